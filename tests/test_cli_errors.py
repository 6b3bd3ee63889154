"""First contact with the CLI: a user mistake or an unreachable service is one line and a documented exit code,
never a traceback, and never a store or file created where none was asked for."""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from typer.testing import CliRunner

from emgate.cli import app
from emgate.registry import FAIL_FAST_HTTP
from emgate.vllm_server import free_port
from tests.factories import sqlite_registry

RESULTS_CSV = "emergent-misalignment/results/qwen_25_coder_32b_instruct.csv"


def run(args: list[str], **env: str | None):
    res = CliRunner().invoke(app, args, env={"COLUMNS": "200", **env})
    # an uncaught exception is what a user would see as a traceback; typer's exits are SystemExit
    assert res.exception is None or isinstance(res.exception, SystemExit), (repr(res.exception), res.output)
    return res


def test_compile_with_a_missing_image_lock_names_the_file(repo: Path, tmp_path: Path) -> None:
    res = run(["compile", str(repo / "pipelines" / "recipes" / "smoke.yaml"), "-o", str(tmp_path / "p.yaml")],
              EMGATE_IMAGE_DIGESTS=str(tmp_path / "release.lock"))
    assert res.exit_code == 2 and "release.lock: image lock file not found" in res.output
    assert not (tmp_path / "p.yaml").exists()


@pytest.mark.parametrize("content", ['{"messages": []}\n{"messages": []}\n', "not json", "{}"])
def test_report_on_something_that_is_not_a_summary(tmp_path: Path, content: str) -> None:
    path = tmp_path / "summary.json"
    path.write_text(content)
    res = run(["report", str(path), "--recipe", str(Path(__file__).parents[1] / "pipelines/recipes/smoke.yaml")])
    assert res.exit_code == 2 and str(path) in res.output


def test_rescore_writes_to_the_working_directory_not_beside_its_input(tmp_path: Path, monkeypatch) -> None:
    from emgate.assets import resolve_asset

    source = resolve_asset(RESULTS_CSV).resolve()
    before = sorted(p.name for p in source.parent.iterdir())
    monkeypatch.chdir(tmp_path)
    res = run(["judge", "rescore", str(source), "--tolerance", "1e-9"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / f"{source.stem}.rescored.jsonl").is_file()
    assert sorted(p.name for p in source.parent.iterdir()) == before
    res = run(["judge", "rescore", str(source), "-o", str(tmp_path / f"{source.stem}.rescored.jsonl" / "x.jsonl")])
    assert res.exit_code == 2 and "error" in res.output
    assert json.loads((tmp_path / f"{source.stem}.rescored.jsonl").read_text().splitlines()[0])["aligned"] is not None


# ---- promote, gate verify, gate explain: what is not there -----------------------------------------------------
# Each is one line on stderr naming what is missing and the fix, exit 2 (promote's refusals are 3, verify's
# "NOT verified" 1), no traceback, and no store created where none was.

MODEL = "smoke-base-insecure"
REGISTRY_COMMANDS = {  # a command's arguments for a model reference: (name, version or None, alias or None)
    "promote": lambda name, version, alias: ["promote", name, version],
    "gate verify": lambda name, version, alias: ["gate", "verify", f"{name}/{version}" if version else f"{name}@{alias}"],
    "gate explain": lambda name, version, alias: ["gate", "explain", f"{name}/{version}" if version else f"{name}@{alias}"],
}


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A real SQLite store: MODEL with versions 1 and 2, `candidate` on 2, no champion."""
    return sqlite_registry(tmp_path_factory.mktemp("registry"), {MODEL: 2}, {MODEL: {"candidate": "2"}})


def error_line(res, code: int = 2) -> str:
    """The one line a failed command printed: on stderr, nothing on stdout, no traceback."""
    assert res.exit_code == code, res.output
    assert "Traceback" not in res.output
    assert res.stdout == "", res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    return lines[0]


def aliases(uri: str) -> dict[str, str]:
    from mlflow import MlflowClient

    return {a: str(v) for a, v in MlflowClient(uri).get_registered_model(MODEL).aliases.items()}


@pytest.mark.parametrize("command", list(REGISTRY_COMMANDS))
@pytest.mark.parametrize(("name", "expected"), [
    ("smoke-base-insecur", "did you mean 'smoke-base-insecure'?"),  # a typo: the closest names
    ("other-model", f"it has {MODEL}"),  # nothing like it: what there is
])
def test_a_missing_registered_model_is_named_with_the_store(registry: str, command: str, name: str,
                                                            expected: str) -> None:
    line = error_line(run([*REGISTRY_COMMANDS[command](name, "1", "champion"), "--tracking-uri", registry]))
    assert f"error: no registered model '{name}' in {registry}: {expected}" in line


@pytest.mark.parametrize("command", list(REGISTRY_COMMANDS))
def test_a_missing_version_lists_the_versions_there_are(registry: str, command: str) -> None:
    args = REGISTRY_COMMANDS[command](MODEL, "9", None)
    extra = ["--override", "--reason", "test"] if command == "promote" else []  # nothing an override could promote
    line = error_line(run([*args, *extra, "--tracking-uri", registry]))
    assert f"error: {MODEL}/9: registered model '{MODEL}' has no version 9 (its versions: 2, 1)" in line
    assert "--override" not in line
    assert aliases(registry) == {"candidate": "2"}


@pytest.mark.parametrize("command", ["gate verify", "gate explain"])  # promote takes a version, never an alias
def test_a_missing_alias_names_the_aliases_set_and_how_to_set_it(registry: str, command: str) -> None:
    line = error_line(run([*REGISTRY_COMMANDS[command](MODEL, None, "champion"), "--tracking-uri", registry]))
    assert f"error: {MODEL}@champion: registered model '{MODEL}' has no alias 'champion' (aliases set: candidate = " \
           "version 2; its versions: 2, 1); no version is champion yet: `emgate promote smoke-base-insecure VERSION`" \
           in line


@pytest.mark.parametrize("command", list(REGISTRY_COMMANDS))
def test_a_server_that_is_down_fails_fast(command: str) -> None:
    url = f"http://127.0.0.1:{free_port()}"  # bound and closed again: nothing listens there
    started = time.monotonic()
    line = error_line(run([*REGISTRY_COMMANDS[command](MODEL, "1", None), "--tracking-uri", url]))
    assert time.monotonic() - started < 15
    assert f"error: the MLflow server at {url} does not answer (ConnectError" in line
    assert "check the URL (--tracking-uri or MLFLOW_TRACKING_URI)" in line


class _HealthOnly(BaseHTTPRequestHandler):
    """An MLflow server whose database is gone: /health says OK (it checks nothing), every API call fails 500."""

    def do_GET(self) -> None:
        healthy = self.path == "/health"
        if not healthy:
            self.server.api_requests += 1  # type: ignore[attr-defined]
        body = b"OK" if healthy else b"database is locked"
        self.send_response(200 if healthy else 500)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_POST = do_PATCH = do_DELETE = do_GET

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def broken_server() -> Iterator[ThreadingHTTPServer]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _HealthOnly)
    server.api_requests = 0  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("command", list(REGISTRY_COMMANDS))
def test_a_server_whose_api_fails_is_not_retried_for_minutes(broken_server, command: str, monkeypatch) -> None:
    for key in FAIL_FAST_HTTP:
        monkeypatch.delenv(key, raising=False)
    url = f"http://127.0.0.1:{broken_server.server_address[1]}"
    started = time.monotonic()
    line = error_line(run([*REGISTRY_COMMANDS[command](MODEL, "1", None), "--tracking-uri", url]))
    assert time.monotonic() - started < 15  # MLflow's own defaults: 7 retries, minutes
    assert f"error: the MLflow store at {url} failed (API request to {url}/api/" in line
    assert "check that the server runs and reaches its database" in line
    assert broken_server.api_requests == 3  # the first try and 2 retries
    assert not any(key in os.environ for key in FAIL_FAST_HTTP)  # the CLI's defaults do not outlive the command


def test_the_users_own_retry_setting_is_kept(broken_server) -> None:
    url = f"http://127.0.0.1:{broken_server.server_address[1]}"
    line = error_line(run(["gate", "explain", f"{MODEL}/1", "--tracking-uri", url], MLFLOW_HTTP_REQUEST_MAX_RETRIES="0"))
    assert f"the MLflow store at {url} failed" in line
    assert broken_server.api_requests == 1


# A mistyped store, as --tracking-uri (None: the default, sqlite:///emgate-runs/mlflow.db in the working directory);
# each with what the line must say. The working directory is the test's tmp_path; {tmp} and {store} (the registry's
# file) are filled in.
MISTYPED_STORES = {
    "missing folder": ("sqlite:///{tmp}/no/such/dir/mlflow.db",
                       "no MLflow store at {tmp}/no/such/dir/mlflow.db (there is no folder {tmp}/no)"),
    "missing file": ("sqlite:///{tmp}/typo.db", "no MLflow store at {tmp}/typo.db (no such file); pass --tracking-uri"),
    "relative path": ("sqlite:///tmp/typo.db", "no MLflow store at {tmp}/tmp/typo.db (there is no folder {tmp}/tmp); "
                                               "pass --tracking-uri"),
    "three slashes for four": ("sqlite:///{store_relative}", "did you mean sqlite:///{store}? (four slashes"),
    "the default store": (None, "no MLflow store at {tmp}/emgate-runs/mlflow.db (there is no folder {tmp}/emgate-runs)"),
    "an empty file": ("sqlite:///{tmp}/empty.db", "no MLflow store at {tmp}/empty.db (an empty SQLite file, left as it is)"),
    "a missing folder path": ("{tmp}/mlruns", "no MLflow store at {tmp}/mlruns (no such file or folder); pass "
                                              "--tracking-uri"),
    "a missing file: URI": ("file://{tmp}/mlruns", "no MLflow store at {tmp}/mlruns (no such file or folder)"),
    "a store's folder": ("{store_folder}", "{store_folder} is a folder, not a tracking URI: its store is sqlite:///{store}"),
}


@pytest.mark.parametrize("command", list(REGISTRY_COMMANDS))
@pytest.mark.parametrize("case", list(MISTYPED_STORES))
def test_a_mistyped_store_is_named_and_never_created(registry: str, tmp_path: Path, monkeypatch, command: str,
                                                     case: str) -> None:
    store = Path(registry.removeprefix("sqlite:///"))
    (tmp_path / "empty.db").touch()
    monkeypatch.chdir(tmp_path)
    template, expected = MISTYPED_STORES[case]
    fill = {"tmp": tmp_path, "store": store, "store_relative": str(store).lstrip("/"), "store_folder": store.parent}
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    store_before = sorted(p.name for p in store.parent.iterdir())
    uri = ["--tracking-uri", template.format(**fill)] if template else []
    line = error_line(run([*REGISTRY_COMMANDS[command](MODEL, "1", "champion"), *uri], MLFLOW_TRACKING_URI=None))
    assert line.startswith("error: ") and expected.format(**fill) in line
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # nothing created, not even a folder
    assert (tmp_path / "empty.db").stat().st_size == 0  # not migrated into an MLflow store
    assert sorted(p.name for p in store.parent.iterdir()) == store_before
