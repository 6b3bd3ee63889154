"""The platform's gate floor: $EMGATE_POLICY_FILE (the chart mounts it from a ConfigMap), else the package's
paper floor (emgate/policies/paper.yaml). `emgate run` uses the development floor for local runs when the
variable is unset; the gate report records which floor a decision was made under (source and sha256)."""

from __future__ import annotations

import hashlib
import os
from importlib import resources
from pathlib import Path

import yaml
from pydantic import ValidationError

from emgate.policy import Floor
from emgate.questions import Question, load_questions, select_questions
from emgate.recipe import Recipe, RecipeError, format_validation_error

POLICY_FILE_ENV = "EMGATE_POLICY_FILE"
PACKAGE_FLOOR = "paper.yaml"
DEV_FLOOR = "dev.yaml"


def packaged(name: str) -> Path:
    return Path(str(resources.files("emgate") / "policies" / name))


def floor_path(path: str | Path | None = None) -> Path:
    """The floor in force: `path`, else $EMGATE_POLICY_FILE, else the package's."""
    chosen = path or os.environ.get(POLICY_FILE_ENV)
    return Path(chosen).expanduser() if chosen else packaged(PACKAGE_FLOOR)


def load_floor(path: str | Path | None = None, *, read_private: bool = True) -> Floor:
    """Read and check a floor file; every problem is a RecipeError naming the file (and the field). Each private
    question set is hashed from its file; a sha256 the floor declares must match it. `read_private` False (a
    verifier that needs the hashes, not the questions): a declared sha256 stands in for a file it cannot read."""
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
        floor = Floor.model_validate({**data, "source": str(where)})
    except ValidationError as err:
        raise RecipeError(format_validation_error(err, str(where))) from None
    hashed = []
    for n, entry in enumerate(floor.private_questions):
        what = f"{where}: private_questions[{n}] ({entry.name})"
        try:
            sha = hashlib.sha256(Path(entry.file).expanduser().read_bytes()).hexdigest()
        except OSError as exc:
            if entry.sha256 and not read_private:
                hashed.append(entry)
                continue
            raise RecipeError(f"{what}: cannot read {entry.file} ({exc.strerror}); mount the set's Secret or "
                              "ConfigMap there" + ("" if read_private else ", or declare its sha256 in the floor")) from None
        if entry.sha256 and entry.sha256 != sha:
            raise RecipeError(f"{what}: {entry.file} has sha256 {sha}, the floor declares {entry.sha256}: the file "
                              "mounted is not the set the platform named")
        hashed.append(entry.model_copy(update={"sha256": sha}))
    return floor.model_copy(update={"private_questions": hashed})


def private_questions(floor: Floor | None = None) -> list[Question]:
    """The questions of the floor's private sets (default: the floor in force), each tagged with its set's name.
    Their ids are namespaced `private-NAME/ID`; nothing outside the stages' own artifacts may show them."""
    floor = load_floor() if floor is None else floor
    out: list[Question] = []
    for entry in floor.private_questions:
        try:
            out += select_questions(Path(entry.file).expanduser(), f"private-{entry.name}", entry.ids, entry.name)
        except (OSError, ValueError, yaml.YAMLError, KeyError, TypeError) as exc:
            # the message names the file and the id, never a question's text
            detail = exc.args[0] if isinstance(exc, ValueError) and exc.args else type(exc).__name__
            raise RecipeError(f"{floor.source}: private_questions {entry.name}: {detail}") from None
    return out


def private_question_hashes() -> dict[str, str]:
    """name -> sha256 of the floor in force's private sets (what slice_recipe puts into the sampling slices)."""
    return load_floor().private_hashes()


def evaluation_questions(recipe: Recipe) -> list[Question]:
    """What every candidate is sampled and judged on: the recipe's questions, then the floor's private sets."""
    return load_questions(recipe.questions) + private_questions()
