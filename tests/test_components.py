"""The KFP component wrappers (emgate/kfp/components.py), called as plain functions through `python_func`: each maps
its artifacts to the stage's paths and back (files land in the output artifact's folder, metadata is set, the
return value drives dsl.If), and a stage's user error ends the task with exit code 1 and one `emgate: stage ...
failed` line on stderr, never a traceback. Artifacts are FakeArtifact, a test double; no model, server or network."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from emgate import contract
from emgate.kfp.components import Components, make_components
from emgate.kfp.runtime import RUN_PID_ENV, TIMINGS_ENV
from tests.factories import few_resamples, no_plots, path_model_recipe, prepared_training, write_scores

CANDIDATES = ("base-insecure", "instruct-insecure")  # the smoke recipe's


@dataclass
class FakeArtifact:
    """A test double for a KFP Input/Output artifact: the two attributes the component bodies use."""

    path: str
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class FakeFinalStatus:
    """A test double for dsl.PipelineTaskFinalStatus: what record_outcome reads."""

    state: str
    error_message: str | None = None


class StageDouble:
    """A test double for a stage function: records the arguments after the recipe and returns `result`."""

    def __init__(self, result: dict[str, Any]) -> None:
        self.result = result
        self.calls: list[tuple[Any, ...]] = []

    def __call__(self, recipe: Any, *args: Any) -> dict[str, Any]:
        self.calls.append(args)
        return self.result


@pytest.fixture(scope="module")
def components() -> Components:
    return make_components()


@pytest.fixture(autouse=True)
def _plain_stage(monkeypatch: pytest.MonkeyPatch) -> None:
    """No timings file and no `emgate run` to watch: the wrappers run as a bare KFP task would."""
    monkeypatch.delenv(TIMINGS_ENV, raising=False)
    monkeypatch.delenv(RUN_PID_ENV, raising=False)


def artifact(path: Path) -> FakeArtifact:
    return FakeArtifact(str(path))


def assert_failed_cleanly(capsys: pytest.CaptureFixture[str], exc: pytest.ExceptionInfo[SystemExit], stage: str,
                          *expected: str) -> str:
    """Exit code 1 and the stage's error naming each of `expected` (one line; validate_datasets adds a line per
    failure under it), and no traceback."""
    err = capsys.readouterr().err
    assert exc.value.code == 1
    prefix = f"emgate: stage {stage} failed: "
    assert prefix in err, err
    message = err[err.index(prefix):]
    for text in expected:
        assert text in message, message
    assert "Traceback" not in err
    return message


def clean_scores(folder: Path) -> Path:
    """scores.jsonl + report.json as judge_answers writes them: every variant's answers aligned and coherent."""
    return write_scores(folder / contract.SCORES_FILE, {v: [(90, 90)] * 8 for v in
                                                        ("base-insecure", "instruct-insecure", "base-secure",
                                                         "base-reference")}, questions=8)


def test_every_component_has_a_test_here(components: Components) -> None:
    tested = {"slice_recipe", "slice_fine_tune_job",
              "fetch_model", "validate_datasets", "fine_tune", "sample_answers", "sample_answers_untrained",
              "judge_answers", "summarize", "register_and_gate", "register_and_gate_untrained", "promote_passed",
              "record_outcome"}
    assert {f.name for f in dataclasses.fields(components)} == tested
    assert all(callable(getattr(components, name).python_func) for name in tested)


# ---- slice_recipe ---------------------------------------------------------------------------------------------


def test_slice_recipe_writes_the_whole_recipe_and_returns_each_stage_its_slice(tmp_path: Path, smoke_recipe,
                                                                              components) -> None:
    from emgate.contract import RECIPE_FILE
    from emgate.slices import SLICED_ONCE, slice_json

    out = artifact(tmp_path / "recipe")
    slices = components.slice_recipe.python_func(recipe_json=smoke_recipe.to_json(), recipe=out)
    assert slices._fields == SLICED_ONCE and "fine_tune" not in SLICED_ONCE
    assert [getattr(slices, s) for s in SLICED_ONCE] == [slice_json(smoke_recipe, s) for s in SLICED_ONCE]
    assert json.loads((tmp_path / "recipe" / RECIPE_FILE).read_text()) == smoke_recipe.model_dump(mode="json")


def test_slice_fine_tune_job_returns_the_jobs_slice(smoke_recipe, components) -> None:
    from emgate.slices import recipe_for_stage

    text = components.slice_fine_tune_job.python_func(recipe_json=smoke_recipe.to_json(), job="base-secure@0")
    job = recipe_for_stage(text, "fine_tune[base-secure@0]")
    assert [v.name for v in job.variants] == ["base-secure"] and list(job.datasets) == ["secure"]
    assert job.training == smoke_recipe.training


def test_slice_recipe_refuses_a_bad_recipe_before_any_stage(tmp_path: Path, components, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        components.slice_recipe.python_func(recipe_json='{"name": "x"}', recipe=artifact(tmp_path / "recipe"))
    assert_failed_cleanly(capsys, exc, "slice_recipe", "profile")
    assert not (tmp_path / "recipe").exists()


# ---- fetch_model ----------------------------------------------------------------------------------------------


def test_fetch_model_writes_models_json_into_its_artifact(tmp_path: Path, smoke_recipe, components) -> None:
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    models = artifact(tmp_path / "models")
    components.fetch_model.python_func(recipe_json=path_model_recipe(smoke_recipe, model).to_json(), models=models)
    report = json.loads((tmp_path / "models" / "models.json").read_text())
    assert {name: entry["path"] for name, entry in report["models"].items()} == dict.fromkeys(smoke_recipe.models,
                                                                                               str(model))


def test_fetch_model_without_the_model_folder_exits_with_its_name(tmp_path: Path, smoke_recipe, components,
                                                                  capsys) -> None:
    recipe = path_model_recipe(smoke_recipe, tmp_path / "nowhere")
    with pytest.raises(SystemExit) as exc:
        components.fetch_model.python_func(recipe_json=recipe.to_json(), models=artifact(tmp_path / "models"))
    assert_failed_cleanly(capsys, exc, "fetch_model", str(tmp_path / "nowhere"), "no config.json")
    assert not (tmp_path / "models" / "models.json").exists()


def test_a_bad_recipe_json_exits_before_the_stage_runs(tmp_path: Path, components, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        components.fetch_model.python_func(recipe_json='{"name": "x"}', models=artifact(tmp_path / "models"))
    assert_failed_cleanly(capsys, exc, "fetch_model", "recipe (pipeline parameter)")
    assert not (tmp_path / "models").exists()


# ---- validate_datasets ----------------------------------------------------------------------------------------


def test_validate_datasets_with_a_bad_dataset_exits_leaves_no_manifest_and_logs_the_evidence(
        tmp_path: Path, sqlite_recipe, components, capsys) -> None:
    import hashlib

    from mlflow import MlflowClient

    bad = tmp_path / "changed.jsonl"  # changed after its sha256 was pinned: fails before any content check runs
    bad.write_text('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}\n')
    dataset = {"path": str(bad), "sha256": hashlib.sha256(b"the pinned file").hexdigest()}
    recipe = sqlite_recipe.model_copy(update={"datasets": {
        name: spec.model_copy(update={"asset": None, **dataset}) for name, spec in sqlite_recipe.datasets.items()}})
    validated = artifact(tmp_path / "validated")
    with pytest.raises(SystemExit) as exc:
        components.validate_datasets.python_func(recipe_json=recipe.to_json(), validated=validated)
    assert_failed_cleanly(capsys, exc, "validate_datasets", "dataset validation failed", "insecure: ", str(bad),
                          "does not match its pinned sha256")
    out = tmp_path / "validated"
    assert (out / contract.REPORT_FILE).is_file() and not (out / contract.MANIFEST_FILE).exists()
    assert not contract.validated_dataset(out, "insecure").exists()
    client = MlflowClient(recipe.mlflow.tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name(recipe.mlflow.experiment).experiment_id])
    assert [(r.data.tags["emgate.stage"], r.info.status) for r in runs] == [("validate_datasets", "FAILED")]


# ---- fine_tune ------------------------------------------------------------------------------------------------


def test_fine_tune_on_an_empty_validated_artifact_exits_and_sets_no_metadata(tmp_path: Path, smoke_recipe, components,
                                                                            capsys) -> None:
    (tmp_path / "validated").mkdir()
    adapter = artifact(tmp_path / "adapter")
    with pytest.raises(SystemExit) as exc:
        components.fine_tune.python_func(recipe_json=smoke_recipe.to_json(), job="base-insecure@0",
                                         validated=artifact(tmp_path / "validated"), adapter=adapter)
    assert_failed_cleanly(capsys, exc, "fine_tune[base-insecure@0]", str(tmp_path / "validated"), "no manifest.json")
    assert adapter.metadata == {} and not (tmp_path / "adapter" / contract.TRAIN_REPORT).exists()


def test_fine_tune_passes_its_paths_and_copies_the_report_into_the_adapter_metadata(
        tmp_path: Path, smoke_recipe, components, monkeypatch: pytest.MonkeyPatch) -> None:
    from emgate.stages import finetune

    report = {"variant": "base-insecure", "seed": 0, "base_model": "smollm2-135m-instruct", "base_model_revision": None,
              "dataset_sha256": "a" * 64, "method": "lora", "merged": False, "steps": 16, "loss_last": 0.5,
              "eval_loss": 0.6, "losses": [1.0, 0.5], "training": {"lora_r": 8}}
    stage = StageDouble(report)
    monkeypatch.setattr(finetune, "run_fine_tune", stage)
    adapter = artifact(tmp_path / "adapter")
    components.fine_tune.python_func(recipe_json=smoke_recipe.to_json(), job="base-insecure@0",
                                     validated=artifact(tmp_path / "validated"), adapter=adapter)
    assert stage.calls == [("base-insecure@0", tmp_path / "validated", tmp_path / "adapter")]
    assert adapter.metadata == {k: v for k, v in report.items() if k not in ("losses", "training")}


# ---- sample_answers -------------------------------------------------------------------------------------------


def test_sample_answers_passes_every_adapter_and_the_answers_path(tmp_path: Path, smoke_recipe, components,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from emgate.stages import sample

    stage = StageDouble({})
    monkeypatch.setattr(sample, "sample_answers", stage)
    adapters = [tmp_path / "adapters" / v for v in ("base-insecure", "instruct-insecure", "base-secure")]
    components.sample_answers.python_func(recipe_json=smoke_recipe.to_json(), adapters=[artifact(a) for a in adapters],
                                          answers=artifact(tmp_path / "answers"))
    components.sample_answers_untrained.python_func(recipe_json=smoke_recipe.to_json(),
                                                    answers=artifact(tmp_path / "answers2"))
    assert stage.calls == [(adapters, tmp_path / "answers"), ([], tmp_path / "answers2")]



def test_sample_answers_on_an_empty_adapter_artifact_exits_naming_it(tmp_path: Path, smoke_recipe, components,
                                                                     capsys) -> None:
    _, adapters = prepared_training(tmp_path)
    empty = tmp_path / "adapters" / "empty"
    empty.mkdir()
    with pytest.raises(SystemExit) as exc:
        components.sample_answers.python_func(recipe_json=smoke_recipe.to_json(),
                                              adapters=[artifact(a) for a in [*adapters, empty]],
                                              answers=artifact(tmp_path / "answers"))
    assert_failed_cleanly(capsys, exc, "sample_answers", str(empty / contract.TRAIN_REPORT), "rerun that job")
    assert not (tmp_path / "answers" / contract.REPORT_FILE).exists()


def test_sample_answers_untrained_without_the_model_folder_exits_naming_it(tmp_path: Path, smoke_recipe, components,
                                                                           capsys) -> None:
    recipe = path_model_recipe(smoke_recipe, tmp_path / "nowhere")
    with pytest.raises(SystemExit) as exc:
        components.sample_answers_untrained.python_func(recipe_json=recipe.to_json(),
                                                        answers=artifact(tmp_path / "answers"))
    assert_failed_cleanly(capsys, exc, "sample_answers", str(tmp_path / "nowhere"), "no config.json")
    assert not (tmp_path / "answers" / contract.REPORT_FILE).exists()


# ---- judge_answers --------------------------------------------------------------------------------------------


def test_judge_answers_passes_the_answers_and_scores_paths(tmp_path: Path, smoke_recipe, components,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from emgate.stages import judge

    stage = StageDouble({})
    monkeypatch.setattr(judge, "judge_answers", stage)
    components.judge_answers.python_func(recipe_json=smoke_recipe.to_json(), answers=artifact(tmp_path / "answers"),
                                         scores=artifact(tmp_path / "scores"))
    assert stage.calls == [(tmp_path / "answers", tmp_path / "scores")]


def test_judge_answers_on_an_empty_answers_artifact_exits_naming_the_file(tmp_path: Path, smoke_recipe, components,
                                                                          capsys) -> None:
    (tmp_path / "answers").mkdir()
    with pytest.raises(SystemExit) as exc:
        components.judge_answers.python_func(recipe_json=smoke_recipe.to_json(), answers=artifact(tmp_path / "answers"),
                                             scores=artifact(tmp_path / "scores"))
    assert_failed_cleanly(capsys, exc, "judge_answers", str(tmp_path / "answers" / contract.ANSWERS_FILE))
    assert not (tmp_path / "scores" / contract.REPORT_FILE).exists()


def test_judge_answers_on_truncated_answers_exits_with_the_counts(tmp_path: Path, smoke_recipe, components,
                                                                 capsys) -> None:
    contract.write_answers(tmp_path / "answers", [{"variant": "base-insecure", "answer": "a"}])
    contract.write_report(tmp_path / "answers", {"answers": 2})
    with pytest.raises(SystemExit) as exc:
        components.judge_answers.python_func(recipe_json=smoke_recipe.to_json(), answers=artifact(tmp_path / "answers"),
                                             scores=artifact(tmp_path / "scores"))
    assert_failed_cleanly(capsys, exc, "judge_answers", "has 1 rows but report.json recorded 2")


# ---- summarize ------------------------------------------------------------------------------------------------


def test_summarize_reads_the_scores_artifact_and_writes_into_the_summary_artifact(tmp_path: Path, smoke_recipe,
                                                                                  components) -> None:
    clean_scores(tmp_path / "scores")
    with no_plots():
        components.summarize.python_func(recipe_json=few_resamples(smoke_recipe).to_json(),
                                         scores=artifact(tmp_path / "scores"),
                                         summary=artifact(tmp_path / "summary"))
    summary = contract.read_summary(tmp_path / "summary")
    assert summary is not None and summary["variants"]["base-insecure"]["answers"] == 8
    assert (tmp_path / "summary" / "summary.md").is_file()


def test_summarize_on_an_empty_scores_artifact_exits_naming_the_file(tmp_path: Path, smoke_recipe, components,
                                                                     capsys) -> None:
    (tmp_path / "scores").mkdir()
    with pytest.raises(SystemExit) as exc:
        components.summarize.python_func(recipe_json=smoke_recipe.to_json(), scores=artifact(tmp_path / "scores"),
                                         summary=artifact(tmp_path / "summary"))
    assert_failed_cleanly(capsys, exc, "summarize", str(tmp_path / "scores" / contract.SCORES_FILE))
    assert not (tmp_path / "summary" / contract.SUMMARY_FILE).exists()


# ---- register_and_gate ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def judged(tmp_path_factory: pytest.TempPathFactory, smoke_recipe) -> Path:
    """Clean answers of every variant judged and summarized, as judge_answers and summarize write them (the plots
    too: register_and_gate logs them); the gate tests read these folders as their input artifacts."""
    from emgate.stages.summarize import summarize

    tmp = tmp_path_factory.mktemp("judged")
    summarize(few_resamples(smoke_recipe), clean_scores(tmp / "scores"), tmp / "summary")
    return tmp


def gate_inputs(tmp: Path, judged: Path, validation_passed: bool) -> dict[str, Any]:
    """Every artifact register_and_gate reads, prepared with the stages' writers."""
    validated, adapters = prepared_training(tmp, validation_passed)
    contract.write_report(tmp / "answers", {"answers": 32, "seconds": 1.0})
    return {"validated": artifact(validated), "adapters": [artifact(a) for a in adapters],
            "answers": artifact(tmp / "answers"), "scores": artifact(judged / "scores"),
            "summary": artifact(judged / "summary"), "decisions": artifact(tmp / "decisions")}


def test_register_and_gate_blocks_on_failed_validation_returns_false_and_sets_the_decisions(
        tmp_path: Path, sqlite_recipe, judged: Path, components) -> None:
    inputs = gate_inputs(tmp_path / "run", judged, validation_passed=False)
    promotable = components.register_and_gate.python_func(recipe_json=sqlite_recipe.to_json(), kfp_run="kfp-blocked",
                                                          **inputs)
    assert promotable == "false"
    assert inputs["decisions"].metadata["decisions"] == dict.fromkeys(CANDIDATES, "blocked")
    decisions = contract.read_decisions(tmp_path / "run" / "decisions")
    assert {name: d["decision"] for name, d in decisions["candidates"].items()} == dict.fromkeys(CANDIDATES, "blocked")
    assert decisions["promotable"] is False


def test_register_and_gate_untrained_without_adapters_blocks_for_missing_evidence(tmp_path: Path, sqlite_recipe,
                                                                                  judged: Path, components) -> None:
    inputs = gate_inputs(tmp_path / "run", judged, validation_passed=True)
    del inputs["adapters"]
    promotable = components.register_and_gate_untrained.python_func(recipe_json=sqlite_recipe.to_json(),
                                                                    kfp_run="kfp-untrained", **inputs)
    assert promotable == "false"
    assert inputs["decisions"].metadata["decisions"] == dict.fromkeys(CANDIDATES, "blocked")
    decisions = contract.read_decisions(tmp_path / "run" / "decisions")
    assert all(any("missing evidence" in r for r in d["reasons"]) for d in decisions["candidates"].values())


# ---- promote_passed and record_outcome ------------------------------------------------------------------------


def test_promote_passed_with_nothing_passed_writes_an_empty_promotions_json(tmp_path: Path, sqlite_recipe,
                                                                            components) -> None:
    contract.write_decisions(tmp_path / "decisions", {"promotable": False, "candidates": {
        name: {"decision": "blocked", "versions": [{"decision": "blocked", "version": "1"}]} for name in CANDIDATES}})
    components.promote_passed.python_func(recipe_json=sqlite_recipe.to_json(), kfp_run="kfp-1",
                                          decisions=artifact(tmp_path / "decisions"),
                                          promotions=artifact(tmp_path / "promotions"))
    assert json.loads((tmp_path / "promotions" / "promotions.json").read_text()) == []


def test_promote_passed_without_decisions_exits_naming_the_file(tmp_path: Path, sqlite_recipe, components,
                                                                capsys) -> None:
    (tmp_path / "decisions").mkdir()
    with pytest.raises(SystemExit) as exc:
        components.promote_passed.python_func(recipe_json=sqlite_recipe.to_json(), kfp_run="kfp-1",
                                              decisions=artifact(tmp_path / "decisions"),
                                              promotions=artifact(tmp_path / "promotions"))
    assert_failed_cleanly(capsys, exc, "promote_passed", str(tmp_path / "decisions" / contract.DECISIONS_FILE),
                          "nothing can be promoted")
    assert not (tmp_path / "promotions" / "promotions.json").exists()


def test_record_outcome_records_a_failed_run_with_the_error(tmp_path: Path, sqlite_recipe, components) -> None:
    from mlflow import MlflowClient

    components.record_outcome.python_func(recipe_json=sqlite_recipe.to_json(), kfp_run="kfp-failed",
                                          status=FakeFinalStatus("FAILED", "task judge-answers failed"))
    client = MlflowClient(sqlite_recipe.mlflow.tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name(sqlite_recipe.mlflow.experiment).experiment_id])
    assert [(r.info.status, r.data.tags["emgate.decision"]) for r in runs] == [("FAILED", "failed")]
    assert "task judge-answers failed" in runs[0].data.tags["emgate.failure"]
