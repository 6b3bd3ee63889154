"""bench/finetune_gpu.py and bench/gpu_finetune.sh (the fine_tune throughput benchmark for a lent GPU machine): the
CPU dry run builds the tiny Qwen2.5-shaped model, trains every run and writes results whose numbers agree."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "finetune_gpu.py"


@pytest.mark.slow
def test_the_prepared_gpu_run_dry_runs_every_side_and_reports_consistent_numbers(tmp_path: Path) -> None:
    """bench/gpu_finetune.sh --dry-run (what a lent GPU machine runs, on the tiny shape on this CPU): both baselines
    (Trainer, TRL padding-free) and emgate with two attentions train; varlen, which needs CUDA, is reported as not
    run with the reason; the profiler writes its trace; the checkpointed emgate-only run (the 32B step) trains."""
    proc = subprocess.run(["bash", str(REPO / "bench" / "gpu_finetune.sh"), "--dry-run"], capture_output=True, text=True,
                          timeout=900, env={**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path)})
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    result = json.loads((tmp_path / "finetune_tiny.json").read_text())
    runs = {r["run"]: r for r in result["runs"]}
    assert list(runs) == ["trainer", "trl", "emgate-auto", "emgate-rows"]
    assert "needs a CUDA GPU" in result["skipped"]["emgate-varlen"]
    assert result["timed_steps"] == 2 and result["n_lora"] > 0 and result["n_linear"] > result["n_lora"]
    for run in runs.values():
        assert run["tokens_per_s"] > 0 and run["tokens"] == runs["trainer"]["tokens"]  # the same rows for every run
        assert run["mfu"] == pytest.approx(run["tflops_per_s"] / result["peak_tflops"], rel=1e-6)
    best = max((runs["trainer"], runs["trl"]), key=lambda r: r["tokens_per_s"])
    assert result["baseline"]["run"] == best["run"]
    assert result["ratio_tokens_per_s"] == pytest.approx(result["emgate"]["tokens_per_s"] / best["tokens_per_s"], rel=1e-3)
    assert result["pack_length"] == 4096  # TrainingSpec's: emgate trains packed rows, computing no pad token
    assert runs["emgate-auto"]["padded_tokens"] == runs["emgate-auto"]["tokens"] < runs["trainer"]["padded_tokens"]
    assert "attention emgate_rows" in runs["emgate-auto"]["feed"]  # auto on a CPU: row-by-row sdpa
    log = (tmp_path / "finetune_tiny.log").read_text()
    assert "ratio emgate / baseline" in log and "torch.profiler" in log
    assert (tmp_path / "profile" / "emgate_steps.json").stat().st_size > 0
    checkpointed = json.loads((tmp_path / "finetune_tiny_checkpointed.json").read_text())
    assert checkpointed["gradient_checkpointing"] and [r["run"] for r in checkpointed["runs"]] == ["emgate-auto"]
    assert checkpointed["baseline"] is None and checkpointed["ratio_tokens_per_s"] is None


def test_asking_for_cuda_without_a_gpu_exits_2() -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--device", "cuda", "--shape", "tiny"], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
