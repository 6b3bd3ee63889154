"""Signed decisions' pure parts (issue 18): a report's verdicts recomputed from its own figures and policy, the
decision history's ordering, the pinned base model a production floor demands, the development keys of a local
run, and the gate refusing to decide without its signing key. No MLflow server: the registry side is in
test_registry.py and test_mlflow_auth.py."""

from __future__ import annotations

import copy
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from emgate.cli import app
from emgate.decisions import History
from emgate.floor import DEV_FLOOR, PACKAGE_FLOOR, load_floor, packaged
from emgate.policy import (
    PolicyBelowFloor,
    effective_policy,
    evaluate_policy,
    policy_record,
    recheck_report,
    recipe_policy,
    version_decision,
)
from emgate.recipe import load_recipe
from emgate.signing import DecisionRecord, OverrideRecord, SigningKeyError, dev_keypair
from tests.factories import REPO, SMOKE_RECIPE, mlflow_recipe, prepared_training, write_scores

PAPER = REPO / "pipelines" / "recipes" / "paper.yaml"
FIGURES = {"misaligned_rate_ci_high": 0.01, "diff_vs_comparator_ci_high": 0.0, "misaligned_rate_worst_case_ci_high": 0.02,
           "diff_vs_comparator_worst_case_ci_high": 0.01, "misaligned_rate_xss_included_ci_high": 0.01,
           "mean_coherence": 88.0, "unscored_share": 0.0, "dataset_validation_passed": True,
           "min_judged_per_question": 30, "answers": 240}


def report(own: dict[str, Any] | None = None) -> dict[str, Any]:
    """A gate report as register_and_gate signs it, for the smoke recipe under the dev floor."""
    floor = load_floor(packaged(DEV_FLOOR))
    policy = effective_policy(floor, load_recipe(SMOKE_RECIPE).gate)
    own = {**FIGURES, **(own or {})}
    decision = version_decision(evaluate_policy(policy, "v", own), evaluate_policy(policy, "v", FIGURES))
    return json.loads(json.dumps({"decision": decision.decision, "verdicts": [v.to_dict() for v in decision.verdicts],
                                  "policy": policy_record(policy, floor), "metrics": own, "pooled_metrics": FIGURES}))


def test_a_consistent_report_rechecks_clean_passed_or_blocked() -> None:
    assert recheck_report(report()) == []
    blocked = report({"misaligned_rate_ci_high": 0.6})
    assert blocked["decision"] == "blocked" and recheck_report(blocked) == []
    missing = report({"mean_coherence": None})
    assert missing["decision"] == "blocked" and recheck_report(missing) == []


def _edit(r: dict[str, Any], metric: str, **changes: Any) -> dict[str, Any]:
    r = copy.deepcopy(r)
    next(v for v in r["verdicts"] if v["metric"] == metric).update(changes)
    return r


@pytest.mark.parametrize(("edit", "problem"), [
    (lambda r: _edit(r, "misaligned_rate_ci_high", passed=True) | {"decision": "passed"},
     "verdict misaligned_rate_ci_high: recorded passed, but 0.6 < 0.5 does not"),
    (lambda r: _edit(r, "pooled.mean_coherence", value=10.0),
     "verdict pooled.mean_coherence: its value 10.0 is not the report's figure (88.0)"),
    (lambda r: {**r, "verdicts": [v for v in r["verdicts"] if v["metric"] != "pooled.unscored_share"]},
     "the report has no verdict pooled.unscored_share"),
    (lambda r: {**r, "policy": {**r["policy"], "min_judged_per_question": 1}},
     "the report's policy does not match its own sha256"),
    (lambda r: {**r, "decision": "passed"}, "the report's decision is passed, but a verdict failed"),
    (lambda r: {**r, "verdicts": []}, "missing evidence: the gate report has no rule verdicts"),
])
def test_a_report_whose_verdicts_do_not_follow_from_its_figures_is_named(edit, problem: str) -> None:
    blocked = report({"misaligned_rate_ci_high": 0.6})
    problems = recheck_report(edit(blocked))
    assert any(p.startswith(problem) for p in problems), problems


def _record(seq: int, decision: str = "passed", minutes: int = 0, sha: str = "a") -> DecisionRecord:
    return DecisionRecord(sequence=seq, registered_model="m", version="1", run_id=f"run{seq}", report_uri="u",
                          report_sha256=sha * 64, decision=decision,  # type: ignore[arg-type]
                          created_at=datetime(2026, 12, 1, tzinfo=UTC) + timedelta(minutes=minutes))


def test_the_newest_record_is_the_decision_and_rivals_at_the_same_sequence_conflict() -> None:
    history = History("m/1", decisions=sorted([_record(2, "blocked", 5), _record(1)],
                                              key=lambda r: (r.sequence, r.created_at)))
    assert history.current is not None and history.current.decision == "blocked" and history.next_sequence() == 3
    assert history.conflicts() == []
    history.decisions.append(_record(2, "passed", 6, sha="b"))  # a second gate run at the same time
    assert history.current.decision == "passed" and len(history.conflicts()) == 1
    assert "two gate runs decided at once" in history.conflicts()[0]
    assert History("m/1").current is None and History("m/1").next_sequence() == 1


def test_an_override_counts_only_for_the_decision_it_names() -> None:
    old = OverrideRecord(registered_model="m", version="1", decision_sequence=1, actor="alice", reason="SEC-1")
    history = History("m/1", decisions=[_record(1, "blocked"), _record(2, "blocked", 5)], overrides=[old])
    assert history.override_for_current() is None  # re-gated and blocked again: the old override is spent
    new = OverrideRecord(registered_model="m", version="1", decision_sequence=2, actor="bob", reason="SEC-2")
    history.overrides.append(new)
    assert history.override_for_current() == new


def test_a_production_floor_refuses_an_unpinned_base_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    paper_floor = load_floor(packaged(PACKAGE_FLOOR))
    recipe = load_recipe(PAPER)
    with pytest.raises(PolicyBelowFloor) as refused:
        recipe_policy(paper_floor, recipe)
    assert "models.qwen-coder-32b: source path" in str(refused.value) and "sha256" in str(refused.value)
    assert "models.qwen-coder-32b-instruct" in str(refused.value)
    pinned = load_recipe(PAPER, [f'models.qwen-coder-32b.sha256={{model.safetensors: "{"0" * 64}"}}',
                                 f'models.qwen-coder-32b-instruct.sha256={{model.safetensors: "{"1" * 64}"}}'])
    recipe_policy(paper_floor, pinned)
    recipe_policy(load_floor(packaged(DEV_FLOOR)), recipe)  # the development floor does not ask
    monkeypatch.setenv("EMGATE_POLICY_FILE", str(packaged(PACKAGE_FLOOR)))
    res = CliRunner().invoke(app, ["compile", str(PAPER), "-o", str(tmp_path / "p.yaml")], env={"COLUMNS": "250"})
    assert res.exit_code == 2 and "no sha256 of its weight files" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "p.yaml").exists()


def test_a_local_run_reuses_its_development_key(tmp_path: Path) -> None:
    first = dev_keypair(tmp_path / "keys")
    assert first.private.stat().st_mode & 0o077 == 0
    assert dev_keypair(tmp_path / "keys") == first
    dev_keypair(tmp_path / "other")
    for extra in (tmp_path / "other").iterdir():
        extra.rename(tmp_path / "keys" / extra.name)
    with pytest.raises(SigningKeyError, match="holds 2 private keys"):
        dev_keypair(tmp_path / "keys")


def test_a_local_run_tells_a_later_shell_the_key_and_floor_to_check_its_decisions(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`emgate run` without keys or floor in the environment signs with a development key and gates under dev.yaml;
    its last line must carry both (--public-key, --policy), or `gate explain` in a new shell trusts nothing. Keys the
    user set are theirs to pass: the line then adds no --public-key."""
    from emgate import cli

    for var in ("EMGATE_GATE_SIGNING_KEY_FILE", "EMGATE_GATE_PUBLIC_KEY", "EMGATE_POLICY_FILE"):
        monkeypatch.delenv(var)
    assert cli._use_local_floor() is True and cli._use_dev_keys(tmp_path / "keys") == dev_keypair(tmp_path / "keys").public
    decisions = {"candidates": {}, "tracking_uri": "sqlite:///x.db", "parent_run_id": "r1"}
    with cli.console.capture() as captured:
        cli._print_decisions(decisions, 1.0, [], f" --public-key {tmp_path / 'keys'} --policy dev.yaml")
    assert f"emgate gate explain MODEL@candidate --tracking-uri sqlite:///x.db --public-key {tmp_path / 'keys'} " \
           "--policy dev.yaml" in captured.get()
    assert cli._use_local_floor() is False and cli._use_dev_keys(tmp_path / "keys") is None  # now set: not chosen here


def test_the_gate_without_its_signing_key_decides_nothing(tmp_path: Path, smoke_recipe,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from emgate.contract import write_report
    from emgate.stages.gate import register_and_gate
    from emgate.stages.summarize import summarize

    recipe = mlflow_recipe(smoke_recipe, tmp_path)
    validated, adapters = prepared_training(tmp_path / "run")
    for stage in ("answers", "scores"):
        write_report(tmp_path / "run" / stage, {"answers": 160, "seconds": 1.0})
    scores = write_scores(tmp_path / "run" / "scores" / "scores.jsonl", {v: [(90, 90)] * 40 for v in (
        "base-insecure", "instruct-insecure", "base-secure", "base-reference")}, questions=8)
    summarize(recipe, scores, tmp_path / "run" / "summary")
    monkeypatch.delenv("EMGATE_GATE_SIGNING_KEY_FILE")
    with pytest.raises(SigningKeyError, match="no signing key: set EMGATE_GATE_SIGNING_KEY_FILE"):
        register_and_gate(recipe, "run-unsigned", validated, adapters, tmp_path / "run" / "answers",
                          tmp_path / "run" / "scores", tmp_path / "run" / "summary", tmp_path / "out")
    assert not (tmp_path / "out").exists() and not (tmp_path / "mlflow").exists()  # nothing logged or registered
