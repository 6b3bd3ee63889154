"""bench/finetune_gpu.py (the fine_tune MFU benchmark for a lent GPU machine): its CPU dry run builds the tiny
Qwen2.5-shaped model, trains both runs and writes a result whose numbers agree with each other."""

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
def test_cpu_dry_run_trains_both_runs_and_reports_consistent_mfu(tmp_path: Path) -> None:
    out = tmp_path / "result.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--shape", "tiny", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    base, ours = result["baseline"], result["emgate"]
    assert result["timed_steps"] == 2 and result["n_lora"] > 0 and result["n_linear"] > result["n_lora"]
    for run in (base, ours):
        assert run["tokens_per_s"] > 0
        assert run["mfu"] == pytest.approx(run["tflops_per_s"] / result["peak_tflops"], rel=1e-6)
    assert result["ratio_tokens_per_s"] == pytest.approx(ours["tokens_per_s"] / base["tokens_per_s"], rel=1e-3)
    assert result["pack_length"] == 4096  # TrainingSpec's: emgate trains packed rows, computing no pad token
    assert ours["padded_tokens"] == ours["tokens"] < base["padded_tokens"]
    assert "ratio emgate / baseline" in proc.stdout


def test_asking_for_cuda_without_a_gpu_exits_2() -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--device", "cuda", "--shape", "tiny"], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
