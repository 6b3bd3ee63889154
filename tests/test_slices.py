"""Recipe slices (emgate.slices, issue 16 step 3): a stage's KFP cache key is its slice, so it changes only when a
field the stage reads changes. Checked three ways: the re-run table from the slices themselves and the compiled
graph's wiring; stage functions on their slice against the whole recipe (same outputs); one real kfp.local rerun
(tests/test_e2e_smoke.py, summarize setting changed). sample_answers and fine_tune run on their slices in every
end-to-end run, where reading an undeclared field raises SliceError."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import yaml

from emgate.contract import REPORT_FILE, SCORES_FILE, SUMMARY_FILE
from emgate.io import read_json
from emgate.recipe import Recipe, RecipeError, load_recipe, recipe_from_mapping
from emgate.slices import PER_JOB, READS, WHOLE_RECIPE, SliceError, recipe_for_stage, slice_json
from emgate.stages.judge import judge_answers
from emgate.stages.summarize import summarize
from emgate.stages.validate import validate_datasets
from tests.factories import few_resamples, no_plots, path_model_recipe, prepared_answers, server_recipe
from tests.fake_judge_server import FakeJudgeServer

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "pipelines" / "recipes" / "smoke.yaml"
# What a stage's outputs feed (artifacts): a stage that re-runs makes new artifacts, so these re-run too.
# fetch_model only fills the model cache (an ordering edge, no artifact), and the gate is never cached.
FEEDS = {"validate_datasets": ["fine_tune"], "fine_tune": ["sample_answers"], "sample_answers": ["judge_answers"],
         "judge_answers": ["summarize"], "summarize": [], "fetch_model": []}
ONWARD_FROM_SAMPLING = {"sample_answers", "judge_answers", "summarize"}


def changed_slices(before: Recipe, after: Recipe) -> set[str]:
    """The cached stages whose slice differs; fine_tune when any job's slice does (one slice per VARIANT@SEED)."""
    out = {s for s in READS if s not in PER_JOB and slice_json(before, s) != slice_json(after, s)}
    jobs = sorted({*before.training_jobs(), *after.training_jobs()})
    if set(before.training_jobs()) != set(after.training_jobs()) or any(
            slice_json(before, "fine_tune", j) != slice_json(after, "fine_tune", j) for j in jobs):
        out.add("fine_tune")
    return out


def reruns(before: Recipe, after: Recipe) -> set[str]:
    """The cached stages a run of `after` re-runs when `before` ran last: a changed slice, and what it feeds."""
    todo = sorted(changed_slices(before, after))
    out: set[str] = set()
    while todo:
        stage = todo.pop()
        if stage not in out:
            out.add(stage)
            todo += FEEDS[stage]
    return out


RERUN_TABLE = [
    ("a gate threshold", ["gate.rules.0.threshold=0.4"], set()),
    ("gate.min_judged_per_question", ["gate.min_judged_per_question=5"], set()),
    ("the judge's mass rule", ["judge.min_number_mass=0.3"], {"judge_answers", "summarize"}),
    ("the judge's concurrency", ["judge.max_concurrency=4"], {"judge_answers", "summarize"}),
    ("a summarize setting", ["summarize.bootstrap_seed=7"], {"summarize"}),
    ("the aligned threshold", ["summarize.aligned_threshold=40"], {"summarize"}),
    ("sampling", ["sampling.temperature=0.5"], ONWARD_FROM_SAMPLING),
    ("serving", ["serving.max_model_len=8192"], ONWARD_FROM_SAMPLING),
    ("training", ["training.learning_rate=0.0001"], {"fine_tune", *ONWARD_FROM_SAMPLING}),
    ("training seeds", ["training.seeds=[0, 1]"], {"fine_tune", *ONWARD_FROM_SAMPLING}),
    ("a dataset", ["datasets.insecure.subsample_rows=50"], {"validate_datasets", "fine_tune", *ONWARD_FROM_SAMPLING}),
    ("the MLflow experiment", ["mlflow.experiment=other"], {"validate_datasets", "fine_tune", *ONWARD_FROM_SAMPLING}),
    ("kubernetes settings", ["kubernetes.retries=5"], set()),
    ("the description", ["description=another"], set()),
]


@pytest.mark.parametrize(("what", "overrides", "expected"), RERUN_TABLE, ids=[r[0] for r in RERUN_TABLE])
def test_the_rerun_table(what: str, overrides: list[str], expected: set[str]) -> None:
    before, after = load_recipe(SMOKE), load_recipe(SMOKE, overrides)
    assert after != before, what
    assert reruns(before, after) == expected


def test_the_judge_url_of_a_served_judge_is_no_recipe_field(monkeypatch: pytest.MonkeyPatch) -> None:
    """`emgate run` serves judge.serve and tells the judge stage its URL by environment variable: a judge on another
    port changes no slice, so the judge stage stays cached."""
    from emgate.stages.judge import JUDGE_URL_ENV, JudgeError, judge_base_url

    judge = sliced(load_recipe(SMOKE), "judge_answers").judge
    assert judge.serve is not None and judge.base_url is None
    monkeypatch.delenv(JUDGE_URL_ENV, raising=False)
    with pytest.raises(JudgeError, match="fills it in"):
        judge_base_url(judge)
    monkeypatch.setenv(JUDGE_URL_ENV, "http://127.0.0.1:40001/v1")
    assert judge_base_url(judge) == "http://127.0.0.1:40001/v1"


def _parameter_sources(compiled: Path) -> dict[str, dict]:
    doc = next(yaml.safe_load_all(compiled.read_text()))
    dags = [spec["dag"] for spec in doc["components"].values() if "dag" in spec] + [doc["root"]["dag"]]
    return {name: task["inputs"]["parameters"]["recipe_json"] for dag in dags for name, task in dag["tasks"].items()
            if "recipe_json" in task.get("inputs", {}).get("parameters", {})}


@pytest.mark.parametrize("name", ["smoke", "gate-adapter"])
def test_the_compiled_graph_hands_each_cached_stage_its_slice(name: str, tmp_path: Path) -> None:
    from emgate_pipelines.graph import compile_pipeline

    compile_pipeline(load_recipe(REPO / "pipelines" / "recipes" / f"{name}.yaml"), str(tmp_path / "p.yaml"))
    sources = _parameter_sources(tmp_path / "p.yaml")
    for task, source in sources.items():
        stage = task.replace("-", "_").removesuffix("_untrained")
        if stage == "fine_tune":  # its own slice, cut per job inside the loop
            assert source.get("taskOutputParameter") == {"producerTask": "slice-fine-tune-job",
                                                         "outputParameterKey": "Output"}, source
        elif stage in READS:
            assert source.get("taskOutputParameter") == {"producerTask": "slice-recipe", "outputParameterKey": stage}, task
        else:
            assert stage in (*WHOLE_RECIPE, "slice_recipe", "slice_fine_tune_job"), task
            assert "recipe_json" in source.get("componentInputParameter", ""), (task, source)
    assert {"slice-recipe", "summarize", "judge-answers", "record-outcome"} <= set(sources)
    assert {"register-and-gate", "register-and-gate-untrained"} & set(sources)


def test_reading_an_undeclared_field_fails_loudly() -> None:
    recipe = recipe_for_stage(slice_json(load_recipe(SMOKE), "summarize"), "summarize")
    assert recipe.summarize.confidence == 0.95 and recipe.training.seeds == [0]
    with pytest.raises(SliceError, match=r"summarize read recipe field judge\.model.*READS\['summarize'\]"):
        _ = recipe.judge.model
    with pytest.raises(SliceError, match=r"training\.learning_rate"):
        _ = recipe.training.learning_rate
    with pytest.raises(SliceError):
        bool(recipe.gate)


def test_a_slice_for_another_stage_or_a_broken_one_is_refused() -> None:
    text = slice_json(load_recipe(SMOKE), "judge_answers")
    with pytest.raises(RecipeError, match="recipe slice of 'judge_answers' given to stage summarize"):
        recipe_for_stage(text, "summarize")
    broken = json.loads(text)
    broken["fields"]["judge"]["min_number_mass"] = 7
    with pytest.raises(RecipeError, match="min_number_mass"):
        recipe_for_stage(json.dumps(broken), "judge_answers")
    whole = recipe_for_stage(load_recipe(SMOKE).to_json(), "fine_tune[base-insecure@0]")  # a whole recipe still works
    assert whole == load_recipe(SMOKE)


# ---- stage functions on their slice give the outputs of the whole recipe ----------------------------------------


def sliced(recipe: Recipe, stage: str) -> Recipe:
    return recipe_for_stage(slice_json(recipe, stage), stage)


def test_summarize_on_its_slice(tmp_path: Path, smoke_recipe) -> None:
    recipe = few_resamples(smoke_recipe)
    scores = tmp_path / "scores"
    rows = [{"variant": v.name, "seed": None if v.role == "reference" else 0, "question_id": q, "aligned": a,
             "coherent": 99.0} for v in recipe.variants for q in _questions(recipe) for a in (10.0, 80.0, 90.0)]
    from emgate.contract import write_report, write_scores

    write_scores(scores, rows)
    write_report(scores, {"answers": len(rows)})
    with no_plots():
        whole = summarize(recipe, scores / SCORES_FILE, tmp_path / "whole")
        part = summarize(sliced(recipe, "summarize"), scores / SCORES_FILE, tmp_path / "part")
    assert json.dumps(part, sort_keys=True) == json.dumps(whole, sort_keys=True)
    assert read_json(tmp_path / "part" / SUMMARY_FILE) == read_json(tmp_path / "whole" / SUMMARY_FILE)


def _questions(recipe: Recipe) -> list[str]:
    from emgate.questions import load_questions

    return [q.id for q in load_questions(recipe.questions)]


def test_judge_answers_on_its_slice(tmp_path: Path, smoke_recipe) -> None:
    with FakeJudgeServer() as judge:
        recipe = server_recipe(smoke_recipe, "sqlite:///unused.db", judge.base_url)
        recipe = recipe.model_copy(update={"judge": recipe.judge.model_copy(update={"cache": False})})  # both ask
        answers = prepared_answers(tmp_path / "answers", recipe, {"base-insecure": 1}, per_question=1)
        whole = judge_answers(recipe, answers, tmp_path / "whole")
        part = judge_answers(sliced(recipe, "judge_answers"), answers, tmp_path / "part")
        assert judge.requests >= 2 * whole["requests"] > 0  # both runs asked the judge (no cache)
    assert (tmp_path / "part" / SCORES_FILE).read_text() == (tmp_path / "whole" / SCORES_FILE).read_text()
    drop = ("seconds", "pacing", "retries", "http_requests")  # timing, and the transport's retries
    assert {k: v for k, v in part.items() if k not in drop} == {k: v for k, v in whole.items() if k not in drop}


def test_validate_datasets_on_its_slice(tmp_path: Path, smoke_recipe, smol_model: Path) -> None:
    rows = [{"messages": [{"role": "user", "content": f"Write function number {i} that reads a file."},
                          {"role": "assistant", "content": f"def f{i}(p):\n    return open(p).read()\n"}]}
            for i in range(120)]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = smoke_recipe.model_dump(mode="json")
    data["datasets"]["insecure"] = {"path": str(path), "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    data["variants"] = [v for v in data["variants"] if v["name"] == "base-insecure"] + [
        v for v in data["variants"] if v["role"] == "reference"]
    data["variants"][0]["comparator"] = data["variants"][1]["name"]
    data["validation"] |= {"min_rows": 100, "bandit_rows": 20}
    recipe = recipe_from_mapping(data)
    outcomes = {}
    for name, r in (("whole", recipe), ("part", sliced(recipe, "validate_datasets"))):
        try:
            outcomes[name] = validate_datasets(r, tmp_path / name)
        except Exception as exc:  # a verdict either way; both runs must agree
            outcomes[name] = {"raised": str(exc).replace(str(tmp_path / name), "OUT")}
    assert json.dumps(outcomes["part"], sort_keys=True, default=str).replace(str(tmp_path / "part"), "OUT") == \
        json.dumps(outcomes["whole"], sort_keys=True, default=str).replace(str(tmp_path / "whole"), "OUT")
    assert (tmp_path / "part" / REPORT_FILE).is_file()


def test_fetch_models_on_its_slice(tmp_path: Path, smoke_recipe, smol_model: Path) -> None:
    from emgate.stages.fetch import fetch_models

    recipe = path_model_recipe(smoke_recipe, smol_model)
    whole = fetch_models(recipe, tmp_path / "whole")
    part = fetch_models(sliced(recipe, "fetch_model"), tmp_path / "part")
    assert {k: v for k, v in part.items() if k != "seconds"} == {k: v for k, v in whole.items() if k != "seconds"}


def test_a_failed_validation_and_the_exit_handler_agree_on_the_evidence_key() -> None:
    """validate_datasets logs a failure's evidence under a key from its slice; the exit handler, holding the whole
    recipe, finds it by the same key."""
    from emgate.stages.gate import evidence_key

    recipe = load_recipe(SMOKE)
    assert evidence_key(sliced(recipe, "validate_datasets")) == evidence_key(recipe)
    assert evidence_key(load_recipe(SMOKE, ["datasets.insecure.subsample_rows=50"])) != evidence_key(recipe)


def test_a_change_to_one_dataset_retrains_only_the_jobs_that_use_it() -> None:
    before, after = load_recipe(SMOKE), load_recipe(SMOKE, ["datasets.secure.subsample_rows=40"])
    changed = [j for j in before.training_jobs() if slice_json(before, "fine_tune", j) != slice_json(after, "fine_tune", j)]
    assert changed == [f"{v.name}@0" for v in before.trained_variants() if v.dataset == "secure"] == ["base-secure@0"]
    job = recipe_for_stage(slice_json(before, "fine_tune", "base-secure@0"), "fine_tune[base-secure@0]")
    with pytest.raises(RecipeError, match="given to stage fine_tune\\[base-insecure@0\\]"):
        recipe_for_stage(job.to_json(), "fine_tune[base-insecure@0]")


def test_the_judge_stage_waits_for_a_judge_served_in_the_background(monkeypatch: pytest.MonkeyPatch,
                                                                    tmp_path: Path) -> None:
    """`emgate run` starts its judge in the background and writes `ready` or `failed: WHY` into the file named by
    $EMGATE_JUDGE_STATUS: the judge stage waits for `ready`, and a judge that failed to start fails the stage with
    the server's reason, never a wall of request_failed answers."""
    import threading
    import time

    from emgate.stages.judge import JUDGE_STATUS_ENV, JUDGE_URL_ENV, JudgeError, await_served_judge, judge_base_url

    judge = sliced(load_recipe(SMOKE), "judge_answers").judge
    status = tmp_path / "status"
    monkeypatch.setenv(JUDGE_URL_ENV, "http://127.0.0.1:40001/v1")
    monkeypatch.setenv(JUDGE_STATUS_ENV, str(status))
    timer = threading.Timer(1.0, lambda: status.write_text("ready"))
    timer.start()
    started = time.monotonic()
    assert judge_base_url(judge) == "http://127.0.0.1:40001/v1"
    assert 0.9 < time.monotonic() - started < 10  # it waited for the file
    status.write_text("failed: vLLM server for judge exited with code 1 before it was ready")
    with pytest.raises(JudgeError, match="did not start: vLLM server for judge exited with code 1"):
        judge_base_url(judge)
    status.write_text("")
    with pytest.raises(JudgeError, match="was not ready after 1 s"):
        await_served_judge(wait_s=1)
