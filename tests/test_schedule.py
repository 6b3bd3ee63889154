"""`emgate schedule`: the real kfp.Client against FakeKfpServer, a recording test double of the KFP REST API."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from emgate.cli import app
from emgate.recipe import load_recipe
from emgate.schedule import ScheduleError, check_cron, gate_newest_recipe
from tests.fake_kfp_server import FakeKfpServer

PAPER = Path(__file__).resolve().parents[1] / "pipelines" / "recipes" / "paper.yaml"


@pytest.fixture()
def kfp(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.setenv("KF_PIPELINES_SA_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.delenv("KFP_TOKEN", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # kfp.Client keeps a context file under ~/.config/kfp
    with FakeKfpServer() as server:
        yield server


def schedule(server: FakeKfpServer, *args: str) -> tuple[int, str]:
    res = CliRunner().invoke(app, ["schedule", str(PAPER), "--host", server.url, *args])
    return res.exit_code, res.output


def recipe_in(spec_yaml: str) -> dict:
    docs = list(yaml.safe_load_all(spec_yaml))
    default = docs[0]["root"]["inputDefinitions"]["parameters"]["recipe_json"]["defaultValue"]
    return json.loads(default)


def test_schedule_uploads_the_pipeline_and_creates_one_recurring_run(kfp: FakeKfpServer) -> None:
    code, out = schedule(kfp, "--cron", "0 0 3 * * *")
    assert code == 0, out
    assert "scheduled emgate-paper-retrain" in out
    [run] = kfp.enabled_runs()
    assert run["display_name"] == "emgate-paper-retrain"
    assert run["trigger"]["cron_schedule"]["cron"] == "0 0 3 * * *"
    assert int(run["max_concurrency"]) == 1 and run["no_catchup"] is True and run["mode"] == "ENABLE"
    experiment = kfp.experiments[run["experiment_id"]]
    assert experiment["display_name"] == "emgate-paper"
    version_id = run["pipeline_version_reference"]["pipeline_version_id"]
    recipe = recipe_in(kfp.spec_of(version_id))
    assert recipe["name"] == "paper" and recipe["variants"][0]["dataset"] == "insecure"
    uploads = [r for r in kfp.requests if r.path.endswith(("/upload", "/upload_version"))]
    assert uploads and all("pipelineInfo" in r.files["uploadfile"] for r in uploads)


def test_rescheduling_is_idempotent_and_a_change_replaces_the_old_run(kfp: FakeKfpServer) -> None:
    assert schedule(kfp, "--cron", "0 0 3 * * *")[0] == 0
    [first] = kfp.enabled_runs()
    uploads_before = sum(r.path.endswith(("/upload", "/upload_version")) for r in kfp.requests)
    code, out = schedule(kfp, "--cron", "0 0 3 * * *")
    assert code == 0 and "unchanged" in out
    assert kfp.enabled_runs() == [first]
    assert sum(r.path.endswith(("/upload", "/upload_version")) for r in kfp.requests) == uploads_before

    code, out = schedule(kfp, "--cron", "0 30 4 * * 1-5")
    assert code == 0 and "disabled the previous one" in out, out
    [second] = kfp.enabled_runs()
    assert second["recurring_run_id"] != first["recurring_run_id"]
    assert second["trigger"]["cron_schedule"]["cron"] == "0 30 4 * * 1-5"
    assert kfp.recurring[first["recurring_run_id"]]["status"] == "DISABLED"  # kept for the audit trail
    assert any(r.path.endswith(f"{first['recurring_run_id']}:disable") for r in kfp.requests)

    # A changed recipe is a new pipeline version of the same pipeline, and again replaces the run.
    code, out = schedule(kfp, "--cron", "0 30 4 * * 1-5", "--set", "sampling.samples_per_question=50")
    assert code == 0, out
    [third] = kfp.enabled_runs()
    assert third["pipeline_version_reference"]["pipeline_version_id"] != \
        second["pipeline_version_reference"]["pipeline_version_id"]
    assert len(kfp.pipelines) == 1


@pytest.mark.parametrize(("cron", "message"), [
    ("0 3 * * *", "has 5 fields; KFP reads 6, seconds first"),
    ("0 0 3 * *", "has 5 fields"),
    ("0 0 3 * * * *", "has 7 fields"),
    ("0 0 3 * * mon%", "day of week field"),
])
def test_a_bad_cron_is_refused_before_any_request(kfp: FakeKfpServer, cron: str, message: str) -> None:
    code, out = schedule(kfp, "--cron", cron)
    assert code == 2 and message in out, out
    assert kfp.requests == []


def test_check_cron_accepts_the_usual_six_field_forms() -> None:
    for cron in ("0 0 3 * * *", "*/30 * * * * *", "0 0 3 1,15 * ?", "0 0 2 * * MON-FRI", "0 15 */6 * * *"):
        assert check_cron(cron) == cron
    with pytest.raises(ScheduleError, match="'0 0 3 \\* \\* \\*'"):
        check_cron("0 3 * * *")  # the message shows the fixed expression


def test_gate_newest_schedules_a_pipeline_that_trains_nothing(kfp: FakeKfpServer) -> None:
    code, out = schedule(kfp, "--cron", "0 0 * * * *", "--mode", "gate-newest")
    assert code == 0, out
    [run] = kfp.enabled_runs()
    assert run["display_name"] == "emgate-paper-gate-newest"
    spec = kfp.spec_of(run["pipeline_version_reference"]["pipeline_version_id"])
    recipe = recipe_in(spec)
    candidates = {v["name"]: v for v in recipe["variants"] if v["role"] == "candidate"}
    assert candidates["base-insecure"]["adapter"] == "models:/paper-base-insecure@newest-ungated"
    assert candidates["base-insecure"]["comparator"] == "base-reference"
    # Instruct had no reference: one is added, so the candidate is compared with the model before fine-tuning.
    assert candidates["instruct-insecure"]["comparator"] == "qwen-coder-32b-instruct-reference"
    assert recipe["datasets"] == {} and all(v["role"] != "control" for v in recipe["variants"])
    assert "fine-tune" not in spec and "sample-answers-untrained" in spec


def test_gate_newest_keeps_an_explicit_adapter() -> None:
    recipe = load_recipe(PAPER.parent / "gate-adapter.yaml")
    [candidate] = [v for v in gate_newest_recipe(recipe).variants if v.role == "candidate"]
    assert candidate.adapter == "models:/smoke-base-insecure@candidate"


def test_the_service_account_token_is_sent_and_never_printed(kfp: FakeKfpServer, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    token = tmp_path / "token"
    token.write_text("sa-token-value-123")
    monkeypatch.setenv("KF_PIPELINES_SA_TOKEN_PATH", str(token))
    code, out = schedule(kfp, "--cron", "0 0 3 * * *")
    assert code == 0, out
    assert {r.headers.get("authorization") for r in kfp.requests} == {"Bearer sa-token-value-123"}
    assert "sa-token-value-123" not in out


def test_an_unreachable_host_is_one_clear_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("KF_PIPELINES_SA_TOKEN_PATH", str(tmp_path / "no-token"))
    res = CliRunner().invoke(app, ["schedule", str(PAPER), "--host", "http://127.0.0.1:9", "--cron", "0 0 3 * * *"])
    assert res.exit_code == 1
    assert "cannot reach KFP at http://127.0.0.1:9" in res.output and "Traceback" not in res.output
