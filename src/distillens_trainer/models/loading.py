"""Loading models and tokenizers from folders, hub ids and GGUF files, as ordinary trainable models; the student's
loading options (:class:`ModelArguments`, :class:`LoraArguments`) that every command shares.

A GGUF file is de-quantised by transformers on load (``from_pretrained(folder, gguf_file=name)``); the model
it returns still carries GGUF quantisation markers, so ``Trainer`` and ``save_pretrained`` refuse it. Its
weights are plain tensors, so dropping the markers (:func:`drop_gguf_quantization`) makes it an ordinary
model that trains and saves as safetensors.

A local GGUF file's config is parsed once per process (:func:`gguf_config`): transformers reads the whole file's
metadata, the tokenizer's vocabulary included, for every config it builds (about 4 s for SmolLM2-135M), and
``from_pretrained`` builds one more unless it is handed the config.
"""

from __future__ import annotations

import copy
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedConfig, PreTrainedModel

from .facts import DTYPE_NAMES, check_dtype_name, torch_dtype

GGUF_INSTALL_HINT = "pip install 'distillens-trainer[gguf]'"
GGUF_SUFFIX = ".gguf"


def split_gguf_path(
    name_or_path: str | None,
    gguf_file: str | None,
    field: str = "model_name_or_path",
    gguf_field: str = "gguf_file",
) -> tuple[str | None, str | None]:
    """``(folder, gguf_file)`` for a model path that names a ``.gguf`` file, else the pair unchanged.

    ``name_or_path="models/x.gguf"`` becomes ``("models", "x.gguf")``, so every loader reads it as the folder and
    the file in it. A ``gguf_file`` given as well must name the same file. ValueError (one line) when the
    ``.gguf`` file does not exist, or when ``gguf_file`` names another one.
    """
    if not name_or_path or not name_or_path.lower().endswith(GGUF_SUFFIX):
        return name_or_path, gguf_file
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return name_or_path, gguf_file  # a folder that happens to end in .gguf
    if not path.is_file():
        raise ValueError(
            f"{field}={name_or_path!r}: no such GGUF file (relative paths resolve from {Path.cwd()}): give the path "
            "of an existing .gguf file, or its folder with --" + gguf_field + "."
        )
    if gguf_file and not _same_file(path, path.parent / gguf_file):
        raise ValueError(
            f"{field}={name_or_path!r} is a GGUF file, and {gguf_field}={gguf_file!r} names another: drop "
            f"--{gguf_field}, or give the folder as --{field}."
        )
    return str(path.parent), path.name


def _same_file(first: Path, second: Path) -> bool:
    """Whether two paths name one existing file."""
    try:
        return first.samefile(second)
    except OSError:
        return False


def check_gguf_source(name_or_path: str, gguf_file: str, field: str) -> None:
    """ValueError (one line) when the ``gguf`` package is missing or a local GGUF file does not exist."""
    if importlib.util.find_spec("gguf") is None:
        raise ValueError(f"{field}={gguf_file!r} needs the gguf package: {GGUF_INSTALL_HINT}.")
    folder = Path(name_or_path)
    if (folder.is_dir() or Path(gguf_file).is_absolute()) and not (folder / gguf_file).is_file():
        raise ValueError(
            f"{field}={gguf_file!r} is not a file in {name_or_path!r}: give the GGUF file's name inside that "
            "folder (or its absolute path)."
        )


# Parsed GGUF configs: (resolved file, its mtime and size, the config's keyword arguments) -> the config.
_GGUF_CONFIGS: dict[tuple[Any, ...], PreTrainedConfig] = {}


def gguf_config(name_or_path: str, gguf_file: str, **kwargs: Any) -> PreTrainedConfig:
    """``AutoConfig.from_pretrained(name_or_path, gguf_file=gguf_file, **kwargs)``, parsed once per process for a
    local file (a changed file is parsed again); each call returns its own copy."""
    kwargs = {"trust_remote_code": False, **kwargs}  # its default, spelled out: one key for both spellings
    path = Path(name_or_path).expanduser() / gguf_file
    if not path.is_file():  # a hub id: nothing to key on
        return AutoConfig.from_pretrained(name_or_path, gguf_file=gguf_file, **kwargs)
    stat = path.stat()
    key = (
        str(path.resolve()),
        stat.st_mtime_ns,
        stat.st_size,
        tuple(sorted((k, repr(v)) for k, v in kwargs.items())),
    )
    if key not in _GGUF_CONFIGS:
        _GGUF_CONFIGS[key] = AutoConfig.from_pretrained(name_or_path, gguf_file=gguf_file, **kwargs)
    return copy.deepcopy(_GGUF_CONFIGS[key])


def is_missing_local_path(name_or_path: str) -> bool:
    """Whether `name_or_path` is meant as a local path that does not exist, rather than a hub id: it is not there
    and starts with ``/``, ``.`` or ``~``, holds a backslash, or is not a valid ``org/name`` hub id."""
    if Path(name_or_path).expanduser().exists():
        return False
    if name_or_path.startswith(("/", ".", "~")) or "\\" in name_or_path:
        return True
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name_or_path)
    except HFValidationError:
        return True
    return False


def check_local_source(name_or_path: str, field: str) -> None:
    """ValueError (one line, at once) for a local model path that does not exist, instead of a hub lookup with
    retries."""
    if is_missing_local_path(name_or_path):
        raise ValueError(
            f"{field}={name_or_path!r}: no such folder (relative paths resolve from {Path.cwd()}): give a saved "
            "model's folder, or a hub id such as 'org/name'."
        )


def is_gguf_model(model: nn.Module) -> bool:
    """Whether ``model`` still carries the GGUF quantisation markers of a GGUF load."""
    quantizer = getattr(model, "hf_quantizer", None)
    method = getattr(getattr(quantizer, "quantization_config", None), "quant_method", None)
    return str(getattr(method, "value", method)) == "gguf"


def drop_gguf_quantization(model: nn.Module) -> nn.Module:
    """Make a GGUF-loaded (already de-quantised) model an ordinary one, in place: trainable and saveable.

    Only the markers go (``hf_quantizer``, ``is_quantized``, ``config.quantization_config``); the weights,
    dtype and tied embeddings are untouched. Any other model is returned as it is.
    """
    if not is_gguf_model(model):
        return model
    model.hf_quantizer = None
    model.is_quantized = False
    model.quantization_method = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model


def load_causal_lm(
    name_or_path: str,
    *,
    gguf_file: str | None = None,
    field: str = "model_name_or_path",
    gguf_field: str = "gguf_file",
    **from_pretrained_kwargs: Any,
) -> PreTrainedModel:
    """A causal LM from a folder or hub id, or from ``gguf_file`` in that folder (de-quantised, plain).

    ``name_or_path`` may also be the ``.gguf`` file itself (:func:`split_gguf_path`). Raises a one-line
    ValueError naming ``field`` (or ``gguf_field``) when it cannot be loaded.
    """
    name_or_path, gguf_file = split_gguf_path(name_or_path, gguf_file, field, gguf_field)
    check_local_source(name_or_path, field)
    if gguf_file:
        check_gguf_source(name_or_path, gguf_file, gguf_field)
        from_pretrained_kwargs["gguf_file"] = gguf_file
    try:
        if gguf_file and "config" not in from_pretrained_kwargs:  # else from_pretrained parses it once more
            trust = {"trust_remote_code": from_pretrained_kwargs.get("trust_remote_code", False)}
            from_pretrained_kwargs["config"] = gguf_config(name_or_path, gguf_file, **trust)
        model = AutoModelForCausalLM.from_pretrained(name_or_path, **from_pretrained_kwargs)
    except OSError as error:
        source = f"{name_or_path!r} with {gguf_field}={gguf_file!r}" if gguf_file else repr(name_or_path)
        raise ValueError(
            f"{field}={source} could not be loaded ({error.__class__.__name__}): give a local model folder "
            "or a hub id reachable from this machine."
        ) from error
    return drop_gguf_quantization(model)


def read_config(
    name_or_path: str | None,
    gguf_file: str | None = None,
    gguf_field: str = "gguf_file",
    *,
    field: str = "model_name_or_path",
    **kwargs: Any,
) -> PreTrainedConfig | None:
    """A model's config without its weights, or None when it cannot be read here (loading the model says why).

    A local path that does not exist is the one-line error of :func:`check_local_source`, naming `field`; a
    missing GGUF file or ``gguf`` package that of :func:`check_gguf_source`, naming `gguf_field`.
    """
    if not name_or_path:
        return None
    name_or_path, gguf_file = split_gguf_path(name_or_path, gguf_file, field, gguf_field)
    check_local_source(name_or_path, field)
    if gguf_file:
        check_gguf_source(name_or_path, gguf_file, gguf_field)
    try:
        if gguf_file:
            return gguf_config(name_or_path, gguf_file, **kwargs)
        return AutoConfig.from_pretrained(name_or_path, **kwargs)
    except (OSError, ValueError, ImportError):
        return None


def load_tokenizer_from(name_or_path: str, gguf_file: str | None = None, **kwargs: Any) -> Any:
    """``AutoTokenizer.from_pretrained`` for a folder / hub id, or the tokenizer stored in a GGUF file (given as
    ``gguf_file`` in that folder, or as ``name_or_path`` itself)."""
    name_or_path, gguf_file = split_gguf_path(name_or_path, gguf_file)
    if gguf_file:
        check_gguf_source(name_or_path, gguf_file, "gguf_file")
        kwargs["gguf_file"] = gguf_file
    return AutoTokenizer.from_pretrained(name_or_path, **kwargs)


# --------------------------------------------------------------------------------------------- the student
@dataclass
class ModelArguments:
    """The student model and how to load it (the teacher is part of ``DistillLensConfig``)."""

    model_name_or_path: str = field(
        metadata={
            "help": "The model (the student for train and lens): a local folder, a hub id, or a .gguf file."
        }
    )
    gguf_file: str | None = field(
        default=None,
        metadata={
            "help": "Load the student from this GGUF file inside model_name_or_path (de-quantised; the "
            "tokenizer too unless tokenizer_name_or_path is given). Needs the gguf extra."
        },
    )
    tokenizer_name_or_path: str | None = field(
        default=None, metadata={"help": "Tokenizer folder or hub id; defaults to model_name_or_path."}
    )
    dtype: str = field(
        default="auto",
        metadata={
            "help": "dtype the model is loaded in (auto = the checkpoint's).",
            "choices": list(DTYPE_NAMES),
        },
    )
    attn_implementation: str | None = field(
        default=None, metadata={"help": "Attention kernel, e.g. sdpa, eager, flash_attention_2."}
    )
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Allow custom modelling code from the hub."}
    )

    def __post_init__(self) -> None:
        check_dtype_name("dtype", self.dtype)
        self.model_name_or_path, self.gguf_file = split_gguf_path(self.model_name_or_path, self.gguf_file)


@dataclass
class LoraArguments:
    """Train a LoRA adapter instead of the whole student (``distillens train``)."""

    use_peft: bool = field(
        default=False, metadata={"help": "Train a LoRA adapter instead of the whole student."}
    )
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha."})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout."})
    lora_target_modules: list[str] | None = field(
        default=None, metadata={"help": "Modules to adapt (default: PEFT's choice for the architecture)."}
    )

    def __post_init__(self) -> None:
        if self.use_peft and self.lora_r < 1:
            raise ValueError(f"lora_r={self.lora_r} must be >= 1.")


def load_student(model_args: ModelArguments, lora_args: LoraArguments | None = None) -> PreTrainedModel:
    """The student causal LM, wrapped with a LoRA adapter when ``lora_args.use_peft``."""
    kwargs: dict[str, Any] = {
        "dtype": torch_dtype(model_args.dtype),
        "trust_remote_code": model_args.trust_remote_code,
    }
    if model_args.attn_implementation:
        kwargs["attn_implementation"] = model_args.attn_implementation
    model = load_causal_lm(model_args.model_name_or_path, gguf_file=model_args.gguf_file, **kwargs)
    if lora_args is not None and lora_args.use_peft:
        try:
            import peft
        except ImportError as error:
            raise ValueError(
                "use_peft needs the peft package: pip install 'distillens-trainer[peft]'."
            ) from error
        lora = peft.LoraConfig(
            r=lora_args.lora_r,
            lora_alpha=lora_args.lora_alpha,
            lora_dropout=lora_args.lora_dropout,
            target_modules=lora_args.lora_target_modules,
            task_type="CAUSAL_LM",
        )
        model = peft.get_peft_model(model, lora)
    return model


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False, gguf_file: str | None = None) -> Any:
    """The tokenizer of a folder, hub id or GGUF file, with its EOS token as the pad token when it has none."""
    try:
        tokenizer = load_tokenizer_from(name_or_path, gguf_file, trust_remote_code=trust_remote_code)
    except OSError as error:
        raise ValueError(
            f"no tokenizer could be loaded from {name_or_path!r}: pass --tokenizer_name_or_path."
        ) from error
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_student_tokenizer(model_args: ModelArguments) -> Any:
    """The student's tokenizer: ``tokenizer_name_or_path``, else the model's folder (or its GGUF file)."""
    return load_tokenizer(
        model_args.tokenizer_name_or_path or model_args.model_name_or_path,
        model_args.trust_remote_code,
        gguf_file=None if model_args.tokenizer_name_or_path else model_args.gguf_file,
    )
