"""On-policy windows: which optimizer windows train on generated completions, and the rows they train on.

An optimizer window (the micro-batches of one optimizer step) is on-policy with probability ``lmbda``. The coin
depends only on the seed and the window's index, so every rank draws the same and a resumed run continues the
same sequence of decisions. On such a window each row's prompt (its real tokens before the first response label)
is completed by the student; the window then trains on prompt + completion, with the prompt and the padding
masked, so every term is a mean over the generated tokens (GKD, arXiv 2306.13649; MiniLLM).

These helpers are pure tensor functions and the window counts logged with each training loss; the trainer
(``DistillLensTrainer.generate_completions``) samples.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, fields

import torch

from ..models.facts import IGNORE_INDEX


def window_is_on_policy(lmbda: float, seed: int, window: int) -> bool:
    """Whether optimizer window ``window`` trains on generated completions: True with probability ``lmbda``.

    The same on every rank and on a resumed run (a function of ``(seed, window)`` only, not of any RNG state).
    """
    if lmbda <= 0.0:
        return False
    if lmbda >= 1.0:
        return True
    return random.Random(f"distillens-on-policy:{seed}:{window}").random() < lmbda


def sampling_seed(seed: int, window: int, rank: int) -> int:
    """The seed a rank samples window ``window``'s completions with: reproducible, and different on every rank (so
    ranks do not draw the same random numbers for their different prompts) and in every window."""
    return random.Random(f"distillens-sampling:{seed}:{window}:{rank}").getrandbits(63)


def has_responses(batch: Mapping[str, torch.Tensor]) -> bool:
    """Whether the batch holds any response token to train on (a ``labels`` entry that is not -100)."""
    labels = batch.get("labels")
    return labels is not None and bool((labels != IGNORE_INDEX).any())


def prompts_of(batch: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
    """The prompt of each row: its real tokens (``attention_mask`` 1) before its first response label.

    ``[B, T]`` ``input_ids`` (``attention_mask``, ``labels`` optional; padding on either side) -> ``B`` tensors
    ``[P_i]``. A row without ``labels`` or without any response token is all prompt (prompt-only data).
    """
    input_ids = batch["input_ids"]
    attention_mask = batch.get("attention_mask")
    labels = batch.get("labels")
    prompts = []
    for row in range(input_ids.shape[0]):
        real = (
            attention_mask[row].bool()
            if attention_mask is not None
            else torch.ones_like(input_ids[row]).bool()
        )
        tokens = input_ids[row][real]
        if labels is not None:
            response = (labels[row][real] != IGNORE_INDEX).nonzero()
            if len(response):
                tokens = tokens[: int(response[0])]
        if tokens.numel() == 0:
            raise ValueError(
                f"row {row} of a training batch has no prompt tokens (its first token is a response label): "
                "on-policy training completes prompts, so give every row a prompt."
            )
        prompts.append(tokens)
    return prompts


def completion_until_eos(generated: torch.Tensor, eos_token_ids: Iterable[int]) -> torch.Tensor:
    """``[N]`` generated tokens -> those up to and including the first EOS token (all of them without one)."""
    is_eos = torch.isin(generated, torch.tensor(sorted(set(eos_token_ids)), device=generated.device))
    found = is_eos.nonzero()
    return generated[: int(found[0]) + 1] if len(found) else generated


def completion_batch(
    prompts: Sequence[torch.Tensor], completions: Sequence[torch.Tensor], pad_token_id: int
) -> dict[str, torch.Tensor]:
    """Rows of prompt + completion, right-padded: ``input_ids``, ``attention_mask`` and ``labels`` ``[B, T]``.

    ``labels`` are the completion tokens (an EOS token included, even when it is also the pad token) and -100 on
    the prompt and the padding, so the response-token count is the number of generated tokens.
    """
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions.")
    length = max(len(prompt) + len(completion) for prompt, completion in zip(prompts, completions))
    device = prompts[0].device
    input_ids = torch.full((len(prompts), length), pad_token_id, dtype=torch.long, device=device)
    attention_mask = torch.zeros((len(prompts), length), dtype=torch.long, device=device)
    labels = torch.full((len(prompts), length), IGNORE_INDEX, dtype=torch.long, device=device)
    for row, (prompt, completion) in enumerate(zip(prompts, completions)):
        end = len(prompt) + len(completion)
        input_ids[row, : len(prompt)] = prompt
        input_ids[row, len(prompt) : end] = completion.to(device)
        attention_mask[row, :end] = 1
        labels[row, len(prompt) : end] = completion.to(device)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


@dataclass
class WindowStats:
    """Counts of the optimizer windows since the last training log, logged beside the loss: the on-policy share,
    the mean completion length and the seconds spent generating per window."""

    windows: int = 0
    on_policy_windows: int = 0
    completions: int = 0
    completion_tokens: int = 0
    generation_seconds: float = 0.0

    def count_window(self, on_policy: bool) -> None:
        self.windows += 1
        self.on_policy_windows += int(on_policy)

    def count_completions(
        self, prompts: Sequence[torch.Tensor], batches: Sequence[Mapping[str, torch.Tensor]], seconds: float
    ) -> None:
        """Adds a window's generated rows: ``prompts`` ``[P_i]`` and the ``completion_batch`` rows built from them."""
        self.completions += len(prompts)
        real_tokens = sum(int(batch["attention_mask"].sum()) for batch in batches)
        self.completion_tokens += real_tokens - sum(len(prompt) for prompt in prompts)
        self.generation_seconds += seconds

    def pop(self) -> dict[str, float]:
        """The logs since the last call (nothing when no window was counted), and the counts cleared."""
        if not self.windows:
            return {}
        logs = {"on_policy_fraction": self.on_policy_windows / self.windows}
        if self.completions:
            logs["completion_length"] = self.completion_tokens / self.completions
            logs["generation_seconds_per_window"] = self.generation_seconds / self.windows
        self.clear()
        return logs

    def clear(self) -> None:
        for count in fields(self):
            setattr(self, count.name, count.default)
