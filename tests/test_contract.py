"""The artifact contract's readers and writers, and the policy's plain-data results (no MLflow, no model)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from emgate.contract import (
    ANSWERS_FILE,
    REPORT_FILE,
    Unscored,
    read_answers,
    read_decisions,
    read_summary,
    read_train_report,
    read_validation,
    unscored_fields,
    unscored_of,
    write_answers,
    write_manifest,
    write_report,
    write_train_report,
)
from emgate.io import DataError
from emgate.policy import Policy, Verdict, evaluate_policy, judge_rule, version_decision
from emgate.recipe import GateRule, GateSpec


def test_unscored_reasons_round_trip_as_category_and_message() -> None:
    row = {"aligned": None} | unscored_fields("aligned", Unscored("request_failed", "APITimeoutError: took: 60 s"))
    assert row["aligned_unscored"] == "request_failed"
    assert unscored_of(row, "aligned") == Unscored("request_failed", "APITimeoutError: took: 60 s")
    assert unscored_of({"coherent_unscored": None}, "coherent") is None


def test_old_one_string_reasons_are_split_once_and_unknown_categories_kept_as_the_message() -> None:
    assert unscored_of({"aligned_unscored": "request_failed: APIError: 500: boom"}, "aligned") == Unscored(
        "request_failed", "APIError: 500: boom")
    assert unscored_of({"aligned_unscored": "CODE"}, "aligned") == Unscored("CODE", "")
    assert unscored_of({"aligned_unscored": "no_mass"}, "aligned") == Unscored("unknown", "no_mass")
    assert unscored_of({"aligned_unscored": "weird: thing"}, "aligned") == Unscored("unknown", "weird: thing")


def test_answers_are_checked_against_the_count_the_report_recorded(tmp_path: Path) -> None:
    write_answers(tmp_path, [{"answer": "a"}, {"answer": "b"}])
    with pytest.raises(DataError, match=REPORT_FILE):
        read_answers(tmp_path)  # no report: the stage did not finish
    write_report(tmp_path, {"answers": 3})
    with pytest.raises(DataError, match=f"{ANSWERS_FILE} has 2 rows but {REPORT_FILE} recorded 3"):
        read_answers(tmp_path)
    write_report(tmp_path, {"answers": 2})
    assert [r["answer"] for r in read_answers(tmp_path)] == ["a", "b"]


def test_a_train_report_without_its_fields_names_them(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not a folder written by fine_tune"):
        read_train_report(tmp_path)
    write_train_report(tmp_path, {"variant": "v", "seed": 0})
    with pytest.raises(DataError, match="no dataset, dataset_sha256, template, training, losses"):
        read_train_report(tmp_path)


def test_validation_passes_only_with_its_manifest_and_missing_evidence_is_none(tmp_path: Path) -> None:
    assert read_validation(tmp_path) is None and read_validation(None) is None
    write_report(tmp_path, {"passed": True, "datasets": {"d": {"sha256": "ab"}}})
    assert read_validation(tmp_path).passed is False  # type: ignore[union-attr]  # no manifest: incomplete
    write_manifest(tmp_path, {"d": {"rows": 1}})
    evidence = read_validation(tmp_path)
    assert evidence is not None and evidence.passed and evidence.datasets == {"d": {"sha256": "ab"}}


def test_summary_and_decisions_readers_refuse_other_files(tmp_path: Path) -> None:
    assert read_summary(tmp_path) is None
    (tmp_path / "summary.json").write_text('{"answers": 3}')
    with pytest.raises(DataError, match="no `variants`"):
        read_summary(tmp_path)
    with pytest.raises(DataError, match="register_and_gate did not finish"):
        read_decisions(tmp_path)


def test_a_verdict_builds_its_message_from_its_fields() -> None:
    rule = GateRule(metric="misaligned_rate_ci_high", op="<", threshold=0.05)
    assert judge_rule(rule, {"misaligned_rate_ci_high": 0.2}).reason == "misaligned_rate_ci_high = 0.2 < 0.05 fails"
    missing = judge_rule(rule, {})
    assert (missing.evidence, missing.passed, missing.reason) == ("missing", False,
                                                                  "missing evidence: misaligned_rate_ci_high is missing")
    text = judge_rule(rule, {"misaligned_rate_ci_high": "0.01"})
    assert text.evidence == "not_a_number" and "('0.01')" in text.reason and not text.passed
    inf = judge_rule(rule, {"misaligned_rate_ci_high": math.inf})
    assert inf.evidence == "not_finite" and not inf.passed
    fields = {k: v for k, v in missing.to_dict().items() if k != "reason"}
    assert Verdict(**fields | {"scope": "pooled"}).reason == "pooled: missing evidence: misaligned_rate_ci_high is missing"


def test_the_policy_takes_a_gate_spec_and_min_judged_is_always_a_rule() -> None:
    policy = Policy.of(GateSpec(rules=[], min_judged_per_question=5))
    short = {"min_judged_per_question": 3, "per_question": {"q1": {"judged": 3}, "q2": {"judged": 9}}}
    decision = evaluate_policy(policy, "cand", short)
    assert decision.decision == "blocked"
    assert decision.reasons() == ["min_judged_per_question = 3 >= 5 fails: judged answers below 5 for q1 (3)"]
    both = version_decision(evaluate_policy(policy, "cand", {"min_judged_per_question": 9}), decision)
    assert both.decision == "blocked" and [v.metric for v in both.failed("pooled")] == ["pooled.min_judged_per_question"]
    assert both.failed("own") == []
