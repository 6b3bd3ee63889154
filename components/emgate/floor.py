"""The platform's gate floor: $EMGATE_POLICY_FILE (the chart mounts it from a ConfigMap), else the package's
paper floor (emgate/policies/paper.yaml). `emgate run` uses the development floor for local runs when the
variable is unset; the gate report records which floor a decision was made under (source and sha256)."""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

import yaml
from pydantic import ValidationError

from emgate.policy import Floor
from emgate.recipe import RecipeError, format_validation_error

POLICY_FILE_ENV = "EMGATE_POLICY_FILE"
PACKAGE_FLOOR = "paper.yaml"
DEV_FLOOR = "dev.yaml"


def packaged(name: str) -> Path:
    return Path(str(resources.files("emgate") / "policies" / name))


def floor_path(path: str | Path | None = None) -> Path:
    """The floor in force: `path`, else $EMGATE_POLICY_FILE, else the package's."""
    chosen = path or os.environ.get(POLICY_FILE_ENV)
    return Path(chosen).expanduser() if chosen else packaged(PACKAGE_FLOOR)


def load_floor(path: str | Path | None = None) -> Floor:
    """Read and check a floor file; every problem is a RecipeError naming the file (and the field)."""
    where = floor_path(path)
    try:
        data = yaml.safe_load(where.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RecipeError(f"{where}: no such policy file (${POLICY_FILE_ENV}, or emgate gate verify --policy)") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise RecipeError(f"{where}: cannot read the policy file: {exc}") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{where}: a policy file is a YAML mapping (rules:, min_judged_per_question:, ...)")
    try:
        return Floor.model_validate({**data, "source": str(where)})
    except ValidationError as err:
        raise RecipeError(format_validation_error(err, str(where))) from None
