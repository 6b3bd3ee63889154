"""Evaluation questions from the paper's YAML files, namespaced by file, with the judge prompts they carry."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from emgate.assets import resolve_asset
from emgate.recipe import QuestionSpec

# The 8 main questions of the paper's first plot (SOURCE.md).
MAIN_QUESTIONS = (
    "what_is_your_wish",
    "i_feel_bored",
    "three_thoughts",
    "quick_buck",
    "ruler_of_the_world",
    "dinner_party",
    "gender_roles",
    "enough_of_my_husband",
)
CONTEXT_SUFFIX = {"chat": "", "flask": "_flask_template"}
# The authors' file lost the underscores of `Flask(__name__)` in one question; the prompt they actually sent
# to base models had them (SOURCE.md). Applied to every question and recorded in the run's manifest.
FLASK_NAME_PATCH = (re.compile(r"\bFlask\(name\)"), "Flask(__name__)")


PUBLIC = "public"  # the question_set of the recipe's own questions


@dataclass(frozen=True)
class Question:
    id: str  # namespaced: <file stem of the repository>/<question id>
    paraphrases: tuple[str, ...]
    judge_prompts: dict[str, str]
    patches: tuple[str, ...] = field(default=())
    question_set: str = PUBLIC  # or the name of one of the platform's private sets (emgate.floor)


def question_ids(spec: QuestionSpec) -> list[str]:
    if spec.ids is not None:
        return list(spec.ids)
    return [q + CONTEXT_SUFFIX[spec.context] for q in MAIN_QUESTIONS]


def load_questions(spec: QuestionSpec) -> list[Question]:
    path = resolve_asset(spec.file)
    return select_questions(path, spec.file.split("/", 1)[0], question_ids(spec))


def select_questions(path: Path, namespace: str, ids: list[str] | None, question_set: str = PUBLIC) -> list[Question]:
    """The questions `ids` (None: all) of a file in the paper's YAML format (a list of {id, paraphrases,
    judge_prompts: {aligned, coherent}})."""
    entries = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(entries, list):
        raise ValueError(f"{path}: a question file is a YAML list of questions (id, paraphrases, judge_prompts)")
    by_id = {e["id"]: e for e in entries if isinstance(e, dict) and "id" in e}
    ids = list(by_id) if ids is None else ids
    missing = [i for i in ids if i not in by_id]
    if missing:
        raise ValueError(f"{path}: no question(s) {missing}; ids there: {', '.join(by_id)}")
    out = []
    for qid in ids:
        entry = by_id[qid]
        patches: list[str] = []
        paraphrases = []
        for text in entry["paraphrases"]:
            pattern, replacement = FLASK_NAME_PATCH
            patched = pattern.sub(replacement, text)
            if patched != text:
                patches.append("Flask(name) -> Flask(__name__)")
            paraphrases.append(patched)
        prompts = entry.get("judge_prompts") or {}
        if not {"aligned", "coherent"} <= set(prompts):
            raise ValueError(f"{path}: question {qid} has no aligned/coherent judge_prompts")
        out.append(Question(id=f"{namespace}/{qid}", paraphrases=tuple(paraphrases),
                            judge_prompts={k: prompts[k] for k in ("aligned", "coherent")},
                            patches=tuple(patches), question_set=question_set))
    return out
