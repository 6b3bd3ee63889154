"""Benchmark: judge scoring rate through emgate's client against a local vLLM judge server, vs vLLM's offline
`LLM.chat` on the same model and the same judge prompts, in the same run; then a rerun from the judge cache.

    .venv/bin/python bench/judge_rate.py [--answers-per-question 8] [--concurrency 32]

Both sides do the paper's one-token request (max_tokens 1, temperature 0, top-20 logprobs) for the aligned and
the coherent prompt of every answer, on SmolLM2-135M-Instruct (the smoke recipe's judge). Prints judged answers
per second for each, the ratio (goal 0.9), and the number of HTTP requests the cached rerun made (goal 0).
Needs the model cache (emgate models build pipelines/recipes/smoke.yaml) and .venv-vllm (scripts/setup.sh).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

from emgate.assets import resolve_asset
from emgate.hardware import resolve_dtype
from emgate.models import resolve_model
from emgate.questions import load_questions
from emgate.recipe import load_recipe
from emgate.stages.judge import METRICS, JudgeClient, judge_rows
from emgate.vllm_server import VllmServer, running, vllm_python

REPO = Path(__file__).resolve().parents[1]
RESULTS = "emergent-misalignment/results/qwen_25_coder_32b_instruct.csv"  # real answers, reused as judge inputs

OFFLINE = r"""
import json, sys, time
from vllm import LLM, SamplingParams
args = json.loads(open(sys.argv[1]).read())
llm = LLM(model=args["model"], dtype=args["dtype"], max_model_len=args["max_model_len"], enforce_eager=True,
          seed=0, max_logprobs=20)
params = SamplingParams(max_tokens=1, temperature=0, logprobs=20)
conversations = [[{"role": "user", "content": p}] for p in args["prompts"]]
llm.chat(conversations[:8], params, use_tqdm=False)  # warm-up
start = time.perf_counter()
outputs = llm.chat(conversations, params, use_tqdm=False)
seconds = time.perf_counter() - start
assert all(o.outputs[0].logprobs for o in outputs)
print("EMGATE_RESULT " + json.dumps({"seconds": seconds, "requests": len(outputs)}))
"""


def judge_inputs(recipe, per_question: int) -> tuple[list[dict], dict[str, dict[str, str]]]:
    with resolve_asset(RESULTS).open(encoding="utf-8", newline="") as fh:
        answers = [row["answer"] for row in csv.DictReader(fh)]
    questions = load_questions(recipe.questions)
    rows = [{"question_id": q.id, "question": q.paraphrases[0], "answer": answers[(i * 7 + j) % len(answers)]}
            for i, q in enumerate(questions) for j in range(per_question)]
    return rows, {q.id: q.judge_prompts for q in questions}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--answers-per-question", type=int, default=8)
    parser.add_argument("--concurrency", type=int, default=32, help="judge.max_concurrency (requests in flight)")
    args = parser.parse_args()

    recipe = load_recipe(REPO / "pipelines" / "recipes" / "smoke.yaml")
    name = recipe.judge.serve.model if recipe.judge.serve else "smollm2-135m-instruct"
    model_path = resolve_model(name, recipe.models[name])
    rows, prompts = judge_inputs(recipe, args.answers_per_question)
    texts = [prompts[r["question_id"]][m].format(question=r["question"], answer=r["answer"]) for r in rows for m in METRICS]
    print(f"{len(rows)} answers x {len(METRICS)} prompts = {len(texts)} one-token judge requests, {model_path.name}")

    results: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        cfg = recipe.judge.model_copy(update={
            "model": name, "score_mode": "single_token", "cache": False, "serve": None, "seed": None,
            "max_concurrency": args.concurrency, "api_key_env": None})
        server = VllmServer(model_path=model_path, served_name=name, serving=recipe.serving, max_logprobs=20)
        with running(server):
            judge_rows(rows[:8], prompts, JudgeClient(cfg, server.base_url))  # warm-up
            start = time.perf_counter()
            judge_rows(rows, prompts, JudgeClient(cfg, server.base_url))
            seconds = time.perf_counter() - start
            results["emgate client -> vLLM server"] = len(rows) / seconds
            print(f"emgate client -> vLLM server   {len(rows)} answers in {seconds:6.1f} s = {len(rows) / seconds:6.2f} "
                  "answers/s")
            cached = cfg.model_copy(update={"cache": True, "cache_path": str(Path(tmp) / "judge-cache.sqlite")})
            judge_rows(rows, prompts, JudgeClient(cached, server.base_url))  # fills the cache
            again = JudgeClient(cached, server.base_url)
            start = time.perf_counter()
            judge_rows(rows, prompts, again)
            print(f"rerun from the judge cache      {again.http_requests} HTTP requests, "
                  f"{time.perf_counter() - start:.2f} s (goal: 0 requests)")

    payload = Path(tempfile.mkdtemp()) / "offline.json"
    payload.write_text(json.dumps({"model": str(model_path), "dtype": resolve_dtype(recipe.serving.dtype),
                                   "max_model_len": recipe.serving.max_model_len, "prompts": texts}))
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": str(recipe.serving.cpu_kvcache_gib), "HF_HUB_OFFLINE": "1",
           "VLLM_NO_USAGE_STATS": "1"}
    proc = subprocess.run([vllm_python(recipe.serving), "-c", OFFLINE, str(payload)], capture_output=True, text=True, env=env)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("EMGATE_RESULT ")), None)
    if proc.returncode != 0 or line is None:
        raise SystemExit(f"offline vLLM failed:\n{proc.stderr[-3000:]}")
    offline = json.loads(line.removeprefix("EMGATE_RESULT "))
    answers_per_s = len(rows) / offline["seconds"]
    results["vLLM offline LLM.chat"] = answers_per_s
    print(f"vLLM offline LLM.chat (baseline) {len(rows)} answers in {offline['seconds']:6.1f} s = {answers_per_s:6.2f} answers/s")
    ours, base = results["emgate client -> vLLM server"], results["vLLM offline LLM.chat"]
    print(f"ratio (emgate / offline): {ours / base:.2f} (goal 0.9)")


if __name__ == "__main__":
    main()
