"""First contact with the CLI: a user mistake or an unreachable service is one line and a documented exit code,
never a traceback, and never a store or file created where none was asked for."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from emgate.cli import app
from emgate.vllm_server import free_port

RESULTS_CSV = "emergent-misalignment/results/qwen_25_coder_32b_instruct.csv"


def run(args: list[str], **env: str):
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


@pytest.mark.parametrize("command", [["gate", "explain", "m@candidate"], ["gate", "verify", "m@champion"],
                                     ["promote", "m", "1"]])
def test_registry_commands_never_create_a_store_and_name_a_dead_server(tmp_path: Path, command: list[str]) -> None:
    missing = tmp_path / "nowhere" / "mlflow.db"
    res = run([*command, "--tracking-uri", f"sqlite:///{missing}"])
    assert res.exit_code == 2 and f"no MLflow store at {missing}" in res.output
    assert not missing.parent.exists()
    res = run([*command, "--tracking-uri", str(tmp_path / "mlruns")])  # a plain path: the file store MLflow refuses
    assert res.exit_code == 2 and "use sqlite:///PATH/mlflow.db" in res.output
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    res = run([*command, "--tracking-uri", url])
    assert res.exit_code == 2 and f"the MLflow server at {url} does not answer" in res.output


def test_promoting_a_version_that_does_not_exist_is_an_error_not_a_refusal(tmp_path: Path) -> None:
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("e", artifact_location=(tmp_path / "a").as_uri())).info.run_id
    client.create_registered_model("m")
    client.create_model_version("m", source=(tmp_path / "a" / "adapter").as_uri(), run_id=run_id)
    res = run(["promote", "m", "9", "--override", "--reason", "test", "--tracking-uri", uri])
    assert res.exit_code == 2 and "m" in res.output and "--override" not in res.output
    assert client.get_registered_model("m").aliases == {}


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
