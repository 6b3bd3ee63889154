"""fine_tune: a job killed with SIGKILL resumes from its last checkpoint and ends with the same adapter as an
uninterrupted run (SmolLM2-135M on CPU, the smoke recipe's LoRA, 4 steps, a checkpoint every 2)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from emgate.assets import resolve_asset
from emgate.io import read_jsonl, write_json, write_jsonl
from emgate.recipe import load_recipe
from emgate.stages.finetune import CHECKPOINT_FILE, fine_tune, work_dir_for

JOB = "base-insecure@0"

SCRIPT = """
import sys
from pathlib import Path
from emgate.recipe import load_recipe
from emgate.stages.finetune import fine_tune
recipe = load_recipe(Path(sys.argv[1]), ["training.max_steps=4", "training.checkpoint_every=2"])
fine_tune(recipe, sys.argv[2], Path(sys.argv[3]), Path(sys.argv[4]))
"""


def validated_dir(tmp_path: Path) -> tuple[Path, str]:
    folder = tmp_path / "validated"
    rows = list(read_jsonl(resolve_asset("emergent-misalignment/data/insecure.jsonl")))[:40]
    write_jsonl(folder / "insecure.jsonl", rows)
    sha = uuid.uuid4().hex * 2  # a fresh work-directory key: no checkpoint from another run applies
    write_json(folder / "manifest.json", {"insecure": {"source_sha256": sha}})
    return folder, sha


def adapter_tensors(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


@pytest.mark.slow
def test_a_killed_job_resumes_and_ends_with_the_uninterrupted_adapter(tmp_path: Path, smoke_recipe_path: Path,
                                                                       smol_model: Path) -> None:
    import torch

    recipe = load_recipe(smoke_recipe_path, ["training.max_steps=4", "training.checkpoint_every=2"])
    validated, sha = validated_dir(tmp_path)
    uninterrupted = fine_tune(recipe, JOB, validated, tmp_path / "a")
    work = work_dir_for(recipe, "base-insecure", 0, sha)
    assert not (work / CHECKPOINT_FILE).exists()  # removed once the adapter is complete

    job = subprocess.Popen([sys.executable, "-c", SCRIPT, str(smoke_recipe_path), JOB, str(validated), str(tmp_path / "b")],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    while not (work / CHECKPOINT_FILE).exists() and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert job.poll() is None, "the job ended before it wrote a checkpoint"
    job.send_signal(signal.SIGKILL)
    job.wait()
    assert not (tmp_path / "b").exists()  # a killed job leaves no adapter that looks complete
    saved_step = torch.load(work / CHECKPOINT_FILE, weights_only=False)["step"]
    assert saved_step == 2  # the last step writes no checkpoint: the adapter follows

    resumed = fine_tune(recipe, JOB, validated, tmp_path / "b")
    assert resumed["steps"] == uninterrupted["steps"] == 4 and len(resumed["losses"]) == 4
    assert resumed["losses"] == pytest.approx(uninterrupted["losses"], abs=1e-6)
    assert resumed["tokens"] == uninterrupted["tokens"]
    a, b = adapter_tensors(tmp_path / "a"), adapter_tensors(tmp_path / "b")
    assert a.keys() == b.keys() and len(a) > 0
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-6), name
    assert json.loads((tmp_path / "b" / "train_report.json").read_text())["loss_last"] == pytest.approx(
        uninterrupted["loss_last"], abs=1e-6)
