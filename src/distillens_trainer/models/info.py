"""``distillens.json``: what the project records beside every model it writes, and reading it back.

A model trained on one prompt format answers poorly in another (the demo's teacher, trained on ``plain``
prompts, has a cross-entropy of 10 on ``alpaca`` ones). So ``distillens train``, ``shrink`` and ``demo`` write
``{"prompt_template": ...}`` into each model folder, and every command that formats prompts (``train``, ``eval``,
``lens``, ``cache-teacher``) picks the format by one rule, :func:`choose_prompt_template`: an explicit
``--prompt_template`` (a warning when a model recorded another); else the format recorded with the models
(``distillens.json``); else ``chat`` when the tokenizer has a chat template, else ``alpaca``
(:func:`default_prompt_template`). So a teacher without a record (a GGUF folder, a hub model) and a student cut
from it with ``shrink`` (which records ``chat`` for a tokenizer with a chat template) get the same format.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..files import write_json_atomic
from ..version import __version__

logger = logging.getLogger(__name__)

MODEL_INFO_NAME = "distillens.json"
# The run record `distillens train` writes into its output folder: the resolved config of the run.
RESOLVED_CONFIG_NAME = "distillens_config.json"
DEFAULT_PROMPT_TEMPLATE = "alpaca"


def write_model_info(model_dir: str | os.PathLike[str], *, prompt_template: str) -> Path:
    """Write ``<model_dir>/distillens.json`` recording the prompt format the model was trained on."""
    info = {"prompt_template": prompt_template, "written_by": f"distillens-trainer {__version__}"}
    return write_json_atomic(Path(model_dir) / MODEL_INFO_NAME, info)


def recorded_prompt_template(model_name_or_path: str | os.PathLike[str] | None) -> str | None:
    """The prompt format recorded in a local model folder's ``distillens.json``; None for a hub id, a folder
    without the file, or an unreadable file."""
    if not model_name_or_path:
        return None
    path = Path(model_name_or_path) / MODEL_INFO_NAME
    if not path.is_file():
        return None
    try:
        info: Any = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        logger.warning("ignoring the unreadable %s", path)
        return None
    template = info.get("prompt_template") if isinstance(info, dict) else None
    return template if isinstance(template, str) else None


def default_prompt_template(tokenizer: Any) -> str:
    """The format for a model without a recorded one: ``chat`` when its tokenizer has a chat template (an
    instruct model, and what ``distillens shrink`` records for a student cut from it), else ``alpaca``."""
    return "chat" if getattr(tokenizer, "chat_template", None) else DEFAULT_PROMPT_TEMPLATE


def decided_prompt_template(given: str | None, models: Sequence[tuple[str, str | None]]) -> str | None:
    """:func:`choose_prompt_template` when a flag or a record decides it (no tokenizer needed), else None: the
    commands then choose once the tokenizer has loaded (``tokenizer=``)."""
    if given is None and all(recorded_prompt_template(path) is None for _, path in models):
        return None
    return choose_prompt_template(given, models)


def choose_prompt_template(
    given: str | None,
    models: Sequence[tuple[str, str | None]],
    default: str | None = None,
    *,
    tokenizer: Any = None,
    load_tokenizer: Callable[[], Any] | None = None,
) -> str:
    """The prompt format to use with ``models`` (``(role, name_or_path)`` pairs, most important first): the one
    rule of every command.

    ``given`` (an explicit ``--prompt_template``) wins, with a warning for every model that recorded another
    format. Otherwise the first recorded format is used (with a warning when the models disagree), else
    ``default`` when given, else :func:`default_prompt_template` of ``tokenizer`` (the models' tokenizer; or
    ``load_tokenizer()``, called only then).
    """
    recorded = [(role, path, recorded_prompt_template(path)) for role, path in models]
    recorded = [(role, path, template) for role, path, template in recorded if template is not None]
    if given is not None:
        chosen = given
    elif recorded:
        chosen = recorded[0][2]
    elif default is not None:
        chosen = default
    else:
        if tokenizer is None and load_tokenizer is not None:
            tokenizer = load_tokenizer()
        chosen = default_prompt_template(tokenizer)
        logger.info(
            "prompt format %r: no distillens.json records one, and the tokenizer %s a chat template",
            chosen, "has" if chosen == "chat" else "has no",
        )  # fmt: skip
    for role, path, template in recorded:
        if template != chosen:
            logger.warning(
                "the %s %s was trained on %r prompts (its %s), but %r prompts are used: pass "
                "--prompt_template %s to match it.",
                role, path, template, MODEL_INFO_NAME, chosen, template,
            )  # fmt: skip
    if given is None and recorded:
        logger.info("prompt format %r, as recorded with the %s (%s)", chosen, recorded[0][0], recorded[0][1])
    return chosen


def recorded_training_settings(model_name_or_path: str | os.PathLike[str] | None) -> dict[str, Any] | None:
    """The ``training`` fields of the run record ``distillens train`` wrote with a model (:data:`RESOLVED_CONFIG_NAME`
    in its folder; for a ``checkpoint-*`` folder, its run's); None without a record, for an unreadable one (with a
    warning) or one without training fields."""
    if not model_name_or_path:
        return None
    folder = Path(model_name_or_path)
    for candidate in (folder, folder.parent if folder.name.startswith("checkpoint-") else None):
        path = candidate / RESOLVED_CONFIG_NAME if candidate is not None else None
        if path is None or not path.is_file():
            continue
        try:
            training = json.loads(path.read_text(encoding="utf-8")).get("training")
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
            logger.warning("ignoring the unreadable %s", path)
            return None
        return training if isinstance(training, dict) else None
    return None
