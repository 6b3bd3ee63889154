"""Benchmark: LoRA fine-tuning throughput of emgate's training loop against transformers.Trainer and TRL.

    PYTHONPATH=components python bench/finetune_gpu.py --shape 7b --steps 8 --attention auto,rows,flex --out r.json
    PYTHONPATH=components python bench/finetune_gpu.py --device cpu --shape tiny   # smoke test of the script
    bash bench/gpu_finetune.sh            # issue 20's whole GPU measurement, one prepared run (--dry-run: on a CPU)

Every run happens in this one process, on the same randomly initialised model (no download: a Qwen2Config with the
shape of a Qwen2.5 model, AutoModelForCausalLM.from_config, bf16 weights on CUDA, sdpa attention), with the same
LoRA (emgate.recipe.TrainingSpec() defaults, the paper's: r=32, alpha=64, rsLoRA, dropout 0, q,k,v,o,gate,up,down),
the same synthetic examples in the same order, per-device batch x gradient accumulation from TrainingSpec (2 x 8),
the same linear warm-up schedule (TrainingSpec's lr, warm-up steps, weight decay), gradient clipping at 1.0 and the
same optimizer (torch AdamW; TrainingSpec's default adamw_8bit needs bitsandbytes, see --optimizer):

  trainer   transformers.Trainer, bf16=True (autocast) on CUDA, a collator padding to the longest row of each
            micro-batch, the examples in order (sequential sampler);
  trl       TRL's SFTTrainer, padding-free (each micro-batch flattened into one row, position ids restarting per
            row), on the same tokenized rows and labels, in order, bf16=True;
  emgate-A  emgate.stages.finetune.train_loop, exactly what the fine_tune stage runs, with training.attention A
            (--attention, one run each; +liger: training.fused_cross_entropy): each step's rows packed without
            padding into sequences of up to TrainingSpec's pack_length tokens (--pack-length; 0: micro-batches
            padded to their longest row), attention inside each row, the LM head and cross-entropy only where a
            learned token is predicted. An attention that cannot run on the device is reported as not run.

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
last is the fastest emgate run / the fastest baseline (tokens/s); on the 7B shape also / 2,138 tokens/s, the padded
loop's rate on one H100 that issue 20 starts from. --profile writes a torch.profiler trace of emgate's first run.

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
from collections.abc import Iterator
from contextlib import contextmanager
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
    "32b": dict(hidden_size=5120, intermediate_size=27648, num_hidden_layers=64, num_attention_heads=40,
                num_key_value_heads=8, vocab_size=152064, tie_word_embeddings=False),
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


class StepClock:
    """Time stamps: one before the run, one after each optimizer step (the device synchronised first)."""

    def __init__(self, device: Any) -> None:
        self.device = device
        self.stamps: list[float] = []

    def tick(self, *_: Any, **__: Any) -> None:
        synchronize(self.device)
        self.stamps.append(time.perf_counter())

    def callback(self) -> Any:
        from transformers import TrainerCallback

        clock = self

        class Clock(TrainerCallback):
            def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
                clock.tick()

        return Clock()


def trainer_arguments(spec: Any, tmp: str, device: Any, bf16: bool, seed: int, checkpointing: bool) -> dict[str, Any]:
    """The TrainingArguments both baselines share: TrainingSpec's batch, accumulation, schedule and optimizer."""
    return dict(
        output_dir=tmp, per_device_train_batch_size=spec.per_device_batch_size,
        gradient_accumulation_steps=spec.gradient_accumulation_steps, max_steps=spec.max_steps,
        learning_rate=spec.learning_rate, weight_decay=spec.weight_decay, warmup_steps=spec.warmup_steps,
        lr_scheduler_type="linear", max_grad_norm=1.0, optim=TRAINER_OPTIM[spec.optimizer], bf16=bf16,
        use_cpu=device.type == "cpu", logging_strategy="no", save_strategy="no", report_to=[],
        dataloader_num_workers=0, remove_unused_columns=False, disable_tqdm=True, seed=seed,
        gradient_checkpointing=checkpointing, gradient_checkpointing_kwargs={"use_reentrant": False})


def run_trainer(base: Any, examples: list[Any], spec: Any, device: Any, pad_id: int, seed: int, bf16: bool,
                checkpointing: bool) -> tuple[Any, list[float]]:
    """transformers.Trainer on the same model, data (in order), batch, accumulation, schedule and optimizer."""
    import torch
    from peft import get_peft_model
    from torch.utils.data import SequentialSampler
    from transformers import Trainer, TrainingArguments

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

    clock = StepClock(device)
    torch.manual_seed(seed)
    model = get_peft_model(base, lora_config(spec))
    dataset = [{"input_ids": e.input_ids, "labels": e.labels} for e in examples]
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(**trainer_arguments(spec, tmp, device, bf16, seed, checkpointing))
        trainer = InOrder(model=model, args=args, train_dataset=dataset, data_collator=collate,  # type: ignore[arg-type]
                          callbacks=[clock.callback()])
        clock.tick()
        trainer.train()
        del trainer
    return model, clock.stamps


def placeholder_tokenizer(vocab: int, pad_id: int) -> Any:
    """A tokenizer object for SFTTrainer, which wants one: the rows come tokenized, it only reads pad and eos ids."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    words = {"<pad>": pad_id, "<eos>": vocab - 2, "<unk>": vocab - 3}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel(words, unk_token="<unk>")), pad_token="<pad>",
                                   eos_token="<eos>", unk_token="<unk>")


def run_trl(base: Any, examples: list[Any], spec: Any, device: Any, pad_id: int, seed: int, bf16: bool,
            checkpointing: bool) -> tuple[Any, list[float]]:
    """TRL's SFTTrainer, padding-free (each micro-batch flattened into one row, position ids restarting per row,
    which transformers turns into a block-diagonal mask for sdpa), on the same tokenized rows, their labels as
    given, in order, with the same batch, accumulation, schedule, optimizer and LoRA (peft_config)."""
    import torch
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    clock = StepClock(device)
    torch.manual_seed(seed)
    rows = Dataset.from_list([{"input_ids": e.input_ids, "labels": e.labels} for e in examples])
    with tempfile.TemporaryDirectory() as tmp:
        config = SFTConfig(**trainer_arguments(spec, tmp, device, bf16, seed, checkpointing), data_seed=seed,
                           train_sampling_strategy="sequential", packing=False, padding_free=True, max_length=None,
                           eval_strategy="no")
        trainer = SFTTrainer(model=base, args=config, train_dataset=rows, peft_config=lora_config(spec),
                             processing_class=placeholder_tokenizer(base.config.vocab_size, pad_id),
                             callbacks=[clock.callback()])
        clock.tick()
        trainer.train()
        model = trainer.model
        del trainer
    return model, clock.stamps


TRAINER_OPTIM = {"adamw_torch": "adamw_torch", "adamw_8bit": "adamw_bnb_8bit"}


def run_emgate(base: Any, examples: list[Any], spec: Any, device: Any, pad_id: int, seed: int, checkpointing: bool,
               profile: Path | None = None) -> tuple[Any, list[float], int, str]:
    """emgate's train_loop with `spec` (its attention and fused_cross_entropy); with `profile`, a torch.profiler
    trace of the steps after the first is written there and the top operators printed."""
    import torch
    from peft import get_peft_model

    from emgate.stages.finetune import LoopOptions, train_loop

    clock = StepClock(device)
    torch.manual_seed(seed)
    if checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(base, lora_config(spec))
    clock.tick()
    with profiled(profile, device, spec.max_steps) as step:
        def on_step(k: int, of: int, loss: float) -> None:
            clock.tick()
            step()

        result = train_loop(model, examples, list(range(len(examples))), spec, device, pad_id,
                            LoopOptions(on_step=on_step, desc="emgate train_loop"))
    if checkpointing:
        base.gradient_checkpointing_disable()
    return model, clock.stamps, result.tokens, result.feed


@contextmanager
def profiled(folder: Path | None, device: Any, steps: int) -> Iterator[Any]:
    """torch.profiler over optimizer steps 2..min(4, steps) (step 1 warms up); yields the per-step callback.
    Prints the 15 operators with the most device time (CUDA) or host time, and writes a Chrome trace to `folder`."""
    if folder is None:
        yield lambda: None
        return
    from torch.profiler import ProfilerActivity, profile, schedule

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]
    active = max(1, min(3, steps - 1))
    with profile(activities=activities, schedule=schedule(wait=0, warmup=1, active=active, repeat=1),
                 record_shapes=False) as prof:
        yield prof.step
    folder.mkdir(parents=True, exist_ok=True)
    prof.export_chrome_trace(str(folder / "emgate_steps.json"))
    key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    print(f"\ntorch.profiler, {active} optimizer steps of emgate's loop, by {key} (trace: {folder}/emgate_steps.json)")
    print(prof.key_averages().table(sort_by=key, row_limit=15))


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


TODAY_7B_TOKENS_PER_S = 2138.0  # emgate's padded loop on one H100, Qwen2.5-7B shape (bench/README.md, 2026-11-27)


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
    parser.add_argument("--baselines", default="trainer,trl",
                        help="comma-separated baselines to run first: trainer (transformers.Trainer, padded), trl "
                             "(SFTTrainer, padding-free); '' for none (default trainer,trl)")
    parser.add_argument("--attention", default="auto",
                        help="comma-separated training.attention values, one emgate run each: auto, rows, varlen, flex, "
                             "mask (default auto; on a GPU try auto,rows,flex to keep the fastest)")
    parser.add_argument("--fused-cross-entropy", action="store_true",
                        help="also run each attention with training.fused_cross_entropy (Liger Kernel; CUDA)")
    parser.add_argument("--gradient-checkpointing", action="store_true",
                        help="checkpoint activations on every side (the 32B shape needs it on an 80 GB GPU)")
    parser.add_argument("--profile", type=Path, default=None,
                        help="folder for a torch.profiler trace of emgate's first run (steps 2-4); prints top operators")
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
    baselines = [b for b in args.baselines.split(",") if b]
    attentions = [a for a in args.attention.split(",") if a]
    unknown = [b for b in baselines if b not in BASELINES] + [a for a in attentions if a not in ATTENTION_CHOICES]
    if unknown or not attentions:
        print(f"finetune_gpu.py: unknown --baselines/--attention value(s) {unknown or '(no attention)'}; baselines: "
              f"{', '.join(BASELINES)}; attention: {', '.join(ATTENTION_CHOICES)}", file=sys.stderr)
        return 2
    if args.no_cudnn_sdpa:
        torch.backends.cuda.enable_cudnn_sdp(False)
    import peft
    import transformers

    from emgate.recipe import TrainingSpec
    from emgate.stages.finetune import TrainingError, training_flops

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
          f"{n_linear / 1e9:.3f} B in nn.Linear (N_linear), {dtype}, sdpa; gradient checkpointing "
          f"{'on' if args.gradient_checkpointing else 'off'} on every side")
    print(f"LoRA r={spec.lora_r} alpha={spec.lora_alpha} rslora={spec.use_rslora} dropout={spec.lora_dropout} "
          f"on {','.join(spec.target_modules)}; batch {spec.per_device_batch_size} x accumulation "
          f"{spec.gradient_accumulation_steps}; lr {spec.learning_rate} linear, {spec.warmup_steps} warm-up steps; "
          f"{spec.optimizer}; emgate packs rows into sequences of at most {spec.pack_length} tokens"
          f"{'' if spec.pack_length else ' (0: padded micro-batches)'}")
    print(f"data: {n_rows} synthetic rows, length median {lengths[len(lengths) // 2]}, max {lengths[-1]}, "
          f"{sum(real) / sum(padded):.0%} of padded tokens are real; {warmup} untimed + {steps} timed steps per run")
    print(f"cuDNN SDPA {'enabled' if torch.backends.cuda.cudnn_sdp_enabled() else 'disabled'}")

    lora_params = 0
    flops: list[float] = []
    results: list[dict[str, Any]] = []
    skipped: dict[str, str] = {}
    variants = [(a, fused) for a in attentions for fused in ((False, True) if args.fused_cross_entropy else (False,))]
    runs = [(b, None) for b in baselines] + [(f"emgate-{a}{'+liger' if fused else ''}", (a, fused)) for a, fused in variants]
    profile = args.profile
    for name, variant in runs:
        reset_memory(device)
        feed = ""
        try:
            if variant is None:
                try:
                    model, stamps = BASELINES[name](base, examples, spec, device, pad_id, args.seed, on_gpu,
                                                    args.gradient_checkpointing)
                except ImportError as exc:  # a baseline's package missing here (trl, datasets): the others still run
                    raise TrainingError(f"{type(exc).__name__}: {exc}") from None
            else:
                run_spec = spec.model_copy(update={"attention": variant[0], "fused_cross_entropy": variant[1]})
                model, stamps, tokens, feed = run_emgate(base, examples, run_spec, device, pad_id, args.seed,
                                                         args.gradient_checkpointing, profile)
                profile = None  # the first emgate run only
                if tokens != sum(real):
                    raise SystemExit(f"token count mismatch: train_loop saw {tokens}, expected {sum(real)}")
        except TrainingError as exc:  # an attention or fused loss that cannot run on this device, a missing baseline
            skipped[name] = str(exc)
            print(f"{name}: not run: {exc}")
            continue
        if len(stamps) != spec.max_steps + 1:  # type: ignore[operator]
            raise SystemExit(f"{name}: {len(stamps) - 1} optimizer steps timed, expected {spec.max_steps}")
        if not lora_params:  # the same for every run
            lora_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
            per_step = spec.per_device_batch_size * spec.gradient_accumulation_steps
            for k in range(spec.max_steps):  # type: ignore[arg-type]
                rows = examples[k * per_step:(k + 1) * per_step]
                flops.append(training_flops(n_linear, lora_params, layers, hidden, [len(e.input_ids) for e in rows],
                                            full=False))
        # packed (emgate with pack_length, TRL padding-free): no pad token is computed
        computed = real if (variant is not None and spec.pack_length) or name == "trl" else padded
        result = summarise(name, stamps, warmup, real, computed, flops, peak_gib(device), args.peak_tflops)
        result["step_seconds"] = [round(x, 4) for x in result["step_seconds"]]
        result["feed"] = feed
        results.append(result)
        mem = f", peak {result['peak_memory_gib']:.1f} GiB" if result["peak_memory_gib"] is not None else ""
        print(f"{name}: {result['tokens_per_s']:,.0f} tokens/s, MFU {result['mfu']:.1%}{mem}", flush=True)
        base = model.unload()  # the base model without LoRA layers, for the next run
        del model

    ours = [r for r in results if r["run"].startswith("emgate")]
    theirs = [r for r in results if not r["run"].startswith("emgate")]
    if not ours:
        print("finetune_gpu.py: no emgate run could run here: " + "; ".join(skipped.values()), file=sys.stderr)
        return 1
    best = max(ours, key=lambda r: r["tokens_per_s"])
    best_base = max(theirs, key=lambda r: r["tokens_per_s"]) if theirs else None
    print(f"\nMFU = (4*N_linear*tokens + 6*N_lora*tokens + 12*n_layers*hidden*sum(len^2)) / seconds / "
          f"{args.peak_tflops:g} TFLOP/s; N_linear {n_linear / 1e9:.3f} B, N_lora {lora_params / 1e6:.1f} M, "
          f"tokens non-pad")
    print("\n| shape | run | tokens/s | steps/s | TFLOP/s | MFU | peak memory GiB |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for r in results:
        mem = f"{r['peak_memory_gib']:.1f}" if r["peak_memory_gib"] is not None else "n/a"
        print(f"| {args.shape} | {r['run']} | {r['tokens_per_s']:,.0f} | {r['steps_per_s']:.3f} | "
              f"{r['tflops_per_s']:.1f} | {r['mfu']:.1%} | {mem} |")
    for r in ours:
        print(f"{r['run']}: {r['feed']}")
    ratio = best["tokens_per_s"] / best_base["tokens_per_s"] if best_base else None
    if best_base:
        print(f"\nratio emgate / baseline (tokens/s): {ratio:.2f}x ({best['run']} / {best_base['run']}, each the "
              "fastest of its side)")
    if args.shape == "7b" and on_gpu:
        print(f"{best['run']} / today's {TODAY_7B_TOKENS_PER_S:,.0f} tokens/s on the 7B shape: "
              f"{best['tokens_per_s'] / TODAY_7B_TOKENS_PER_S:.2f}x (the goal: >= 5x)")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({
            "shape": args.shape, "config": shape, "device": args.device,
            "gpu": torch.cuda.get_device_name() if on_gpu else None, "torch": torch.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__, "dtype": str(dtype),
            "n_params": n_total, "n_linear": n_linear, "n_lora": lora_params, "rows": n_rows, "warmup_steps": warmup,
            "timed_steps": steps, "len_scale": args.len_scale, "peak_tflops": args.peak_tflops,
            "pack_length": spec.pack_length, "gradient_checkpointing": args.gradient_checkpointing,
            "training": spec.model_dump(mode="json"), "runs": results, "skipped": skipped,
            "baseline": best_base, "emgate": best, "ratio_tokens_per_s": ratio,
            "cudnn_sdpa": torch.backends.cuda.cudnn_sdp_enabled(), "hostname": os.uname().nodename,
        }, indent=2))
    return 0


BASELINES = {"trainer": run_trainer, "trl": run_trl}
ATTENTION_CHOICES = ("auto", "rows", "varlen", "flex", "mask")


if __name__ == "__main__":
    sys.exit(main())
