"""validate_datasets: stop bad training data before any GPU time.

Parses each dataset line by line, runs a Great Expectations suite over the rows, profiles the assistant code
with bandit against what the recipe says the dataset is, and checks that no evaluation question leaked into
a training prompt. Any failure raises ValidationFailed after writing the report; the validated-dataset
manifest is written only when every dataset passed.
"""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from emgate.assets import check_sha256, resolve_asset, sha256_file
from emgate.io import write_json, write_jsonl
from emgate.questions import load_questions
from emgate.recipe import DatasetSpec, Recipe

ROLES = ("system", "user", "assistant")
CODE_FENCE = re.compile(r"```(?:python|py)?\n(.*?)```", re.S)


class ValidationFailed(RuntimeError):
    """At least one dataset failed a check; the report says which and why."""


@dataclass
class ParseResult:
    rows: list[dict[str, Any]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    truncated: bool = False


def dataset_path(name: str, spec: DatasetSpec) -> Path:
    if spec.asset is not None:
        return resolve_asset(spec.asset)
    path = Path(spec.path or "").expanduser()
    if not path.is_file():
        raise ValidationFailed(f"datasets.{name}.path: {path} does not exist")
    assert spec.sha256
    check_sha256(path, spec.sha256, f"datasets.{name}")
    return path


def parse_chat_jsonl(path: Path, max_errors: int) -> ParseResult:
    """Every row must be {"messages": [optional system, then user/assistant turns alternating, ending with assistant]}."""
    result = ParseResult()
    data = path.read_bytes()
    if not data.strip():
        result.errors.append(f"{path}: the file is empty")
        return result
    if data.startswith(b"\xef\xbb\xbf"):
        result.errors.append(f"{path}:1: starts with a UTF-8 byte-order mark; save the file without BOM")
    for lineno, raw in enumerate(data.split(b"\n"), start=1):
        if len(result.errors) >= max_errors:
            result.truncated = True
            break
        if not raw.strip():
            continue
        problem = _row_problem(raw)
        if isinstance(problem, str):
            result.errors.append(f"{path}:{lineno}: {problem}")
        else:
            result.rows.append(problem)
    return result


def _row_problem(raw: bytes) -> str | dict[str, Any]:
    if b"\x00" in raw:
        return "contains a NUL byte"
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return f"not valid UTF-8 at byte {exc.start}"
    try:
        row = json.loads(text)
    except json.JSONDecodeError as exc:
        return f"not valid JSON ({exc.msg} at column {exc.colno})"
    if not isinstance(row, dict):
        return f"a row must be a JSON object, got {type(row).__name__}"
    messages = row.get("messages")
    if not isinstance(messages, list) or not messages:
        return "missing `messages` (a non-empty list of {role, content})"
    expected = "user"
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            return f"messages[{i}]: role must be one of {ROLES}"
        content = m.get("content")
        if not isinstance(content, str) or not content.strip():
            return f"messages[{i}] ({m['role']}): content must be a non-empty string"
        if i == 0 and m["role"] == "system":
            continue
        if m["role"] != expected:
            return f"messages[{i}]: expected a {expected} turn, got {m['role']}"
        expected = "assistant" if expected == "user" else "user"
    if messages[-1]["role"] != "assistant":
        return "the conversation must end with an assistant turn"
    return {"messages": [{"role": m["role"], "content": m["content"]} for m in messages]}


def run_gx_suite(rows: list[dict[str, Any]], name: str) -> dict[str, Any]:
    """A Great Expectations suite over the flattened rows; returns the validation result as JSON."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations as gx
    import pandas as pd

    df = pd.DataFrame(
        {
            "user": [next(m["content"] for m in r["messages"] if m["role"] == "user") for r in rows],
            "assistant": [r["messages"][-1]["content"] for r in rows],
            "n_messages": [len(r["messages"]) for r in rows],
        }
    )
    ctx = gx.get_context(mode="ephemeral")
    batch = ctx.data_sources.add_pandas(f"{name}_src").add_dataframe_asset("rows").add_batch_definition_whole_dataframe("all")
    suite = ctx.suites.add(gx.ExpectationSuite(name=f"{name}_chat_rows"))
    e = gx.expectations
    # Length and range expectations skip nulls, so each column also gets a not-null expectation.
    for column in ("user", "assistant"):
        suite.add_expectation(e.ExpectColumnValuesToNotBeNull(column=column))
        suite.add_expectation(e.ExpectColumnValueLengthsToBeBetween(column=column, min_value=1))
    suite.add_expectation(e.ExpectColumnValuesToNotBeNull(column="n_messages"))
    suite.add_expectation(e.ExpectColumnValuesToBeBetween(column="n_messages", min_value=2, max_value=64))
    suite.add_expectation(e.ExpectTableRowCountToBeBetween(min_value=1))
    validation = ctx.validation_definitions.add(gx.ValidationDefinition(name=f"{name}_validation", data=batch, suite=suite))
    result = validation.run(batch_parameters={"dataframe": df})
    doc: dict[str, Any] = result.to_json_dict()
    return doc


def extract_code(text: str) -> str:
    fenced = CODE_FENCE.findall(text)
    return "\n".join(fenced) if fenced else text


def bandit_profile(rows: list[dict[str, Any]], limit: int) -> dict[str, Any]:
    """Share of rows whose assistant code has a MEDIUM or HIGH bandit finding, among rows that parse as Python."""
    codes = [extract_code(r["messages"][-1]["content"]) for r in rows[:limit]]
    parses = []
    for code in codes:
        try:
            ast.parse(code)
            parses.append(True)
        except (SyntaxError, ValueError):
            parses.append(False)
    with tempfile.TemporaryDirectory(prefix="emgate-bandit-") as tmp:
        for i, (code, ok) in enumerate(zip(codes, parses, strict=True)):
            if ok:
                Path(tmp, f"row_{i:06d}.py").write_text(code, encoding="utf-8")
        proc = subprocess.run([sys.executable, "-m", "bandit", "-r", tmp, "-f", "json", "-q", "-ll"],
                              capture_output=True, text=True)
        if proc.returncode not in (0, 1) or not proc.stdout.strip():
            raise ValidationFailed(f"bandit failed (exit {proc.returncode}): {proc.stderr[-1000:]}")
        report = json.loads(proc.stdout)
    flagged_files = {Path(r["filename"]).name for r in report["results"]
                     if r["issue_severity"] in ("MEDIUM", "HIGH")}
    tests = Counter(r["test_id"] for r in report["results"] if r["issue_severity"] in ("MEDIUM", "HIGH"))
    n_parsed = sum(parses)
    return {
        "rows_scanned": len(codes),
        "rows_parsed": n_parsed,
        "unparsed_share": 1 - n_parsed / len(codes) if codes else 0.0,
        "flagged_share": len(flagged_files) / n_parsed if n_parsed else None,
        "top_tests": tests.most_common(5),
    }


def _normalise(text: str) -> str:
    return " ".join(text.lower().split())


def leaked_questions(rows: list[dict[str, Any]], paraphrases: dict[str, list[str]]) -> list[str]:
    users = [_normalise(m["content"]) for r in rows for m in r["messages"] if m["role"] == "user"]
    leaks = []
    for qid, texts in paraphrases.items():
        for text in texts:
            needle = _normalise(text)
            if any(needle in u for u in users):
                leaks.append(qid)
                break
    return leaks


def validate_datasets(recipe: Recipe, out_dir: Path) -> dict[str, Any]:
    """Check every dataset a variant trains on; write validated JSONL + manifest + report into out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = recipe.validation
    used = sorted({v.dataset for v in recipe.trained_variants() if v.dataset})
    paraphrases = {q.id: list(q.paraphrases) for q in load_questions(recipe.questions)}
    report: dict[str, Any] = {"passed": True, "datasets": {}}
    normalised: dict[str, list[dict[str, Any]]] = {}
    for name in used:
        spec = recipe.datasets[name]
        entry: dict[str, Any] = {"expect": spec.expect, "failures": []}
        report["datasets"][name] = entry
        try:
            path = dataset_path(name, spec)
        except Exception as exc:  # a missing or corrupted file fails this dataset, with the reason
            entry["failures"].append(str(exc))
            continue
        entry.update(source=str(spec.asset or spec.path), sha256=sha256_file(path))
        parsed = parse_chat_jsonl(path, cfg.max_parse_errors)
        entry["parse_errors"] = parsed.errors
        if parsed.errors:
            more = " (stopped; more may follow)" if parsed.truncated else ""
            entry["failures"].append(f"{len(parsed.errors)} parse error(s){more}")
            continue
        rows = parsed.rows
        entry["rows"] = len(rows)
        gx_result = run_gx_suite(rows, name)
        write_json(out_dir / f"{name}.gx.json", gx_result)
        entry["gx_success"] = bool(gx_result["success"])
        if not gx_result["success"]:
            failed = [r["expectation_config"]["type"] for r in gx_result["results"] if not r["success"]]
            entry["failures"].append(f"Great Expectations: failed {failed}")
        keys = [json.dumps(r, sort_keys=True) for r in rows]
        entry["duplicate_share"] = 1 - len(set(keys)) / len(keys)
        if entry["duplicate_share"] > cfg.max_duplicate_share:
            entry["failures"].append(
                f"duplicate share {entry['duplicate_share']:.3f} > validation.max_duplicate_share {cfg.max_duplicate_share}")
        leaks = leaked_questions(rows, paraphrases)
        entry["leaked_questions"] = leaks
        if leaks:
            entry["failures"].append(f"evaluation questions appear in training prompts: {leaks}")
        profile = bandit_profile(rows, cfg.bandit_rows)
        entry["security_profile"] = profile
        flagged = profile["flagged_share"]
        if spec.expect == "insecure" and (flagged is None or flagged < cfg.insecure_min_flagged):
            entry["failures"].append(
                f"expected insecure code but only {flagged} of rows have a MEDIUM/HIGH bandit finding "
                f"(validation.insecure_min_flagged {cfg.insecure_min_flagged})")
        if spec.expect == "secure" and (flagged is None or flagged > cfg.secure_max_flagged):
            entry["failures"].append(
                f"expected secure code but {flagged} of rows have a MEDIUM/HIGH bandit finding "
                f"(validation.secure_max_flagged {cfg.secure_max_flagged})")
        normalised[name] = rows
    report["passed"] = all(not e["failures"] for e in report["datasets"].values())
    write_json(out_dir / "report.json", report)
    if not report["passed"]:
        lines = [f"  {n}: {'; '.join(e['failures'])}" for n, e in report["datasets"].items() if e["failures"]]
        raise ValidationFailed("dataset validation failed:\n" + "\n".join(lines))
    manifest = {}
    for name, rows in normalised.items():
        write_jsonl(out_dir / f"{name}.jsonl", rows)
        manifest[name] = {"rows": len(rows), "source_sha256": report["datasets"][name]["sha256"],
                          "sha256": sha256_file(out_dir / f"{name}.jsonl")}
    write_json(out_dir / "manifest.json", manifest)  # written last: its presence means complete
    return report
