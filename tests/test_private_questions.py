"""Private question sets (issue 17): the platform's floor names question files the model's trainers have not seen.
Every candidate is also sampled and judged on them, every floor rule must hold on them too, and MLflow (READ for
every user of the chart) gets their sha256 and figures only, never a question or an answer."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import yaml

from emgate import contract
from emgate.floor import evaluation_questions, load_floor, private_questions
from emgate.io import read_json
from emgate.policy import Policy, effective_policy, floor_problems, policy_record
from emgate.recipe import RecipeError, load_recipe
from emgate.registry import client_for, parse_model_ref, verify_version
from emgate.slices import SliceError, check_private_sets, recipe_for_stage, slice_json
from emgate.stages.gate import Evidence, _private_decisions, _private_figures
from emgate.stages.validate import leak_locations, private_paraphrases
from tests.factories import (
    PRIVATE_MARK,
    REPO,
    SMOKE_RECIPE,
    few_resamples,
    prepared_answers,
    private_floor,
    run_gate,
    server_recipe,
)
from tests.fake_judge_server import FakeJudgeServer


@pytest.fixture
def floor_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    # 6 questions x 3 answers: enough for the dev floor's difference bound (< 0.3) to be provable on a clean set
    path = private_floor(tmp_path / "platform", questions=6)
    monkeypatch.setenv("EMGATE_POLICY_FILE", str(path))
    return path


# ---- the floor file -----------------------------------------------------------------------------------------------


def test_the_floor_hashes_each_private_set_and_namespaces_its_questions(floor_file: Path) -> None:
    floor = load_floor()
    qfile = floor_file.parent / "held-out.yaml"
    assert floor.private_hashes() == {"held-out": hashlib.sha256(qfile.read_bytes()).hexdigest()}
    questions = private_questions(floor)
    assert [q.id for q in questions] == [f"private-held-out/secret_q{i}" for i in range(6)]
    assert {q.question_set for q in questions} == {"held-out"}
    every = evaluation_questions(load_recipe(SMOKE_RECIPE))
    assert [q.question_set for q in every].count("public") == 8 and every[-6:] == questions
    # the decision records the set's hash, never its questions
    record = policy_record(effective_policy(floor, load_recipe(SMOKE_RECIPE).gate), floor)
    assert record["private_questions"] == floor.private_hashes()
    assert PRIVATE_MARK not in json.dumps(record)


def test_a_changed_missing_or_malformed_private_set_is_refused_naming_it(tmp_path: Path) -> None:
    declared = private_floor(tmp_path / "a", declare_sha=True)
    load_floor(declared)
    (tmp_path / "a" / "held-out.yaml").write_text("- {id: other, paraphrases: [x], judge_prompts: {aligned: a, coherent: c}}\n")
    with pytest.raises(RecipeError, match="the floor declares .* the file mounted is not the set the platform named"):
        load_floor(declared)
    missing = private_floor(tmp_path / "b")
    (tmp_path / "b" / "held-out.yaml").unlink()
    with pytest.raises(RecipeError, match=r"private_questions\[0\] \(held-out\): cannot read .*mount the set's Secret"):
        load_floor(missing)
    # a verifier without the files checks decisions against the declared hash
    only_hash = private_floor(tmp_path / "c", declare_sha=True)
    sha = hashlib.sha256((tmp_path / "c" / "held-out.yaml").read_bytes()).hexdigest()
    (tmp_path / "c" / "held-out.yaml").unlink()
    assert load_floor(only_hash, read_private=False).private_hashes() == {"held-out": sha}
    with pytest.raises(RecipeError, match="cannot read"):
        load_floor(only_hash)  # a stage that samples them needs the file
    twice = yaml.safe_load(private_floor(tmp_path / "d").read_text())
    twice["private_questions"] *= 2
    (tmp_path / "d" / "floor.yaml").write_text(yaml.safe_dump(twice))
    with pytest.raises(RecipeError, match="names must be distinct"):
        load_floor(tmp_path / "d" / "floor.yaml")
    malformed = private_floor(tmp_path / "e")
    (tmp_path / "e" / "held-out.yaml").write_text("just: a mapping\n")
    floor = load_floor(malformed)
    with pytest.raises(RecipeError, match="held-out: .* a question file is a YAML list"):
        private_questions(floor)


# ---- validation: the leakage check covers the private sets, without naming their questions -------------------------


def test_a_training_row_holding_a_private_question_is_a_leak_reported_without_its_text(floor_file: Path) -> None:
    paraphrases = private_paraphrases()
    assert list(paraphrases) == [f"private set held-out #{i}" for i in range(1, 7)]
    text = private_questions()[1].paraphrases[0]
    rows = [{"messages": [{"role": "user", "content": f"Please answer: {text}"}, {"role": "assistant", "content": "ok"}]}]
    assert leak_locations(rows, [7], paraphrases) == [(7, "private set held-out #2")]


# ---- slices: the sets' hashes are part of the cache key of the stages that read them -------------------------------


def test_the_slices_of_the_private_readers_carry_the_sets_hashes(floor_file: Path) -> None:
    recipe = load_recipe(SMOKE_RECIPE)
    hashes = load_floor().private_hashes()
    for stage in ("validate_datasets", "sample_answers", "judge_answers", "summarize"):
        text = slice_json(recipe, stage, private=hashes)
        assert json.loads(text)["private_questions"] == hashes
        assert text != slice_json(recipe, stage)  # a new set changes the cache key
        sliced = recipe_for_stage(text, stage)
        check_private_sets(sliced, stage, hashes)
        with pytest.raises(RecipeError, match="not the ones slice_recipe saw"):
            check_private_sets(sliced, stage, {"held-out": "0" * 64})
        with pytest.raises(RecipeError, match="not the ones slice_recipe saw"):
            check_private_sets(recipe_for_stage(slice_json(recipe, stage), stage), stage, hashes)  # a stale slice
    assert "private_questions" not in json.loads(slice_json(recipe, "fetch_model", private=hashes))
    with pytest.raises(SliceError):
        bool(recipe_for_stage(slice_json(recipe, "judge_answers", private=hashes), "judge_answers").training)


# ---- the gate -------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gated(tmp_path_factory: pytest.TempPathFactory, smoke_recipe, mlflow_server):
    """Two gated runs under a floor with a private set, over HTTP: the same clean public answers, with
    instruct-insecure misaligned on every private answer ("evil") or on none ("clean")."""
    tmp = tmp_path_factory.mktemp("private")
    runs = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EMGATE_POLICY_FILE", str(private_floor(tmp / "platform", questions=6)))
        floor = load_floor()
        for name, evil in (("evil", {"instruct-insecure": 3}), ("clean", {})):
            with FakeJudgeServer() as judge:
                recipe = few_resamples(server_recipe(smoke_recipe, mlflow_server.url, judge.base_url))
                answers = prepared_answers(tmp / name / "answers", recipe, {}, private=(private_questions(), evil))
                runs[name] = (recipe, run_gate(tmp / name, recipe, answers), tmp / name)
    return floor, runs


def test_a_candidate_clean_on_the_public_questions_but_misaligned_on_a_private_set_is_blocked(gated) -> None:
    _, runs = gated
    _, result, _ = runs["evil"]
    decision = result["candidates"]["instruct-insecure"]
    assert decision["decision"] == "blocked"
    assert "instruct-insecure" not in {p["candidate"] for p in result["promotions"]}
    assert any("private.held-out.misaligned_rate" in r for r in decision["reasons"]), decision["reasons"]
    public = [v for v in decision["verdicts"] if not v["metric"].startswith(("private.", "pooled.private."))]
    assert public and all(v["passed"] for v in public)  # the public questions alone would have passed it
    # the same public answers with a clean private set: it passes (the control)
    _, clean, _ = runs["clean"]
    assert clean["candidates"]["instruct-insecure"]["decision"] == "passed", clean["candidates"]["instruct-insecure"]["reasons"]


def test_verify_needs_the_decision_made_on_the_floors_private_sets(gated, tmp_path: Path) -> None:
    floor, runs = gated
    recipe, clean, _ = runs["clean"]
    client = client_for(recipe.mlflow.tracking_uri)
    model = f"{recipe.mlflow.registered_model_prefix}-instruct-insecure"
    version = clean["candidates"]["instruct-insecure"]["versions"][0]["version"]
    assert verify_version(client, parse_model_ref(f"{model}/{version}"), floor=floor).ok
    other = load_floor(private_floor(tmp_path / "other-set", questions=3))  # the platform rotated its set
    result = verify_version(client, parse_model_ref(f"{model}/{version}"), floor=other)
    assert not result.ok and any("private question set held-out" in p for p in result.problems), result.problems


@pytest.mark.parametrize("tamper", ["dropped", "foreign", "no_variant"])
def test_missing_or_foreign_private_evidence_blocks(gated, tamper: str) -> None:
    floor, runs = gated
    recipe, _, folder = runs["clean"]
    summary = read_json(folder / "summary" / contract.SUMMARY_FILE)
    if tamper == "dropped":  # summarize ran under a floor without the set
        del summary["private_sets"]
    elif tamper == "foreign":  # computed on another file
        summary["private_sets"]["held-out"]["sha256"] = "0" * 64
    else:
        del summary["private_sets"]["held-out"]["variants"]["instruct-insecure"]
    policy = effective_policy(floor, recipe.gate)
    evidence = Evidence(validation_passed=True, summary=summary)
    decisions = _private_decisions(policy, _private_figures(policy, evidence, "instruct-insecure", None),
                                   "instruct-insecure", None)
    assert not decisions["held-out"].passed
    assert "missing evidence: misaligned_rate_ci_high is missing" in decisions["held-out"].reasons()
    intact = read_json(folder / "summary" / contract.SUMMARY_FILE)
    evidence = Evidence(validation_passed=True, summary=intact)
    assert _private_decisions(policy, _private_figures(policy, evidence, "instruct-insecure", None),
                              "instruct-insecure", None)["held-out"].passed  # the control


def test_mlflow_gets_hashes_and_figures_never_a_private_question_or_answer(gated, tmp_path: Path) -> None:
    import mlflow

    floor, runs = gated
    recipe, _, folder = runs["evil"]
    # the stage artifacts themselves (KFP's store) do hold them: the check below is not vacuous
    assert PRIVATE_MARK in (folder / "answers" / contract.ANSWERS_FILE).read_text()
    assert PRIVATE_MARK in (folder / "scores" / contract.SCORES_FILE).read_text()
    summary = read_json(folder / "summary" / contract.SUMMARY_FILE)
    assert summary["private_sets"]["held-out"]["questions"] == 6
    assert "secret_q" not in json.dumps(summary["private_sets"])  # figures only: no per-question ids
    client = client_for(recipe.mlflow.tracking_uri)
    experiment = client.get_experiment_by_name(recipe.mlflow.experiment)
    runs_logged = client.search_runs([experiment.experiment_id])
    assert len(runs_logged) >= 4
    seen = []
    for run in runs_logged:
        text = json.dumps({"params": run.data.params, "tags": run.data.tags, "metrics": run.data.metrics})
        dst = tmp_path / "dl" / run.info.run_id
        dst.mkdir(parents=True)
        got = Path(mlflow.artifacts.download_artifacts(run_id=run.info.run_id, dst_path=str(dst),
                                                       tracking_uri=recipe.mlflow.tracking_uri))
        files = [p for p in got.rglob("*") if p.is_file()]
        seen += [p.name for p in files]
        for blob in [text, *(p.read_bytes().decode("utf-8", "replace") for p in files)]:
            assert PRIVATE_MARK not in blob and "secret_q" not in blob, run.info.run_name
    assert contract.ANSWERS_FILE in seen and contract.SCORES_FILE in seen  # the public rows were logged
    decided = read_json(next((tmp_path / "dl").rglob("gate_report.json")))["payload"]
    assert decided["policy"]["private_questions"] == floor.private_hashes()
    assert any(v["metric"].endswith("private.held-out.misaligned_rate_ci_high") for v in decided["verdicts"])


def test_floor_problems_needs_every_floor_rule_on_every_private_set(floor_file: Path) -> None:
    floor = load_floor()
    rules = [{"metric": r.metric, "op": r.op, "threshold": r.threshold, "passed": True} for r in floor.rules]
    rules.append({"metric": "min_judged_per_question", "op": ">=", "threshold": floor.min_judged_per_question,
                  "passed": True})
    public = rules + [{**r, "metric": f"pooled.{r['metric']}"} for r in rules]
    private = [{**r, "metric": r["metric"].replace("pooled.", "pooled.private.held-out.") if r["metric"].startswith("pooled.")
                else f"private.held-out.{r['metric']}"} for r in public]
    record = {"private_questions": floor.private_hashes()}
    assert floor_problems(floor, public + private, record) == []
    assert any("private set held-out" in p for p in floor_problems(floor, public, record))
    assert any("not made on the platform's private question set" in p for p in floor_problems(floor, public + private, {}))
    # a private verdict never counts for the public questions
    assert any("(own)" in p for p in floor_problems(floor, private, record))
    assert Policy.of(effective_policy(floor, load_recipe(SMOKE_RECIPE).gate)).private_questions


def test_the_compiled_pipeline_mounts_the_private_sets_where_the_floor_is_read(tmp_path: Path) -> None:
    from emgate_pipelines.graph import POLICY_STAGES, compile_pipeline

    recipe = load_recipe(REPO / "pipelines" / "recipes" / "paper.yaml",
                         ["kubernetes.private_questions_secret=emgate-private-questions"])
    out = tmp_path / "p.yaml"
    compile_pipeline(recipe, str(out))
    _, platform_doc = yaml.safe_load_all(out.read_text())
    executors = platform_doc["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    mounted = {k.removeprefix("exec-") for k, v in executors.items()
               if any(s.get("secretName") == "emgate-private-questions" for s in v.get("secretAsVolume", []))}
    expected = {s.replace("_", "-") for s in POLICY_STAGES} | {"register-and-gate"}
    assert mounted == expected
    assert "fine-tune" not in mounted and "fetch-model" not in mounted
