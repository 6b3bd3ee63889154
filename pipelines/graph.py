"""The emgate pipeline graph, built from a recipe.

validate_datasets -> fine_tune (one task per variant and seed) -> sample_answers -> judge_answers
-> summarize -> register_and_gate -> promote_passed (under dsl.If: only when a candidate passed).
The recipe travels as one JSON pipeline parameter whose default is the
recipe the pipeline was compiled from, so a compiled YAML is self-contained and a run can override it.
"""

# No `from __future__ import annotations`: KFP reads the real annotation objects.

from typing import Any

from kfp import dsl

from emgate.kfp.components import make_components
from emgate.recipe import Recipe


def build_pipeline(recipe: Recipe) -> Any:
    comps = make_components(recipe.images or None)
    jobs = recipe.training_jobs()
    gpu = recipe.profile != "smoke"

    def _stages(recipe_json: Any) -> None:
        validated = comps.validate_datasets(recipe_json=recipe_json)
        validated.set_display_name("validate datasets")
        if jobs:
            with dsl.ParallelFor(items=jobs, parallelism=1 if not gpu else 0) as job:
                trained = comps.fine_tune(recipe_json=recipe_json, job=job, validated=validated.outputs["validated"])
                trained.set_display_name("fine-tune")
                if gpu:
                    trained.set_accelerator_type("nvidia.com/gpu").set_accelerator_limit(1)
            adapters = dsl.Collected(trained.outputs["adapter"])
            sampled = comps.sample_answers(recipe_json=recipe_json, adapters=adapters)
        else:  # only adapters trained elsewhere (and references): nothing to fine-tune
            sampled = comps.sample_answers_untrained(recipe_json=recipe_json)
            sampled.after(validated)
        sampled.set_display_name("sample answers (vLLM)")
        if recipe.external_variants():
            # An adapter URI (models:/NAME@ALIAS, a folder) can point at new weights under the same recipe:
            # never reuse old answers for it.
            sampled.set_caching_options(False)
        if gpu:
            sampled.set_accelerator_type("nvidia.com/gpu").set_accelerator_limit(recipe.serving.tensor_parallel_size)
        judged = comps.judge_answers(recipe_json=recipe_json, answers=sampled.outputs["answers"])
        judged.set_display_name("judge answers")
        summary = comps.summarize(recipe_json=recipe_json, scores=judged.outputs["scores"])
        summary.set_display_name("summarize")
        evidence = {"recipe_json": recipe_json, "kfp_run": dsl.PIPELINE_JOB_ID_PLACEHOLDER,
                    "validated": validated.outputs["validated"], "answers": sampled.outputs["answers"],
                    "scores": judged.outputs["scores"], "summary": summary.outputs["summary"]}
        if jobs:
            gate = comps.register_and_gate(adapters=dsl.Collected(trained.outputs["adapter"]), **evidence)
        else:
            gate = comps.register_and_gate_untrained(**evidence)
        gate.set_display_name("register and gate (MLflow)")
        gate.set_caching_options(False)  # every run decides anew and logs to its own MLflow parent run
        # A string condition: the local runner skips float comparisons silently (ENVIRONMENT.md).
        with dsl.If(gate.outputs["Output"] == "true", name="a-candidate-passed"):
            promoted = comps.promote_passed(recipe_json=recipe_json, kfp_run=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
                                            decisions=gate.outputs["decisions"])
            promoted.set_display_name("promote passed versions (champion alias)")
            promoted.set_caching_options(False)


    @dsl.pipeline(name=f"emgate-{recipe.name}",
                  description=f"emgate misalignment gate, recipe {recipe.name} ({recipe.profile})")
    def emgate_pipeline(recipe_json: str = recipe.to_json()) -> None:
        # Runs after everything else, even on failure: a failed run becomes a FAILED MLflow run with the reason.
        outcome = comps.record_outcome(recipe_json=recipe_json, kfp_run=dsl.PIPELINE_JOB_ID_PLACEHOLDER)
        outcome.set_display_name("record outcome (MLflow)")
        outcome.set_caching_options(False)
        with dsl.ExitHandler(outcome, name="emgate"):
            _stages(recipe_json)  # KFP returns no outputs from inside an exit handler: read decisions.json

    return emgate_pipeline


def compile_pipeline(recipe: Recipe, path: str) -> None:
    from kfp import compiler

    compiler.Compiler().compile(build_pipeline(recipe), package_path=path)
