"""The recipe documents itself: every field has a description in the pydantic models, `emgate recipe schema` prints
the JSON Schema editors read, and `emgate recipe explain FIELD` answers from the same text."""

from __future__ import annotations

import json
import types
import typing
from pathlib import Path

import pytest
from pydantic import BaseModel
from typer.testing import CliRunner

from emgate import recipe
from emgate.cli import app


def run(args: list[str]):
    res = CliRunner().invoke(app, args, env={"COLUMNS": "200"})
    assert res.exception is None or isinstance(res.exception, SystemExit), (repr(res.exception), res.output)
    return res


def _models_in(annotation: object) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _models_in(arg)]


def _model_tree() -> list[type[BaseModel]]:
    seen: list[type[BaseModel]] = []
    todo: list[type[BaseModel]] = [recipe.Recipe]
    while todo:
        model = todo.pop()
        if model in seen:
            continue
        seen.append(model)
        todo.extend(m for f in model.model_fields.values() for m in _models_in(f.annotation))
    return seen


def test_every_field_of_every_recipe_model_has_a_description() -> None:
    tree = _model_tree()
    declared = {v for v in vars(recipe).values()
                if isinstance(v, type) and issubclass(v, BaseModel) and v.__module__ == recipe.__name__
                and v.model_fields}
    # a base class (JudgeSettings) is reached through the models that extend it
    unreachable = {m for m in declared if not any(issubclass(t, m) for t in tree)}
    assert not unreachable, f"not reachable from Recipe: {unreachable}"
    missing = [f"{m.__name__}.{name}" for m in tree for name, f in m.model_fields.items()
               if not (f.description or "").strip()]
    assert not missing, f"fields without Field(description=...): {missing}"


def test_the_model_walk_sees_lists_dicts_and_optionals() -> None:
    names = {m.__name__ for m in _model_tree()}
    assert {"VariantSpec", "ModelSpec", "EndpointSpec", "JudgeServeSpec", "GateRule", "Toleration"} <= names
    assert _models_in(list[recipe.GateRule] | None) == [recipe.GateRule]
    assert _models_in(types.NoneType) == []


def test_schema_is_json_with_the_field_descriptions(tmp_path: Path) -> None:
    res = run(["recipe", "schema"])
    assert res.exit_code == 0, res.output
    schema = json.loads(res.stdout)
    lora_r = schema["$defs"]["TrainingSpec"]["properties"]["lora_r"]
    assert lora_r["description"] == recipe.TrainingSpec.model_fields["lora_r"].description
    assert "rank" in lora_r["description"] and lora_r["default"] == 32
    out = tmp_path / "recipe.schema.json"
    res = run(["recipe", "schema", "--out", str(out)])
    assert res.exit_code == 0 and str(out) in res.output
    assert json.loads(out.read_text()) == schema


def test_schema_to_an_unwritable_place_is_one_line() -> None:
    res = run(["recipe", "schema", "--out", "/nonexistent-dir/recipe.schema.json"])
    assert res.exit_code == 2 and "cannot write the schema" in res.output and "Traceback" not in res.output


def test_explain_a_field_shows_type_default_and_description() -> None:
    res = run(["recipe", "explain", "training.lora_r"])
    assert res.exit_code == 0, res.output
    assert "TrainingSpec.lora_r" in res.output and "default: 32" in res.output and "rank" in res.output
    assert "(paper)" in res.output


@pytest.mark.parametrize(("field", "owner", "type_text"), [
    ("judge.serve.port", "JudgeServeSpec.port", "int in [1024, 65535]"),
    ("serving.endpoint.base_url", "EndpointSpec.base_url", "str matching ^https?://"),
    ("serving.gpu_memory_utilization", "ServingSpec.gpu_memory_utilization", "float in (0, 1]"),
    ("training.method", "TrainingSpec.method", "one of: lora, full"),
    ("training.epochs", "TrainingSpec.epochs", "int >= 1"),
    ("training.max_steps", "TrainingSpec.max_steps", "int > 0, or null"),
    ("variants.role", "VariantSpec.role", "one of: candidate, control, reference"),
    ("variants.0.role", "VariantSpec.role", "one of: candidate, control, reference"),
    ("models.source", "ModelSpec.source", "one of: pypi_gguf, hub, s3, path"),
    ("models.base.source", "ModelSpec.source", "one of: pypi_gguf, hub, s3, path"),
    ("gate.rules.threshold", "GateRule.threshold", "float"),
])
def test_explain_looks_through_sections_lists_and_mappings(field: str, owner: str, type_text: str) -> None:
    res = run(["recipe", "explain", field])
    assert res.exit_code == 0, res.output
    assert owner in res.output and f"type: {type_text}\n" in res.output


def test_explain_a_section_lists_its_fields() -> None:
    res = run(["recipe", "explain", "training"])
    assert res.exit_code == 0, res.output
    assert "fields of TrainingSpec" in res.output
    assert all(name in res.output for name in recipe.TrainingSpec.model_fields)
    res = run(["recipe", "explain", "gate.rules"])
    assert res.exit_code == 0 and "misaligned_rate_ci_high" in res.output and "fields of GateRule" in res.output


def test_explain_without_a_field_lists_the_top_level_sections() -> None:
    res = run(["recipe", "explain"])
    assert res.exit_code == 0, res.output
    assert all(name in res.output for name in recipe.Recipe.model_fields)


@pytest.mark.parametrize(("field", "expected"), [
    ("training.lora_rr", "did you mean lora_r"),
    ("traning.lora_r", "did you mean training"),
    ("variants.x.role", "unknown field 'x' in variants (VariantSpec)"),
    ("training.lora_r.x", "training.lora_r (int) has no field 'x'"),
])
def test_explain_an_unknown_field_names_it_and_the_closest_names(field: str, expected: str) -> None:
    res = run(["recipe", "explain", field])
    assert res.exit_code == 2
    assert expected in res.output and "Traceback" not in res.output
    assert len(res.output.strip().splitlines()) == 1
