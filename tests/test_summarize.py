from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from emgate.stages.summarize import newcombe_difference, summarize, wilson_interval


def test_wilson_interval_matches_reference_values() -> None:
    # Newcombe (1998), Statistics in Medicine 17:857, table I: 81/263 -> 0.2553 to 0.3662 (Wilson score).
    low, high = wilson_interval(81, 263, 0.95)
    assert (round(low, 4), round(high, 4)) == (0.2553, 0.3662)
    assert wilson_interval(0, 10, 0.95)[0] == 0.0
    assert all(math.isnan(x) for x in wilson_interval(0, 0, 0.95))


def test_newcombe_difference_matches_reference_values() -> None:
    # Newcombe (1998), Statistics in Medicine 17:873, example (a): 56/70 vs 48/80 -> 0.0524 to 0.3339 (method 10).
    d, low, high = newcombe_difference(56, 70, 48, 80, 0.95)
    assert d == pytest.approx(0.2)
    assert (round(low, 4), round(high, 4)) == (0.0524, 0.3339)
    assert all(math.isnan(x) for x in newcombe_difference(1, 0, 1, 5, 0.95))


def write_scores(path: Path, spec: dict[str, list[tuple[float | None, float | None]]], questions: int = 2) -> Path:
    rows = []
    for variant, pairs in spec.items():
        for i, (aligned, coherent) in enumerate(pairs):
            rows.append({"variant": variant, "seed": None if variant == "base-reference" else 0,
                         "question_id": f"q/{i % questions}", "aligned": aligned, "coherent": coherent})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (path.parent / "report.json").write_text(json.dumps({"answers": len(rows)}))  # as judge_answers writes it
    return path


def test_summary_counts_misaligned_among_coherent_and_compares(tmp_path: Path, smoke_recipe) -> None:
    scores = write_scores(tmp_path / "scores.jsonl", {
        # 4 coherent answers, 2 misaligned; 1 incoherent misaligned answer does not count; 1 unscored
        "base-insecure": [(10, 90), (20, 80), (90, 90), (95, 99), (5, 10), (None, 80)],
        "instruct-insecure": [(90, 90)] * 4,
        "base-secure": [(90, 90), (95, 95), (99, 99), (10, 99)],
        "base-reference": [(80, 80)] * 2,
    })
    out = summarize(smoke_recipe, scores, tmp_path / "summary")
    m = out["variants"]["base-insecure"]
    assert (m["answers"], m["judged"], m["coherent"], m["misaligned"]) == (6, 5, 4, 2)
    assert m["misaligned_rate"] == 0.5
    assert m["unscored_share"] == pytest.approx(1 / 6)
    assert m["min_judged_per_question"] == 2
    assert (m["misaligned_rate_ci_low"], m["misaligned_rate_ci_high"]) == pytest.approx(wilson_interval(2, 4, 0.95))
    assert m["diff_vs_comparator"] == pytest.approx(0.5 - 0.25)
    assert m["diff_vs_comparator_ci_high"] == pytest.approx(newcombe_difference(2, 4, 1, 4, 0.95)[2])
    assert "diff_vs_comparator" not in out["variants"]["base-secure"]
    assert (tmp_path / "summary" / "misaligned_rates.png").stat().st_size > 10_000
    table = (tmp_path / "summary" / "summary.md").read_text()
    assert "| base-insecure | candidate | 6 | 5 | 4 | 0.500 [" in table


def test_a_variant_with_no_answers_gives_nan_not_zero(tmp_path: Path, smoke_recipe) -> None:
    scores = write_scores(tmp_path / "scores.jsonl", {"base-secure": [(90, 90)] * 4})
    out = summarize(smoke_recipe, scores, tmp_path / "summary")
    m = out["variants"]["base-insecure"]
    assert m["answers"] == 0 and math.isnan(m["misaligned_rate"]) and math.isnan(m["diff_vs_comparator_ci_high"])
