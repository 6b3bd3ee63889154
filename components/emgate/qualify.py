"""emgate judge calibrate: score the calibration sets (emgate/qualification.py) with a recipe's judge and write the
qualification report the judge stage checks (stages/judge.py check_qualification). No pipeline task: run it when
the judge changes."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from emgate.assets import resolve_asset, sha256_file
from emgate.contract import QUALIFICATION_FILE
from emgate.io import write_json, write_jsonl
from emgate.qualification import (
    MIN_RECALL,
    MIN_SPECIFICITY,
    PLOT_FILE,
    PUBLISHED_MISALIGNED,
    SCORES_FILE,
    calibrate,
    calibration_thresholds,
    default_aligned_set,
    judge_fingerprint,
    plot_calibration,
    read_aligned_set,
    read_labelled,
    sha256_json,
)
from emgate.questions import load_questions
from emgate.recipe import Recipe
from emgate.stages.judge import JudgeClient, judge_base_url, judge_rows


def qualify_judge(recipe: Recipe, out_dir: Path, labelled: Path | None = None, aligned: Path | None = None,  # noqa: PLR0913
                  min_recall: float = MIN_RECALL, min_specificity: float = MIN_SPECIFICITY,
                  limit: int | None = None) -> dict[str, Any]:
    """Judge both sets with the recipe's judge, write qualification_scores.jsonl, calibration.png and
    qualification.json (last) in out_dir, and return the report. `limit`: at most N rows of each set."""
    labelled = labelled or resolve_asset(PUBLISHED_MISALIGNED)
    aligned = aligned or default_aligned_set()
    rows = read_labelled(labelled, limit) + read_aligned_set(aligned, limit)
    questions = load_questions(recipe.questions)
    standard = questions[0].judge_prompts  # the paper's prompts are the same for every question
    by_suffix = {q.id.rsplit("/", 1)[-1]: q.judge_prompts for q in questions}
    prompts = {row["question_id"]: by_suffix.get(row["question_id"], standard) for row in rows}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / QUALIFICATION_FILE).unlink(missing_ok=True)  # a rerun that fails leaves no old verdict behind
    client = JudgeClient(recipe.judge, judge_base_url(recipe.judge))
    scored = judge_rows(rows, prompts, client)
    thresholds = calibration_thresholds(recipe)
    cfg = recipe.summarize
    report: dict[str, Any] = calibrate(scored, thresholds, cfg.confidence, min_recall, min_specificity,
                                       cfg.bootstrap_seed)
    write_jsonl(out_dir / SCORES_FILE, scored)
    fingerprint = judge_fingerprint(recipe)
    report |= {
        "rows": len(rows), "judge_model": recipe.judge.model, "judge_model_snapshot": sorted(client.snapshots),
        "judge_fingerprint": fingerprint, "judge_fingerprint_sha256": sha256_json(fingerprint),
        "scoring": fingerprint["scoring"], "thresholds": thresholds, "confidence": cfg.confidence,
        "sets": {"misaligned": {"file": str(labelled), "sha256": sha256_file(labelled)},
                 "aligned": {"file": str(aligned), "sha256": sha256_file(aligned)}},
        "limit": limit, "scores_file": SCORES_FILE, "scores_sha256": sha256_file(out_dir / SCORES_FILE),
        "qualified_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    plot_calibration(scored, report, out_dir / PLOT_FILE)
    report["plot"] = PLOT_FILE
    report["report_sha256"] = sha256_json(report)
    write_json(out_dir / QUALIFICATION_FILE, report)
    return report
