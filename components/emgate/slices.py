"""Recipe slices: each cached stage receives only the recipe fields it reads, so its KFP cache key changes only
when one of them does (a new judge re-scores old answers without sampling them again).

`READS` declares, per stage, the top-level sections (`judge`) or single fields (`training.seeds`) it reads. The
pipeline's first task, `slice_recipe`, checks the whole recipe and hands each stage its slice as JSON; the stage
rebuilds a Recipe in which everything else is absent: reading an undeclared field raises SliceError, so a stage
that starts reading something new fails its tests until READS says so. The gate, promotion and the exit handler
are never cached and get the whole recipe.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, PrivateAttr, TypeAdapter, ValidationError

from emgate.recipe import Recipe, RecipeError, format_validation_error, recipe_from_json

READS: dict[str, tuple[str, ...]] = {
    "fetch_model": ("models",),
    # validation checks truncation against training.max_seq_length, and logs a failure's evidence to MLflow
    "validate_datasets": ("models", "datasets", "variants", "questions", "validation", "training.max_seq_length",
                          "mlflow"),
    "fine_tune": ("models", "datasets", "variants", "training"),
    "sample_answers": ("models", "variants", "questions", "sampling", "serving", "training.seeds", "training.lora_r",
                       "mlflow.tracking_uri"),
    "judge_answers": ("judge", "questions"),
    "summarize": ("name", "variants", "questions", "summarize", "training.seeds", "judge.name", "judge.panel"),
}
# One slice per fine-tuning job (VARIANT@SEED): the job's variant, its model and dataset, and `training`, so a change
# to one variant retrains only that variant. Cut inside the pipeline's ParallelFor, by its own task (kfp.local hands
# a loop body the loop item in place of an outer task's output).
PER_JOB = ("fine_tune",)
SLICED_ONCE = tuple(stage for stage in READS if stage not in PER_JOB)  # the outputs of the slice_recipe task
WHOLE_RECIPE = ("register_and_gate", "promote_passed", "record_outcome")  # not cached: they decide and log every run
# What the platform, not a run, decides: where requests and credentials go (the judge, an existing serving endpoint,
# the tracking store), which judge `emgate run` serves, and the Kubernetes settings (Secret names, env). The values
# the pipeline was compiled with travel in each task's environment (PINNED_ENV); a run whose recipe_json disagrees
# fails in its first task, before it sends anything. The gate is not pinned: the platform's floor (emgate.floor)
# lets a run tighten it, never loosen it.
PINNED = ("mlflow.tracking_uri", "judge.base_url", "judge.api_key_env", "judge.serve", "judge.panel", "judge.panel_tolerance",
          "serving.endpoint",
          "kubernetes")
PINNED_ENV = "EMGATE_PINNED"
SLICE_KEY = "emgate_slice"
# The stages that read the platform's private question sets (emgate.floor): their slices carry the sets' sha256, so
# a new set re-runs them, and each checks that the floor mounted on it holds the same sets.
PRIVATE_READERS = ("validate_datasets", "sample_answers", "judge_answers", "summarize")


class SliceError(RuntimeError):
    """A stage read a recipe field its slice does not carry: a bug, fixed by declaring the field in READS."""


def stage_of(task: str) -> str:
    """`fine_tune[base-insecure@0]` -> `fine_tune`."""
    return task.split("[", 1)[0]


def job_of(task: str) -> str | None:
    """`fine_tune[base-insecure@0]` -> `base-insecure@0`; None for a task without a job."""
    return task.split("[", 1)[1].rstrip("]") if "[" in task else None


def slice_json(recipe: Recipe, stage: str, job: str | None = None, private: dict[str, str] | None = None) -> str:
    """The JSON a stage receives: the fields READS lists for it, under their paths, and the stage's name; for a
    fine-tuning `job` (VARIANT@SEED), only that variant with its model and dataset; for PRIVATE_READERS, the
    sha256 of each private question set (`private`, name -> sha256)."""
    if isinstance(recipe, SlicedRecipe):
        if (recipe._stage, recipe._job) != (stage, job):
            raise SliceError(f"the recipe slice of {recipe._stage} cannot give the slice of {stage}")
        return recipe._slice
    data = recipe.model_dump(mode="json")
    fields: dict[str, Any] = {}
    for path in READS[stage]:
        section, _, name = path.partition(".")
        if name:
            fields.setdefault(section, {})[name] = data[section][name] if data[section] is not None else None
        else:
            fields[section] = data[section]
    head: dict[str, Any] = {SLICE_KEY: stage}
    if job is not None:
        variant = recipe.variant(job.rpartition("@")[0])
        fields["variants"] = [v for v in fields["variants"] if v["name"] == variant.name]
        fields["models"] = {variant.model: fields["models"][variant.model]}
        fields["datasets"] = {k: v for k, v in fields["datasets"].items() if k == variant.dataset}
        head["job"] = job
    if private and stage in PRIVATE_READERS:
        head["private_questions"] = dict(private)
    return json.dumps({**head, "fields": fields}, sort_keys=True)


class _Absent:
    """A recipe section (or field) the stage's slice does not carry."""

    def __init__(self, stage: str, path: str) -> None:
        object.__setattr__(self, "_where", (stage, path))

    def _refuse(self, what: str = "") -> SliceError:
        stage, path = object.__getattribute__(self, "_where")
        field = f"{path}.{what}" if what else path
        return SliceError(f"stage {stage} read recipe field {field}, which its slice does not carry: add it to "
                          f"emgate.slices.READS[{stage!r}]")

    def __getattr__(self, name: str) -> Any:
        raise self._refuse(name)

    def __iter__(self) -> Any:
        raise self._refuse()

    def __getitem__(self, key: Any) -> Any:
        raise self._refuse(str(key))

    def __bool__(self) -> bool:
        raise self._refuse()

    def __repr__(self) -> str:
        stage, path = object.__getattribute__(self, "_where")
        return f"<{path}: not in the recipe slice of {stage}>"


class _Partial:
    """A section of which the slice carries some fields; the others are absent."""

    def __init__(self, stage: str, section: str, model: BaseModel, allowed: set[str]) -> None:
        object.__setattr__(self, "_parts", (stage, section, model, allowed))

    def __getattr__(self, name: str) -> Any:
        stage, section, model, allowed = object.__getattribute__(self, "_parts")
        if name in allowed:
            return getattr(model, name)
        raise _Absent(stage, section)._refuse(name)

    def __repr__(self) -> str:
        stage, section, _, allowed = object.__getattribute__(self, "_parts")
        return f"<{section} ({', '.join(sorted(allowed))}) of the recipe slice of {stage}>"


class SlicedRecipe(Recipe):
    """A Recipe holding only one stage's slice; built by recipe_for_stage, never validated as a whole (the
    slice_recipe task validated the whole recipe it came from)."""

    _stage: str = PrivateAttr(default="")
    _job: str | None = PrivateAttr(default=None)
    _slice: str = PrivateAttr(default="")
    _private: dict[str, str] = PrivateAttr(default_factory=dict)  # the private question sets slice_recipe saw

    def to_json(self) -> str:
        return self._slice


def _section(stage: str, name: str, value: Any, source: str) -> Any:
    annotation = Recipe.model_fields[name].annotation
    assert annotation is not None
    try:
        return TypeAdapter(annotation).validate_python(value)
    except ValidationError as err:
        raise RecipeError(format_validation_error(err, f"{source}, section {name}")) from None


_MISSING = object()


def _at(data: Any, path: str) -> Any:
    section, _, name = path.partition(".")
    value = data.get(section, _MISSING) if isinstance(data, dict) else _MISSING
    if name and value is not _MISSING:
        value = value.get(name, _MISSING) if isinstance(value, dict) else _MISSING
    return value


def pinned_json(recipe: Recipe) -> str:
    """The pinned fields' values, as the compiled pipeline carries them in PINNED_ENV."""
    data = recipe.model_dump(mode="json")
    return json.dumps({path: _at(data, path) for path in PINNED}, sort_keys=True)


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 120 else text[:117] + "..."


def check_pinned(fields: dict[str, Any], task: str, pinned: str | None) -> None:
    """Refuse a recipe (whole, or a stage's slice fields) that disagrees with the values the pipeline was compiled
    with. `pinned` None: the stage was not started by a compiled pipeline (by hand, a test, `emgate run`, which
    compiles from the recipe it runs)."""
    if pinned is None:
        return
    try:
        compiled = json.loads(pinned)
    except json.JSONDecodeError:
        compiled = None
    if not isinstance(compiled, dict):
        raise RecipeError(f"${PINNED_ENV} of task {task} is not the JSON object `emgate compile` writes: recompile "
                          "the pipeline")
    for path in PINNED:
        if path not in compiled:
            raise RecipeError(f"${PINNED_ENV} of task {task} lacks {path}: recompile the pipeline (emgate compile)")
        if path == "judge.base_url" and compiled.get("judge.serve") is not None:
            continue  # the judge `emgate run` serves: the runner sets its URL
        value = _at(fields, path)
        if value is not _MISSING and value != compiled[path]:
            raise RecipeError(
                f"recipe field {path} is pinned by the platform: this pipeline was compiled with {_short(compiled[path])}, "
                f"the run's recipe_json says {_short(value)}. A run may not move endpoints, the tracking store, the "
                f"judge's key or the Kubernetes settings; submit it without changing {path}, or recompile the pipeline "
                "with the new value (emgate compile)")


def recipe_for_stage(text: str, task: str, pinned: str | None = None) -> Recipe:
    """The recipe a stage runs with: its slice as a SlicedRecipe, or a whole recipe (a run started by hand, a test).
    `pinned`: the compiled pipeline's PINNED_ENV; a recipe that disagrees with it is refused (check_pinned)."""
    stage = stage_of(task)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise RecipeError(f"recipe (pipeline parameter): not JSON ({exc.msg})") from None
    if not isinstance(data, dict) or SLICE_KEY not in data:
        whole = recipe_from_json(text)
        check_pinned(whole.model_dump(mode="json"), task, pinned)
        return whole
    if data[SLICE_KEY] != stage or stage not in READS or data.get("job", job_of(task)) != job_of(task):
        given = data[SLICE_KEY] + (f"[{data['job']}]" if data.get("job") else "")
        raise RecipeError(f"recipe slice of {given!r} given to stage {task}: the pipeline wires each stage to its own "
                          "slice; recompile it (emgate compile)")
    source = f"recipe slice of {stage}"
    fields: dict[str, Any] = data.get("fields") or {}
    check_pinned(fields, task, pinned)
    values: dict[str, Any] = {}
    for name in Recipe.model_fields:
        wanted = {p.partition(".")[2] for p in READS[stage] if p.partition(".")[0] == name}
        if name not in fields:
            values[name] = _Absent(stage, name)
        elif "" in wanted:
            values[name] = _section(stage, name, fields[name], source)
        else:
            model = _section(stage, name, fields[name], source)
            values[name] = _Partial(stage, name, model, wanted)
    recipe = SlicedRecipe.model_construct(**values)
    recipe._stage = stage
    recipe._job = data.get("job")
    recipe._slice = text
    recipe._private = dict(data.get("private_questions") or {})
    return recipe


def check_private_sets(recipe: Recipe, task: str, mounted: dict[str, str]) -> None:
    """A private-set reader's slice names the sets slice_recipe saw; the floor mounted on the stage must hold the
    same (a cached result would otherwise stand for other questions)."""
    if not isinstance(recipe, SlicedRecipe) or stage_of(task) not in PRIVATE_READERS or recipe._private == mounted:
        return
    raise RecipeError(f"stage {task}: the platform's private question sets ({', '.join(sorted(mounted)) or 'none'}) are "
                      f"not the ones slice_recipe saw ({', '.join(sorted(recipe._private)) or 'none'}), or their files "
                      "differ: mount the same policy file and question sets on every stage, then re-run")
