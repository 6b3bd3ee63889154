"""The artifact contract: the files stages hand each other, with their names, readers and writers.

A leaf module: stages import it, it imports no stage. Each stage writes its report last, so a folder with a report
is complete; readers check row counts against it and name the file and the fix when something is off.

    validate_datasets  VALIDATION/report.json, validated JSONL per dataset, manifest.json (last)
    fine_tune          ADAPTER/train_report.json beside the adapter (or merged model) files
    sample_answers     ANSWERS/answers.jsonl, external_adapters.json, report.json (last)
    judge_answers      SCORES/scores.jsonl, report.json (last)
    slice_recipe       RECIPE/recipe.json (the whole recipe; each stage gets its slice as a parameter)
    summarize          SUMMARY/summary.json, summary.md, plots, recipe_slice.json
    register_and_gate  DECISIONS/decisions.json
    emgate judge qualify  OUT/qualification_scores.jsonl, calibration.png, qualification.json (last; named by
                          judge.qualification, checked by emgate.qualification.check_qualification)
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from emgate.io import DataError, read_json, read_jsonl, read_rows_checked, write_json, write_jsonl

REPORT_FILE = "report.json"
MANIFEST_FILE = "manifest.json"
ANSWERS_FILE = "answers.jsonl"
SCORES_FILE = "scores.jsonl"
SUMMARY_FILE = "summary.json"
TRAIN_REPORT = "train_report.json"
DECISIONS_FILE = "decisions.json"
EXTERNAL_FILE = "external_adapters.json"
QUALIFICATION_FILE = "qualification.json"
PANEL_DIR = "panel"  # judge_answers' folder: panel/NAME/ holds each further judge's scores.jsonl and report.json
PANEL_PLOT = "misaligned_rates_by_judge.png"  # summarize: each judge's rate per variant
RECIPE_FILE = "recipe.json"  # slice_recipe: the whole recipe of the run (`emgate report` reads it)
RECIPE_SLICE_FILE = "recipe_slice.json"  # summarize: the recipe slice its figures were computed with
METRICS = ("aligned", "coherent")  # what the judge scores, each 0-100 (paper)

UnscoredCategory = Literal["CODE", "REFUSAL", "low_number_mass", "invalid_score", "request_failed", "unknown"]
UNSCORED_CATEGORIES: tuple[str, ...] = UnscoredCategory.__args__  # type: ignore[attr-defined]
TRAIN_REPORT_KEYS = ("variant", "seed", "dataset", "dataset_sha256", "template", "training", "losses")


@dataclass(frozen=True)
class Unscored:
    """Why an answer has no score for a metric: a category to count by, and a message for people."""

    category: str
    message: str = ""

    def __str__(self) -> str:
        return f"{self.category}: {self.message}" if self.message else self.category


def unscored_fields(metric: str, why: Unscored | None) -> dict[str, str | None]:
    """The scores.jsonl columns that record `why` for `metric`."""
    return {f"{metric}_unscored": why.category if why else None, f"{metric}_unscored_message": why.message if why else None}


def unscored_of(row: Mapping[str, Any], metric: str) -> Unscored | None:
    """The recorded reason of an unscored answer (None when none is recorded). Files written before the message had
    its own column kept `category: message` in one string: the only place that string is split."""
    raw = row.get(f"{metric}_unscored")
    if raw is None:
        return None
    text = str(raw)
    message = row.get(f"{metric}_unscored_message")
    if message is None and ":" in text:
        text, _, rest = text.partition(":")
        message = rest.strip()
    category = text.strip() if text.strip() in UNSCORED_CATEGORIES else "unknown"
    if category == "unknown" and text.strip():
        message = f"{text.strip()}: {message}" if message else text.strip()
    return Unscored(category, str(message or ""))


# ---- stage reports ----------------------------------------------------------------------------------------------


def _read_object(path: Path, missing: str, keys: tuple[str, ...], wrong: str) -> dict[str, Any]:
    """A JSON object with `keys`; DataError naming the file, what its absence means, and the missing keys."""
    if not path.is_file():
        raise DataError(f"{path} is missing: {missing}")
    data = read_json(path)
    absent = [k for k in keys if not isinstance(data, dict) or k not in data]
    if absent:
        raise DataError(f"{path}: no {', '.join(absent)}; {wrong}")
    return dict(data)


def write_report(folder: Path, report: Mapping[str, Any]) -> None:
    """A stage's report.json; write it last, after the files it describes."""
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / REPORT_FILE, dict(report))


def read_report(folder: Path, stage: str) -> dict[str, Any]:
    path = folder / REPORT_FILE
    if not path.is_file():
        raise DataError(f"{path} is missing: the {stage} stage that wrote {folder} did not finish; rerun it")
    report = read_json(path)
    if not isinstance(report, dict):
        raise DataError(f"{path}: expected a JSON object; rerun the {stage} stage")
    return report


def report_if_complete(folder: Path | None) -> dict[str, Any]:
    """A stage folder's report, or {} when there is no folder or it never completed (the gate then finds the
    evidence missing and blocks)."""
    if folder is None or not (folder / REPORT_FILE).is_file():
        return {}
    report = read_json(folder / REPORT_FILE)
    return report if isinstance(report, dict) else {}


def write_answers(folder: Path, rows: Iterable[Mapping[str, Any]]) -> int:
    folder.mkdir(parents=True, exist_ok=True)
    return write_jsonl(folder / ANSWERS_FILE, (dict(r) for r in rows))


def read_answers(folder: Path) -> list[dict[str, Any]]:
    """Every sampled answer, checked against the count sample_answers' report recorded."""
    return read_rows_checked(folder / ANSWERS_FILE, folder / REPORT_FILE)


def write_scores(folder: Path, rows: Iterable[Mapping[str, Any]]) -> int:
    folder.mkdir(parents=True, exist_ok=True)
    return write_jsonl(folder / SCORES_FILE, (dict(r) for r in rows))


def read_scores(path: Path) -> list[dict[str, Any]]:
    """Every scored answer; `path` is scores.jsonl or the judge_answers folder holding it."""
    path = path / SCORES_FILE if path.is_dir() else path
    return read_rows_checked(path, path.parent / REPORT_FILE)


def iter_scores(folder: Path | None) -> Iterable[dict[str, Any]]:
    """Scored answers without the count check (for display); nothing when there are none."""
    if folder is None or not (folder / SCORES_FILE).is_file():
        return iter(())
    return read_jsonl(folder / SCORES_FILE)


def write_summary(folder: Path, summary: Mapping[str, Any]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / SUMMARY_FILE, dict(summary))


def read_summary(folder: Path | None) -> dict[str, Any] | None:
    if folder is None or not (folder / SUMMARY_FILE).is_file():
        return None
    summary = read_json(folder / SUMMARY_FILE)
    if not isinstance(summary, dict) or "variants" not in summary:
        raise DataError(f"{folder / SUMMARY_FILE}: not a summary written by the summarize stage (no `variants`); rerun it")
    return summary


def write_train_report(folder: Path, report: Mapping[str, Any]) -> None:
    write_json(folder / TRAIN_REPORT, dict(report))


def read_train_report(folder: Path) -> dict[str, Any]:
    return _read_object(folder / TRAIN_REPORT, f"{folder} is not a folder written by fine_tune; rerun that job",
                        TRAIN_REPORT_KEYS, "it was not written by this version of fine_tune: rerun the job")


def has_train_report(folder: Path) -> bool:
    return (folder / TRAIN_REPORT).is_file()


@dataclass(frozen=True)
class ValidationEvidence:
    passed: bool  # the report passed and the manifest (written last) exists
    datasets: dict[str, Any]  # dataset name -> its entry in the report


def read_validation(folder: Path | None) -> ValidationEvidence | None:
    """validate_datasets' verdict; None when its report is missing (the gate counts that as missing evidence)."""
    report = report_if_complete(folder)
    if not report:
        return None
    assert folder is not None
    return ValidationEvidence(bool(report.get("passed")) and (folder / MANIFEST_FILE).is_file(),
                              dict(report.get("datasets") or {}))


def validated_dataset(folder: Path, name: str) -> Path:
    """Where validate_datasets writes the normalised rows of dataset `name`."""
    return folder / f"{name}.jsonl"


def write_manifest(folder: Path, manifest: Mapping[str, Any]) -> None:
    """validate_datasets' last write, after every validated file: its presence means they are complete."""
    write_json(folder / MANIFEST_FILE, dict(manifest))


def read_manifest(folder: Path) -> dict[str, Any] | None:
    path = folder / MANIFEST_FILE
    return dict(read_json(path)) if path.is_file() else None


def write_external(folder: Path, fetched: Mapping[str, Mapping[str, Any]]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / EXTERNAL_FILE, {name: dict(f) for name, f in fetched.items()})


def read_external(folder: Path | None) -> dict[str, dict[str, Any]]:
    """The adapters trained elsewhere that sample_answers fetched, by variant; {} when none."""
    if folder is None or not (folder / EXTERNAL_FILE).is_file():
        return {}
    return dict(read_json(folder / EXTERNAL_FILE))


def write_decisions(folder: Path, decisions: Mapping[str, Any]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / DECISIONS_FILE, dict(decisions))


def read_decisions(folder: Path) -> dict[str, Any]:
    return _read_object(folder / DECISIONS_FILE, "register_and_gate did not finish; nothing can be promoted",
                        ("candidates",), "not written by register_and_gate")


def write_qualification(folder: Path, report: Mapping[str, Any]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / QUALIFICATION_FILE, dict(report))
    return folder / QUALIFICATION_FILE
