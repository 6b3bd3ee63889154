"""The thin KFP components: each maps its artifacts to paths and calls the stage's plain function.

No `from __future__ import annotations` here: KFP reads the real annotation objects.
The functions are wrapped with `dsl.component` by `make_components`, so each stage gets the image that the
recipe (or emgate.images) names. Bodies import inside, as KFP lightweight components must.
"""

from dataclasses import dataclass
from typing import Any, NamedTuple  # noqa: UP035  (KFP reads List[...] annotations)

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Model, Output

from emgate.images import image_for


def slice_recipe(recipe_json: str, recipe: Output[Artifact]) -> NamedTuple(  # type: ignore[valid-type]  # KFP's form
        "Slices", fetch_model=str, validate_datasets=str, sample_answers=str, judge_answers=str, summarize=str):
    """Checks the whole recipe, writes it (recipe.json) and gives each cached stage its slice (emgate.slices);
    fine-tuning jobs get theirs from slice_fine_tune_job."""
    from collections import namedtuple
    from pathlib import Path

    from emgate.contract import RECIPE_FILE
    from emgate.io import write_json
    from emgate.kfp.runtime import stage
    from emgate.slices import SLICED_ONCE, slice_json

    with stage("slice_recipe", recipe_json) as whole:
        from emgate.floor import load_floor
        from emgate.policy import recipe_policy

        floor = load_floor()
        recipe_policy(floor, whole)  # a run's own weaker gate (or unpinned base model) stops here, before any GPU time
        write_json(Path(recipe.path) / RECIPE_FILE, whole.model_dump(mode="json"))
        private = floor.private_hashes()  # a new private question set re-runs the stages that read it
        slices = namedtuple("Slices", list(SLICED_ONCE))(*(slice_json(whole, name, private=private)
                                                            for name in SLICED_ONCE))
    return slices


def slice_fine_tune_job(recipe_json: str, job: str) -> str:
    """One fine-tuning job's slice (VARIANT@SEED): its variant, model and dataset, and `training`."""
    from emgate.kfp.runtime import stage
    from emgate.slices import slice_json

    with stage(f"slice_recipe[{job}]", recipe_json) as whole:
        return slice_json(whole, "fine_tune", job)


def fetch_model(recipe_json: str, models: Output[Artifact]) -> None:
    from pathlib import Path

    from emgate.kfp.runtime import stage
    from emgate.stages.fetch import fetch_models

    with stage("fetch_model", recipe_json) as recipe:
        fetch_models(recipe, Path(models.path))


def validate_datasets(recipe_json: str, validated: Output[Dataset]) -> None:
    from pathlib import Path

    from emgate.kfp.runtime import stage
    from emgate.stages.gate import log_failure_evidence
    from emgate.stages.validate import ValidationFailed
    from emgate.stages.validate import validate_datasets as run

    with stage("validate_datasets", recipe_json) as recipe:
        try:
            run(recipe, Path(validated.path))
        except ValidationFailed as exc:
            try:  # the evidence goes to MLflow; the exit handler attaches it to the pipeline's failed run
                log_failure_evidence(recipe, "validate_datasets", Path(validated.path), str(exc))
            except Exception as log_error:
                print(f"emgate: could not log the validation evidence to MLflow: {log_error}")
            raise


def fine_tune(recipe_json: str, job: str, validated: Input[Dataset], adapter: Output[Model]) -> None:
    from pathlib import Path

    from emgate.kfp.runtime import stage
    from emgate.stages.finetune import run_fine_tune as run

    with stage(f"fine_tune[{job}]", recipe_json) as recipe:
        report = run(recipe, job, Path(validated.path), Path(adapter.path))
        adapter.metadata.update({k: report[k] for k in ("variant", "seed", "base_model", "base_model_revision",
                                                           "dataset_sha256", "method", "merged", "steps", "loss_last",
                                                           "eval_loss")})


def sample_answers(recipe_json: str, adapters: Input[list[Model]], answers: Output[Dataset]) -> None:
    from pathlib import Path

    from emgate.kfp.runtime import stage
    from emgate.stages.sample import sample_answers as run

    with stage("sample_answers", recipe_json) as recipe:
        run(recipe, [Path(a.path) for a in adapters], Path(answers.path))


def sample_answers_untrained(recipe_json: str, answers: Output[Dataset]) -> None:
    """sample_answers for a recipe that trains nothing (only adapters trained elsewhere and references)."""
    from pathlib import Path

    from emgate.kfp.runtime import stage
    from emgate.stages.sample import sample_answers as run

    with stage("sample_answers", recipe_json) as recipe:
        run(recipe, [], Path(answers.path))


def judge_answers(recipe_json: str, answers: Input[Dataset], scores: Output[Dataset]) -> None:
    from pathlib import Path

    from emgate.kfp.runtime import stage
    from emgate.stages.judge import judge_answers as run

    with stage("judge_answers", recipe_json) as recipe:
        run(recipe, Path(answers.path), Path(scores.path))


def summarize(recipe_json: str, scores: Input[Dataset], summary: Output[Artifact]) -> None:
    from pathlib import Path

    from emgate.contract import SCORES_FILE
    from emgate.kfp.runtime import stage
    from emgate.stages.summarize import summarize as run

    with stage("summarize", recipe_json) as recipe:
        run(recipe, Path(scores.path) / SCORES_FILE, Path(summary.path))


def register_and_gate(recipe_json: str, kfp_run: str, validated: Input[Dataset], adapters: Input[list[Model]],
                      answers: Input[Dataset], scores: Input[Dataset], summary: Input[Artifact],
                      decisions: Output[Artifact]) -> str:
    """Returns "true" when a candidate passed: the promotion step runs under dsl.If on this string."""
    from pathlib import Path

    from emgate.kfp.runtime import stage
    from emgate.stages.gate import register_and_gate as run

    with stage("register_and_gate", recipe_json) as recipe:
        result = run(recipe, run_key=kfp_run, validation_dir=Path(validated.path),
                     adapter_dirs=[Path(a.path) for a in adapters], answers_dir=Path(answers.path),
                     scores_dir=Path(scores.path), summary_dir=Path(summary.path), out_dir=Path(decisions.path),
                     kfp_run=kfp_run)
        decisions.metadata["decisions"] = {k: v["decision"] for k, v in result["candidates"].items()}
    return "true" if result["promotable"] else "false"


def register_and_gate_untrained(recipe_json: str, kfp_run: str, validated: Input[Dataset], answers: Input[Dataset],
                                scores: Input[Dataset], summary: Input[Artifact], decisions: Output[Artifact]) -> str:
    """register_and_gate for a recipe that trains nothing."""
    from pathlib import Path

    from emgate.kfp.runtime import stage
    from emgate.stages.gate import register_and_gate as run

    with stage("register_and_gate", recipe_json) as recipe:
        result = run(recipe, run_key=kfp_run, validation_dir=Path(validated.path), adapter_dirs=[],
                     answers_dir=Path(answers.path), scores_dir=Path(scores.path), summary_dir=Path(summary.path),
                     out_dir=Path(decisions.path), kfp_run=kfp_run)
        decisions.metadata["decisions"] = {k: v["decision"] for k, v in result["candidates"].items()}
    return "true" if result["promotable"] else "false"


def promote_passed(recipe_json: str, kfp_run: str, decisions: Input[Artifact], promotions: Output[Artifact]) -> None:
    from pathlib import Path

    from emgate.contract import read_decisions
    from emgate.io import write_json
    from emgate.kfp.runtime import stage
    from emgate.stages.gate import promote_passed

    with stage("promote_passed", recipe_json) as recipe:
        done = promote_passed(recipe, read_decisions(Path(decisions.path)), by=f"emgate pipeline {kfp_run}")
        write_json(Path(promotions.path) / "promotions.json", done)


def record_outcome(recipe_json: str, kfp_run: str, status: dsl.PipelineTaskFinalStatus) -> None:
    from emgate.kfp.runtime import stage
    from emgate.stages.gate import record_pipeline_outcome

    with stage("record_outcome", recipe_json) as recipe:
        record_pipeline_outcome(recipe, kfp_run, status.state, status.error_message or "")


@dataclass(frozen=True)
class Components:
    slice_recipe: Any
    slice_fine_tune_job: Any
    fetch_model: Any
    validate_datasets: Any
    fine_tune: Any
    sample_answers: Any
    sample_answers_untrained: Any
    judge_answers: Any
    summarize: Any
    register_and_gate: Any
    register_and_gate_untrained: Any
    promote_passed: Any
    record_outcome: Any


def make_components(image_overrides: dict[str, str] | None = None) -> Components:
    def wrap(func: Any, stage: str) -> Any:
        return dsl.component(func, base_image=image_for(stage, image_overrides), install_kfp_package=False)

    return Components(
        slice_recipe=wrap(slice_recipe, "gate"),
        slice_fine_tune_job=wrap(slice_fine_tune_job, "gate"),
        fetch_model=wrap(fetch_model, "fetch"),
        validate_datasets=wrap(validate_datasets, "validate"),
        fine_tune=wrap(fine_tune, "train"),
        sample_answers=wrap(sample_answers, "sample"),
        sample_answers_untrained=wrap(sample_answers_untrained, "sample"),
        judge_answers=wrap(judge_answers, "judge"),
        summarize=wrap(summarize, "summarize"),
        register_and_gate=wrap(register_and_gate, "gate"),
        register_and_gate_untrained=wrap(register_and_gate_untrained, "gate"),
        promote_passed=wrap(promote_passed, "gate"),
        record_outcome=wrap(record_outcome, "gate"),
    )
