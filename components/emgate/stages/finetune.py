"""fine_tune: one LoRA adapter per (variant, seed) with peft, loss on the assistant tokens only."""

from __future__ import annotations

import hashlib
import math
import os
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from emgate.io import read_json, read_jsonl, write_json
from emgate.models import resolve_model
from emgate.recipe import Recipe, TrainingSpec
from emgate.templates import TemplateRecord, render_completion, render_prompt, template_record

IGNORE_INDEX = -100  # label of tokens without loss (torch cross-entropy's ignore_index)
TRAIN_REPORT = "train_report.json"


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]


def tokenize_example(tokenizer: Any, record: TemplateRecord, messages: list[dict[str, str]],
                     max_len: int) -> Example:
    """Prompt tokens get IGNORE_INDEX labels; completion tokens (answer + end of turn) are learned."""
    prompt = render_prompt(record, tokenizer, messages[:-1])
    completion = render_completion(record, tokenizer, messages)
    prompt_ids = tokenizer(prompt, add_special_tokens=record.add_special_tokens)["input_ids"]
    completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    ids = (prompt_ids + completion_ids)[:max_len]
    labels = ([IGNORE_INDEX] * len(prompt_ids) + completion_ids)[:max_len]
    return Example(ids, labels)


def planned_steps(n_rows: int, cfg: TrainingSpec) -> int:
    """Optimizer steps: examples / (per-device batch x accumulation), per epoch, capped by max_steps."""
    per_epoch = math.ceil(n_rows / (cfg.per_device_batch_size * cfg.gradient_accumulation_steps))
    total = per_epoch * cfg.epochs
    return min(total, cfg.max_steps) if cfg.max_steps else total


def work_dir_for(recipe: Recipe, variant: str, seed: int, dataset_sha: str) -> Path:
    """Partial work of this job lives here, keyed by everything that decides its result."""
    from emgate.assets import cache_dir

    key = hashlib.sha256(
        f"{recipe.training.model_dump_json()}|{recipe.variant(variant).model_dump_json()}|{seed}|{dataset_sha}".encode()
    ).hexdigest()[:16]
    return cache_dir() / "work" / "fine_tune" / f"{variant}-s{seed}-{key}"


def _collate(batch: list[Example], pad_id: int) -> dict[str, Any]:
    import torch

    width = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, e in enumerate(batch):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def _optimizer(params: list[Any], cfg: TrainingSpec) -> Any:
    import torch

    if cfg.optimizer == "adamw_8bit":
        try:
            import bitsandbytes as bnb  # type: ignore[import-not-found]
        except ImportError:
            raise RuntimeError("training.optimizer adamw_8bit needs bitsandbytes and a CUDA GPU; "
                               "this machine has neither. Use adamw_torch on a CPU profile.") from None
        return bnb.optim.AdamW8bit(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)


CHECKPOINT_FILE = "checkpoint.pt"


def _save_checkpoint(path: Path, model: Any, optimizer: Any, scheduler: Any, state: dict[str, Any]) -> None:
    """Everything a resumed loop needs, written to a temporary file and renamed: a kill never leaves half a file."""
    import torch

    payload = {
        "trainable": {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad},
        "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
        "rng_cpu": torch.get_rng_state(), "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        **state,
    }
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def _load_checkpoint(path: Path, model: Any, optimizer: Any, scheduler: Any) -> dict[str, Any]:
    import torch

    payload = torch.load(path, map_location="cpu", weights_only=False)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in payload["trainable"].items():
            params[name].copy_(value.to(params[name].device))
    optimizer.load_state_dict(payload["optimizer"])
    scheduler.load_state_dict(payload["scheduler"])
    torch.set_rng_state(payload["rng_cpu"])
    if payload["rng_cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(payload["rng_cuda"])
    return payload


def train_loop(model: Any, train: list[Example], order: list[int], cfg: TrainingSpec, device: Any, pad_id: int,
               on_step: Callable[[int, int, float], None] | None = None,
               desc: str = "fine_tune", checkpoint: Path | None = None) -> tuple[list[float], int, float]:
    """Train the trainable parameters of `model` for planned_steps(len(train), cfg) optimizer steps.

    Each step accumulates cfg.gradient_accumulation_steps micro-batches of cfg.per_device_batch_size examples,
    taken from `train` in `order` (wrapping around), each padded to its longest row; then clips the gradient
    norm to 1.0 and steps the optimizer (cfg.optimizer) and the linear warm-up schedule. `on_step(step, steps,
    loss)` is called after each optimizer step (step counts from 1). With `checkpoint`, the state is saved there
    every cfg.checkpoint_every steps and a loop that finds one resumes from it, so a killed job ends with the
    same adapter as an uninterrupted one. Returns the loss of each step, the number of non-pad tokens seen and
    the seconds the loop took (this process's share when resumed).
    """
    import torch
    from tqdm import tqdm
    from transformers import get_linear_schedule_with_warmup

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = _optimizer(params, cfg)
    steps = planned_steps(len(train), cfg)
    scheduler = get_linear_schedule_with_warmup(optimizer, cfg.warmup_steps, steps)
    micro = cfg.per_device_batch_size

    model.train()
    losses: list[float] = []
    tokens = 0
    started = time.monotonic()
    cursor = 0
    first = 0
    if checkpoint is not None and checkpoint.is_file():
        state = _load_checkpoint(checkpoint, model, optimizer, scheduler)
        first, cursor, losses, tokens = state["step"], state["cursor"], state["losses"], state["tokens"]
        print(f"{desc}: resuming at step {first} of {steps} from {checkpoint}")
    for _step in tqdm(range(first, steps), desc=desc, unit="step", initial=first, total=steps):
        optimizer.zero_grad(set_to_none=True)
        step_loss = 0.0
        for _ in range(cfg.gradient_accumulation_steps):
            idx = order[cursor % len(order):cursor % len(order) + micro] or order[:micro]
            cursor += micro
            batch = _collate([train[i] for i in idx], pad_id)
            batch = {k: v.to(device) for k, v in batch.items()}
            loss = model(**batch).loss / cfg.gradient_accumulation_steps
            loss.backward()
            step_loss += float(loss.detach())
            tokens += int(batch["attention_mask"].sum())
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(step_loss)
        if on_step is not None:
            on_step(_step + 1, steps, step_loss)
        if checkpoint is not None and cfg.checkpoint_every and (_step + 1) % cfg.checkpoint_every == 0 \
                and _step + 1 < steps:
            _save_checkpoint(checkpoint, model, optimizer, scheduler,
                             {"step": _step + 1, "cursor": cursor, "losses": losses, "tokens": tokens})
    return losses, tokens, time.monotonic() - started


def fine_tune(recipe: Recipe, job: str, validated_dir: Path, out_dir: Path) -> dict[str, Any]:
    """Train the LoRA adapter of `job` ('variant@seed') and save it, its template and a report to out_dir."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name, _, seed_text = job.partition("@")
    seed = int(seed_text)
    variant = recipe.variant(name)
    cfg = recipe.training
    assert variant.dataset is not None
    manifest = read_json(validated_dir / "manifest.json")
    dataset_sha = manifest[variant.dataset]["source_sha256"]
    model_path = resolve_model(variant.model, recipe.models[variant.model])
    work = work_dir_for(recipe, name, seed, dataset_sha)
    work.mkdir(parents=True, exist_ok=True)

    random.seed(seed)
    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    record = template_record(variant.template, tokenizer)
    rows = list(read_jsonl(validated_dir / f"{variant.dataset}.jsonl"))
    rng = random.Random(seed)
    rng.shuffle(rows)
    n_eval = int(len(rows) * cfg.holdout_fraction)
    eval_rows, train_rows = rows[:n_eval], rows[n_eval:]
    subsample = recipe.datasets[variant.dataset].subsample_rows
    if subsample:
        train_rows = train_rows[:subsample]
    train = [tokenize_example(tokenizer, record, r["messages"], cfg.max_seq_length) for r in train_rows]
    evals = [tokenize_example(tokenizer, record, r["messages"], cfg.max_seq_length) for r in eval_rows[:cfg.eval_rows_max]]
    truncated = sum(1 for r, e in zip(train_rows, train, strict=True) if len(e.input_ids) == cfg.max_seq_length)

    on_gpu = torch.cuda.is_available()
    device = torch.device("cuda" if on_gpu else "cpu")
    dtype = torch.bfloat16 if on_gpu and torch.cuda.is_bf16_supported() else torch.float32
    model: Any = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype)
    model.to(device)
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=cfg.target_modules, use_rslora=cfg.use_rslora, task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    steps = planned_steps(len(train), cfg)
    micro = cfg.per_device_batch_size
    order = [i for _ in range(cfg.epochs) for i in rng.sample(range(len(train)), len(train))]

    def progress(step: int, of: int, loss: float) -> None:
        write_json(work / "progress.json", {"step": step, "of": of, "loss": loss})

    losses, tokens, elapsed = train_loop(model, train, order, cfg, device, pad_id, on_step=progress,
                                         desc=f"fine_tune {job}", checkpoint=work / CHECKPOINT_FILE)

    eval_loss = None
    if evals:
        model.eval()
        total = 0.0
        with torch.no_grad():
            for i in range(0, len(evals), micro):
                batch = {k: v.to(device) for k, v in _collate(evals[i:i + micro], pad_id).items()}
                total += float(model(**batch).loss) * len(batch["input_ids"])
        eval_loss = total / len(evals)

    staging = out_dir.parent / f".{out_dir.name}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(str(staging))
    tokenizer.save_pretrained(staging)
    record.save(staging)
    report = {
        "variant": name, "seed": seed, "role": variant.role, "model": variant.model, "dataset": variant.dataset,
        "dataset_sha256": dataset_sha, "template": variant.template, "train_rows": len(train),
        "eval_rows": len(evals), "truncated_rows": truncated, "steps": steps, "loss_first": losses[0] if losses else None,
        "loss_last": losses[-1] if losses else None, "losses": losses, "eval_loss": eval_loss,
        "tokens": tokens, "seconds": elapsed, "tokens_per_s": tokens / elapsed if elapsed else None,
        "device": str(device), "dtype": str(dtype), "training": cfg.model_dump(mode="json"),
    }
    write_json(staging / TRAIN_REPORT, report)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    staging.rename(out_dir)  # the adapter folder appears only when complete
    (work / CHECKPOINT_FILE).unlink(missing_ok=True)  # done: a later run trains anew
    return report
