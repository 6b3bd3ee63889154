"""Benchmark: assistant-token training throughput of emgate's fine_tune loop against TRL's SFTTrainer, same run.

    .venv/bin/python bench/finetune_vs_trl.py [--steps 3] [--warmup 1] [--grad-accum 8] [--max-seq-length 2048]
    .venv/bin/python bench/finetune_vs_trl.py --quick          # one step of 2 short rows per side: well under a minute

Measures assistant tokens (labels != -100) trained per second of optimizer steps, on CPU in float32:

  emgate  emgate.stages.finetune.train_loop, what the fine_tune stage runs, on examples made by its
          tokenize_example (prompt tokens labelled -100, completion = answer + end of turn learned), with
          TrainingSpec's pack_length (--pack-length): each step's rows packed without padding into sequences of up
          to that many tokens, attention inside each row, the LM head and cross-entropy only where a learned token
          is predicted; --emgate-padded also runs it with pack_length 0 (micro-batches padded to their longest row,
          the model's own loss: the loop before packing) as the side "emgate-padded", which is never the baseline;
  TRL     trl.SFTTrainer (TRL 1.16) on a prompt/completion dataset whose strings are exactly emgate's
          render_prompt / render_completion (so the token ids match, which the script checks row by row),
          completion_only_loss=True, measured twice: padding_free=True (the micro-batch flattened into one
          sequence with position_ids, no pad tokens; transformers builds the block-diagonal mask for sdpa) and
          padding_free=False (padded to the longest row, like emgate). The faster of the two is the baseline.

Equal settings on both sides: SmolLM2-135M-Instruct from the smoke recipe's model cache (emgate.models.resolve_model),
float32, the model's default attention (sdpa), LoRA from emgate.recipe.TrainingSpec (r 32, alpha 64, rsLoRA,
dropout 0, q,k,v,o,gate,up,down_proj), the first --rows rows of the paper's insecure.jsonl (after --offset rows,
default 0) through emgate's `user_assistant` template, the same rows in the same order (emgate: order 0..rows-1; TRL:
train_sampling_strategy="sequential"), per-device batch 2 x --grad-accum, TrainingSpec's learning rate, warm-up
steps, weight decay and linear schedule, max_seq_length, torch AdamW (adamw_torch), gradient clipping at 1.0,
seed 0, no gradient checkpointing (TRL's default turns it on; off is faster and is what emgate does), no bf16
(TRL's default; fp32 is what fine_tune uses on CPU), no logging, evaluation or checkpoint saving on TRL's side,
dataloader in the main process on both.

Timing: model loading, LoRA wrapping and tokenization are outside the clock. Before any run, one forward and
backward pass on a throwaway model takes the process's one-time costs off the first side. Each run does --warmup
untimed optimizer steps, then --steps timed ones; the clock runs from the end of the last warm-up step to the end
of the last timed step (emgate: its on_step callback; TRL: a TrainerCallback's on_step_end), so it covers
collation, forward, backward, clipping, the optimizer and the scheduler, and whatever either loop adds per step.
All runs happen in this one process one after the other (--rounds repeats them in alternating order and takes each
timed step at its fastest round: other processes only slow a step down), each on a freshly loaded model. Process
CPU seconds and the 1-minute load average are printed beside the wall clock: on a shared machine they show when
another process took cores during a run. Assistant tokens are counted from emgate's examples for the timed steps
and, on TRL's side, from the labels of the micro-batches its training_step got; the two must agree.

Prints a table and, last, one JSON line: ours_tokens_per_s, trl_tokens_per_s (the baseline), ratio (ours / TRL),
assistant_tokens, steps, and the details. Needs the model cache (built by `emgate models` or the first slow test;
pipelines/recipes/smoke.yaml) and the paper's data (EMGATE_ASSETS_DIR or the pinned download).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "pipelines" / "recipes" / "smoke.yaml"
MODEL_KEY = "smollm2-135m-instruct"
DATASET = "emergent-misalignment/data/insecure.jsonl"
TEMPLATE = "user_assistant"
IGNORE = -100
SIDES = ("emgate", "trl-padding-free", "trl-padded")
EMGATE_SIDES = ("emgate", "emgate-padded")


@dataclass
class Run:
    """One side's timed run."""

    side: str
    seconds: float = 0.0
    steps: int = 0
    assistant_tokens: int = 0  # labels != -100 in the timed steps
    input_tokens: int = 0  # non-pad tokens in the timed steps
    computed_tokens: int = 0  # tokens the model ran on (padding included)
    cpu_seconds: float = 0.0  # CPU time of this process (all threads) over the timed steps
    step_seconds: list[float] = field(default_factory=list)  # wall clock of each timed step
    step_cpu: list[float] = field(default_factory=list)  # CPU time of each timed step
    load: list[float] = field(default_factory=list)  # 1-minute load average before and after each run
    mean_loss: float | None = None  # over all steps, warm-up included (a sanity check, not a comparison)

    @property
    def tokens_per_s(self) -> float:
        return self.assistant_tokens / self.seconds if self.seconds else 0.0

    @property
    def tokens_per_cpu_s(self) -> float:
        return self.assistant_tokens / self.cpu_seconds if self.cpu_seconds else 0.0


Stamp = tuple[float, float]  # (wall clock, process CPU time), seconds


def now() -> Stamp:
    return time.perf_counter(), time.process_time()


def cpu_info() -> tuple[str, list[str]]:
    """The CPU's model name and which of the flags that decide bf16 speed it has (avx2, avx512f, avx512_bf16, amx_*)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine(), []
    name = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), "")
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    wanted = [f for f in flags if f in ("avx2", "avx512f", "avx512_bf16") or f.startswith("amx")]
    return name or platform.machine(), sorted(set(wanted))


def load_rows(n: int, offset: int = 0) -> list[list[dict[str, str]]]:
    """The conversations of rows offset .. offset + n - 1 of the paper's insecure.jsonl."""
    from emgate.assets import resolve_asset
    from emgate.io import read_jsonl

    rows = []
    for i, row in enumerate(read_jsonl(resolve_asset(DATASET))):
        if i >= offset:
            rows.append(row["messages"])
        if len(rows) == n:
            break
    if len(rows) < n:
        raise SystemExit(f"{DATASET} has only {offset + len(rows)} rows, {offset + n} asked for")
    return rows


def step_rows(n_rows: int, per_step: int, steps: int) -> list[list[int]]:
    """Row indices of each optimizer step: rows in order, wrapping around (n_rows is a multiple of per_step)."""
    return [[(k * per_step + j) % n_rows for j in range(per_step)] for k in range(steps)]


def lora_config(spec: Any) -> Any:
    from peft import LoraConfig

    return LoraConfig(r=spec.lora_r, lora_alpha=spec.lora_alpha, lora_dropout=spec.lora_dropout,
                      target_modules=list(spec.target_modules), use_rslora=spec.use_rslora, task_type="CAUSAL_LM")


def load_model(path: Path) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)  # as fine_tune does on a CPU


def warm_process(path: Path, examples: list[Any], spec: Any, pad_id: int) -> float:
    """One forward and backward pass on a throwaway LoRA model, before any run: the first pass in a process pays
    one-time costs (kernel set-up, memory growth) that would otherwise fall on whichever side runs first."""
    import torch
    from peft import get_peft_model

    from emgate.stages.finetune import _collate

    started = time.perf_counter()
    model = get_peft_model(load_model(path), lora_config(spec))
    model.train()
    model(**_collate(examples[:spec.per_device_batch_size], pad_id)).loss.backward()
    del model
    gc.collect()
    torch.manual_seed(0)
    return time.perf_counter() - started


def run_emgate(path: Path, examples: list[Any], spec: Any, pad_id: int, warmup: int, seed: int,
               side: str = "emgate") -> Run:
    import torch
    from peft import get_peft_model

    from emgate.stages.finetune import LoopOptions, train_loop

    torch.manual_seed(seed)
    model = get_peft_model(load_model(path), lora_config(spec))
    stamps = [now()]

    def on_step(step: int, of: int, loss: float) -> None:
        stamps.append(now())

    losses = train_loop(model=model, train=examples, order=list(range(len(examples))), cfg=spec,
                        device=torch.device("cpu"), pad_id=pad_id,
                        options=LoopOptions(on_step=on_step, desc="emgate train_loop")).losses
    del model
    gc.collect()
    return timed_run(side, stamps, warmup, sum(losses) / len(losses) if losses else None)


def timed_run(side: str, stamps: list[Stamp], warmup: int, mean_loss: float | None) -> Run:
    # stamps[0]: before the first step; stamps[k]: after optimizer step k
    steps = len(stamps) - 1 - warmup
    timed = range(warmup, len(stamps) - 1)
    return Run(side, seconds=stamps[-1][0] - stamps[warmup][0], cpu_seconds=stamps[-1][1] - stamps[warmup][1],
               steps=steps, mean_loss=mean_loss, step_seconds=[stamps[k + 1][0] - stamps[k][0] for k in timed],
               step_cpu=[stamps[k + 1][1] - stamps[k][1] for k in timed])


def best_of(rounds: list[Run]) -> Run:
    """One side's rounds combined: each timed step (the same rows in every round) at its fastest round's time.
    Another process can only slow a step down, so on a shared machine this is the closest to the quiet time."""
    first = rounds[0]
    fastest = [min(rounds, key=lambda r: r.step_seconds[k]) for k in range(first.steps)]
    step_seconds = [r.step_seconds[k] for k, r in enumerate(fastest)]
    step_cpu = [r.step_cpu[k] for k, r in enumerate(fastest)]
    return Run(first.side, seconds=sum(step_seconds), cpu_seconds=sum(step_cpu), steps=first.steps,
               assistant_tokens=first.assistant_tokens, input_tokens=first.input_tokens,
               computed_tokens=first.computed_tokens, step_seconds=step_seconds, step_cpu=step_cpu,
               load=[x for r in rounds for x in r.load], mean_loss=first.mean_loss)


def run_trl(path: Path, tokenizer: Any, pairs: list[dict[str, str]], spec: Any, warmup: int, seed: int,
            padding_free: bool, examples: list[Any]) -> tuple[Run, int]:
    """SFTTrainer on the prompt/completion pairs. Returns the run (with its own token counts) and how many of the
    rows TRL tokenized differently from emgate's examples."""
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    side = "trl-padding-free" if padding_free else "trl-padded"
    stamps: list[Stamp] = []
    seen: list[tuple[int, int, int, int]] = []  # (global step, assistant tokens, input tokens, computed tokens)

    class Clock(TrainerCallback):
        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            stamps.append(now())

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            stamps.append(now())

    class Counting(SFTTrainer):
        def training_step(self, model: Any, inputs: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
            labels = inputs["labels"]
            real = int(inputs["attention_mask"].sum()) if "attention_mask" in inputs else labels.numel()
            seen.append((self.state.global_step, int((labels != IGNORE).sum()), real, labels.numel()))
            return super().training_step(model, inputs, *args, **kwargs)

    # TRL 1.16 refuses max_length with padding_free and no packing (it would not truncate). With rows to cut, that side
    # gets emgate's cut token ids and labels instead of the strings (the padded side checks that TRL's own
    # tokenization with max_length gives the same); the collation is still TRL's padding-free one.
    pretokenized = padding_free and any(len(e.input_ids) >= spec.max_seq_length for e in examples)
    rows = [{"input_ids": e.input_ids, "labels": e.labels} for e in examples] if pretokenized else pairs
    torch.manual_seed(seed)
    model = load_model(path)
    with tempfile.TemporaryDirectory() as tmp:
        config = SFTConfig(
            output_dir=tmp, per_device_train_batch_size=spec.per_device_batch_size,
            gradient_accumulation_steps=spec.gradient_accumulation_steps, max_steps=spec.max_steps,
            learning_rate=spec.learning_rate, weight_decay=spec.weight_decay, warmup_steps=spec.warmup_steps,
            lr_scheduler_type="linear", max_grad_norm=1.0, optim="adamw_torch", seed=seed, data_seed=seed,
            use_cpu=True, bf16=False, fp16=False, gradient_checkpointing=False,
            train_sampling_strategy="sequential", dataloader_num_workers=0,
            logging_strategy="no", save_strategy="no", eval_strategy="no", report_to="none", disable_tqdm=True,
            completion_only_loss=True, packing=False, padding_free=padding_free,
            # with padding_free, rows to cut come pre-tokenized (above)
            max_length=None if padding_free else spec.max_seq_length,
        )
        trainer = Counting(model=model, args=config, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                           peft_config=lora_config(spec), callbacks=[Clock()])
        prepared = trainer.train_dataset
        # rows whose token ids or labels differ from emgate's, or that TRL dropped; -1: not checked (emgate's ids given)
        mismatched = -1 if pretokenized else abs(len(prepared) - len(examples)) + sum(  # type: ignore[arg-type]
            1 for row, e in zip(prepared, examples, strict=False)  # type: ignore[arg-type]
            if list(row["input_ids"]) != e.input_ids or list(row["labels"]) != e.labels)
        result = trainer.train()
        del trainer
    del model
    gc.collect()
    run = timed_run(side, stamps, warmup, float(result.training_loss))
    timed = [s for s in seen if s[0] >= warmup]
    run.assistant_tokens = sum(s[1] for s in timed)
    run.input_tokens = sum(s[2] for s in timed)
    run.computed_tokens = sum(s[3] for s in timed)
    return run, mismatched


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=None, help="timed optimizer steps per run (default 3)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed optimizer steps first (default 1)")
    parser.add_argument("--grad-accum", type=int, default=None,
                        help="micro-batches per optimizer step (default TrainingSpec's, 8: the paper's)")
    parser.add_argument("--batch", type=int, default=None, help="per-device batch (default TrainingSpec's, 2)")
    parser.add_argument("--rows", type=int, default=None,
                        help="first rows of insecure.jsonl to train on, a multiple of batch x accumulation "
                             "(default: (warmup + steps) x batch x accumulation, each row once)")
    parser.add_argument("--offset", type=int, default=None, help="skip this many rows of insecure.jsonl first (default 0)")
    parser.add_argument("--max-seq-length", type=int, default=None,
                        help="tokens per example, longer ones cut (default TrainingSpec's, 2048: the paper's)")
    parser.add_argument("--pack-length", type=int, default=None,
                        help="emgate's training.pack_length, tokens (default TrainingSpec's, 4096; 0: padded micro-batches)")
    parser.add_argument("--emgate-padded", action="store_true",
                        help="also run emgate with pack_length 0 (the side emgate-padded, not a baseline)")
    parser.add_argument("--trl", choices=["both", "padding-free", "padded"], default="both",
                        help="TRL variants to measure; with both, the faster is the baseline (default both)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="repeat every run this many times, alternating the order; each timed step counts at its "
                             "fastest round (default 1)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's, one per core)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true",
                        help="smoke test (tests/test_bench.py): per run one timed step, no warm-up, of one micro-batch "
                             "of 2 short rows (rows 4-5: 459 tokens), unless other options say otherwise")
    parser.add_argument("--out", type=Path, help="also write the result JSON here")
    args = parser.parse_args()
    quick = {"steps": 1, "warmup": 0, "grad_accum": 1, "offset": 4} if args.quick else {}
    for name, default in {"steps": 3, "warmup": 1, "offset": 0, **quick}.items():
        if getattr(args, name) is None:
            setattr(args, name, default)

    import peft
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers
    import trl
    from transformers import AutoTokenizer

    from emgate.models import resolve_model
    from emgate.recipe import TrainingSpec, load_recipe
    from emgate.stages.finetune import tokenize_example
    from emgate.templates import render_completion, render_prompt, template_record

    paper = TrainingSpec()
    batch = args.batch or paper.per_device_batch_size
    accum = args.grad_accum or paper.gradient_accumulation_steps
    max_len = args.max_seq_length or paper.max_seq_length
    total_steps = args.warmup + args.steps
    per_step = batch * accum
    n_rows = args.rows or total_steps * per_step
    if n_rows % per_step:
        parser.error(f"--rows must be a multiple of batch x accumulation ({per_step}), so both loops wrap alike")
    spec = TrainingSpec(**{**paper.model_dump(), "optimizer": "adamw_torch", "per_device_batch_size": batch,
                           "gradient_accumulation_steps": accum, "max_seq_length": max_len, "max_steps": total_steps,
                           "epochs": math.ceil(total_steps / (n_rows // per_step)), "checkpoint_every": 0,
                           "pack_length": paper.pack_length if args.pack_length is None else args.pack_length})
    padded_spec = spec.model_copy(update={"pack_length": 0})

    recipe = load_recipe(SMOKE)
    model_path = resolve_model(MODEL_KEY, recipe.models[MODEL_KEY])
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    record = template_record(TEMPLATE, tokenizer)
    conversations = load_rows(n_rows, args.offset)
    examples = [tokenize_example(tokenizer, record, m, max_len) for m in conversations]
    pairs = [{"prompt": render_prompt(record, tokenizer, m[:-1]), "completion": render_completion(record, tokenizer, m)}
             for m in conversations]
    truncated = sum(1 for e in examples if len(e.input_ids) == max_len)

    # what each timed step trains on, from emgate's examples (the same rows on both sides)
    timed_rows = [i for rows in step_rows(n_rows, per_step, total_steps)[args.warmup:] for i in rows]
    expected_assistant = sum(sum(1 for x in examples[i].labels if x != IGNORE) for i in timed_rows)
    expected_input = sum(len(examples[i].input_ids) for i in timed_rows)
    padded = 0
    for k in range(0, len(timed_rows), batch):
        micro = timed_rows[k:k + batch]
        padded += len(micro) * max(len(examples[i].input_ids) for i in micro)

    lengths = sorted(len(e.input_ids) for e in examples)
    cpu_name, cpu_flags = cpu_info()
    print(f"machine: {cpu_name} ({' '.join(cpu_flags) or 'no avx2/avx512/amx flags'}), {os.cpu_count()} CPUs, torch threads "
          f"{torch.get_num_threads()}; torch {torch.__version__}, transformers {transformers.__version__}, "
          f"peft {peft.__version__}, trl {trl.__version__}")
    print(f"model: {MODEL_KEY} ({model_path}), float32, the model's default attention (sdpa)")
    print(f"LoRA r={spec.lora_r} alpha={spec.lora_alpha} rslora={spec.use_rslora} dropout={spec.lora_dropout} on "
          f"{','.join(spec.target_modules)}; batch {batch} x accumulation {accum}; lr {spec.learning_rate} linear, "
          f"{spec.warmup_steps} warm-up steps, weight decay {spec.weight_decay}; adamw_torch; clip 1.0; seed {args.seed}")
    print(f"data: {n_rows} rows of insecure.jsonl from row {args.offset}, template {TEMPLATE}, max_seq_length {max_len} "
          f"({truncated} rows cut); lengths median {lengths[len(lengths) // 2]}, max {lengths[-1]} tokens; "
          f"{args.warmup} untimed + {args.steps} timed steps per run, {args.rounds} round(s)")
    print(f"timed steps: {expected_assistant} assistant tokens, {expected_input} tokens, {padded} padded to the "
          f"longest row of each micro-batch ({expected_input / padded:.0%} real)")
    if spec.pack_length:
        from emgate.stages.finetune import step_packs

        packs = [step_packs([[examples[i] for i in rows[k:k + batch]] for k in range(0, per_step, batch)],
                            spec.pack_length) for rows in step_rows(n_rows, per_step, total_steps)[args.warmup:]]
        print(f"emgate packs rows into sequences of at most {spec.pack_length} tokens: "
              + "; ".join(f"step {args.warmup + k + 1}: " + " + ".join(str(sum(len(e.input_ids) for e in p)) for p in ps)
                          for k, ps in enumerate(packs)))

    print(f"process warm-up (one micro-batch, not counted): {warm_process(model_path, examples, spec, pad_id):.1f} s")
    sides = (["emgate"] + (["emgate-padded"] if args.emgate_padded else [])
             + [s for s in SIDES[1:] if args.trl in ("both", s.removeprefix("trl-"))])
    rounds: dict[str, list[Run]] = {s: [] for s in sides}
    mismatched: dict[str, int] = {}
    for r in range(args.rounds):
        for side in sides if r % 2 == 0 else list(reversed(sides)):
            print(f"\n--- round {r + 1}: {side}", flush=True)
            load_before = os.getloadavg()[0]
            if side in EMGATE_SIDES:
                side_spec = spec if side == "emgate" else padded_spec
                run = run_emgate(model_path, examples, side_spec, pad_id, args.warmup, args.seed, side)
                run.assistant_tokens, run.input_tokens = expected_assistant, expected_input
                run.computed_tokens = expected_input if side_spec.pack_length else padded
            else:
                run, mismatched[side] = run_trl(model_path, tokenizer, pairs, spec, args.warmup, args.seed,
                                                side == "trl-padding-free", examples)
            run.load = [round(load_before, 2), round(os.getloadavg()[0], 2)]
            print(f"{side}: {run.assistant_tokens} assistant tokens in {run.seconds:.2f} s = {run.tokens_per_s:.1f}/s; "
                  f"steps {[round(x, 2) for x in run.step_seconds]} s; load {run.load}", flush=True)
            rounds[side].append(run)
    runs = {side: best_of(rs) for side, rs in rounds.items()}

    ours = runs["emgate"]
    base = max((runs[s] for s in sides if s not in EMGATE_SIDES), key=lambda x: x.tokens_per_s)
    ratio = ours.tokens_per_s / base.tokens_per_s

    print("\n| side | timed steps | assistant tokens | tokens (non-pad) | tokens computed (with padding) | seconds | "
          "s/step | assistant tokens/s | CPU seconds | assistant tokens/CPU-s | load avg (1 min) | mean loss |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: |")
    for side in sides:
        x = runs[side]
        loss = f"{x.mean_loss:.4f}" if x.mean_loss is not None else "-"
        print(f"| {side}{' (baseline)' if x is base else ''} | {x.steps} | {x.assistant_tokens:,} | {x.input_tokens:,} | "
              f"{x.computed_tokens:,} | {x.seconds:.2f} | {x.seconds / x.steps:.2f} | {x.tokens_per_s:.1f} | "
              f"{x.cpu_seconds:.2f} | {x.tokens_per_cpu_s:.1f} | {min(x.load):.1f}-{max(x.load):.1f} | {loss} |")
    if args.rounds > 1:
        print(f"(each timed step at its fastest of {args.rounds} rounds; rounds' rates: "
              + "; ".join(f"{s} {', '.join(f'{r.tokens_per_s:.1f}' for r in rounds[s])}" for s in sides) + ")")
    print(f"\nratio emgate / TRL ({base.side}), assistant tokens/s: {ratio:.3f}x "
          f"(per CPU-second: {ours.tokens_per_cpu_s / base.tokens_per_cpu_s:.3f}x)")
    token_notes = [f"{s} round {i + 1}: {r.assistant_tokens} assistant tokens, emgate {ours.assistant_tokens}"
                   for s in sides for i, r in enumerate(rounds[s]) if r.assistant_tokens != ours.assistant_tokens]
    token_notes += [f"{s}: {n} of {n_rows} rows tokenized differently from emgate" for s, n in mismatched.items() if n > 0]
    if truncated and mismatched.get("trl-padding-free") == -1:
        print(f"note: {truncated} rows are cut at max_seq_length {max_len}; TRL 1.16 refuses max_length with padding_free "
              "(no packing), so trl-padding-free got the cut token ids and labels instead of the strings")
    for note in token_notes:
        print(f"WARNING {note}")

    result = {
        "ours_tokens_per_s": ours.tokens_per_s, "trl_tokens_per_s": base.tokens_per_s, "ratio": ratio,
        "trl_baseline": base.side, "ratio_per_cpu_s": ours.tokens_per_cpu_s / base.tokens_per_cpu_s,
        "assistant_tokens": ours.assistant_tokens, "trl_assistant_tokens": base.assistant_tokens,
        "steps": ours.steps, "warmup_steps": args.warmup, "rounds": args.rounds, "rows": n_rows, "offset": args.offset,
        "batch": batch, "grad_accum": accum, "max_seq_length": max_len, "pack_length": spec.pack_length,
        "truncated_rows": truncated,
        "rows_tokenized_differently": mismatched,
        "runs": {s: {"tokens_per_s": round(x.tokens_per_s, 3), "seconds": round(x.seconds, 3), "steps": x.steps,
                     "cpu_seconds": round(x.cpu_seconds, 3), "tokens_per_cpu_s": round(x.tokens_per_cpu_s, 3),
                     "assistant_tokens": x.assistant_tokens, "input_tokens": x.input_tokens,
                     "computed_tokens": x.computed_tokens, "step_seconds": [round(t, 3) for t in x.step_seconds],
                     "load_avg_1min": x.load, "mean_loss": x.mean_loss,
                     "rounds_tokens_per_s": [round(r.tokens_per_s, 3) for r in rounds[s]]} for s, x in runs.items()},
        "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
        "trl": trl.__version__, "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count(),
        "cpu": cpu_name, "cpu_flags": cpu_flags,
    }
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
