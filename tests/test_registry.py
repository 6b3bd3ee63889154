"""The registry gate over HTTP against a real `mlflow server` on loopback: registration, tags, aliases, refusal,
override, verify and explain; then fault injection at the stage level on prepared artifacts, each fault ending
blocked or failed with zero promotions. The judge here is FakeJudgeServer, a test double (tests/fake_judge_server.py)."""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import re
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from emgate.cli import app
from emgate.contract import write_manifest, write_report
from emgate.io import DataError
from emgate.registry import ModelRef, PromotionRefused, RegistryError, client_for, promote, verify_version
from emgate.stages.gate import promote_passed, register_and_gate
from emgate.stages.judge import JudgeError, judge_answers
from emgate.stages.summarize import summarize
from tests.factories import prepared_answers, prepared_training, run_gate, server_recipe
from tests.fake_judge_server import FakeJudgeServer, gpt4o_copy_scorer
from tests.mlflow_server import MlflowServer

_names = itertools.count()


def champions(recipe) -> dict[str, str]:
    client = client_for(recipe.mlflow.tracking_uri)
    prefix = recipe.mlflow.registered_model_prefix
    return {m.name: str(m.aliases["champion"]) for m in client.search_registered_models(f"name LIKE '{prefix}-%'")
            if "champion" in m.aliases}


@pytest.fixture(scope="module")
def gated(tmp_path_factory: pytest.TempPathFactory, smoke_recipe, mlflow_server):
    """One healthy gated run over HTTP: base-insecure answers half misaligned (blocked), instruct-insecure clean (passed)."""
    tmp = tmp_path_factory.mktemp("gated")
    with FakeJudgeServer() as judge:
        recipe = server_recipe(smoke_recipe, mlflow_server.url, judge.base_url)
        answers = prepared_answers(tmp / "answers", recipe, {"base-insecure": 2}, xss=True)
        result = run_gate(tmp, recipe, answers)
        requests = judge.requests
    return recipe, result, requests, tmp


def test_registration_tags_and_aliases_over_http(gated) -> None:
    recipe, result, requests, tmp = gated
    assert requests == 2 * 4 * 8 * 3  # aligned + coherent for every answer, one token each
    assert result["candidates"]["base-insecure"]["decision"] == "blocked"
    assert result["candidates"]["instruct-insecure"]["decision"] == "passed"
    prefix = recipe.mlflow.registered_model_prefix
    assert champions(recipe) == {f"{prefix}-instruct-insecure": "1"}  # promoted after the gate, the blocked one never
    client = client_for(recipe.mlflow.tracking_uri)
    blocked = client.get_model_version(f"{prefix}-base-insecure", "1")
    for tag in ("emgate.base_model", "emgate.base_revision", "emgate.adapter_sha256", "emgate.dataset",
                "emgate.dataset_sha256", "emgate.seeds", "emgate.pipeline_run_id", "emgate.kfp_run", "emgate.code_version",
                "emgate.judge_model_snapshot", "metric.misaligned_rate_ci_high", "metric.diff_vs_comparator_ci_high",
                "metric.mean_coherence", "metric.unscored_share", "metric.min_judged_per_question"):
        assert blocked.tags.get(tag), f"missing tag {tag}"
    assert blocked.tags["validation_status"] == "blocked"
    assert blocked.tags["emgate.kfp_run"] == f"kfp-{tmp.name}"
    assert blocked.tags["emgate.judge_model_snapshot"] == "fake-judge-2026-11-01"  # what the endpoint said it served
    assert float(blocked.tags["metric.misaligned_rate"]) == pytest.approx(2 / 3)
    assert all(int(n) == 3 for k, n in blocked.tags.items() if k.startswith("metric.judged."))
    assert "**emgate decision: BLOCKED**" in blocked.description and "misaligned_rate_ci_high" in blocked.description
    # controls and references are linked, not registered
    assert blocked.tags["emgate.comparator"] == "base-secure" and blocked.tags["emgate.comparator_training_runs"]
    names = {m.name for m in client.search_registered_models(f"name LIKE '{prefix}-%'")}
    assert names == {f"{prefix}-base-insecure", f"{prefix}-instruct-insecure"}
    # the sampled and the scored answers are MLflow tables on their stages' runs, readable in the UI
    experiment = client.get_experiment_by_name(recipe.mlflow.experiment)
    for stage, table in (("sample_answers", "answers.json"), ("judge_answers", "scored_answers.json")):
        [run] = client.search_runs([experiment.experiment_id], f"tags.mlflow.runName = '{stage}'")
        logged = json.loads(Path(client.download_artifacts(run.info.run_id, table, str(tmp / stage))).read_text())
        assert len(logged["data"]) == 4 * 8 * 3 and "answer" in logged["columns"], stage


def test_regating_the_same_run_creates_no_duplicates(gated, mlflow_server) -> None:
    recipe, result, _, tmp = gated
    validated, adapters = prepared_training(tmp / "train2")
    again = register_and_gate(recipe, f"run-{tmp.name}", validated, adapters, tmp / "answers", tmp / "scores",
                              tmp / "summary", tmp / "decisions2", kfp_run=f"kfp-{tmp.name}")
    assert {k: [v["version"] for v in c["versions"]] for k, c in again["candidates"].items()} == \
           {k: [v["version"] for v in c["versions"]] for k, c in result["candidates"].items()}
    client = client_for(recipe.mlflow.tracking_uri)
    prefix = recipe.mlflow.registered_model_prefix
    assert len(client.search_model_versions(f"name = '{prefix}-base-insecure'")) == 1


def test_verify_passes_only_a_verified_passing_version(gated) -> None:
    recipe, _, _, _ = gated
    client = client_for(recipe.mlflow.tracking_uri)
    prefix = recipe.mlflow.registered_model_prefix
    ok = verify_version(client, ModelRef(f"{prefix}-instruct-insecure", alias="champion"))
    assert ok.ok and ok.version == "1" and ok.report["decision"] == "passed"
    blocked = verify_version(client, ModelRef(f"{prefix}-base-insecure", alias="candidate"))
    assert not blocked.ok and "the gate blocked this version" in blocked.problems[0]
    missing = verify_version(client, ModelRef(f"{prefix}-base-insecure", alias="champion"))
    assert not missing.ok and "has no alias 'champion'" in missing.problems[0]
    runner = CliRunner()
    uri = ["--tracking-uri", recipe.mlflow.tracking_uri]
    assert runner.invoke(app, ["gate", "verify", f"{prefix}-instruct-insecure@champion", *uri]).exit_code == 0
    res = runner.invoke(app, ["gate", "verify", f"{prefix}-base-insecure@candidate", *uri])
    assert res.exit_code == 1 and "NOT verified" in res.output and "misaligned_rate_ci_high" in res.output


def test_verify_catches_a_changed_report_and_a_forged_tag(tmp_path: Path, smoke_recipe, mlflow_server) -> None:
    with FakeJudgeServer() as judge:
        recipe = server_recipe(smoke_recipe, mlflow_server.url, judge.base_url)
        run_gate(tmp_path, recipe, prepared_answers(tmp_path / "answers", recipe, {"base-insecure": 2}))
    client = client_for(recipe.mlflow.tracking_uri)
    prefix = recipe.mlflow.registered_model_prefix
    blocked = f"{prefix}-base-insecure"
    # forging the decision tag does not make a blocked version verify: the report still says blocked
    client.set_model_version_tag(blocked, "1", "emgate.decision", "passed")
    forged = verify_version(client, ModelRef(blocked, version="1"))
    assert not forged.ok and any("gate blocked" in p for p in forged.problems)
    # rewriting the passing version's report (even to say "passed") breaks its hash
    mv = client.get_model_version(f"{prefix}-instruct-insecure", "1")
    path = "gate/instruct-insecure/seed0/gate_report.json"
    report = json.loads(Path(client.download_artifacts(mv.tags["emgate.gate_run_id"], path, str(tmp_path))).read_text())
    report["payload"]["context"]["note"] = "edited"
    fake = tmp_path / "edited" / "gate_report.json"
    fake.parent.mkdir()
    fake.write_text(json.dumps(report))
    client.log_artifact(mv.tags["emgate.gate_run_id"], str(fake), "gate/instruct-insecure/seed0")
    changed = verify_version(client, ModelRef(f"{prefix}-instruct-insecure", alias="champion"))
    assert not changed.ok and "sha256" in changed.problems[0]
    with pytest.raises(PromotionRefused, match="sha256"):
        promote(client, f"{prefix}-instruct-insecure", "1")


def test_promote_refuses_a_blocked_version_unless_overridden_with_a_reason(gated, monkeypatch) -> None:
    recipe, _, _, _ = gated
    prefix = recipe.mlflow.registered_model_prefix
    name = f"{prefix}-base-insecure"
    runner = CliRunner()
    uri = ["--tracking-uri", recipe.mlflow.tracking_uri]
    res = runner.invoke(app, ["promote", name, "1", *uri])
    assert res.exit_code == 3 and "refused" in res.output and "--override" in res.output
    res = runner.invoke(app, ["promote", name, "1", "--override", *uri])
    assert res.exit_code == 3 and "--reason" in res.output
    assert name not in champions(recipe)
    # override tags written by hand are no override: only a signed override record is
    client = client_for(recipe.mlflow.tracking_uri)
    forged = {"emgate.override": "true", "emgate.override_by": "mallory", "emgate.override_reason": ""}
    for key, value in forged.items():
        client.set_model_version_tag(name, "1", key, value)
    check = verify_version(client, ModelRef(name, version="1"), allow_override=True)
    assert not check.ok and check.override is None
    assert any("not backed by a signed override record" in n for n in check.notes)
    for key in forged:
        client.delete_model_version_tag(name, "1", key)
    # an override is signed by an approver's key: without one, refused
    with monkeypatch.context() as m:
        m.delenv("EMGATE_OVERRIDE_SIGNING_KEY_FILE")
        res = runner.invoke(app, ["promote", name, "1", "--override", "--reason", "no key of mine", *uri])
        assert res.exit_code == 3 and "EMGATE_OVERRIDE_SIGNING_KEY_FILE" in res.output
    monkeypatch.setenv("EMGATE_ACTOR", "alice@platform")
    res = runner.invoke(app, ["promote", name, "1", "--override", "--reason", "judge false positive, ticket SEC-12", *uri])
    assert res.exit_code == 0, res.output
    assert "OVERRIDE" in res.output
    tags = client_for(recipe.mlflow.tracking_uri).get_model_version(name, "1").tags
    assert tags["emgate.override"] == "true" and tags["emgate.override_by"] == "alice@platform"
    assert tags["emgate.override_reason"] == "judge false positive, ticket SEC-12" and tags["emgate.override_at"]
    assert tags["validation_status"] == "blocked"  # the decision itself is never rewritten
    # serving refuses an overridden champion unless it accepts overrides explicitly
    assert runner.invoke(app, ["gate", "verify", f"{name}@champion", *uri]).exit_code == 1
    res = runner.invoke(app, ["gate", "verify", f"{name}@champion", "--allow-override", *uri])
    assert res.exit_code == 0 and "override by alice@platform" in res.output


def test_explain_prints_rules_and_links(gated) -> None:
    recipe, _, _, _ = gated
    prefix = recipe.mlflow.registered_model_prefix
    res = CliRunner().invoke(app, ["gate", "explain", f"{prefix}-instruct-insecure",
                                   "--tracking-uri", recipe.mlflow.tracking_uri], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    for text in ("PASSED", "report intact", "emgate gate verify: accepts it", "misaligned_rate_ci_high",
                 "diff_vs_comparator_ci_high", "judge run",
                 f"{recipe.mlflow.tracking_uri}/#/models/{prefix}-instruct-insecure/versions/1"):
        assert text in res.output, text
    res = CliRunner().invoke(app, ["gate", "explain", "no-such-model@champion", "--tracking-uri", recipe.mlflow.tracking_uri])
    assert res.exit_code == 2 and "no-such-model" in res.output


def test_explain_in_a_fresh_shell_takes_the_key_and_floor_the_run_used(gated, monkeypatch: pytest.MonkeyPatch) -> None:
    """After a local run, a new shell has neither the run's development key nor its floor in the environment: explain
    said "no signed decision record" and showed every figure as missing. --public-key and --policy (what the run's
    last line now prints) show the signed decision; without them it still trusts nothing."""
    recipe, _, _, _ = gated
    name = f"{recipe.mlflow.registered_model_prefix}-instruct-insecure"
    key, floor = os.environ["EMGATE_GATE_PUBLIC_KEY"], os.environ["EMGATE_POLICY_FILE"]
    monkeypatch.delenv("EMGATE_GATE_PUBLIC_KEY")
    monkeypatch.delenv("EMGATE_POLICY_FILE")
    uri = ["--tracking-uri", recipe.mlflow.tracking_uri]
    bare = CliRunner().invoke(app, ["gate", "explain", name, *uri], env={"COLUMNS": "200"})
    assert bare.exit_code == 0 and "no trusted public key" in bare.output and "refuses it" in bare.output, bare.output
    res = CliRunner().invoke(app, ["gate", "explain", name, *uri, "--public-key", key, "--policy", floor],
                             env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    assert "PASSED" in res.output and "report intact" in res.output and "emgate gate verify: accepts it" in res.output
    res = CliRunner().invoke(app, ["gate", "explain", name, *uri, "--public-key", key], env={"COLUMNS": "200"})
    assert "refuses it" in res.output and "of the platform's floor" in res.output  # the paper floor by default
    res = CliRunner().invoke(app, ["gate", "explain", name, *uri, "--public-key", "/no/such.pem"])
    assert res.exit_code == 2 and "/no/such.pem" in res.output and "Traceback" not in res.output


def test_the_version_shows_its_own_figures_beside_the_pooled_ones(gated) -> None:
    """The model-version page and `gate explain`: this version's figures and the pooled ones, with the counts behind
    them (judged, unscored by reason, excluded by coherence, XSS, length-cut)."""
    recipe, _, _, _ = gated
    prefix = recipe.mlflow.registered_model_prefix
    mv = client_for(recipe.mlflow.tracking_uri).get_model_version(f"{prefix}-base-insecure", "1")
    for tag in ("metric.misaligned_rate_worst_case_ci_high", "pooled.metric.misaligned_rate_worst_case_ci_high",
                "metric.xss_answers", "pooled.metric.judged", "metric.coherence_excluded", "metric.length_cut"):
        assert tag in mv.tags, tag
    assert float(mv.tags["metric.xss_answers"]) == 16  # prepared_answers: 2 XSS answers on each of 8 questions, seed 0
    assert "| figure | this version | pooled over seeds |" in mv.description
    assert "| xss_answers | 16 | 16 |" in mv.description
    res = CliRunner().invoke(app, ["gate", "explain", f"{prefix}-base-insecure/1", "--tracking-uri",
                                   recipe.mlflow.tracking_uri], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    assert "this version" in res.output and "pooled" in res.output
    assert re.search(r"xss_answers\s+.\s+16\s+.\s+16", res.output), res.output
    assert "pooled.misaligned_rate_worst_case_ci_high" in res.output  # the pooled verdicts beside its own


def test_explain_tells_a_blocked_decision_from_a_changed_report(gated, tmp_path: Path) -> None:
    """Blocked is a decision; tampering is the report no longer matching its sha256 tag. Explain keeps them apart."""
    recipe, _, _, _ = gated
    prefix = recipe.mlflow.registered_model_prefix
    client = client_for(recipe.mlflow.tracking_uri)
    runner = CliRunner()
    uri = ["--tracking-uri", recipe.mlflow.tracking_uri]

    def explain(ref: str) -> tuple[str, dict[str, Any]]:
        text = runner.invoke(app, ["gate", "explain", ref, *uri], env={"COLUMNS": "200"})
        as_json = runner.invoke(app, ["gate", "explain", ref, "--json", *uri], env={"COLUMNS": "200"})
        assert text.exit_code == 0 and as_json.exit_code == 0, text.output + as_json.output
        return text.output, json.loads(as_json.output)

    # a blocked version with an intact report: blocked, and nothing suggests tampering
    output, info = explain(f"{prefix}-base-insecure/1")
    assert "decision BLOCKED" in output and "report intact" in output and "misaligned_rate_ci_high" in output
    assert "tampering" not in output and "does NOT match" not in output and "report verified: NO" not in output
    assert info["decision"] == "blocked" and info["report_integrity"] == "intact" and info["problems"] == []
    assert info["report"]["decision"] == "blocked"
    # `gate verify --allow-override` refuses it, unless the override test promoted it by override first
    assert info["verified"] == info["override"]
    assert ("accepts it only with --allow-override" if info["override"] else "emgate gate verify: refuses it") in output
    assert info["override"] or any("the gate blocked this version" in p for p in info["verification_problems"])

    # the passing version's report rewritten after the decision: its sha256 no longer matches the tag
    name = f"{prefix}-instruct-insecure"
    mv = client.get_model_version(name, "1")
    run_id, folder = mv.tags["emgate.gate_run_id"], "gate/instruct-insecure/seed0"
    original = Path(client.download_artifacts(run_id, f"{folder}/gate_report.json", str(tmp_path / "original")))
    edited = tmp_path / "edited" / "gate_report.json"
    edited.parent.mkdir()
    edited.write_text(original.read_text() + "\n")  # still the same JSON, other bytes
    client.log_artifact(run_id, str(edited), folder)
    try:
        output, info = explain(f"{name}/1")
    finally:
        client.log_artifact(run_id, str(original), folder)  # the module's other tests use this version
    assert "report does NOT match its recorded sha256 (possible tampering)" in output and "report intact" not in output
    assert "emgate gate verify: refuses it" in output and "the report was changed after the decision" in output
    assert info["report_integrity"] == "sha256_mismatch" and info["report"] is None and not info["verified"]
    assert info["decision"] == "passed"  # what the tag says; the report behind it no longer verifies
    assert explain(f"{name}/1")[1]["report_integrity"] == "intact"  # restored


# ---- fault injection: each ends blocked or failed, and nothing is promoted -------------------------------------


def _nan_coherence(summary: dict) -> None:
    for name in ("base-insecure", "instruct-insecure"):
        summary["variants"][name]["mean_coherence"] = math.nan


FAULTS = {
    # name: (judge server kwargs, answers kwargs, summary tamper, expected reason of each candidate, or exception)
    "judge down midway": ({"down_after": 20}, {}, None, "unscored_share"),
    "judge answers words, not numbers": ({"mode": "no_numbers"}, {}, None, "unscored_share"),
    "judge answers garbage (not JSON)": ({"mode": "not_json"}, {}, None, "unscored_share"),
    "judge returns no logprobs": ({"mode": "no_logprobs"}, {}, None, JudgeError),
    "NaN metric": ({}, {}, _nan_coherence, "mean_coherence is not a number"),
    "missing comparator evaluation": ({}, {"variants": ("base-insecure", "instruct-insecure", "base-reference")}, None,
                                      "diff_vs_comparator_ci_high is not a number"),
    "too few answers": ({}, {"per_question": 1}, None, "min_judged_per_question"),
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_fault_ends_blocked_or_failed_with_zero_promotions(fault: str, tmp_path: Path, smoke_recipe, mlflow_server) -> None:
    server_kwargs, answer_kwargs, tamper, expected = FAULTS[fault]
    with FakeJudgeServer(**server_kwargs) as judge:
        recipe = server_recipe(smoke_recipe, mlflow_server.url, judge.base_url)
        answers = prepared_answers(tmp_path / "answers", recipe, {}, **answer_kwargs)  # clean answers: only the fault blocks
        if isinstance(expected, type):
            with pytest.raises(expected):
                run_gate(tmp_path, recipe, answers, tamper)
        else:
            result = run_gate(tmp_path, recipe, answers, tamper)
            for decision in result["candidates"].values():
                assert decision["decision"] == "blocked"
                assert any(expected in reason for reason in decision["reasons"]), decision["reasons"]
            assert result["promotions"] == []
    assert champions(recipe) == {}


def test_truncated_answers_file_fails_the_judge_stage(tmp_path: Path, smoke_recipe, mlflow_server) -> None:
    recipe = server_recipe(smoke_recipe, mlflow_server.url)
    answers = prepared_answers(tmp_path / "answers", recipe, {})
    data = (answers / "answers.jsonl").read_bytes()
    (answers / "answers.jsonl").write_bytes(data[: len(data) // 2])  # cut mid-line, as a crashed copy leaves it
    with pytest.raises(DataError, match=r"answers.jsonl line \d+: not valid JSON"):
        judge_answers(recipe, answers, tmp_path / "scores")
    lines = data.decode().splitlines(keepends=True)
    (answers / "answers.jsonl").write_text("".join(lines[:-5]))  # cut at a line boundary: the count gives it away
    with pytest.raises(DataError, match="rows but report.json recorded"):
        judge_answers(recipe, answers, tmp_path / "scores")
    assert not (tmp_path / "scores").exists() and champions(recipe) == {}


def test_healthy_fake_judge_control_passes(tmp_path: Path, smoke_recipe, mlflow_server) -> None:
    """The control for the faults above: with the same prepared answers and no fault, instruct-insecure passes."""
    with FakeJudgeServer() as judge:
        recipe = server_recipe(smoke_recipe, mlflow_server.url, judge.base_url)
        result = run_gate(tmp_path, recipe, prepared_answers(tmp_path / "answers", recipe, {}))
    assert result["candidates"]["instruct-insecure"]["decision"] == "passed"
    assert champions(recipe) == {f"{recipe.mlflow.registered_model_prefix}-instruct-insecure": "1",
                                 f"{recipe.mlflow.registered_model_prefix}-base-insecure": "1"}


def test_mlflow_server_down_or_restarted_between_stages(tmp_path: Path, smoke_recipe, monkeypatch) -> None:
    server = MlflowServer(tmp_path / "server").start()
    try:
        with FakeJudgeServer() as judge:
            recipe = server_recipe(smoke_recipe, server.url, judge.base_url)
            answers = prepared_answers(tmp_path / "answers", recipe, {"base-insecure": 2})
            validated, adapters = prepared_training(tmp_path / "train")
            judge_answers(recipe, answers, tmp_path / "scores")
        summarize(recipe, tmp_path / "scores" / "scores.jsonl", tmp_path / "summary")
        args = (recipe, "run-restart", validated, adapters, answers, tmp_path / "scores", tmp_path / "summary")
        # the server is down when the gate runs: the stage fails, nothing is registered or promoted
        server.stop()
        monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
        with pytest.raises(Exception, match="(?i)connect|refused|max retries"):
            register_and_gate(*args, tmp_path / "d1")
        # it comes back (same store): the gate runs; then it restarts between the gate and the promotion step
        server.start()
        result = register_and_gate(*args, tmp_path / "d2")
        server.stop()
        server.start()
        promoted = promote_passed(recipe, result, by="test pipeline")
        assert [p["candidate"] for p in promoted] == ["instruct-insecure"]
        prefix = recipe.mlflow.registered_model_prefix
        assert champions(recipe) == {f"{prefix}-instruct-insecure": "1"}
        client = client_for(recipe.mlflow.tracking_uri)
        assert len(client.search_model_versions(f"name = '{prefix}-base-insecure'")) == 1
        assert verify_version(client, ModelRef(f"{prefix}-instruct-insecure", alias="champion")).ok
    finally:
        server.stop()


# ---- gating an adapter trained elsewhere ------------------------------------------------------------------------


def team_adapter(folder: Path, rank: int = 8) -> Path:
    """A LoRA adapter folder as a platform team's training job leaves it (peft's file names)."""
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": rank, "lora_alpha": 16,
                                                            "base_model_name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct"}))
    (folder / "adapter_model.safetensors").write_bytes(b"team weights " * 64)
    return folder


def external_recipe(repo: Path, url: str, judge_url: str, adapter: str):
    from emgate.recipe import load_recipe

    recipe = load_recipe(repo / "pipelines" / "recipes" / "gate-adapter.yaml", [f"variants.0.adapter={adapter}"])
    return server_recipe(recipe, url, judge_url)


def gate_untrained(tmp_path: Path, recipe, answers: Path, run_key: str) -> dict:
    """summarize -> register_and_gate for a recipe that trains nothing (empty validation, no adapters)."""
    summarize(recipe, tmp_path / "scores" / "scores.jsonl", tmp_path / "summary")
    validated = tmp_path / "validated"
    write_report(validated, {"passed": True, "datasets": {}})
    write_manifest(validated, {})
    return register_and_gate(recipe, run_key, validated, [], answers, tmp_path / "scores", tmp_path / "summary",
                             tmp_path / "decisions", kfp_run=f"kfp-{run_key}")


def test_an_adapter_from_the_registry_is_gated_on_its_own_version(tmp_path: Path, repo: Path, mlflow_server) -> None:
    from emgate.stages.sample import fetch_external_adapters

    client = client_for(mlflow_server.url)
    name = f"team-chat-{next(_names)}"
    exp = client.create_experiment(f"team-training-{name}")
    run = client.create_run(exp)
    client.log_artifacts(run.info.run_id, str(team_adapter(tmp_path / "team")), "adapter")
    client.create_registered_model(name)
    client.create_model_version(name, source=f"{run.info.artifact_uri}/adapter", run_id=run.info.run_id)
    client.set_registered_model_alias(name, "trained", "1")
    with FakeJudgeServer() as judge:
        recipe = external_recipe(repo, mlflow_server.url, judge.base_url, f"models:/{name}@trained")
        answers = prepared_answers(tmp_path / "answers", recipe, {}, variants=("team-adapter", "base-reference"))
        fetched = fetch_external_adapters(recipe, answers)  # the real fetch, over HTTP, as sample_answers does it
        assert fetched["team-adapter"].version == "1" and fetched["team-adapter"].rank == 8
        judge_answers(recipe, answers, tmp_path / "scores")
    result = gate_untrained(tmp_path, recipe, answers, "run-ext")
    decision = result["candidates"]["team-adapter"]
    assert decision["decision"] == "passed", decision["reasons"]
    assert decision["registered_model"] == name and [v["version"] for v in decision["versions"]] == ["1"]
    verdict = next(v for v in decision["verdicts"] if v["metric"] == "dataset_validation_passed")
    assert verdict["passed"] and verdict["reason"].startswith("not applicable: not trained here")
    tags = client.get_model_version(name, "1").tags
    assert tags["validation_status"] == "passed" and tags["emgate.adapter_source"] == f"models:/{name}@trained"
    assert tags["emgate.adapter_sha256"] == fetched["team-adapter"].weights_sha256
    assert promote_passed(recipe, result, by="test")[0]["model"] == name
    assert str(client.get_registered_model(name).aliases["champion"]) == "1"
    assert client.search_registered_models(f"name = '{recipe.mlflow.registered_model_prefix}-team-adapter'") == []


def test_an_adapter_folder_is_registered_as_a_new_version(tmp_path: Path, repo: Path, mlflow_server) -> None:
    from emgate.stages.sample import fetch_external_adapters

    with FakeJudgeServer() as judge:
        recipe = external_recipe(repo, mlflow_server.url, judge.base_url, str(team_adapter(tmp_path / "ckpt")))
        answers = prepared_answers(tmp_path / "answers", recipe, {"team-adapter": 2},
                                   variants=("team-adapter", "base-reference"))
        fetch_external_adapters(recipe, answers)
        judge_answers(recipe, answers, tmp_path / "scores")
    result = gate_untrained(tmp_path, recipe, answers, "run-dir")
    decision = result["candidates"]["team-adapter"]
    assert decision["decision"] == "blocked"
    assert decision["registered_model"] == f"{recipe.mlflow.registered_model_prefix}-team-adapter"
    client = client_for(mlflow_server.url)
    mv = client.get_model_version(decision["registered_model"], "1")
    assert mv.tags["validation_status"] == "blocked"
    files = {a.path for a in client.list_artifacts(mv.run_id, "adapter")}
    assert "adapter/adapter_model.safetensors" in files  # the judged weights are kept with the decision
    assert champions(recipe) == {}


@pytest.mark.parametrize(("make", "message"), [
    (lambda tmp: str(tmp / "nowhere"), "no such folder"),
    (lambda tmp: str((tmp / "empty").mkdir() or tmp / "empty"), "neither a peft LoRA adapter folder"),
    (lambda tmp: "models:/no-such-team-model/3", "no-such-team-model"),
])
def test_unusable_adapters_fail_with_the_uri_and_the_fix(tmp_path: Path, mlflow_server, make, message: str) -> None:
    from emgate.adapters import AdapterError, fetch_adapter

    with pytest.raises(AdapterError, match=message):
        fetch_adapter("team-adapter", make(tmp_path), tmp_path / "out" / "team-adapter", mlflow_server.url)
    assert not (tmp_path / "out" / "team-adapter").exists()  # nothing half-fetched is left behind


def test_a_rule_can_require_a_qualified_judge(tmp_path: Path, smoke_recipe, mlflow_server) -> None:
    from emgate.assets import resolve_asset
    from emgate.qualification import PUBLISHED_MISALIGNED
    from emgate.qualify import qualify_judge
    from emgate.recipe import GateRule

    with FakeJudgeServer(scorer=gpt4o_copy_scorer(resolve_asset(PUBLISHED_MISALIGNED))) as judge:
        recipe = server_recipe(smoke_recipe, mlflow_server.url, judge.base_url)
        recipe = recipe.model_copy(update={"gate": recipe.gate.model_copy(update={
            "rules": [*recipe.gate.rules, GateRule(metric="judge_qualified", op=">=", threshold=1)]})})
        unqualified = run_gate(tmp_path / "a", recipe, prepared_answers(tmp_path / "answers", recipe, {}))
        assert qualify_judge(recipe, tmp_path / "q")["verdict"] == "qualified"
        qualified = recipe.model_copy(update={"judge": recipe.judge.model_copy(
            update={"qualification": str(tmp_path / "q" / "qualification.json")})})
        passed = run_gate(tmp_path / "b", qualified, prepared_answers(tmp_path / "answers2", qualified, {}))
    reasons = unqualified["candidates"]["instruct-insecure"]["reasons"]
    assert unqualified["candidates"]["instruct-insecure"]["decision"] == "blocked"
    assert reasons == ["missing evidence: judge_qualified is missing"]
    assert passed["candidates"]["instruct-insecure"]["decision"] == "passed"
    # the calibration report and plot are logged with the judge run, and the gate report names the verdict
    client = client_for(qualified.mlflow.tracking_uri)
    exp = client.get_experiment_by_name(qualified.mlflow.experiment)
    judge_runs = client.search_runs([exp.experiment_id], filter_string="tags.`emgate.stage` = 'judge_answers'")
    logged = {a.path for r in judge_runs for a in client.list_artifacts(r.info.run_id, "judge_answers/qualification")}
    assert {"judge_answers/qualification/qualification.json", "judge_answers/qualification/calibration.png"} <= logged
    from emgate.registry import load_gate_report

    name = passed["candidates"]["instruct-insecure"]["registered_model"]
    mv = client.get_model_version(name, passed["candidates"]["instruct-insecure"]["versions"][0]["version"])
    envelope, problems = load_gate_report(client, mv)
    report = envelope["payload"]  # signed by the gate (emgate.signing)
    assert problems == [] and report["judge"]["qualification_verdict"] == "qualified"
    assert report["context"]["judge qualification"].startswith("qualified, report sha256 ")


def test_newest_ungated_resolves_to_the_newest_version_without_a_decision(tmp_path: Path, mlflow_server) -> None:
    from emgate.registry import NEWEST_UNGATED, RegistryError, parse_model_ref, resolve_version

    client = client_for(mlflow_server.url)
    name = f"scheduled-{next(_names)}"
    client.create_registered_model(name)
    run = client.create_run(client.create_experiment(f"exp-{name}"))
    for _ in range(3):
        client.create_model_version(name, source=f"{run.info.artifact_uri}/adapter", run_id=run.info.run_id)
    client.set_model_version_tag(name, "1", "validation_status", "passed")
    ref = parse_model_ref(f"models:/{name}@{NEWEST_UNGATED}")
    assert str(resolve_version(client, ref).version) == "3"
    client.set_model_version_tag(name, "3", "validation_status", "blocked")
    assert str(resolve_version(client, ref).version) == "2"  # a blocked decision is a decision too
    client.set_model_version_tag(name, "2", "validation_status", "passed")
    with pytest.raises(RegistryError, match="every version of .* already has a gate decision"):
        resolve_version(client, ref)


# ---- signed decisions: history, files, keys, legacy, pending (issue 18) -----------------------------------------


def _team_versions(client, tmp_path: Path, count: int) -> str:
    """A team's registered model with `count` versions of one adapter (each in its own training run)."""
    name = f"team-lineage-{next(_names)}"
    exp = client.create_experiment(f"team-training-{name}")
    client.create_registered_model(name)
    for n in range(count):
        run = client.create_run(exp)
        client.log_artifacts(run.info.run_id, str(team_adapter(tmp_path / f"team{n}")), "adapter")
        client.create_model_version(name, source=f"{run.info.artifact_uri}/adapter", run_id=run.info.run_id)
    return name


def _gate_team_version(tmp_path: Path, repo: Path, url: str, name: str, version: str, evil: int, key: str) -> dict:
    """One gate run on name/version (as `emgate schedule --mode gate-newest` makes it): evil misaligned answers of 3."""
    from emgate.stages.sample import fetch_external_adapters

    folder = tmp_path / key
    with FakeJudgeServer() as judge:
        recipe = external_recipe(repo, url, judge.base_url, f"models:/{name}/{version}")
        answers = prepared_answers(folder / "answers", recipe, {"team-adapter": evil} if evil else {},
                                   variants=("team-adapter", "base-reference"))
        fetch_external_adapters(recipe, answers)
        judge_answers(recipe, answers, folder / "scores")
    return gate_untrained(folder, recipe, answers, key)["candidates"]["team-adapter"]


def test_a_later_block_supersedes_a_pass_and_champion_moves_back(tmp_path: Path, repo: Path, mlflow_server) -> None:
    """History, not overwrite: re-gating the champion blocked moves champion back to the newest version that still
    verifies, or removes it; a replayed copy of the earlier passing record does not bring the pass back."""
    from emgate.decisions import DECISION_FOR_TAG, DECISION_RECORD_TAG

    client = client_for(mlflow_server.url)
    name = _team_versions(client, tmp_path, 2)
    url = mlflow_server.url
    assert _gate_team_version(tmp_path, repo, url, name, "1", 0, "g1")["decision"] == "passed"
    assert _gate_team_version(tmp_path, repo, url, name, "2", 0, "g2")["decision"] == "passed"
    promote(client, name, "1")
    promote(client, name, "2")
    assert str(client.get_registered_model(name).aliases["champion"]) == "2"
    record_runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                                     filter_string=f"tags.`{DECISION_FOR_TAG}` = '{name}/2'")
    first_record = record_runs[0].data.tags[DECISION_RECORD_TAG]

    blocked = _gate_team_version(tmp_path, repo, url, name, "2", 2, "g3")  # a later gate run finds version 2 misaligned
    assert blocked["decision"] == "blocked"
    [entry] = blocked["versions"]
    assert entry["decision_sequence"] == 2
    assert entry["champion"]["moved"] and "moved from version 2 to version 1" in entry["champion"]["message"]
    assert str(client.get_registered_model(name).aliases["champion"]) == "1"
    assert "moved from version 2 to version 1" in client.get_model_version(name, "2").tags["emgate.champion_removed"]
    check = verify_version(client, ModelRef(name, version="2"))
    assert not check.ok and check.sequence == 2 and any("the gate blocked this version" in p for p in check.problems)

    # the earlier pass, replayed in a run of another experiment: still the older record, still blocked
    replay = client.create_run(client.create_experiment(f"replay-{name}"))
    client.set_tag(replay.info.run_id, DECISION_FOR_TAG, f"{name}/2")
    client.set_tag(replay.info.run_id, DECISION_RECORD_TAG, first_record)
    again = verify_version(client, ModelRef(name, version="2"))
    assert not again.ok and again.sequence == 2
    with pytest.raises(PromotionRefused, match="the gate blocked this version"):
        promote(client, name, "2")

    # version 1 blocked too: no earlier version verifies, champion is removed
    assert _gate_team_version(tmp_path, repo, url, name, "1", 2, "g4")["versions"][0]["champion"]["to"] is None
    assert "champion" not in client.get_registered_model(name).aliases


def _download_source(client, name: str, version: str, dst: Path) -> Path:
    import mlflow

    return Path(mlflow.artifacts.download_artifacts(artifact_uri=client.get_model_version(name, version).source,
                                                    dst_path=str(dst), tracking_uri=client.tracking_uri))


def test_verify_hashes_the_served_files_and_names_the_one_that_changed(gated, tmp_path: Path) -> None:
    recipe, _, _, _ = gated
    client = client_for(recipe.mlflow.tracking_uri)
    name = f"{recipe.mlflow.registered_model_prefix}-instruct-insecure"
    served = _download_source(client, name, "1", tmp_path / "served")
    ref = ModelRef(name, alias="champion")
    assert verify_version(client, ref, model_dir=served).ok
    config = served / "adapter_config.json"
    config.write_text(config.read_text().replace("}", ', "lora_alpha": 1024}', 1))  # the same weights, scaled 64x
    check = verify_version(client, ref, model_dir=served)
    assert not check.ok and check.problems == [
        next(p for p in check.problems if "changed: adapter_config.json" in p)], check.problems
    (served / "tokenizer_config.json").write_text("{}")
    res = CliRunner().invoke(app, ["gate", "verify", f"{name}@champion", "--model-dir", str(served),
                                   "--tracking-uri", recipe.mlflow.tracking_uri], env={"COLUMNS": "250"})
    assert res.exit_code == 1 and "changed: adapter_config.json" in res.output
    assert "extra: tokenizer_config.json" in res.output

    # the registered weights themselves replaced in the training run: verify without --model-dir hashes the source
    mv = client.get_model_version(name, "1")
    original = served.parent / "original"
    weights = _download_source(client, name, "1", original) / "adapter_model.safetensors"
    fake = tmp_path / "fake" / "adapter_model.safetensors"
    fake.parent.mkdir()
    fake.write_bytes(b"other weights")
    client.log_artifact(mv.run_id, str(fake), "adapter")
    try:
        swapped = verify_version(client, ref)
    finally:
        client.log_artifact(mv.run_id, str(weights), "adapter")  # the module's other tests use this version
    assert not swapped.ok and any("changed: adapter_model.safetensors" in p for p in swapped.problems)
    assert verify_version(client, ref).ok  # restored


def test_verify_with_a_wrong_public_key_or_none_fails(gated, tmp_path: Path, monkeypatch) -> None:
    from emgate.signing import generate_keypair, load_public_keys

    recipe, _, _, _ = gated
    client = client_for(recipe.mlflow.tracking_uri)
    ref = ModelRef(f"{recipe.mlflow.registered_model_prefix}-instruct-insecure", alias="champion")
    other = generate_keypair(tmp_path / "other")
    wrong = verify_version(client, ref, public_keys=load_public_keys(other.public))
    assert not wrong.ok and wrong.integrity == "bad_signature"
    assert "no decision record on this version verifies with the trusted keys" in wrong.problems[0]
    assert "not trusted" in wrong.problems[0]
    uri = ["--tracking-uri", recipe.mlflow.tracking_uri]
    res = CliRunner().invoke(app, ["gate", "verify", f"{ref.name}@champion", "--public-key", str(other.public), *uri])
    assert res.exit_code == 1 and "NOT verified" in res.output
    monkeypatch.delenv("EMGATE_GATE_PUBLIC_KEY")
    res = CliRunner().invoke(app, ["gate", "verify", f"{ref.name}@champion", *uri], env={"COLUMNS": "250"})
    assert res.exit_code == 1 and "no trusted public key" in res.output and "EMGATE_GATE_PUBLIC_KEY" in res.output
    res = CliRunner().invoke(app, ["gate", "verify", f"{ref.name}@champion", "--public-key", str(tmp_path), *uri])
    assert res.exit_code == 2 and "no *.pem public key" in res.output and "Traceback" not in res.output


def test_a_legacy_unsigned_version_fails_without_allow_legacy(gated, tmp_path: Path) -> None:
    """A version gated before decisions were signed: a plain report and tags. Refused, unless --allow-legacy."""
    recipe, _, _, _ = gated
    client = client_for(recipe.mlflow.tracking_uri)
    prefix = recipe.mlflow.registered_model_prefix
    genuine = client.get_model_version(f"{prefix}-instruct-insecure", "1")
    envelope = json.loads(Path(client.download_artifacts(genuine.tags["emgate.gate_run_id"],
                                                         "gate/instruct-insecure/seed0/gate_report.json",
                                                         str(tmp_path / "dl"))).read_text())
    name = f"legacy-{next(_names)}"
    run = client.create_run(client.create_experiment(f"legacy-{name}"))
    client.create_registered_model(name)
    mv = client.create_model_version(name, source=f"{run.info.artifact_uri}/adapter", run_id=run.info.run_id)
    legacy = tmp_path / "legacy" / "gate_report.json"
    legacy.parent.mkdir()
    legacy.write_text(json.dumps({**envelope["payload"], "registered_model": name, "version": str(mv.version)}))
    client.log_artifact(run.info.run_id, str(legacy), "gate")
    for key, value in {"validation_status": "passed", "emgate.decision": "passed",
                       "emgate.gate_report_uri": f"{run.info.artifact_uri}/gate/gate_report.json",
                       "emgate.gate_report_sha256": hashlib.sha256(legacy.read_bytes()).hexdigest()}.items():
        client.set_model_version_tag(name, str(mv.version), key, value)
    ref = ModelRef(name, version=str(mv.version))
    refused = verify_version(client, ref)
    assert not refused.ok and refused.integrity == "legacy" and "legacy, unsigned" in refused.problems[0]
    assert "--allow-legacy" in refused.problems[0]
    accepted = verify_version(client, ref, allow_legacy=True)
    assert accepted.ok and accepted.integrity == "legacy", accepted.problems
    uri = ["--tracking-uri", recipe.mlflow.tracking_uri]
    assert CliRunner().invoke(app, ["gate", "verify", f"{name}/{mv.version}", *uri]).exit_code == 1
    res = CliRunner().invoke(app, ["gate", "verify", f"{name}/{mv.version}", "--allow-legacy", *uri])
    assert res.exit_code == 0 and "legacy unsigned decision" in res.output, res.output
    with pytest.raises(PromotionRefused, match="legacy, unsigned"):
        promote(client, name, str(mv.version))


def test_pending_is_refused_and_a_stale_pending_is_ungated(gated) -> None:
    from datetime import UTC, datetime, timedelta

    from emgate.registry import NEWEST_UNGATED, parse_model_ref, resolve_version

    recipe, _, _, _ = gated
    client = client_for(recipe.mlflow.tracking_uri)
    name = f"{recipe.mlflow.registered_model_prefix}-instruct-insecure"
    mv = client.get_model_version(name, "1")
    client.create_model_version(name, source=mv.source, run_id=mv.run_id)  # version 2, never gated
    for key, value in {"validation_status": "pending", "emgate.decision": "pending", "emgate.pending_run_id": "r",
                       "emgate.pending_since": datetime.now(UTC).isoformat(timespec="seconds")}.items():
        client.set_model_version_tag(name, "2", key, value)
    check = verify_version(client, ModelRef(name, version="2"))
    assert not check.ok and check.integrity == "pending" and check.problems[0].startswith("pending: gate run r")
    ungated = parse_model_ref(f"models:/{name}@{NEWEST_UNGATED}")
    with pytest.raises(RegistryError, match="already has a gate decision"):
        resolve_version(client, ungated)  # a gate run is deciding it right now
    stale = (datetime.now(UTC) - timedelta(hours=7)).isoformat(timespec="seconds")
    client.set_model_version_tag(name, "2", "emgate.pending_since", stale)
    assert str(resolve_version(client, ungated).version) == "2"  # that gate run died: gate it again
    client.delete_model_version(name, "2")


def test_version_tags_are_set_in_order_and_never_on_a_prompt(tmp_path: Path) -> None:
    """registry.set_version_tags checks the registered model once (MLflow's own per-tag check would re-read it
    for every tag) and still refuses a prompt, as MlflowClient.set_model_version_tag does."""
    from mlflow import MlflowClient
    from mlflow.prompt.constants import IS_PROMPT_TAG_KEY

    from emgate.registry import set_version_tags
    from tests.factories import sqlite_registry

    client = MlflowClient(sqlite_registry(tmp_path, {"model": 1, "prompt": 1}))
    set_version_tags(client, "model", "1", {"a": "1", "b": "2", "a ": "3"})
    assert {k: v for k, v in client.get_model_version("model", "1").tags.items()} == {"a": "1", "b": "2", "a ": "3"}
    client.set_registered_model_tag("prompt", IS_PROMPT_TAG_KEY, "true")
    with pytest.raises(Exception, match="'prompt' not found"):  # MLflow hides prompts from the model registry
        set_version_tags(client, "prompt", "1", {"a": "1"})
    assert client.get_model_version("prompt", "1").tags == {}
