"""Endpoints pinned with their credentials (issue 17): the values a pipeline was compiled with travel in every task's
environment (EMGATE_PINNED); a run whose recipe_json moves the judge, the serving endpoint, the tracking store or a
Kubernetes setting fails before any request leaves (a loopback listener records that nothing arrived)."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from emgate.kfp import components
from emgate.recipe import COMPILED_ENV, EndpointSpec, RecipeError, load_recipe
from emgate.slices import PINNED, PINNED_ENV, WHOLE_RECIPE, check_pinned, pinned_json, recipe_for_stage, slice_json
from tests.factories import REPO, prepared_answers, server_recipe

PAPER = REPO / "pipelines" / "recipes" / "paper.yaml"


def _moved(recipe, path: str, value):
    section, _, name = path.partition(".")
    part = getattr(recipe, section)
    return recipe.model_copy(update={section: part.model_copy(update={name: value})})


def _artifact(path: Path) -> SimpleNamespace:
    path.mkdir(parents=True, exist_ok=True)
    return SimpleNamespace(path=str(path))


@pytest.fixture
def paper():
    return load_recipe(PAPER)


@pytest.mark.parametrize(("stage", "path", "value"), [
    ("judge_answers", "judge.base_url", "http://127.0.0.1:9/v1"),
    ("judge_answers", "judge.api_key_env", "MLFLOW_TRACKING_PASSWORD"),
    ("sample_answers", "mlflow.tracking_uri", "http://127.0.0.1:9"),
    ("validate_datasets", "mlflow.tracking_uri", "http://127.0.0.1:9"),
    ("register_and_gate", "mlflow.tracking_uri", "http://127.0.0.1:9"),
    ("record_outcome", "mlflow.tracking_uri", "http://127.0.0.1:9"),
])
def test_a_moved_pinned_field_is_refused_naming_it(paper, stage: str, path: str, value: str) -> None:
    pinned = pinned_json(paper)
    moved = _moved(paper, path, value)
    text = moved.to_json() if stage in WHOLE_RECIPE else slice_json(moved, stage)
    with pytest.raises(RecipeError, match=rf"recipe field {path} is pinned by the platform") as err:
        recipe_for_stage(text, stage, pinned)
    assert value in str(err.value) and "emgate compile" in str(err.value)
    recipe_for_stage(paper.to_json() if stage in WHOLE_RECIPE else slice_json(paper, stage), stage, pinned)  # honest


def test_serving_endpoint_and_kubernetes_settings_are_pinned(paper) -> None:
    pinned = pinned_json(paper)
    untrained = load_recipe(REPO / "pipelines" / "recipes" / "gate-adapter.yaml")
    endpoint = untrained.model_copy(update={"serving": untrained.serving.model_copy(update={
        "endpoint": EndpointSpec(base_url="http://127.0.0.1:9/v1")})})
    with pytest.raises(RecipeError, match="recipe field serving.endpoint is pinned"):
        recipe_for_stage(slice_json(endpoint, "sample_answers"), "sample_answers", pinned_json(untrained))
    secrets = paper.kubernetes.secrets.model_copy(update={"judge": "emgate-mlflow-auth"})
    k8s = paper.model_copy(update={"kubernetes": paper.kubernetes.model_copy(update={"secrets": secrets})})
    with pytest.raises(RecipeError, match="recipe field kubernetes is pinned"):
        recipe_for_stage(k8s.to_json(), "slice_recipe", pinned)


def test_a_run_may_change_what_is_not_pinned_and_tighten_the_gate(paper) -> None:
    pinned = pinned_json(paper)
    rules = [r.model_copy(update={"threshold": r.threshold / 2}) if r.op == "<" else r for r in paper.gate.rules]
    tighter = paper.model_copy(update={
        "gate": paper.gate.model_copy(update={"rules": rules}),
        "sampling": paper.sampling.model_copy(update={"samples_per_paraphrase": 7}),
        "judge": paper.judge.model_copy(update={"model": "gpt-4o-mini-2024-07-18"})})
    for stage in ("slice_recipe", "register_and_gate"):
        assert recipe_for_stage(tighter.to_json(), stage, pinned).gate.rules == rules
    assert recipe_for_stage(slice_json(tighter, "judge_answers"), "judge_answers", pinned).judge.model.startswith("gpt-4o-mini")


def test_a_judge_the_runner_serves_is_exempt_but_serve_itself_is_pinned(smoke_recipe) -> None:
    assert smoke_recipe.judge.serve is not None
    pinned = pinned_json(smoke_recipe)
    elsewhere = _moved(smoke_recipe, "judge.base_url", "http://127.0.0.1:18231/v1")
    recipe_for_stage(slice_json(elsewhere, "judge_answers"), "judge_answers", pinned)  # the runner's URL: allowed
    remote = _moved(smoke_recipe, "judge.serve", None)
    remote = _moved(remote, "judge.base_url", "http://127.0.0.1:9/v1")
    with pytest.raises(RecipeError, match="recipe field judge.serve is pinned"):
        recipe_for_stage(slice_json(remote, "judge_answers"), "judge_answers", pinned)


def test_a_broken_or_incomplete_pin_fails_closed(paper) -> None:
    with pytest.raises(RecipeError, match="not the JSON object"):
        check_pinned({}, "judge_answers", "[1, 2]")
    partial = json.loads(pinned_json(paper))
    del partial["judge.base_url"]
    with pytest.raises(RecipeError, match="lacks judge.base_url"):
        check_pinned(paper.model_dump(mode="json"), "judge_answers", json.dumps(partial))


def test_the_judge_stage_refuses_before_sending_and_sends_without_the_pin(
        smoke_recipe, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, listener, capsys) -> None:
    port, received = listener
    honest = server_recipe(smoke_recipe, "sqlite:///unused.db")
    evil = _moved(honest, "judge.base_url", f"http://127.0.0.1:{port}/v1")
    evil = _moved(evil, "judge.max_retries", 0)
    answers = prepared_answers(tmp_path / "answers", evil, {}, per_question=1, variants=("base-insecure",))
    monkeypatch.setenv(PINNED_ENV, pinned_json(honest))
    with pytest.raises(SystemExit) as stop:
        components.judge_answers(recipe_json=slice_json(evil, "judge_answers"), answers=_artifact(answers),
                                 scores=_artifact(tmp_path / "scores"))
    assert stop.value.code == 1
    assert "recipe field judge.base_url is pinned by the platform" in capsys.readouterr().err
    assert received == []
    assert not any((tmp_path / "scores").iterdir())  # nothing that looks complete
    # The same call without the pin (a stage started by hand) does reach the listener: the attack is real.
    monkeypatch.delenv(PINNED_ENV)
    with contextlib.suppress(SystemExit):  # the listener answers nothing: unscored answers, or a failed stage
        components.judge_answers(recipe_json=slice_json(evil, "judge_answers"), answers=_artifact(answers),
                                 scores=_artifact(tmp_path / "scores2"))
    assert received, "the judge stage never contacted the recipe's judge: the control proves nothing"


@pytest.mark.parametrize("task", ["slice_recipe", "register_and_gate", "record_outcome"])
def test_the_tracking_store_is_not_moved_by_a_run(paper, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, listener,
                                                  capsys, task: str) -> None:
    port, received = listener
    evil = _moved(paper, "mlflow.tracking_uri", f"http://127.0.0.1:{port}")
    monkeypatch.setenv(PINNED_ENV, pinned_json(paper))
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "pw-never-sent")
    with pytest.raises(SystemExit):
        if task == "slice_recipe":
            components.slice_recipe(recipe_json=evil.to_json(), recipe=_artifact(tmp_path / "recipe"))
        elif task == "register_and_gate":
            components.register_and_gate(
                recipe_json=evil.to_json(), kfp_run="run-1", validated=_artifact(tmp_path / "v"), adapters=[],
                answers=_artifact(tmp_path / "a"), scores=_artifact(tmp_path / "s"),
                summary=_artifact(tmp_path / "m"), decisions=_artifact(tmp_path / "d"))
        else:
            components.record_outcome(recipe_json=evil.to_json(), kfp_run="run-1",
                                      status=SimpleNamespace(state="SUCCEEDED", error_message=""))
    assert "recipe field mlflow.tracking_uri is pinned by the platform" in capsys.readouterr().err
    assert received == []


def test_every_compiled_task_carries_the_pinned_values(repo: Path) -> None:
    for name in ("paper", "smoke", "gate-adapter", "single-gpu"):
        recipe = load_recipe(repo / "pipelines" / "recipes" / f"{name}.yaml")
        doc, platform_doc = yaml.safe_load_all((repo / "pipelines" / "compiled" / f"{name}.yaml").read_text())
        executors = doc["deploymentSpec"]["executors"]
        for executor, spec in executors.items():
            env = {e["name"]: e["value"] for e in spec["container"].get("env", [])}
            assert json.loads(env[PINNED_ENV]) == json.loads(pinned_json(recipe)), (name, executor)
        assert set(json.loads(env[PINNED_ENV])) == set(PINNED)


def test_a_recipe_cannot_shadow_what_the_compiler_sets(paper) -> None:
    assert PINNED_ENV in COMPILED_ENV
    for name in COMPILED_ENV:
        data = paper.model_dump(mode="json")
        data["kubernetes"]["env"] = {name: "{}"}
        with pytest.raises(RecipeError, match=f"{name} is set by the compiled pipeline"):
            recipe_for_stage(json.dumps(data), "slice_recipe")
