"""The frozen teacher: resolved, loaded and frozen (the one way), its dtype, and vocabulary compatibility with
the student."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from transformers import PreTrainedModel

from ..models.facts import DTYPES, freeze, model_vocab_size
from ..models.loading import load_causal_lm, load_tokenizer_from, read_config

if TYPE_CHECKING:
    from ..config import DistillLensConfig

logger = logging.getLogger(__name__)


def resolve_teacher_dtype(
    teacher_dtype: str, *, bf16: bool = False, fp16: bool = False
) -> torch.dtype | None:
    """The teacher's dtype; None keeps the checkpoint's (or the given model's) own dtype."""
    if teacher_dtype != "auto":
        return DTYPES[teacher_dtype]
    if bf16:
        return torch.bfloat16
    if fp16:
        return torch.float16
    return None


def load_teacher(
    name_or_path: str,
    dtype: torch.dtype | None = None,
    gguf_file: str | None = None,
    **from_pretrained_kwargs: Any,
) -> PreTrainedModel:
    """Load a causal LM teacher from a local folder, a hub id, or a GGUF file in that folder, in ``dtype``
    (None: the checkpoint's)."""
    return load_causal_lm(
        name_or_path,
        gguf_file=gguf_file,
        field="teacher_model_name_or_path",
        gguf_field="teacher_gguf_file",
        dtype=dtype if dtype is not None else "auto",
        **from_pretrained_kwargs,
    )


def load_frozen_teacher(
    name_or_path: str,
    dtype: torch.dtype | None = None,
    *,
    gguf_file: str | None = None,
    device: torch.device | str | None = None,
    **from_pretrained_kwargs: Any,
) -> PreTrainedModel:
    """The teacher as every command gets it: loaded (:func:`load_teacher`, in ``dtype``; None: the checkpoint's),
    frozen (eval mode, no gradients) and, when ``device`` is given, moved there. The trainer then places it for
    the run (:func:`~distillens_trainer.teacher.placement.prepare_teacher`, which freezes a given model too)."""
    teacher = freeze(load_teacher(name_or_path, dtype, gguf_file=gguf_file, **from_pretrained_kwargs))
    return teacher.to(device) if device is not None else teacher


def read_teacher_config(name_or_path: str | None, gguf_file: str | None = None, **kwargs: Any) -> Any | None:
    """The teacher's config without its weights (None when it cannot be read here), errors naming the teacher's
    fields."""
    return read_config(
        name_or_path, gguf_file, gguf_field="teacher_gguf_file", field="teacher_model_name_or_path", **kwargs
    )


def load_teacher_tokenizer(name_or_path: str, gguf_file: str | None = None) -> Any | None:
    """The tokenizer saved with the teacher (or in its GGUF file), or None when there is none."""
    try:
        return load_tokenizer_from(name_or_path, gguf_file)
    except (OSError, ValueError, TypeError):
        return None


def resolve_teacher(
    args: DistillLensConfig, teacher_model: Any, teacher_processing_class: Any, *, needs_teacher: bool
) -> tuple[nn.Module | None, Any]:
    """The teacher model (None when the objective needs none) and its processing class.

    ``teacher_model`` may be a model, None (then ``args.teacher_model_name_or_path``) or a folder / hub id,
    loaded in ``args.teacher_dtype`` with its tokenizer when ``teacher_processing_class`` is None.
    """
    if not needs_teacher:
        if teacher_model is not None or args.teacher_model_name_or_path:
            logger.warning("kd_weight and lens_weight are 0 (plain SFT): the teacher is not used.")
        return None, teacher_processing_class
    teacher_model = teacher_model if teacher_model is not None else args.teacher_model_name_or_path
    if teacher_model is None:
        raise ValueError(
            f"kd_weight={args.kd_weight} and lens_weight={args.lens_weight} need a teacher: pass teacher_model=... "
            "or set teacher_model_name_or_path (for plain SFT: ce_weight=1, kd_weight=0, lens_weight=0)."
        )
    if isinstance(teacher_model, str):
        path = teacher_model
        teacher_model = load_frozen_teacher(
            path,
            resolve_teacher_dtype(args.teacher_dtype, bf16=args.bf16, fp16=args.fp16),
            gguf_file=args.teacher_gguf_file,
        )
        if teacher_processing_class is None:
            teacher_processing_class = load_teacher_tokenizer(path, args.teacher_gguf_file)
    if not isinstance(teacher_model, nn.Module):
        raise ValueError(
            f"teacher_model is a {type(teacher_model).__name__}: pass a model, a folder or a hub id."
        )
    return teacher_model, teacher_processing_class


def _first_vocab_difference(student_vocab: dict[str, int], teacher_vocab: dict[str, int]) -> str:
    for token, index in sorted(student_vocab.items(), key=lambda item: item[1]):
        if teacher_vocab.get(token) != index:
            return f"token {token!r} is id {index} for the student and {teacher_vocab.get(token)} for the teacher"
    for token, index in teacher_vocab.items():
        if token not in student_vocab:
            return f"token {token!r} (id {index}) exists only in the teacher's vocabulary"
    return "the vocabularies differ"


def has_vocabulary(tokenizer: Any) -> bool:
    """False for a tokenizer holding only special tokens: what ``AutoTokenizer`` builds for a model folder
    without tokenizer files (GPT-2, Qwen2: a lone ``<|endoftext|>``)."""
    special = set(getattr(tokenizer, "all_special_tokens", ()))
    return any(token not in special for token in tokenizer.get_vocab())


def shared_vocab_size(
    student: nn.Module,
    teacher: nn.Module,
    student_tokenizer: Any | None = None,
    teacher_tokenizer: Any | None = None,
) -> int:
    """Logit columns that student and teacher share: the real vocabulary, without either model's padding
    (see :func:`shared_vocab_size_of_rows`)."""
    return shared_vocab_size_of_rows(
        model_vocab_size(student), model_vocab_size(teacher), student_tokenizer, teacher_tokenizer
    )


def shared_vocab_size_of_rows(
    student_rows: int,
    teacher_rows: int,
    student_tokenizer: Any | None = None,
    teacher_tokenizer: Any | None = None,
) -> int:
    """Logit columns that student and teacher share, from their LM heads' rows: the real vocabulary.

    Qwen-style checkpoints pad the LM head differently (151936 vs 152064 rows) around one tokenizer;
    only the tokenizer's ``len()`` columns are real. Different tokenizers are an error. A teacher tokenizer
    without a vocabulary (a teacher folder without tokenizer files) is ignored with a note: then only the
    vocabulary sizes are checked.
    """
    if teacher_tokenizer is not None and not has_vocabulary(teacher_tokenizer):
        logger.warning(
            "The teacher's tokenizer holds no vocabulary (its folder has no tokenizer files?): checking only that "
            "the student's tokenizer fits the teacher's %d logits, not that the two tokenizers are the same.",
            teacher_rows,
        )
        teacher_tokenizer = None
    if student_tokenizer is not None and teacher_tokenizer is not None:
        student_vocab, teacher_vocab = student_tokenizer.get_vocab(), teacher_tokenizer.get_vocab()
        if student_vocab != teacher_vocab:
            raise ValueError(
                "student and teacher use different tokenizers ("
                + _first_vocab_difference(student_vocab, teacher_vocab)
                + "): DistillLens compares next-token distributions id by id, so pick a teacher from the student's "
                "model family (same tokenizer)."
            )
    real_vocab = len(student_tokenizer) if student_tokenizer is not None else None
    shared = min(student_rows, teacher_rows)
    if real_vocab is not None:
        if real_vocab > shared:
            smaller = "student" if student_rows == shared else "teacher"
            raise ValueError(
                f"the tokenizer has {real_vocab} tokens but the {smaller} has only {shared} logits: the two models "
                "do not share this tokenizer; pick a teacher from the student's model family."
            )
        shared = real_vocab
    if student_rows != teacher_rows:
        logger.info(
            "student (%d logits) and teacher (%d logits) pad their vocabularies differently; comparing the "
            "shared %d columns.",
            student_rows,
            teacher_rows,
            shared,
        )
    return shared
