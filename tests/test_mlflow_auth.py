"""The gate against a real `mlflow server` with basic auth, as charts/emgate runs it (`--app-name basic-auth`,
default_permission READ, the pipeline's admin account): the gate registers and promotes with the admin's
credentials; an attacker with ordinary access (a READ user) can read and verify the decision but cannot move
`champion`, rewrite the decision, delete the version or replace the gate report, and `emgate promote` tells them so
in one line. A user with EDIT on the registered models (issue 18's attacker) can rewrite every tag and move every
alias, and still no forged tag, report, override or replayed record makes a blocked version verify; nor does a
signed report copied into a model the attacker owns. The credentials never reach what the gate logs. One server
for the module (tests/mlflow_server.py)."""

from __future__ import annotations

import hashlib
import json
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from mlflow.exceptions import MlflowException
from typer.testing import CliRunner

from emgate.cli import app
from emgate.decisions import DECISION_FOR_TAG, DECISION_RECORD_TAG
from emgate.registry import ModelRef, PromotionRefused, client_for, promote, verify_version
from tests.factories import few_resamples, prepared_answers, run_gate, server_recipe
from tests.fake_judge_server import FakeJudgeServer
from tests.mlflow_server import Account, MlflowServer, as_user

pytestmark = pytest.mark.slow  # a basic-auth server and one gated run: 1.5 to 2.5 minutes on two cores

REPORT = "gate/instruct-insecure/seed0/gate_report.json"
# The chart's MLflow webhook settings (templates/mlflow-deployment.yaml): the guard listens on plain http on a private
# (here loopback) address, which MLflow refuses by default; a 1 s webhook cache so a new webhook is used at once.
WEBHOOK_SERVER_ENV = {"MLFLOW_WEBHOOK_ALLOWED_SCHEMES": "http,https", "MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS": "true",
                      "MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY": "dGVzdC1vbmx5LWtleS1ub3QtYS1zZWNyZXQtMDEyMzQ=",
                      "MLFLOW_WEBHOOK_CACHE_TTL": "1"}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-auth"), auth=True, env=WEBHOOK_SERVER_ENV).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def reader(server: MlflowServer) -> Account:
    """An ordinary user: READ on everything the admin created (the chart's default_permission)."""
    return server.create_user("reader")


@pytest.fixture(scope="module")
def gated(tmp_path_factory: pytest.TempPathFactory, smoke_recipe, server: MlflowServer) -> tuple[Any, dict[str, Any]]:
    """One gated run with the admin's credentials, as the pipeline's stages run: base-insecure blocked,
    instruct-insecure passed and promoted to champion."""
    assert server.admin is not None
    tmp = tmp_path_factory.mktemp("gated-auth")
    with FakeJudgeServer() as judge, as_user(server.admin):
        recipe = few_resamples(server_recipe(smoke_recipe, server.url, judge.base_url))
        result = run_gate(tmp, recipe, prepared_answers(tmp / "answers", recipe, {"base-insecure": 2}))
    return recipe, result


def names(recipe) -> tuple[str, str]:
    """(the passed model, the blocked model)."""
    prefix = recipe.mlflow.registered_model_prefix
    return f"{prefix}-instruct-insecure", f"{prefix}-base-insecure"


def registry_state(recipe) -> dict[str, Any]:
    """What the attacks must leave as it was: every version's tags, every model's aliases, the gate report's bytes."""
    client = client_for(recipe.mlflow.tracking_uri)
    state: dict[str, Any] = {}
    for name in names(recipe):
        state[name] = {"aliases": dict(client.get_registered_model(name).aliases),
                       "versions": {v.version: dict(v.tags) for v in client.search_model_versions(f"name = '{name}'")}}
    mv = client.get_model_version(names(recipe)[0], "1")
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(client.download_artifacts(mv.tags["emgate.gate_run_id"], REPORT, tmp)).read_bytes()
    state["report_sha256"] = hashlib.sha256(report).hexdigest()
    return state


def test_the_gate_registers_as_the_admin_and_a_reader_verifies_its_decision(gated, server: MlflowServer,
                                                                              reader: Account) -> None:
    recipe, result = gated
    passed, blocked = names(recipe)
    assert result["candidates"]["instruct-insecure"]["decision"] == "passed"
    assert result["candidates"]["base-insecure"]["decision"] == "blocked"
    assert [p["model"] for p in result["promotions"]] == [passed]
    uri = ["--tracking-uri", server.url]
    runner = CliRunner()
    with as_user(reader):
        client = client_for(server.url)
        check = verify_version(client, ModelRef(passed, alias="champion"))
        assert check.ok and check.version == "1" and check.report and check.report["decision"] == "passed", check.problems
        res = runner.invoke(app, ["gate", "verify", f"{passed}@champion", *uri])
        assert res.exit_code == 0 and "verified" in res.output, res.output
        assert not verify_version(client, ModelRef(blocked, version="1")).ok  # reading is not accepting
    with as_user(None):  # the server does demand credentials: without them nothing verifies
        check = verify_version(client_for(server.url), ModelRef(passed, alias="champion"))
        assert not check.ok and check.problems[0].startswith("not authenticated: a client without"), check.problems
        res = runner.invoke(app, ["gate", "verify", f"{passed}@champion", *uri])
        # exit 2: the version could not be checked at all (as for a missing model or store), one line
        assert res.exit_code == 2 and "not authenticated" in res.output and "Traceback" not in res.output, res.output


def _replace_report(client: Any, passed: str) -> None:
    """Upload a gate_report.json that says `passed` with other bytes over the one in the gate's run."""
    mv = client.get_model_version(passed, "1")
    with tempfile.TemporaryDirectory() as tmp:
        report = json.loads(Path(client.download_artifacts(mv.tags["emgate.gate_run_id"], REPORT, tmp)).read_text())
        report["payload"]["context"]["note"] = "replaced by the reader"
        fake = Path(tmp, "upload", "gate_report.json")
        fake.parent.mkdir()
        fake.write_text(json.dumps(report))
        client.log_artifact(mv.tags["emgate.gate_run_id"], str(fake), str(Path(REPORT).parent))


# Each attack as a READ user would try it with MLflow's client: (passed model, blocked model) -> a request.
ATTACKS: dict[str, Callable[[Any, str, str], Any]] = {
    "champion_alias_on_the_blocked_version": lambda c, passed, blocked: c.set_registered_model_alias(
        blocked, "champion", "1"),
    "champion_alias_deleted": lambda c, passed, blocked: c.delete_registered_model_alias(passed, "champion"),
    "decision_tag_forged": lambda c, passed, blocked: c.set_model_version_tag(blocked, "1", "emgate.decision", "passed"),
    "validation_status_forged": lambda c, passed, blocked: c.set_model_version_tag(
        blocked, "1", "validation_status", "passed"),
    "report_sha256_tag_overwritten": lambda c, passed, blocked: c.set_model_version_tag(
        passed, "1", "emgate.gate_report_sha256", "0" * 64),
    "report_uri_tag_deleted": lambda c, passed, blocked: c.delete_model_version_tag(passed, "1", "emgate.gate_report_uri"),
    "version_deleted": lambda c, passed, blocked: c.delete_model_version(passed, "1"),
    "registered_model_deleted": lambda c, passed, blocked: c.delete_registered_model(blocked),
    "gate_report_replaced": lambda c, passed, blocked: _replace_report(c, passed),
}


@pytest.mark.parametrize("attack", list(ATTACKS))
def test_a_reader_cannot_change_the_decision_or_the_champion(attack: str, gated, server: MlflowServer,
                                                              reader: Account) -> None:
    recipe, _ = gated
    passed, blocked = names(recipe)
    with as_user(server.admin):
        before = registry_state(recipe)
    with as_user(reader), pytest.raises((MlflowException, requests.HTTPError)) as refused:
        ATTACKS[attack](client_for(server.url), passed, blocked)
    exc = refused.value
    if isinstance(exc, MlflowException):
        assert exc.get_http_status_code() == 403 and exc.error_code == "PERMISSION_DENIED", exc
    else:  # the artifact proxy answers the upload itself
        assert exc.response is not None and exc.response.status_code == 403, exc
    with as_user(server.admin):
        assert registry_state(recipe) == before
    with as_user(reader):
        assert verify_version(client_for(server.url), ModelRef(passed, alias="champion")).ok


def test_promote_as_a_reader_is_one_line_permission_denied(gated, server: MlflowServer, reader: Account) -> None:
    recipe, _ = gated
    passed, blocked = names(recipe)
    with as_user(server.admin):
        before = registry_state(recipe)
    runner = CliRunner()
    uri = ["--tracking-uri", server.url]
    with as_user(reader):
        for args in ([blocked, "1", "--override", "--reason", "the reader wants it out"], [passed, "1"]):
            res = runner.invoke(app, ["promote", *args, *uri])
            assert isinstance(res.exception, SystemExit) and res.exit_code != 0, res.output  # no traceback
            lines = res.output.strip().splitlines()
            assert len(lines) == 1 and "permission denied" in lines[0].lower(), res.output
            assert f"{args[0]}/1" in lines[0] and "reader" in lines[0], res.output
    with as_user(server.admin):
        assert registry_state(recipe) == before  # neither the alias nor any override/promotion tag moved


def _texts(client: Any, run_id: str, dst: Path) -> Iterator[tuple[str, bytes]]:
    """(where, bytes) for every param, tag and artifact file of the run."""
    run = client.get_run(run_id)
    for kind, values in (("param", run.data.params), ("tag", run.data.tags)):
        for key, value in values.items():
            yield f"{run_id} {kind} {key}", f"{key}={value}".encode()
    if client.list_artifacts(run_id):
        local = Path(client.download_artifacts(run_id, "", str(dst / run_id)))
        for path in local.rglob("*"):
            if path.is_file():
                yield f"{run_id} artifact {path.relative_to(local)}", path.read_bytes()


def test_the_credentials_never_reach_the_logged_runs(gated, server: MlflowServer, tmp_path: Path) -> None:
    recipe, _ = gated
    assert server.admin is not None
    secret = server.admin.password.encode()
    with as_user(server.admin):
        client = client_for(server.url)
        experiment = client.get_experiment_by_name(recipe.mlflow.experiment)
        runs = client.search_runs([experiment.experiment_id])
        seen = [found for r in runs for found in _texts(client, r.info.run_id, tmp_path)]
        for name in names(recipe):
            for mv in client.search_model_versions(f"name = '{name}'"):
                seen += [(f"{name}/{mv.version} tag {k}", f"{k}={v}".encode()) for k, v in mv.tags.items()]
                seen.append((f"{name}/{mv.version} description", (mv.description or "").encode()))
    # the search covers what the gate logged: the recipe (with the server's URL), the gate reports, the tags
    where = {w.split(" ", 1)[1] for w, _ in seen}
    assert "artifact recipe.json" in where and f"artifact {REPORT}" in where and "tag emgate.decision" in where
    assert any(server.url.encode() in text for _, text in seen)
    assert len(runs) >= 5
    leaks = [w for w, text in seen if secret in text]
    assert leaks == []


@pytest.fixture(scope="module")
def editor(server: MlflowServer, gated) -> Account:
    """A user with EDIT on both registered models (the team that owns them), READ elsewhere."""
    from mlflow.server import get_app_client

    account = server.create_user("editor")
    recipe, _ = gated
    with as_user(server.admin):
        auth = get_app_client("basic-auth", tracking_uri=server.url)
        for name in names(recipe):
            auth.grant_user_permission(account.username, "registered_model", name, "EDIT")
    return account


def _genuine(client: Any, passed: str, tmp: Path) -> tuple[dict[str, Any], str]:
    """The passed version's signed gate report (the envelope) and its signed decision record (tag text)."""
    mv = client.get_model_version(passed, "1")
    envelope = json.loads(Path(client.download_artifacts(mv.tags["emgate.gate_run_id"], REPORT, str(tmp))).read_text())
    [record_run] = client.search_runs([mv.tags["emgate.experiment_id"]],
                                      filter_string=f"tags.`{DECISION_FOR_TAG}` = '{passed}/1'")
    return envelope, record_run.data.tags[DECISION_RECORD_TAG]


def _own_run(client: Any, label: str) -> Any:
    """A run in an experiment of the attacker's own (any authenticated user may create one)."""
    return client.create_run(client.create_experiment(f"{label}-{tempfile.mktemp(dir='').strip('/')}"),
                             tags={"mlflow.user": "emgate-admin"})


def _forge_pass_tags(client: Any, passed: str, blocked: str, tmp: Path) -> None:
    """The blocked version's decision tags pointed at the passing report, re-addressed, uploaded to the attacker's run."""
    envelope, _ = _genuine(client, passed, tmp)
    envelope["payload"].update(registered_model=blocked, version="1")
    run = _own_run(client, "forged-report")
    forged = tmp / "forged" / "gate_report.json"
    forged.parent.mkdir()
    forged.write_text(json.dumps(envelope))
    client.log_artifact(run.info.run_id, str(forged), "gate")
    for key, value in {"validation_status": "passed", "emgate.decision": "passed", "emgate.gate_run_id": run.info.run_id,
                       "emgate.gate_report_uri": f"{run.info.artifact_uri}/gate/gate_report.json",
                       "emgate.gate_report_sha256": hashlib.sha256(forged.read_bytes()).hexdigest()}.items():
        client.set_model_version_tag(blocked, "1", key, value)


def _replay_record(client: Any, passed: str, blocked: str, tmp: Path) -> None:
    """The passing version's genuine signed decision record, filed under the blocked version in the attacker's run."""
    _, record = _genuine(client, passed, tmp)
    run = _own_run(client, "replayed-record")
    client.set_tag(run.info.run_id, DECISION_FOR_TAG, f"{blocked}/1")
    client.set_tag(run.info.run_id, DECISION_RECORD_TAG, record)


# Each attack as a user with EDIT on the registered models would make it: every one of these requests succeeds.
EDITOR_ATTACKS: dict[str, Callable[[Any, str, str, Path], Any]] = {
    "decision_and_report_tags_forged": _forge_pass_tags,
    "override_tags_forged": lambda c, passed, blocked, tmp: [c.set_model_version_tag(blocked, "1", k, v) for k, v in {
        "emgate.override": "true", "emgate.override_by": "editor", "emgate.override_reason": ""}.items()],
    "champion_moved_to_the_blocked_version": lambda c, passed, blocked, tmp: c.set_registered_model_alias(
        blocked, "champion", "1"),
    "genuine_record_replayed_for_the_blocked_version": _replay_record,
    "decision_sequence_tag_raised": lambda c, passed, blocked, tmp: c.set_model_version_tag(
        blocked, "1", "emgate.decision_sequence", "99"),
}


@pytest.mark.parametrize("attack", list(EDITOR_ATTACKS))
def test_an_editor_cannot_make_the_blocked_version_verify(attack: str, gated, server: MlflowServer, editor: Account,
                                                           tmp_path: Path) -> None:
    recipe, _ = gated
    passed, blocked = names(recipe)
    uri = ["--tracking-uri", server.url]
    with as_user(editor):
        client = client_for(server.url)
        EDITOR_ATTACKS[attack](client, passed, blocked, tmp_path)  # EDIT allows it: no 403
        for ref in (ModelRef(blocked, version="1"), ModelRef(blocked, alias="candidate")):
            for allow_override in (False, True):
                check = verify_version(client, ref, allow_override=allow_override)
                assert not check.ok and any("the gate blocked this version" in p for p in check.problems), check.problems
        res = CliRunner().invoke(app, ["gate", "verify", f"{blocked}/1", "--allow-override", *uri])
        assert res.exit_code == 1 and "NOT verified" in res.output, res.output
        with pytest.raises(PromotionRefused, match="the gate blocked this version"):
            promote(client, blocked, "1")
        assert verify_version(client, ModelRef(passed, alias="champion")).ok  # the genuine pass still verifies


def test_a_report_forged_in_the_readers_own_run_does_not_verify(gated, server: MlflowServer, reader: Account,
                                                                 tmp_path: Path) -> None:
    """The owner of a model of its own copies the gate's genuine signed report and decision record to it: the
    signature holds, but both are about another version, so nothing verifies."""
    recipe, _ = gated
    passed, _ = names(recipe)
    with as_user(reader):
        client = client_for(server.url)
        envelope, record = _genuine(client, passed, tmp_path / "genuine")
        name = f"{recipe.mlflow.registered_model_prefix}-readers-own"
        run = _own_run(client, "readers-own")
        client.create_registered_model(name)  # allowed: the reader MANAGEs what it creates
        mv = client.create_model_version(name, source=f"{run.info.artifact_uri}/adapter", run_id=run.info.run_id)
        forged = tmp_path / "forged" / "gate_report.json"
        forged.parent.mkdir()
        forged.write_text(json.dumps(envelope))  # byte for byte the gate's, signature intact
        client.log_artifact(run.info.run_id, str(forged), "gate")
        tags = {"validation_status": "passed", "emgate.decision": "passed", "emgate.gate_run_id": run.info.run_id,
                "emgate.gate_report_uri": f"{run.info.artifact_uri}/gate/gate_report.json",
                "emgate.gate_report_sha256": hashlib.sha256(forged.read_bytes()).hexdigest()}
        for key, value in tags.items():
            client.set_model_version_tag(name, mv.version, key, value)
        client.set_registered_model_alias(name, "champion", mv.version)
        tags_only = verify_version(client, ModelRef(name, alias="champion"))
        assert not tags_only.ok and tags_only.integrity == "legacy", tags_only.problems
        assert "legacy, unsigned" in tags_only.problems[0]
        client.set_tag(run.info.run_id, DECISION_FOR_TAG, f"{name}/{mv.version}")
        client.set_tag(run.info.run_id, DECISION_RECORD_TAG, record)  # the genuine record, filed under this version
        replayed = verify_version(client, ModelRef(name, alias="champion"))
    assert not replayed.ok and replayed.integrity == "bad_signature", replayed.problems
    assert "no decision record on this version verifies" in replayed.problems[0]
    assert f"about {passed}/1" in replayed.problems[0]


# ---- the alias guard (emgate gate guard): last in this module, since it reverts what the tests above leave ----

@pytest.fixture(scope="module")
def guard(server: MlflowServer, gated, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`emgate gate guard` as the chart runs it (the admin's account, the gate's public key, an HMAC secret),
    registered on the real server with `emgate gate guard-register`: the server delivers its webhooks to it."""
    import os
    import socket
    import subprocess
    import sys

    assert server.admin is not None
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "EMGATE_WEBHOOK_SECRET": GUARD_SECRET, "MLFLOW_TRACKING_URI": server.url,
           "MLFLOW_TRACKING_USERNAME": server.admin.username, "MLFLOW_TRACKING_PASSWORD": server.admin.password}
    log = (tmp_path_factory.mktemp("guard") / "guard.log").open("w")
    emgate = str(Path(sys.executable).parent / "emgate")
    proc = subprocess.Popen([emgate, "gate", "guard", "--port", str(port)], env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        assert proc.poll() is None and time.monotonic() < deadline, Path(log.name).read_text()
        try:
            if requests.get(f"{url}/healthz", timeout=2).status_code == 200:
                break
        except requests.ConnectionError:
            time.sleep(0.3)
    for _ in range(2):  # the second call updates the same webhook
        reg = subprocess.run([emgate, "gate", "guard-register", "--url", f"{url}/webhook"], env=env, capture_output=True,
                             text=True, timeout=60)
        assert reg.returncode == 0, reg.stdout + reg.stderr
    assert reg.stdout.startswith("updated webhook emgate-alias-guard")
    time.sleep(1.5)  # MLFLOW_WEBHOOK_CACHE_TTL
    yield url
    proc.terminate()
    proc.wait(timeout=20)
    print(Path(log.name).read_text()[-4000:])


GUARD_SECRET = "test-webhook-secret-0123456789abcdef"


def _eventually(read: Callable[[], Any], want: Callable[[Any], bool], timeout_s: float = 30) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = read()
        if want(value) or time.monotonic() > deadline:
            return value
        time.sleep(0.5)


def test_the_guard_is_registered_once_on_the_server(guard: str, server: MlflowServer) -> None:
    with as_user(server.admin):
        hooks = [h for h in client_for(server.url).list_webhooks() if h.name == "emgate-alias-guard"]
    assert len(hooks) == 1 and hooks[0].url == f"{guard}/webhook"
    assert {str(e) for e in hooks[0].events} == {"model_version_alias.created", "model_version_alias.deleted",
                                                  "model_version_tag.set", "model_version_tag.deleted"}


def test_the_guard_takes_champion_off_a_blocked_version(guard: str, gated, server: MlflowServer,
                                                        editor: Account) -> None:
    recipe, _ = gated
    passed, blocked = names(recipe)
    with as_user(editor):
        client = client_for(server.url)
        client.set_registered_model_alias(blocked, "champion", "1")  # the MLflow UI's "add alias" does the same
        aliases = _eventually(lambda: client.get_registered_model(blocked).aliases, lambda a: "champion" not in a)
        assert "champion" not in aliases
        note = client.get_model_version(blocked, "1").tags.get("emgate.guard_reverted", "")
        assert "champion was set on version 1, which does not verify" in note and "champion removed" in note
        client.set_registered_model_alias(passed, "champion", "1")  # a genuine pass keeps it
        time.sleep(3)
        assert client.get_registered_model(passed).aliases.get("champion") == "1"


def test_the_guard_sets_forged_decision_tags_back(guard: str, gated, server: MlflowServer, editor: Account) -> None:
    recipe, _ = gated
    passed, blocked = names(recipe)
    with as_user(editor):
        client = client_for(server.url)
        note = lambda: client.get_model_version(blocked, "1").tags.get("emgate.guard_reverted", "")  # noqa: E731
        client.set_model_version_tag(blocked, "1", "validation_status", "passed")
        tags = _eventually(lambda: client.get_model_version(blocked, "1").tags,
                           lambda t: t.get("validation_status") == "blocked")
        assert tags.get("validation_status") == "blocked", tags
        assert "validation_status was 'passed', the signed decision #1 is 'blocked': set back" in note()
        client.set_model_version_tag(blocked, "1", "emgate.override", "true")
        tags = _eventually(lambda: client.get_model_version(blocked, "1").tags, lambda t: "emgate.override" not in t)
        assert "emgate.override" not in tags and "no signed override record" in note(), tags
        with pytest.raises(MlflowException, match="403"):  # deleting a tag takes MANAGE, which EDIT lacks
            client.delete_model_version_tag(passed, "1", "emgate.decision")
    with as_user(server.admin):  # an owner (MANAGE) deletes it: restored all the same
        client = client_for(server.url)
        client.delete_model_version_tag(passed, "1", "emgate.decision")
        restored = _eventually(lambda: client.get_model_version(passed, "1").tags.get("emgate.decision"),
                               lambda v: v == "passed")
        assert restored == "passed"
        assert verify_version(client, ModelRef(passed, alias="champion")).ok


def test_the_guard_refuses_an_unsigned_or_replayed_delivery(guard: str, gated, server: MlflowServer) -> None:
    from emgate.alias_guard import sign

    recipe, _ = gated
    _, blocked = names(recipe)
    body = json.dumps({"entity": "model_version_alias", "action": "created",
                       "data": {"name": blocked, "alias": "champion", "version": "1"}})
    now = str(int(time.time()))
    cases = {"unsigned": {}, "wrong secret": {"X-MLflow-Signature": sign("not-the-secret", "d1", now, body)},
             "replayed": {"X-MLflow-Signature": sign(GUARD_SECRET, "d1", "1000000000", body),
                          "X-MLflow-Timestamp": "1000000000"}}
    for label, headers in cases.items():
        sent = {"X-MLflow-Delivery-Id": "d1", "X-MLflow-Timestamp": now, **headers}
        resp = requests.post(f"{guard}/webhook", data=body, headers=sent, timeout=10)
        assert resp.status_code == 401, (label, resp.text)
    good = requests.post(f"{guard}/webhook", data=body, timeout=30, headers={
        "X-MLflow-Delivery-Id": "d2", "X-MLflow-Timestamp": now, "X-MLflow-Signature": sign(GUARD_SECRET, "d2", now, body)})
    assert good.status_code == 200 and good.json()["action"] in ("ignored", "kept", "reverted"), good.text
