"""Swap your Trainer: turn a ``transformers.Trainer`` fine-tuning script into DistillLens distillation.

Only two names change and one argument is added:

- ``TrainingArguments(...)`` becomes ``DistillLensConfig(...)`` (every TrainingArguments field still works,
  plus the ``kd_*`` / ``lens_*`` fields of the objective);
- ``Trainer(...)`` becomes ``DistillLensTrainer(..., teacher_model=teacher)``.

This version runs offline on the CPU in about 20 seconds: the data is the library's procedural task suite, the
tokenizer is trained on it, and teacher and student are tiny random Llama models, so the answers printed at the
end are not good. With real models replace ``tiny_llama(...)`` by
``AutoModelForCausalLM.from_pretrained(...)`` and the suite tokenizer by ``AutoTokenizer.from_pretrained(...)``.

    PYTHONPATH=src python examples/swap_your_trainer.py
"""

from __future__ import annotations

import tempfile

import datasets
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

from distillens_demo.data.suite import format_example, generate_examples, train_suite_tokenizer
from distillens_trainer import DistillLensConfig, DistillLensTrainer
from distillens_trainer.data import (
    DataCollatorForCompletionOnly,
    format_alpaca_prompt,
    tokenize_prompt_completion,
)

TASKS = ["copy_text", "compare_numbers", "letter_facts"]


def tiny_llama(tokenizer, num_layers: int, hidden_size: int, seed: int) -> LlamaForCausalLM:
    """A small random Llama sharing `tokenizer`'s vocabulary (stands in for a pretrained checkpoint)."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(config)


def build_train_dataset(tokenizer, examples: list[dict[str, str]]) -> datasets.Dataset:
    """Alpaca prompt + answer -> input_ids / attention_mask / labels (-100 over the prompt)."""
    rows = [
        {"prompt": format_alpaca_prompt(ex["instruction"], ex["input"]), "completion": ex["output"]}
        for ex in examples
    ]
    train_dataset, _ = tokenize_prompt_completion(
        datasets.Dataset.from_list(rows), tokenizer, max_length=128, max_prompt_length=96
    )
    return train_dataset


@torch.no_grad()
def answer(model, tokenizer, example: dict[str, str]) -> str:
    """Greedy answer of `model` to one example, decoded without the prompt."""
    model.eval()
    inputs = tokenizer(format_alpaca_prompt(example["instruction"], example["input"]), return_tensors="pt")
    output = model.generate(
        **inputs.to(model.device), max_new_tokens=16, do_sample=False, pad_token_id=tokenizer.pad_token_id
    )
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


def main() -> None:
    datasets.disable_progress_bars()
    output_dir = tempfile.mkdtemp(prefix="distillens-swap-")
    examples = generate_examples(512, seed=0, tasks=TASKS)
    tokenizer = train_suite_tokenizer(format_example(ex) for ex in examples)
    train_dataset = build_train_dataset(tokenizer, examples)
    collator = DataCollatorForCompletionOnly(tokenizer=tokenizer)
    common = dict(
        per_device_train_batch_size=16,
        learning_rate=5e-3,
        lr_scheduler_type="cosine",
        warmup_steps=4,
        max_steps=30,
        logging_steps=10,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )

    # Before: plain supervised fine-tuning with transformers.Trainer (here it makes the teacher).
    teacher = tiny_llama(tokenizer, num_layers=6, hidden_size=64, seed=0)
    sft = Trainer(
        model=teacher,
        args=TrainingArguments(output_dir=f"{output_dir}/teacher", **common),
        train_dataset=train_dataset,
        data_collator=collator,
        processing_class=tokenizer,
    )
    sft.train()

    # After: the same call with DistillLensConfig, DistillLensTrainer and a teacher.
    student = tiny_llama(tokenizer, num_layers=3, hidden_size=48, seed=1)
    args = DistillLensConfig(
        output_dir=f"{output_dir}/student",
        **common,
        kd_weight=1.0,  # reverse KL between final logits (the paper's default)
        kd_divergence="rkl",
        lens_weight=1.0,  # Jensen-Shannon through the logit lens on mapped intermediate layers
        lens_divergence="jsd",
        lens_num_layers=2,  # the paper uses 5; this 3-layer student has room for 2
    )
    trainer = DistillLensTrainer(
        model=student,
        teacher_model=teacher,
        args=args,
        train_dataset=train_dataset,
        data_collator=collator,
        processing_class=tokenizer,
    )
    trainer.train()

    print(f"layer pairs (student, teacher): {trainer.layer_map}")
    for log in trainer.state.log_history:
        if "lens_loss" in log:
            pairs = "  ".join(f"{key}={value:.4f}" for key, value in log.items() if key.startswith("lens/"))
            print(
                f"step {log['step']:>3}  loss={log['loss']:.4f}  kd_loss={log['kd_loss']:.4f}  "
                f"lens_loss={log['lens_loss']:.4f}  {pairs}"
            )
    example = generate_examples(1, seed=123, tasks=TASKS)[0]
    print(f"question: {example['instruction']} {example['input']!r}  reference: {example['output']!r}")
    print(
        f"teacher: {answer(teacher, tokenizer, example)!r}  student: {answer(student, tokenizer, example)!r}"
    )


if __name__ == "__main__":
    main()
