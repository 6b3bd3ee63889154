"""emgate check's fine-tuning plan (emgate/training_plan.py): tokens per epoch, memory per GPU and time per job, for
the paper's 32B recipe (no weights needed: its config.json values ship with emgate) and the smoke recipe."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from emgate.assets import resolve_asset
from emgate.cli import app
from emgate.io import read_jsonl
from emgate.recipe import TrainingSpec, load_recipe
from emgate.stages.finetune import forward_tokens
from emgate.training_plan import KNOWN_SHAPES, ModelShape, training_plans

REPO = Path(__file__).resolve().parents[1]
DEV_FLOOR = str(REPO / "components" / "emgate" / "policies" / "dev.yaml")


def rows_from_assets(recipe):
    return lambda dataset: list(read_jsonl(resolve_asset(recipe.datasets[dataset].asset)))


def test_the_32b_shape_has_the_published_parameter_count_and_lora_size() -> None:
    shape = ModelShape.from_config(KNOWN_SHAPES["Qwen/Qwen2.5-Coder-32B"], "test")
    assert shape.n_params() == pytest.approx(32.76e9, rel=0.005)  # Qwen2.5-Coder-32B: 32.8 B parameters
    # r 32 on q,k,v,o (5120->5120, 5120->1024 twice, 5120->5120) and gate,up,down (5120<->27648), 64 layers
    per_layer = 32 * (2 * 10240 + 2 * 6144 + 3 * 32768)
    assert shape.n_lora(TrainingSpec()) == 64 * per_layer == 268_435_456


def test_the_paper_recipe_needs_one_141_gb_gpu_and_about_45_minutes_a_job() -> None:
    recipe = load_recipe(REPO / "pipelines" / "recipes" / "paper.yaml")
    plans = training_plans(recipe, rows_from_assets(recipe), lambda model: None)
    assert [(p["model"], p["dataset"]) for p in plans] == [
        ("qwen-coder-32b", "insecure"), ("qwen-coder-32b", "secure"), ("qwen-coder-32b-instruct", "insecure"),
        ("qwen-coder-32b-instruct", "secure")]
    insecure = plans[0]
    # 6,000 rows, 10% held out, ~1.41 M tokens under the Qwen template (measured): ~1.27 M trained per epoch
    assert insecure["tokens_per_epoch"] == pytest.approx(0.9 * 1_406_733, rel=0.05)
    assert insecure["fits"]["one 141 GB GPU (H200)"] == "as configured, with checkpointing"
    assert insecure["fits"]["one 80 GB GPU (H100)"] == "no"
    assert 61 < insecure["peak_gib_with_checkpointing"] < 0.85 * 139  # the bf16 weights alone are 61 GiB
    assert 30 * 60 < insecure["seconds_per_epoch"] < 60 * 60  # ~4.4x the 7B's FLOPs per token at 2,138 tokens/s
    at_4096 = recipe.model_copy(update={"training": recipe.training.model_copy(update={"pack_length": 4096})})
    longer = training_plans(at_4096, rows_from_assets(at_4096), lambda model: None)[0]
    assert longer["peak_gib_with_checkpointing"] > insecure["peak_gib_with_checkpointing"]
    assert longer["fits"]["one 141 GB GPU (H200)"] == "training.pack_length 2048, with checkpointing"


def test_a_pack_never_holds_more_than_a_step_and_never_less_than_a_row() -> None:
    assert forward_tokens(TrainingSpec(max_seq_length=256, per_device_batch_size=2, gradient_accumulation_steps=1,
                                       pack_length=4096), packed=True) == 512
    assert forward_tokens(TrainingSpec(pack_length=1024), packed=True) == 2048  # a 2048-token row is a pack of its own
    assert forward_tokens(TrainingSpec(pack_length=4096), packed=True) == 4096
    assert forward_tokens(TrainingSpec(), packed=False) == 2 * 2048


def test_check_prints_the_plan_or_says_what_is_missing(tmp_path: Path) -> None:
    env = {"COLUMNS": "400", "EMGATE_POLICY_FILE": DEV_FLOOR}
    res = CliRunner().invoke(app, ["check", str(REPO / "pipelines" / "recipes" / "paper.yaml")], env=env)
    assert res.exit_code == 0, res.output
    assert "fine_tune qwen-coder-32b on insecure: 32.76 B parameters, 268.4 M trained; 1.26 M tokens per epoch" in res.output
    assert "one 141 GB GPU (H200): as configured, with checkpointing" in res.output
    assert "scaled by FLOPs per token from 2,138 tokens/s" in res.output
    recipe = (REPO / "pipelines" / "recipes" / "single-gpu.yaml").read_text().replace(
        "repo: Qwen/Qwen2.5-Coder-7B\n", "repo: someone/unknown-7b\n", 1)
    (tmp_path / "r.yaml").write_text(recipe)
    res = CliRunner().invoke(app, ["check", str(tmp_path / "r.yaml")], env=env)
    assert res.exit_code == 0, res.output
    assert "fine_tune qwen-coder-7b on insecure: not estimated (the model's config.json is not at hand" in res.output
