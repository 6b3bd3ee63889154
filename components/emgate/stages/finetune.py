"""fine_tune: one LoRA adapter (or full fine-tune) per (variant, seed), loss on the assistant tokens only.

One entry point for one process and for several: under `accelerate launch` (DDP or FSDP, training.gpus GPUs) the
micro-batches of each optimizer step are split between the processes (each packs its rows), so a step still sees
per_device_batch_size x gradient_accumulation_steps examples and the run takes the same number of steps.
Run it as `python -m emgate.stages.finetune --help`.
"""

from __future__ import annotations

import hashlib
import math
import os
import random
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from emgate.contract import (
    MANIFEST_FILE,
    has_train_report,
    read_manifest,
    read_train_report,
    validated_dataset,
    write_train_report,
)
from emgate.io import read_json, read_jsonl, write_json
from emgate.merge import merge_adapter_folder
from emgate.models import resolve_model
from emgate.packing import (
    ROW_ATTENTION,
    VARLEN_ATTENTION,
    Pack,
    attention_implementation,
    base_model,
    builds_packed_masks,
    choose_attention,
    collate_pack,
    keeps_logits,
    liger_cross_entropy,
    pack_loss,
    pack_rows,
    sliding_window,
    split_packs,
    to_device,
)
from emgate.recipe import ModelSpec, Recipe, TrainingSpec, VariantSpec
from emgate.templates import IGNORE_INDEX, Example, TemplateRecord, template_record, tokenize_example

RECIPE_SLICE = "recipe_slice.json"  # the parts of the recipe this job used, saved with the adapter
# Dense bf16 peak of common training GPUs, TFLOP/s (vendor data sheets, SXM where there are two forms); the MFU
# denominator. EMGATE_PEAK_TFLOPS overrides it; an unknown GPU gets no MFU rather than a guessed one.
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10G": 125.0}


class TrainingError(RuntimeError):
    """A fine-tuning job that cannot run as asked: names the cause and the fix."""


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
CHECKPOINT_STATE = "checkpoint.json"  # step and tokens of the checkpoint, readable without loading it


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
    write_json(path.with_name(CHECKPOINT_STATE), {"step": state["step"], "tokens": state["tokens"]})
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


def training_flops(n_linear: int, n_trained: int, n_layers: int, hidden: int, row_lengths: list[int],
                   full: bool) -> float:
    """Model FLOPs of one pass over rows of these lengths (forward and backward), the MFU numerator.

    LoRA:  4 N_linear per token (forward 2N, backward through the activations 2N: the frozen weights get no weight
           gradient) + 6 N_adapter per token (the adapters: forward, activation and weight gradients);
    full:  6 N_linear per token;
    both:  + 12 n_layers hidden len^2 per row of len tokens (attention scores and values, forward + backward;
           PaLM's count, no saving from the causal mask).
    N_linear counts every nn.Linear weight of the base model, lm_head included (the embedding is a lookup).
    """
    tokens = sum(row_lengths)
    attention = 12 * n_layers * hidden * sum(n * n for n in row_lengths)
    if full:
        return 6 * n_linear * tokens + attention
    return 4 * n_linear * tokens + 6 * n_trained * tokens + attention


# The weights are what they are; everything else the formula counts (optimizer state, activations, logits) is scaled
# by what the GPU runs there are measured (bench/README.md, finetune_gpu, one H100, LoRA, bf16, checkpointing on,
# padded micro-batches of at most 1,480 tokens): measured peak less the weights over estimate less the weights,
# Qwen2.5-7B shape (31.0 - 14.2) / (18.3 - 14.2) = 4.1, 0.5B shape (6.7 - 0.9) / (3.5 - 0.9) = 2.2; the larger is
# kept. What the formula leaves out (the allocator's blocks, the optimizer's temporaries, the loss's extra copies of
# the logits) is assumed to scale with it: two points, one loop, a rough and cautious fit.
MEMORY_CALIBRATION = 4.1
GPU_MEMORY_SHARE = 0.85  # of the GPU's memory a run without checkpointing may be estimated to fill: CUDA context, slack


@dataclass(frozen=True)
class MemoryShape:
    """What training memory depends on: the model's shape and the tokens of one forward pass."""

    hidden: int
    intermediate: int
    layers: int
    kv_dim: int  # key/value heads x head dimension
    vocab: int
    n_params: int  # every weight of the base model
    n_trained: int  # trainable parameters (the adapters; every weight for a full fine-tune)
    lora_r: int | None  # None: a full fine-tune
    tokens: int  # of the largest forward pass
    param_bytes: int  # 2 for bf16 weights, 4 for float32
    shards: int = 1  # FSDP processes sharing the weights and optimizer state


def estimate_training_memory_gib(shape: MemoryShape, checkpointing: bool) -> float:
    """Peak training memory per process, GiB, before MEMORY_CALIBRATION:

    weights    n_params x param_bytes / shards
    state      LoRA: n_trained x 16 (float32 adapter, gradient, two AdamW moments);
               full: n_params x 3 x param_bytes / shards (gradient and two moments in the weights' dtype)
    layers     bytes one decoder layer keeps for the backward pass per token: in 16-bit, 12 hidden (norm inputs,
               q/k/v and attention inputs and output, residuals) + 4 kv_dim (k, v) + 8 intermediate (gate, up, their
               SiLU product, the down projection's input), scaled by param_bytes / 2; with LoRA on 16-bit weights, the
               adapters' float32 copies of their inputs, 4 x (6 hidden + intermediate), and their rank-r
               activations, 7 x 4 r; checkpointing keeps only each layer's input (hidden x param_bytes) and one
               layer's activations while it is recomputed
    logits     tokens x vocab x (param_bytes + 8): the LM head's output, its float32 copy and the cross-entropy's
               gradient (an upper bound: the packed loop computes them only where a learned token is predicted)
    """
    h, i, r = shape.hidden, shape.intermediate, shape.lora_r
    layer = (12 * h + 4 * shape.kv_dim + 8 * i) * shape.param_bytes / 2
    if r is not None and shape.param_bytes < 4:
        layer += 4 * (6 * h + i) + 7 * 4 * r
    per_token = shape.layers * h * shape.param_bytes + layer if checkpointing else shape.layers * layer
    weights = shape.n_params * shape.param_bytes / shape.shards
    state = shape.n_trained * 16 if r is not None else 3 * shape.n_params * shape.param_bytes / shape.shards
    logits = shape.tokens * shape.vocab * (shape.param_bytes + 8)
    return (weights + state + shape.tokens * per_token + logits) / 2**30


def calibrated_memory_gib(shape: MemoryShape, checkpointing: bool) -> float:
    """estimate_training_memory_gib with everything but the weights scaled by MEMORY_CALIBRATION."""
    weights = shape.n_params * shape.param_bytes / shape.shards / 2**30
    return weights + (estimate_training_memory_gib(shape, checkpointing) - weights) * MEMORY_CALIBRATION


def checkpointing_plan(shape: MemoryShape, setting: bool | str, gpu_gib: float | None) -> dict[str, Any]:
    """Whether to checkpoint activations (training.gradient_checkpointing: true, false or auto), with the estimates
    the train report records. auto: only on a GPU (gpu_gib given) whose GPU_MEMORY_SHARE the calibrated estimate
    without checkpointing exceeds; a CPU never checkpoints (memory is not the limit there, the recompute is)."""
    without = calibrated_memory_gib(shape, checkpointing=False)
    with_ = calibrated_memory_gib(shape, checkpointing=True)
    if gpu_gib is None:
        used, reason = False, "not on a GPU"
    elif setting == "auto":
        used = without > GPU_MEMORY_SHARE * gpu_gib
        reason = (f"auto: estimated {without:.1f} GiB without it, {'over' if used else 'within'} "
                  f"{GPU_MEMORY_SHARE:.0%} of the GPU's {gpu_gib:.1f} GiB")
    else:
        used, reason = bool(setting), f"training.gradient_checkpointing: {str(setting).lower()}"
    return {"setting": setting, "used": used, "reason": reason, "forward_tokens": shape.tokens,
            "estimated_peak_gib_without": round(without, 2), "estimated_peak_gib_with": round(with_, 2),
            "gpu_memory_gib": round(gpu_gib, 2) if gpu_gib is not None else None}


def peak_tflops(device_name: str) -> float | None:
    """The GPU's dense bf16 peak (PEAK_BF16_TFLOPS, or $EMGATE_PEAK_TFLOPS); None when unknown."""
    if os.environ.get("EMGATE_PEAK_TFLOPS"):
        return float(os.environ["EMGATE_PEAK_TFLOPS"])
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in device_name), None)


def peak_memory_gib(device: Any) -> tuple[float, str]:
    """The job's peak memory and what was measured: CUDA's max allocated on a GPU, the process's max RSS on a CPU."""
    import resource

    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30, "cuda_max_memory_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "process_max_rss"  # ru_maxrss: KiB on Linux


@dataclass(frozen=True)
class LoopOptions:
    """train_loop's optional settings; the defaults train in one process, without checkpoints."""

    on_step: Callable[[int, int, float], None] | None = None  # on_step(step, steps, loss) after each optimizer step
    desc: str = "fine_tune"  # the progress bar's label
    checkpoint: Path | None = None  # saved every cfg.checkpoint_every steps, resumed from when found
    accelerator: Any = None  # accelerate's, when several processes train (the model prepared by it)
    lrs: list[float] | None = None  # collects the learning rate of each step


@dataclass(frozen=True)
class LoopResult:
    """What a train_loop run did."""

    losses: list[float]  # the loss of each optimizer step (a resumed run: the saved ones first)
    tokens: int  # non-pad tokens seen, all processes
    seconds: float  # the loop's wall time (this process's share when resumed)
    feed: str  # how the rows reached the model (_Feed.describe)


@dataclass(frozen=True)
class _Loop:
    """What stays fixed during one train_loop run."""

    model: Any
    train: list[Example]
    order: list[int]
    cfg: TrainingSpec
    device: Any
    pad_id: int
    options: LoopOptions
    checkpoint: Path | None  # options.checkpoint, None under FSDP
    params: list[Any]  # the trainable parameters
    optimizer: Any
    scheduler: Any
    steps: int
    world: int
    rank: int
    feed: _Feed


@dataclass(frozen=True)
class _Feed:
    """How the step's rows reach the model (_feed decides it once per run)."""

    packed: bool  # rows packed into sequences of cfg.pack_length tokens; else micro-batches padded to the longest row
    logits_only: bool  # packed: the LM head and cross-entropy only where a learned token is predicted
    attention: str | None  # the attention implementation the loop runs with; None: the model's own
    fused: Any = None  # packed, logits_only: the fused linear cross-entropy (training.fused_cross_entropy)

    def describe(self) -> str:
        if not self.packed:
            return "micro-batches padded to their longest row, the model's own loss"
        loss = ("fused linear cross-entropy (Liger) at learned positions" if self.fused is not None else
                "logits only at learned positions" if self.logits_only else "the model's own loss")
        return "packed rows, " + loss + (f", attention {self.attention}" if self.attention else "")

    @property
    def spans(self) -> bool:
        """Whether the forward passes carry the packs' RowSpans (emgate's own attention functions read them)."""
        return self.attention in (ROW_ATTENTION, VARLEN_ATTENTION)


def _feed(model: Any, cfg: TrainingSpec, accelerator: Any, device: Any) -> _Feed:
    """Packing where the model keeps attention inside packed rows (packing.builds_packed_masks) and
    cfg.pack_length > 0; logits only where its forward takes logits_to_keep (Llama, Qwen2 and the other decoder models
    of transformers 5; remote-code or older models without it fall back to their own loss); the attention from
    cfg.attention (packing.choose_attention: FlashAttention varlen on a GPU that runs it, row-by-row sdpa elsewhere,
    never the block-diagonal mask by default, which would cost pack_length^2 per layer); Liger's fused linear
    cross-entropy when cfg.fused_cross_entropy. A choice that cannot run here is a TrainingError with the reason."""
    inner = base_model(_unwrap(model, accelerator))
    packed = cfg.pack_length > 0 and builds_packed_masks(inner)
    if not packed:
        return _Feed(packed=False, logits_only=False, attention=None)
    logits_only = keeps_logits(inner)
    try:
        attention = choose_attention(cfg.attention, getattr(inner.config, "_attn_implementation", None), device,
                                     inner.dtype, sliding_window(inner.config, cfg.max_seq_length))
    except ValueError as exc:
        raise TrainingError(str(exc)) from None
    fused = None
    if cfg.fused_cross_entropy and logits_only:
        fix = "set training.fused_cross_entropy to false"
        if getattr(device, "type", device) != "cuda":
            raise TrainingError(f"training.fused_cross_entropy needs a CUDA GPU (Liger's kernels are Triton); {fix}")
        if accelerator is not None and accelerator.num_processes > 1:
            # the fused loss runs the decoder without the model's wrapper, which DDP and FSDP need for their hooks
            raise TrainingError(f"training.fused_cross_entropy runs on one GPU only (training.gpus 1); {fix}")
        try:
            fused = liger_cross_entropy()
        except ImportError as exc:
            raise TrainingError(f"training.fused_cross_entropy: liger-kernel is installed but does not import here "
                                f"({exc}); {fix} or install a liger-kernel that matches this torch") from None
        if fused is None:
            raise TrainingError("training.fused_cross_entropy needs liger-kernel, which is not installed (not in the "
                                f"train image until bench/gpu_finetune.sh measures that it pays); {fix}")
    return _Feed(packed=True, logits_only=logits_only, attention=attention, fused=fused)


@dataclass
class _LoopState:
    """Where a train_loop run is: what a checkpoint saves and a resumed loop starts from."""

    step: int = 0  # optimizer steps done
    cursor: int = 0  # position in the order of the next micro-batch
    losses: list[float] = field(default_factory=list)
    tokens: int = 0  # non-pad tokens seen, all processes


def train_loop(model: Any, train: list[Example], order: list[int], cfg: TrainingSpec, device: Any, pad_id: int,
               options: LoopOptions | None = None) -> LoopResult:
    """Train the trainable parameters of `model` for planned_steps(len(train), cfg) optimizer steps.

    Each step takes cfg.gradient_accumulation_steps micro-batches of cfg.per_device_batch_size examples from
    `train` in `order` (wrapping around). Their rows are packed into sequences of at most cfg.pack_length tokens
    without padding (packing.py; models that cannot keep attention inside packed rows, and pack_length 0, get each
    micro-batch padded to its longest row), and the loss is a mean over every learned token of the step (not a mean
    of micro-batch means), so the gradients do not depend on how the rows are grouped; then the loop clips the
    gradient norm to 1.0 and steps the optimizer (cfg.optimizer) and the linear warm-up schedule. The next step's
    rows are collated and sent to the device while the GPU still runs this one (the loop waits for the device once
    per step, for the step's loss). With an `options.accelerator` of several processes (the model and optimizer
    prepared by it), process r takes the rows of micro-batches r, r+P, ... of each step (step_packs) and the
    gradients are averaged across processes once per step, which gives the single-process update.
    `options.on_step(step, steps, loss)` is called after each optimizer step (step counts from 1); `options.lrs`
    collects the learning rate of each step. With `options.checkpoint`, the state is saved there every
    cfg.checkpoint_every steps and a loop that finds one resumes from it, so a killed job ends with the same weights
    as an uninterrupted one.
    """
    from tqdm import tqdm

    loop = _start_loop(model, train, order, cfg, device, pad_id, options or LoopOptions())
    model.train()
    started = time.monotonic()
    state = _resume(loop)
    bar = tqdm(range(state.step, loop.steps), desc=loop.options.desc, unit="step", initial=state.step,
               total=loop.steps, disable=loop.rank != 0)
    resumed_tokens = state.tokens
    with attention_implementation(_unwrap(model, loop.options.accelerator), loop.feed.attention):
        upcoming = _prepare_step(loop, state.cursor) if state.step < loop.steps else None
        for step in bar:
            assert upcoming is not None
            step_loss = _train_step(loop, upcoming)
            state.cursor, state.tokens = upcoming.cursor, state.tokens + upcoming.tokens
            # host work for the next step while the device runs this one; float() below waits for it
            upcoming = _prepare_step(loop, state.cursor) if step + 1 < loop.steps else None
            state.losses.append(float(step_loss))
            bar.set_postfix(loss=f"{state.losses[-1]:.4f}",
                            tok_s=f"{(state.tokens - resumed_tokens) / (time.monotonic() - started):.0f}")
            _after_step(loop, state, step + 1)
    return LoopResult(losses=state.losses, tokens=state.tokens, seconds=time.monotonic() - started,
                      feed=loop.feed.describe())


def _start_loop(model: Any, train: list[Example], order: list[int], cfg: TrainingSpec, device: Any, pad_id: int,
                options: LoopOptions) -> _Loop:
    """The optimizer (prepared by the accelerator), the warm-up schedule and the processes of one run."""
    from transformers import get_linear_schedule_with_warmup

    accelerator = options.accelerator
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = _optimizer(params, cfg)
    if accelerator is not None:
        optimizer = accelerator.prepare_optimizer(optimizer)
    steps = planned_steps(len(train), cfg)
    # Not prepared by accelerate, which would step it once per process.
    scheduler = get_linear_schedule_with_warmup(optimizer, cfg.warmup_steps, steps)
    checkpoint = options.checkpoint
    if accelerator is not None and accelerator.distributed_type.name == "FSDP":
        checkpoint = None  # sharded state: a killed FSDP job starts over (pipelines/recipes/accelerate/fsdp.yaml)
    return _Loop(model=model, train=train, order=order, cfg=cfg, device=device, pad_id=pad_id, options=options,
                 checkpoint=checkpoint, params=params, optimizer=optimizer, scheduler=scheduler, steps=steps,
                 world=accelerator.num_processes if accelerator is not None else 1,
                 rank=accelerator.process_index if accelerator is not None else 0,
                 feed=_feed(model, cfg, accelerator, device))


def _resume(loop: _Loop) -> _LoopState:
    """The state of the loop's checkpoint, loaded into the model, optimizer and schedule; a fresh state without one."""
    if loop.checkpoint is None or not loop.checkpoint.is_file():
        return _LoopState()
    saved = _load_checkpoint(loop.checkpoint, _unwrap(loop.model, loop.options.accelerator), loop.optimizer,
                             loop.scheduler)
    state = _LoopState(step=saved["step"], cursor=saved["cursor"], losses=saved["losses"], tokens=saved["tokens"])
    if loop.options.lrs is not None:
        loop.options.lrs.extend(saved.get("lrs", []))
    if loop.rank == 0:
        print(f"{loop.options.desc}: resuming at step {state.step} of {loop.steps} from {loop.checkpoint}")
    return state


@dataclass(frozen=True)
class _StepInput:
    """One optimizer step's rows, collated and on their way to the device."""

    batches: list[Any]  # this process's forward passes: packs (packing.Pack) or padded micro-batches
    learned: int  # learned tokens of the step, all processes
    tokens: int  # non-pad tokens of the step, all processes
    cursor: int  # the position in the order after the step


def _prepare_step(loop: _Loop, cursor: int) -> _StepInput:
    """The step whose rows start at `cursor` in the order: cfg.gradient_accumulation_steps micro-batches of
    cfg.per_device_batch_size rows (every process's, wrapping around), this process's share collated."""
    micro = loop.cfg.per_device_batch_size
    order = loop.order
    step_rows = []
    for _ in range(loop.cfg.gradient_accumulation_steps):
        idx = order[cursor % len(order):cursor % len(order) + micro] or order[:micro]
        cursor += micro
        step_rows.append([loop.train[i] for i in idx])
    # Every learned token of the step weighs the same, however the rows fall into micro-batches and processes
    # (transformers' num_items_in_batch, as Trainer, TRL and Unsloth normalise since their accumulation fix).
    learned = max(1, sum(_learned_tokens(e) for rows in step_rows for e in rows))
    return _StepInput(batches=_local_batches(loop, step_rows), learned=learned, cursor=cursor,
                      tokens=sum(len(e.input_ids) for rows in step_rows for e in rows))


def _train_step(loop: _Loop, step: _StepInput) -> Any:
    """One optimizer step: the step's micro-batches forward and backward, then the clipped update; the step's loss
    (a device tensor, all processes)."""
    loop.optimizer.zero_grad(set_to_none=True)
    step_loss = _forward_backward(loop, step.batches, step.learned)
    _update(loop)
    return step_loss


def _forward_backward(loop: _Loop, batches: list[Any], learned: int) -> Any:
    """This process's forward passes of the step, packed or padded (loop.feed), forward and backward; the step's
    loss, all processes."""
    import contextlib

    import torch

    accelerator = loop.options.accelerator
    step_loss = torch.zeros((), device=loop.device)
    for k, batch in enumerate(batches):
        # gradients are all-reduced only on this process's last forward pass of the step
        sync = accelerator is None or k == len(batches) - 1
        with contextlib.nullcontext() if sync else accelerator.no_sync(loop.model):
            if isinstance(batch, Pack):
                loss = pack_loss(loop.model, batch, learned, loop.feed.logits_only, loop.feed.spans, loop.feed.fused)
            else:
                loss = loop.model(**batch, num_items_in_batch=learned, use_cache=False).loss  # no KV cache in training
            # DDP and FSDP average the gradients over the processes; the loss is their sum
            if accelerator is not None:
                accelerator.backward(loss * loop.world)
            else:
                loss.backward()
        step_loss += loss.detach()
    if loop.world > 1:
        step_loss = accelerator.reduce(step_loss, reduction="sum")
    return step_loss


def _local_batches(loop: _Loop, step_rows: list[list[Example]]) -> list[Any]:
    """The forward passes of this process in this step: packs (packing.Pack) or padded micro-batches, on its device."""
    if loop.feed.packed:
        return [collate_pack(rows).to(loop.device)
                for rows in step_packs(step_rows, loop.cfg.pack_length, loop.world, loop.rank)]
    mine = [rows for j, rows in enumerate(step_rows) if j % loop.world == loop.rank]
    return [{k: to_device(v, loop.device) for k, v in _collate(rows, loop.pad_id).items()} for rows in mine]


def step_packs(step_rows: list[list[Example]], pack_length: int, world: int = 1, rank: int = 0) -> list[list[Example]]:
    """The rows of process `rank` of `world` in one step, packed: its micro-batches (rank, rank + world, ...) in order,
    cut into packs of at most pack_length tokens. With several processes every process gets as many packs as the
    busiest one (FSDP gathers weights in every forward pass, so the counts must match), its packs split at row
    boundaries; where a process has too few rows for that, each micro-batch is one pack on every process."""
    shares = [[row for j, rows in enumerate(step_rows) if j % world == r for row in rows] for r in range(world)]
    packs = [pack_rows(share, pack_length) for share in shares]
    if world == 1:
        return packs[0]
    count = max(len(p) for p in packs)
    even = [split_packs(p, count) for p in packs]
    mine = even[rank]
    if mine is None or any(p is None for p in even):
        return [rows for j, rows in enumerate(step_rows) if j % world == rank]
    return mine


def _update(loop: _Loop) -> None:
    """Clip the gradient norm to 1.0, record the learning rate, step the optimizer and the schedule."""
    import torch

    if loop.options.accelerator is not None:
        loop.options.accelerator.clip_grad_norm_(loop.model.parameters(), 1.0)
    else:
        torch.nn.utils.clip_grad_norm_(loop.params, 1.0)
    if loop.options.lrs is not None:
        loop.options.lrs.append(float(loop.scheduler.get_last_lr()[0]))
    loop.optimizer.step()
    loop.scheduler.step()


def _after_step(loop: _Loop, state: _LoopState, step: int) -> None:
    """Report step `step` (counted from 1) to on_step; save a checkpoint when one is due (never after the last)."""
    if loop.options.on_step is not None and loop.rank == 0:
        loop.options.on_step(step, loop.steps, state.losses[-1])
    every = loop.cfg.checkpoint_every
    if loop.checkpoint is not None and every and step % every == 0 and step < loop.steps:
        saved = {"step": step, "cursor": state.cursor, "losses": state.losses, "tokens": state.tokens,
                 "lrs": loop.options.lrs or []}
        if loop.rank == 0:
            _save_checkpoint(loop.checkpoint, _unwrap(loop.model, loop.options.accelerator), loop.optimizer,
                             loop.scheduler, saved)
        if loop.options.accelerator is not None:
            loop.options.accelerator.wait_for_everyone()


def _learned_tokens(example: Example) -> int:
    """Tokens whose prediction is in the loss: labels after the causal shift that are not IGNORE_INDEX."""
    return sum(1 for x in example.labels[1:] if x != IGNORE_INDEX)


def _unwrap(model: Any, accelerator: Any) -> Any:
    return accelerator.unwrap_model(model) if accelerator is not None else model


def _check_validated(validated_dir: Path, dataset: str) -> dict[str, Any]:
    """The manifest entry of `dataset`, after checking the folder is a complete, passed validate_datasets output."""
    from emgate.assets import sha256_file

    manifest = read_manifest(validated_dir)
    data = validated_dataset(validated_dir, dataset)
    if manifest is None:
        raise TrainingError(f"{validated_dir} is not a validated dataset artifact (no {MANIFEST_FILE}, which "
                            "validate_datasets writes last, only when every dataset passed); run validate_datasets")
    entry = manifest.get(dataset)
    if entry is None or not data.is_file():
        raise TrainingError(f"dataset {dataset!r} is not among the validated datasets in {validated_dir}; run "
                            "validate_datasets with this recipe")
    recorded = entry.get("sha256")
    if recorded is not None and sha256_file(data) != recorded:
        raise TrainingError(f"{data} changed after validation (sha256 differs from {MANIFEST_FILE}); validate it again")
    return dict(entry)


def _load_base(model_path: Path, dtype: Any) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (model_path / "config.json").is_file():
        raise TrainingError(f"model folder {model_path} has no config.json; point the recipe's model at a Hugging "
                            "Face model folder (config.json, safetensors, tokenizer)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_path)
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype)
    except (OSError, ValueError) as exc:
        raise TrainingError(f"model folder {model_path} cannot be loaded ({type(exc).__name__}: {exc}); check that it "
                            "holds the weights and tokenizer files and that they are readable") from None
    return tokenizer, model


@dataclass(frozen=True)
class _JobSpec:
    """One job (VARIANT@SEED), resolved against the recipe and the validated datasets."""

    job: str
    name: str  # the variant's
    seed: int
    variant: VariantSpec
    data_file: Path  # the validated dataset
    entry: dict[str, Any]  # its manifest entry
    dataset_sha: str
    model_spec: ModelSpec
    model_path: Path  # the base model's folder
    work: Path  # partial work: checkpoint and progress


@dataclass(frozen=True)
class _Runtime:
    """Where this process trains: alone, or as one of accelerate's processes."""

    accelerator: Any  # None in a single process
    main: bool  # writes out_dir
    on_gpu: bool
    device: Any
    dtype: Any

    @property
    def world(self) -> int:
        return self.accelerator.num_processes if self.accelerator is not None else 1


@dataclass(frozen=True)
class _Data:
    """The job's examples, tokenized with its template."""

    record: TemplateRecord
    pad_id: int
    train: list[Example]
    evals: list[Example]  # held out
    truncated: int  # training rows cut at max_seq_length
    order: list[int]  # the training rows of every epoch, each epoch shuffled


@dataclass(frozen=True)
class _ModelSize:
    config: Any  # the base model's text config
    n_linear: int  # weights of the base model's nn.Linear layers
    n_trained: int  # trainable parameters
    checkpointing: dict[str, Any]  # checkpointing_plan's decision and estimates


@dataclass(frozen=True)
class _Trained:
    """What train_loop returned, and what the run measured around it."""

    losses: list[float]
    tokens: int
    seconds: float
    lrs: list[float]
    resumed: dict[str, Any]  # step and tokens of the checkpoint the run resumed from (0 and 0 when none)
    memory: float
    memory_kind: str
    batches: str  # how the rows reached the model (_Feed.describe)


@dataclass(frozen=True)
class _Throughput:
    flops: float  # model FLOPs of the steps this process ran
    peak: float | None  # the GPU's dense bf16 TFLOP/s
    mfu: float | None
    assistant_tokens: int  # learned tokens of every step
    assistant_ran: int  # learned tokens of the steps this process ran


@dataclass(frozen=True)
class _Output:
    """What the job saves in out_dir."""

    model: Any  # as trained: prepared by accelerate when there is an accelerator
    state_dict: Any  # gathered by accelerate from every process; None in a single process
    tokenizer: Any
    record: TemplateRecord
    report: dict[str, Any]


def fine_tune(recipe: Recipe, job: str, validated_dir: Path, out_dir: Path) -> dict[str, Any]:
    """Train `job` ('variant@seed') and save the adapter (or merged model folder), its template and a report.

    Run by one process, or by every process of `accelerate launch`; only the main process writes out_dir.
    """
    cfg = recipe.training
    spec = _resolve_job(recipe, job, validated_dir)
    accelerator = _accelerator(cfg)
    _seed(spec.seed)
    runtime = _runtime(accelerator)
    tokenizer, model = _load_base(spec.model_path, runtime.dtype)
    _check_template(spec, tokenizer)
    data = _prepare_data(recipe, spec, tokenizer)
    model, size = _prepare_model(model, cfg, runtime)
    trained = _train(model, data, cfg, runtime, spec)
    eval_loss = _eval_loss(model, data, cfg, runtime.device)
    report = _report(recipe, spec, runtime, data, size, trained, eval_loss)
    _save(_gather_output(model, tokenizer, data.record, report, runtime), recipe, spec, out_dir, runtime)
    return report


def _resolve_job(recipe: Recipe, job: str, validated_dir: Path) -> _JobSpec:
    """The job's variant, validated dataset and base model; its work folder, created."""
    name, _, seed_text = job.partition("@")
    seed = int(seed_text)
    variant = recipe.variant(name)
    assert variant.dataset is not None
    entry = _check_validated(validated_dir, variant.dataset)
    dataset_sha = entry["source_sha256"]
    model_spec = recipe.models[variant.model]
    model_path = resolve_model(variant.model, model_spec)
    work = work_dir_for(recipe, name, seed, dataset_sha)
    work.mkdir(parents=True, exist_ok=True)
    return _JobSpec(job=job, name=name, seed=seed, variant=variant, data_file=validated_dir / f"{variant.dataset}.jsonl",
                    entry=entry, dataset_sha=dataset_sha,
                    model_spec=model_spec, model_path=model_path, work=work)


def _accelerator(cfg: TrainingSpec) -> Any:
    """accelerate's Accelerator under a launcher of several processes (checked against training.gpus), else None."""
    import torch
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=not torch.cuda.is_available()) if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None
    if accelerator is not None and accelerator.num_processes != cfg.gpus:
        raise TrainingError(f"accelerate launched {accelerator.num_processes} processes but training.gpus is {cfg.gpus}")
    return accelerator


def _seed(seed: int) -> None:
    import torch

    random.seed(seed)
    torch.manual_seed(seed)


def _runtime(accelerator: Any) -> _Runtime:
    """The process's device, and its dtype: bf16 on a GPU that has it, else float32."""
    import torch

    on_gpu = torch.cuda.is_available()
    return _Runtime(accelerator=accelerator, main=accelerator is None or accelerator.is_main_process, on_gpu=on_gpu,
                    device=accelerator.device if accelerator is not None else torch.device("cuda" if on_gpu else "cpu"),
                    dtype=torch.bfloat16 if on_gpu and torch.cuda.is_bf16_supported() else torch.float32)


def _check_template(spec: _JobSpec, tokenizer: Any) -> None:
    if spec.variant.template == "native" and not getattr(tokenizer, "chat_template", None):
        raise TrainingError(f"variant {spec.name}: template native, but the tokenizer of model {spec.variant.model} "
                            f"({spec.model_path}) has no chat template; an Instruct model needs its own, a base model "
                            "needs `template: qwen`, `user_assistant` or `user1_user2`")


def _prepare_data(recipe: Recipe, spec: _JobSpec, tokenizer: Any) -> _Data:
    """The dataset shuffled by the seed, split into held-out and training rows (subsampled) and tokenized; the
    training order of every epoch."""
    cfg = recipe.training
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    record = template_record(spec.variant.template, tokenizer)
    rows = list(read_jsonl(spec.data_file))
    rng = random.Random(spec.seed)
    rng.shuffle(rows)
    n_eval = int(len(rows) * cfg.holdout_fraction)
    eval_rows, train_rows = rows[:n_eval], rows[n_eval:]
    subsample = recipe.datasets[spec.variant.dataset or ""].subsample_rows
    if subsample:
        train_rows = train_rows[:subsample]
    train = [tokenize_example(tokenizer, record, r["messages"], cfg.max_seq_length) for r in train_rows]
    evals = [tokenize_example(tokenizer, record, r["messages"], cfg.max_seq_length) for r in eval_rows[:cfg.eval_rows_max]]
    return _Data(record=record, pad_id=pad_id, train=train, evals=evals,
                 truncated=sum(1 for e in train if len(e.input_ids) == cfg.max_seq_length),
                 order=[i for _ in range(cfg.epochs) for i in rng.sample(range(len(train)), len(train))])


def _prepare_model(model: Any, cfg: TrainingSpec, runtime: _Runtime) -> tuple[Any, _ModelSize]:
    """Gradient checkpointing where memory needs it (checkpointing_plan), the LoRA adapters (training.method lora),
    the model on its device(s)."""
    import torch
    from peft import LoraConfig, get_peft_model

    config = model_config(model)
    gpu_gib = torch.cuda.get_device_properties(runtime.device).total_memory / 2**30 if runtime.on_gpu else None
    plan = checkpointing_plan(memory_shape(model, cfg, runtime), cfg.gradient_checkpointing, gpu_gib)
    if plan["used"]:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.method == "lora":
        lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                          target_modules=cfg.target_modules, use_rslora=cfg.use_rslora, task_type="CAUSAL_LM")
        model = get_peft_model(model, lora)
    size = _ModelSize(config=config, n_linear=sum(m.weight.numel() for m in _base_linears(model)),
                      n_trained=sum(p.numel() for p in model.parameters() if p.requires_grad), checkpointing=plan)
    accelerator = runtime.accelerator
    return (accelerator.prepare_model(model) if accelerator is not None else model.to(runtime.device)), size


def _train(model: Any, data: _Data, cfg: TrainingSpec, runtime: _Runtime, spec: _JobSpec) -> _Trained:
    """train_loop with the job's checkpoint and progress file; a GPU out of memory named with the fix."""
    import torch

    def progress(step: int, of: int, loss: float) -> None:
        write_json(spec.work / "progress.json", {"step": step, "of": of, "loss": loss})

    if runtime.on_gpu:
        torch.cuda.reset_peak_memory_stats(runtime.device)
    lrs: list[float] = []
    checkpoint = spec.work / CHECKPOINT_FILE
    resumed = read_json(spec.work / CHECKPOINT_STATE) if checkpoint.is_file() else {"step": 0, "tokens": 0}
    options = LoopOptions(on_step=progress, desc=f"fine_tune {spec.job}", checkpoint=checkpoint,
                          accelerator=runtime.accelerator, lrs=lrs)
    try:
        result = train_loop(model, data.train, data.order, cfg, runtime.device, data.pad_id, options)
    except torch.OutOfMemoryError:
        raise TrainingError(f"fine_tune {spec.job}: out of GPU memory with per_device_batch_size "
                            f"{cfg.per_device_batch_size}, max_seq_length {cfg.max_seq_length} and pack_length "
                            f"{cfg.pack_length}; lower per_device_batch_size (and raise gradient_accumulation_steps to "
                            "keep the step size) or pack_length (tokens per forward pass when packed), or use more "
                            "GPUs (training.gpus)") from None
    memory, memory_kind = peak_memory_gib(runtime.device)
    return _Trained(losses=result.losses, tokens=result.tokens, seconds=result.seconds, lrs=lrs, resumed=resumed,
                    memory=memory, memory_kind=memory_kind, batches=result.feed)


def _eval_loss(model: Any, data: _Data, cfg: TrainingSpec, device: Any) -> float | None:
    """The loss on the held-out rows: summed over every learned token of them, then one mean; None without any."""
    import torch

    if not data.evals:
        return None
    model.eval()
    micro = cfg.per_device_batch_size
    total = 0.0
    with torch.no_grad():
        for i in range(0, len(data.evals), micro):
            batch = {k: v.to(device) for k, v in _collate(data.evals[i:i + micro], data.pad_id).items()}
            total += float(model(**batch, num_items_in_batch=1, use_cache=False).loss)
    return total / max(1, sum(_learned_tokens(e) for e in data.evals))


def _throughput(cfg: TrainingSpec, runtime: _Runtime, data: _Data, size: _ModelSize, trained: _Trained) -> _Throughput:
    """Model FLOPs, MFU and assistant tokens; the rates count only the steps this process ran: a resumed job timed
    only its own share."""
    import torch

    seen = _seen_rows(data.order, planned_steps(len(data.train), cfg), cfg)
    ran = seen[trained.resumed["step"] * cfg.gradient_accumulation_steps * cfg.per_device_batch_size:]
    flops = training_flops(size.n_linear, size.n_trained, size.config.num_hidden_layers, size.config.hidden_size,
                           [len(data.train[i].input_ids) for i in ran], full=cfg.method == "full")
    peak = peak_tflops(torch.cuda.get_device_name(runtime.device)) if runtime.on_gpu else None
    elapsed = trained.seconds
    return _Throughput(flops=flops, peak=peak,
                       mfu=flops / elapsed / (peak * 1e12 * runtime.world) if peak and elapsed else None,
                       assistant_tokens=sum(sum(1 for x in data.train[i].labels if x != IGNORE_INDEX) for i in seen),
                       assistant_ran=sum(sum(1 for x in data.train[i].labels if x != IGNORE_INDEX) for i in ran))


def _report(recipe: Recipe, spec: _JobSpec, runtime: _Runtime, data: _Data, size: _ModelSize, trained: _Trained,
            eval_loss: float | None) -> dict[str, Any]:
    """train_report.json: what was trained, on what, how it went and how fast."""
    cfg = recipe.training
    rate = _throughput(cfg, runtime, data, size, trained)
    variant, losses, elapsed, resumed = spec.variant, trained.losses, trained.seconds, trained.resumed
    return {
        "variant": spec.name, "seed": spec.seed, "role": variant.role, "model": variant.model, "dataset": variant.dataset,
        "base_model": _model_source(spec.model_spec), "base_model_revision": spec.model_spec.revision,
        "dataset_sha256": spec.dataset_sha, "validated_sha256": spec.entry.get("sha256"), "template": variant.template,
        "method": cfg.method, "merged": cfg.merges(), "gpus": runtime.world,
        "train_rows": len(data.train), "eval_rows": len(data.evals), "truncated_rows": data.truncated,
        "steps": planned_steps(len(data.train), cfg),
        "loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None, "losses": losses,
        "learning_rates": trained.lrs, "eval_loss": eval_loss, "tokens": trained.tokens,
        "assistant_tokens": rate.assistant_tokens, "resumed_at_step": resumed["step"], "seconds": elapsed,
        "tokens_per_s": (trained.tokens - resumed["tokens"]) / elapsed if elapsed else None,
        "assistant_tokens_per_s": rate.assistant_ran / elapsed if elapsed else None,
        "peak_memory_gib": trained.memory, "peak_memory_kind": trained.memory_kind, "batches": trained.batches,
        "gradient_checkpointing": size.checkpointing,
        "model_flops": rate.flops,
        "mfu": rate.mfu, "peak_tflops": rate.peak, "trained_parameters": size.n_trained,
        "device": str(runtime.device), "dtype": str(runtime.dtype), "training": cfg.model_dump(mode="json"),
    }


def _gather_output(model: Any, tokenizer: Any, record: TemplateRecord, report: dict[str, Any],
                   runtime: _Runtime) -> _Output:
    """What out_dir gets; every process takes part in gathering the state dict."""
    state_dict = runtime.accelerator.get_state_dict(model) if runtime.accelerator is not None else None
    return _Output(model=model, state_dict=state_dict, tokenizer=tokenizer, record=record, report=report)


def _save(output: _Output, recipe: Recipe, spec: _JobSpec, out_dir: Path, runtime: _Runtime) -> None:
    """The main process writes out_dir and removes the checkpoint; every process waits for it."""
    if runtime.main:
        _write_output(output, recipe, spec, out_dir, runtime)
        (spec.work / CHECKPOINT_FILE).unlink(missing_ok=True)  # done: a later run trains anew
        (spec.work / CHECKPOINT_STATE).unlink(missing_ok=True)
    if runtime.accelerator is not None:
        runtime.accelerator.wait_for_everyone()


def _write_output(output: _Output, recipe: Recipe, spec: _JobSpec, out_dir: Path, runtime: _Runtime) -> None:
    """Save into a hidden staging folder, then rename it into place: out_dir appears only when complete."""
    staging = out_dir.parent / f".{out_dir.name}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    _save_weights(output, recipe.training, staging, out_dir, spec.model_path, runtime)
    output.tokenizer.save_pretrained(staging)
    output.record.save(staging)
    write_json(staging / RECIPE_SLICE, _recipe_slice(recipe, spec))
    write_train_report(staging, output.report)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    staging.rename(out_dir)


def _save_weights(output: _Output, cfg: TrainingSpec, staging: Path, out_dir: Path, model_path: Path,
                  runtime: _Runtime) -> None:
    """The full model, the adapter, or (training merges) the base model with the adapter merged into it."""
    trained = _unwrap(output.model, runtime.accelerator)
    state_dict = output.state_dict
    if cfg.method == "full":
        trained.save_pretrained(str(staging), state_dict=state_dict, safe_serialization=True)
    elif cfg.merges():  # from the saved adapter, onto the base reloaded from disk: the same path under DDP and FSDP
        adapter = out_dir.parent / f".{out_dir.name}.adapter"
        shutil.rmtree(adapter, ignore_errors=True)
        trained.save_pretrained(str(adapter), state_dict=state_dict)
        merge_adapter_folder(model_path, adapter, staging, dtype=str(runtime.dtype).removeprefix("torch."))
        shutil.copy(adapter / "adapter_config.json", staging / "adapter_config.merged.json")  # what was merged
        shutil.rmtree(adapter)
    else:
        trained.save_pretrained(str(staging), state_dict=state_dict)


def _recipe_slice(recipe: Recipe, spec: _JobSpec) -> dict[str, Any]:
    """The parts of the recipe this job used (RECIPE_SLICE)."""
    variant = recipe.variant(spec.name)
    return {
        "job": spec.job, "variant": variant.model_dump(mode="json"),
        "model": recipe.models[variant.model].model_dump(mode="json"),
        "dataset": recipe.datasets[variant.dataset or ""].model_dump(mode="json"),
        "training": recipe.training.model_dump(mode="json"),
    }


def _seen_rows(order: list[int], steps: int, cfg: TrainingSpec) -> list[int]:
    """The training rows of the run's micro-batches, in order (the data position wraps around like train_loop's)."""
    n = steps * cfg.gradient_accumulation_steps * cfg.per_device_batch_size
    return [order[k % len(order)] for k in range(n)]


def memory_shape(model: Any, cfg: TrainingSpec, runtime: _Runtime) -> MemoryShape:
    """The MemoryShape of `model` (before LoRA is added) trained as `cfg` says on this process."""
    import torch

    config = model_config(model)
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    lora = sum(cfg.lora_r * (m.in_features + m.out_features) for n, m in linears
               if n.rsplit(".", 1)[-1] in cfg.target_modules)
    n_params = sum(p.numel() for p in model.parameters())
    packed = cfg.pack_length > 0 and builds_packed_masks(model)
    return MemoryShape(
        hidden=config.hidden_size, intermediate=config.intermediate_size, layers=config.num_hidden_layers,
        kv_dim=(getattr(config, "num_key_value_heads", None) or heads) * head_dim, vocab=config.vocab_size,
        n_params=n_params, n_trained=lora if cfg.method == "lora" else n_params,
        lora_r=cfg.lora_r if cfg.method == "lora" else None,
        tokens=forward_tokens(cfg, packed),
        param_bytes=runtime.dtype.itemsize if hasattr(runtime.dtype, "itemsize") else 4,
        shards=runtime.world if cfg.distributed == "fsdp" else 1)


def forward_tokens(cfg: TrainingSpec, packed: bool) -> int:
    """Tokens of the largest forward pass: a pack (never more than a step's rows hold, never less than one row) or a
    padded micro-batch."""
    if not packed:
        return cfg.per_device_batch_size * cfg.max_seq_length
    step = cfg.per_device_batch_size * cfg.gradient_accumulation_steps * cfg.max_seq_length
    return min(max(cfg.pack_length, cfg.max_seq_length), step)


def _base_linears(model: Any) -> list[Any]:
    import torch

    return [m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "lora_" not in n]


def model_config(model: Any) -> Any:
    config = getattr(model, "config", None) or model.get_base_model().config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _model_source(spec: Any) -> str:
    return str(spec.repo or spec.uri or spec.path or spec.package or "")


def accelerate_config(name: str) -> Path:
    """The accelerate config shipped in pipelines/recipes/accelerate/ (installed as emgate_pipelines data)."""
    from importlib.resources import files

    return Path(str(files("emgate_pipelines") / "recipes" / "accelerate" / f"{name}.yaml"))


def launch_command(recipe: Recipe, recipe_file: Path, job: str, validated_dir: Path, out_dir: Path,
                   cuda: bool) -> list[str]:
    """The command that runs `job` in training.gpus processes: `accelerate launch` with the shipped DDP or FSDP
    config on GPUs; torch's own launcher on a CPU machine (accelerate launches CPU processes through MPI only),
    where Accelerator runs the same loop over gloo."""
    n = str(recipe.training.gpus)
    entry = ["-m", "emgate.stages.finetune", "--recipe-json", str(recipe_file), "--job", job,
             "--validated", str(validated_dir), "--out", str(out_dir)]
    if cuda:
        return [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                str(accelerate_config(recipe.training.distributed)), "--num_processes", n, *entry]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", n, *entry]


def run_fine_tune(recipe: Recipe, job: str, validated_dir: Path, out_dir: Path) -> dict[str, Any]:
    """fine_tune in this process (training.gpus 1), else in training.gpus processes started by launch_command."""
    import subprocess
    import tempfile

    import torch

    if recipe.training.gpus == 1:
        return fine_tune(recipe, job, validated_dir, out_dir)
    cuda = torch.cuda.is_available()
    if cuda and torch.cuda.device_count() < recipe.training.gpus:
        raise TrainingError(f"training.gpus is {recipe.training.gpus} but this node has {torch.cuda.device_count()} "
                            "GPU(s); on a cluster the fine_tune task requests training.gpus GPUs")
    with tempfile.TemporaryDirectory(prefix="emgate-ft-") as tmp:
        recipe_file = Path(tmp) / "recipe.json"
        recipe_file.write_text(recipe.to_json())
        cmd = launch_command(recipe, recipe_file, job, validated_dir, out_dir, cuda)
        print("fine_tune: " + " ".join(cmd), flush=True)
        code = subprocess.run(cmd, check=False).returncode
    if code != 0 or not has_train_report(out_dir):
        raise TrainingError(f"fine_tune {job} on {recipe.training.gpus} processes failed (exit code {code}); the "
                            "processes' log is above")
    return read_train_report(out_dir)


def main(argv: list[str] | None = None) -> None:
    """Entry point for `accelerate launch -m emgate.stages.finetune` (the fine_tune component on several GPUs)."""
    import argparse

    from emgate.slices import recipe_for_stage

    parser = argparse.ArgumentParser(prog="python -m emgate.stages.finetune",
                                     description="Fine-tune one job (VARIANT@SEED) of a recipe; under `accelerate "
                                                 "launch` every process runs this and the main one writes OUT.")
    parser.add_argument("--recipe-json", type=Path, required=True, help="the recipe, or fine_tune's slice of it, as JSON")
    parser.add_argument("--job", required=True, help="VARIANT@SEED")
    parser.add_argument("--validated", type=Path, required=True, help="validate_datasets output folder")
    parser.add_argument("--out", type=Path, required=True, help="adapter (or merged model) folder to write")
    args = parser.parse_args(argv)
    fine_tune(recipe_for_stage(args.recipe_json.read_text(), f"fine_tune[{args.job}]"), args.job, args.validated, args.out)


if __name__ == "__main__":
    main()
