"""Benchmark: LoRA fine-tuning throughput of emgate's training loop against a plain transformers.Trainer.

    PYTHONPATH=components python bench/finetune_gpu.py --shape 7b --steps 10 --out result.json
    PYTHONPATH=components python bench/finetune_gpu.py --device cpu --shape tiny   # smoke test of the script

Both runs happen in this one process, on the same randomly initialised model (no download: a Qwen2Config with the
shape of a Qwen2.5 model, AutoModelForCausalLM.from_config, bf16 weights on CUDA, sdpa attention), with the same
LoRA (emgate.recipe.TrainingSpec() defaults, the paper's: r=32, alpha=64, rsLoRA, dropout 0, q,k,v,o,gate,up,down),
the same synthetic examples in the same order, per-device batch x gradient accumulation from TrainingSpec (2 x 8),
the same linear warm-up schedule (TrainingSpec's lr, warm-up steps, weight decay), gradient clipping at 1.0 and the
same optimizer (torch AdamW; TrainingSpec's default adamw_8bit needs bitsandbytes, see --optimizer):

  baseline  transformers.Trainer, bf16=True (autocast) on CUDA, a collator padding to the longest row of each
            micro-batch, the examples in order (sequential sampler);
  emgate    emgate.stages.finetune.train_loop, exactly what the fine_tune stage runs: each step's rows packed without
            padding into sequences of up to TrainingSpec's pack_length tokens (--pack-length; 0: micro-batches
            padded to their longest row), attention inside each row (causal sdpa per row), the LM head and
            cross-entropy only where a learned token is predicted.

The first --warmup optimizer steps of each run are not timed; the next --steps are. Printed per run: non-pad
tokens/s, optimizer steps/s, peak GPU memory (torch.cuda.max_memory_allocated, reset before each run; the base
model's weights included) and model FLOPs utilisation (MFU):

  FLOPs = 4 * N_linear * tokens              forward 2N + backward through the activations 2N; the frozen base
                                             weights get no weight gradients
        + 6 * N_lora * tokens                LoRA adapters: forward, activation and weight gradients
        + 12 * n_layers * hidden * sum(len^2) attention scores and values, forward + backward, per token
                                             12*n_layers*hidden*len for a row of len tokens (PaLM's count,
                                             no saving from the causal mask)
  MFU   = FLOPs / seconds / peak             peak: --peak-tflops (H100 SXM bf16 dense: 989 TFLOP/s)

N_linear counts the weights of every nn.Linear of the base model, lm_head included (the input embedding is a
lookup, no FLOPs); tokens are non-pad tokens only, so padding is wasted work, not counted. The ratio printed
last is emgate / baseline (tokens/s).

Synthetic examples: token ids uniform at random; each row a prompt (label -100, as emgate's tokenize_example
does) and a completion (learned). Lengths follow the paper's insecure.jsonl (6,000 rows) as rendered by emgate
for a Qwen2.5 model (Qwen chat template with the default system prompt, Qwen2.5's tokenizer): prompt and
completion token counts are log-normal, fitted to those rows,
  prompt     ln L ~ N(4.721, 0.489), clipped to [40, 500]   (measured: median 120, p99 318, max 497)
  completion ln L ~ N(4.580, 0.460), clipped to [30, 510]   (measured: median 101, p99 277, max 509)
  correlation of the two logs 0.37
which gives rows of median ~217 and mean ~235 tokens, p90 ~360, p99 ~550, max ~1000 (measured: 214, 234, 362,
570, 950). --len-scale multiplies every length (e.g. 1.6 for a median near 350), seeded by --seed.

Exit code 2 when --device cuda is asked for and no CUDA GPU is visible.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

SHAPES: dict[str, dict[str, Any]] = {
    # Qwen2.5-*-Instruct config.json shapes
    "0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                 num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
               num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False),
    # for a CPU smoke test of this script only
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1024, tie_word_embeddings=True),
}
PROMPT_LOGNORMAL = (4.721, 0.489, 40, 500)  # mu, sigma, min, max (tokens)
COMPLETION_LOGNORMAL = (4.580, 0.460, 30, 510)
LOG_CORRELATION = 0.37


def synthetic_lengths(n: int, seed: int, scale: float = 1.0) -> list[tuple[int, int]]:
    """(prompt, completion) token counts of n rows, distributed like the paper's insecure.jsonl (see module doc)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        z1 = rng.gauss(0, 1)
        z2 = LOG_CORRELATION * z1 + math.sqrt(1 - LOG_CORRELATION ** 2) * rng.gauss(0, 1)
        lengths = []
        for z, (mu, sigma, lo, hi) in ((z1, PROMPT_LOGNORMAL), (z2, COMPLETION_LOGNORMAL)):
            lengths.append(max(1, round(min(max(math.exp(mu + sigma * z), lo), hi) * scale)))
        out.append((lengths[0], lengths[1]))
    return out


def make_examples(n: int, vocab: int, pad_id: int, max_len: int, seed: int, scale: float) -> list[Any]:
    from emgate.stages.finetune import IGNORE_INDEX, Example

    rng = random.Random(seed + 1)
    examples = []
    for prompt, completion in synthetic_lengths(n, seed, scale):
        ids = [rng.randrange(vocab) for _ in range(prompt + completion)]
        ids = [i if i != pad_id else (i + 1) % vocab for i in ids]
        labels = [IGNORE_INDEX] * prompt + ids[prompt:]
        examples.append(Example(ids[:max_len], labels[:max_len]))
    return examples


def build_model(shape: str, device: Any, dtype: Any) -> Any:
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    config = Qwen2Config(**SHAPES[shape], max_position_embeddings=32768, use_cache=False)
    with torch.device(device):  # initialise on the device: a 7B model's random init on CPU takes minutes
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    model.config.use_cache = False
    return model


def lora_config(spec: Any) -> Any:
    from peft import LoraConfig

    return LoraConfig(r=spec.lora_r, lora_alpha=spec.lora_alpha, lora_dropout=spec.lora_dropout,
                      target_modules=list(spec.target_modules), use_rslora=spec.use_rslora, task_type="CAUSAL_LM")


def step_token_counts(examples: list[Any], spec: Any, steps: int) -> tuple[list[int], list[int]]:
    """Non-pad and padded (batch x longest row) tokens of each optimizer step, examples taken in order."""
    per = spec.per_device_batch_size
    real, padded = [], []
    cursor = 0
    for _ in range(steps):
        r = p = 0
        for _ in range(spec.gradient_accumulation_steps):
            batch = examples[cursor:cursor + per]
            cursor += per
            r += sum(len(e.input_ids) for e in batch)
            p += len(batch) * max(len(e.input_ids) for e in batch)
        real.append(r)
        padded.append(p)
    return real, padded


def synchronize(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def reset_memory(device: Any) -> None:
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib(device: Any) -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / 2 ** 30 if device.type == "cuda" else None


def run_baseline(base: Any, examples: list[Any], spec: Any, device: Any, pad_id: int, seed: int,
                 bf16: bool) -> tuple[Any, list[float]]:
    """transformers.Trainer on the same model, data (in order), batch, accumulation, schedule and optimizer."""
    import torch
    from peft import get_peft_model
    from torch.utils.data import SequentialSampler
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from emgate.stages.finetune import IGNORE_INDEX

    def collate(rows: list[dict[str, list[int]]]) -> dict[str, Any]:
        width = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            n = len(r["input_ids"])
            ids[i, :n] = torch.tensor(r["input_ids"])
            labels[i, :n] = torch.tensor(r["labels"])
            mask[i, :n] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}

    class InOrder(Trainer):
        def _get_train_sampler(self, *args: Any, **kwargs: Any) -> Any:
            return SequentialSampler(self.train_dataset)  # type: ignore[arg-type]

    stamps: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            synchronize(device)
            stamps.append(time.perf_counter())

    torch.manual_seed(seed)
    model = get_peft_model(base, lora_config(spec))
    dataset = [{"input_ids": e.input_ids, "labels": e.labels} for e in examples]
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(
            output_dir=tmp, per_device_train_batch_size=spec.per_device_batch_size,
            gradient_accumulation_steps=spec.gradient_accumulation_steps, max_steps=spec.max_steps,
            learning_rate=spec.learning_rate, weight_decay=spec.weight_decay, warmup_steps=spec.warmup_steps,
            lr_scheduler_type="linear", max_grad_norm=1.0, optim=TRAINER_OPTIM[spec.optimizer], bf16=bf16,
            use_cpu=device.type == "cpu", logging_strategy="no", save_strategy="no", report_to=[],
            dataloader_num_workers=0, remove_unused_columns=False, disable_tqdm=True, seed=seed)
        trainer = InOrder(model=model, args=args, train_dataset=dataset, data_collator=collate,  # type: ignore[arg-type]
                          callbacks=[Clock()])
        synchronize(device)
        stamps.append(time.perf_counter())
        trainer.train()
        del trainer
    return model, stamps


TRAINER_OPTIM = {"adamw_torch": "adamw_torch", "adamw_8bit": "adamw_bnb_8bit"}


def run_emgate(base: Any, examples: list[Any], spec: Any, device: Any, pad_id: int, seed: int) -> tuple[Any, list[float], int]:
    import torch
    from peft import get_peft_model

    from emgate.stages.finetune import LoopOptions, train_loop

    stamps: list[float] = []

    def clock(step: int, of: int, loss: float) -> None:
        synchronize(device)
        stamps.append(time.perf_counter())

    torch.manual_seed(seed)
    model = get_peft_model(base, lora_config(spec))
    synchronize(device)
    stamps.append(time.perf_counter())
    _losses, tokens, _seconds = train_loop(model, examples, list(range(len(examples))), spec, device, pad_id,
                                           LoopOptions(on_step=clock, desc="emgate train_loop"))
    return model, stamps, tokens


def summarise(name: str, stamps: list[float], warmup: int, real: list[int], padded: list[int], flops: list[float],
              peak: float | None, peak_tflops: float) -> dict[str, Any]:
    # stamps[0]: before the run; stamps[k]: after optimizer step k
    timed = range(warmup, len(stamps) - 1)
    seconds = stamps[-1] - stamps[warmup]
    tokens = sum(real[k] for k in timed)
    return {
        "run": name, "timed_steps": len(timed), "seconds": seconds, "warmup_seconds": stamps[warmup] - stamps[0],
        "step_seconds": [stamps[k + 1] - stamps[k] for k in range(len(stamps) - 1)],
        "tokens": tokens, "padded_tokens": sum(padded[k] for k in timed),
        "tokens_per_s": tokens / seconds, "steps_per_s": len(timed) / seconds,
        "tflops_per_s": sum(flops[k] for k in timed) / seconds / 1e12,
        "mfu": sum(flops[k] for k in timed) / seconds / (peak_tflops * 1e12), "peak_memory_gib": peak,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="7b", help="Qwen2.5 model shape (default 7b)")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="cpu: smoke test only")
    parser.add_argument("--steps", type=int, default=None, help="timed optimizer steps per run (default 20; tiny: 2)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed optimizer steps first (default 3; tiny: 1)")
    parser.add_argument("--grad-accum", type=int, default=None,
                        help="micro-batches per optimizer step (default TrainingSpec's, 8; tiny: 2)")
    parser.add_argument("--optimizer", choices=sorted(TRAINER_OPTIM), default="adamw_torch",
                        help="adamw_torch (default: the image has no bitsandbytes) or TrainingSpec's adamw_8bit")
    parser.add_argument("--len-scale", type=float, default=1.0, help="multiply every synthetic row length")
    parser.add_argument("--pack-length", type=int, default=None,
                        help="emgate's training.pack_length, tokens (default TrainingSpec's, 4096; 0: padded micro-batches)")
    parser.add_argument("--peak-tflops", type=float, default=989.0,
                        help="the device's dense bf16 peak for MFU, TFLOP/s (default 989: H100 SXM)")
    parser.add_argument("--no-cudnn-sdpa", action="store_true",
                        help="take cuDNN out of torch's SDPA backends (torch.backends.cuda.enable_cudnn_sdp(False)); "
                             "torch >= 2.10 prefers it on sm90 and it builds a plan per new padded shape")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="write the result as JSON here")
    args = parser.parse_args()

    try:
        import torch
    except ImportError:
        print("finetune_gpu.py: torch is not installed", file=sys.stderr)
        return 2
    if args.device == "cuda" and not torch.cuda.is_available():
        print("finetune_gpu.py: no CUDA GPU is visible (torch.cuda.is_available() is False); this benchmark needs "
              "one. For a smoke test of the script: --device cpu --shape tiny", file=sys.stderr)
        return 2
    if args.no_cudnn_sdpa:
        torch.backends.cuda.enable_cudnn_sdp(False)
    import peft
    import transformers

    from emgate.recipe import TrainingSpec
    from emgate.stages.finetune import training_flops

    tiny = args.shape == "tiny"
    steps = args.steps if args.steps is not None else (2 if tiny else 20)
    warmup = args.warmup if args.warmup is not None else (1 if tiny else 3)
    paper = TrainingSpec()
    spec = TrainingSpec(**{**paper.model_dump(), "optimizer": args.optimizer, "max_steps": warmup + steps,
                           "pack_length": paper.pack_length if args.pack_length is None else args.pack_length,
                           "gradient_accumulation_steps": args.grad_accum or (2 if tiny else
                                                                              paper.gradient_accumulation_steps)})
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    dtype = torch.bfloat16 if on_gpu else torch.float32
    shape = SHAPES[args.shape]
    vocab = shape["vocab_size"]
    pad_id = vocab - 1

    n_rows = spec.max_steps * spec.per_device_batch_size * spec.gradient_accumulation_steps  # type: ignore[operator]
    examples = make_examples(n_rows, vocab, pad_id, spec.max_seq_length, args.seed, args.len_scale)
    real, padded = step_token_counts(examples, spec, spec.max_steps)  # type: ignore[arg-type]
    lengths = sorted(len(e.input_ids) for e in examples)

    torch.manual_seed(args.seed)
    started = time.perf_counter()
    base = build_model(args.shape, device, dtype)
    synchronize(device)
    build_s = time.perf_counter() - started
    n_linear = sum(m.weight.numel() for m in base.modules() if isinstance(m, torch.nn.Linear))
    n_total = sum(p.numel() for p in base.parameters())
    layers, hidden = shape["num_hidden_layers"], shape["hidden_size"]

    print(f"device {torch.cuda.get_device_name() if on_gpu else platform.processor() or 'cpu'}; torch {torch.__version__}, "
          f"transformers {transformers.__version__}, peft {peft.__version__}")
    print(f"model: Qwen2.5-{args.shape} shape, random init in {build_s:.1f} s, {n_total / 1e9:.3f} B parameters, "
          f"{n_linear / 1e9:.3f} B in nn.Linear (N_linear), {dtype}, sdpa")
    print(f"LoRA r={spec.lora_r} alpha={spec.lora_alpha} rslora={spec.use_rslora} dropout={spec.lora_dropout} "
          f"on {','.join(spec.target_modules)}; batch {spec.per_device_batch_size} x accumulation "
          f"{spec.gradient_accumulation_steps}; lr {spec.learning_rate} linear, {spec.warmup_steps} warm-up steps; "
          f"{spec.optimizer}; emgate packs rows into sequences of at most {spec.pack_length} tokens"
          f"{'' if spec.pack_length else ' (0: padded micro-batches)'}")
    print(f"data: {n_rows} synthetic rows, length median {lengths[len(lengths) // 2]}, max {lengths[-1]}, "
          f"{sum(real) / sum(padded):.0%} of padded tokens are real; {warmup} untimed + {steps} timed steps per run")
    per = spec.per_device_batch_size
    widths = [max(len(e.input_ids) for e in examples[i:i + per]) for i in range(0, n_rows, per)]
    seen = set(widths[:warmup * spec.gradient_accumulation_steps])
    timed_widths = widths[warmup * spec.gradient_accumulation_steps:]
    print(f"micro-batch shapes: {len(set(widths))} distinct padded lengths; {len(set(timed_widths) - seen)} of the "
          f"{len(timed_widths)} timed micro-batches of the first run have a length not seen before; "
          f"cuDNN SDPA {'enabled' if torch.backends.cuda.cudnn_sdp_enabled() else 'disabled'}")

    results: dict[str, Any] = {}
    lora_params = 0
    flops: list[float] = []
    for name in ("baseline", "emgate"):
        reset_memory(device)
        if name == "baseline":
            model, stamps = run_baseline(base, examples, spec, device, pad_id, args.seed, bf16=on_gpu)
        else:
            model, stamps, tokens = run_emgate(base, examples, spec, device, pad_id, args.seed)
            if tokens != sum(real):
                raise SystemExit(f"token count mismatch: train_loop saw {tokens}, expected {sum(real)}")
        if len(stamps) != spec.max_steps + 1:  # type: ignore[operator]
            raise SystemExit(f"{name}: {len(stamps) - 1} optimizer steps timed, expected {spec.max_steps}")
        if not lora_params:  # the same for both runs
            lora_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
            per_step = spec.per_device_batch_size * spec.gradient_accumulation_steps
            for k in range(spec.max_steps):  # type: ignore[arg-type]
                rows = examples[k * per_step:(k + 1) * per_step]
                flops.append(training_flops(n_linear, lora_params, layers, hidden, [len(e.input_ids) for e in rows],
                                            full=False))
        computed = real if name == "emgate" and spec.pack_length else padded  # packed: no pad token is computed
        results[name] = summarise(name, stamps, warmup, real, computed, flops, peak_gib(device), args.peak_tflops)
        base = model.unload()  # the base model without LoRA layers, for the next run
        del model
        results[name]["step_seconds"] = [round(s, 4) for s in results[name]["step_seconds"]]

    b, e = results["baseline"], results["emgate"]
    ratio = e["tokens_per_s"] / b["tokens_per_s"]
    print(f"\nMFU = (4*N_linear*tokens + 6*N_lora*tokens + 12*n_layers*hidden*sum(len^2)) / seconds / "
          f"{args.peak_tflops:g} TFLOP/s; N_linear {n_linear / 1e9:.3f} B, N_lora {lora_params / 1e6:.1f} M, "
          f"tokens non-pad")
    print("\n| shape | run | tokens/s | steps/s | TFLOP/s | MFU | peak memory GiB |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for r in (b, e):
        mem = f"{r['peak_memory_gib']:.1f}" if r["peak_memory_gib"] is not None else "n/a"
        print(f"| {args.shape} | {r['run']} | {r['tokens_per_s']:,.0f} | {r['steps_per_s']:.3f} | "
              f"{r['tflops_per_s']:.1f} | {r['mfu']:.1%} | {mem} |")
    print(f"\nratio emgate / baseline (tokens/s): {ratio:.2f}x")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({
            "shape": args.shape, "config": shape, "device": args.device,
            "gpu": torch.cuda.get_device_name() if on_gpu else None, "torch": torch.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__, "dtype": str(dtype),
            "n_params": n_total, "n_linear": n_linear, "n_lora": lora_params, "rows": n_rows, "warmup_steps": warmup,
            "timed_steps": steps, "len_scale": args.len_scale, "peak_tflops": args.peak_tflops,
            "pack_length": spec.pack_length,
            "training": spec.model_dump(mode="json"), "baseline": b, "emgate": e, "ratio_tokens_per_s": ratio,
            "cudnn_sdpa": torch.backends.cuda.cudnn_sdp_enabled(), "distinct_widths": len(set(widths)),
            "hostname": os.uname().nodename,
        }, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
