"""validate_datasets: stop bad training data before any GPU time.

Each dataset is parsed line by line (every problem as FILE:LINE with the reason); then one Great Expectations
suite checks the rows (non-empty turns, turn counts, row-count bounds, duplicates after whitespace
normalisation, token lengths under every chat template that trains on it); then secrets (with an allowlist),
leaked evaluation questions and the bandit security profile against what the recipe says the dataset is.
Any failure raises ValidationFailed after writing the report, the GX results and the Data Docs; the
validated-dataset manifest is written only when every dataset passed.
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
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from emgate.assets import check_sha256, resolve_asset, sha256_file
from emgate.contract import REPORT_FILE, validated_dataset, write_manifest, write_report
from emgate.io import write_json, write_jsonl, write_text_atomic
from emgate.questions import load_questions
from emgate.recipe import DatasetSpec, Recipe, ValidationSpec
from emgate.secrets_scan import AllowEntry, blocking_findings, load_allowlist, scan_rows
from emgate.secrets_scan import summary as secrets_summary

ROLES = ("system", "user", "assistant")
CODE_FENCE = re.compile(r"```(?:python|py)?\n(.*?)```", re.S)
# C0 controls but tab, newline and carriage return; DEL; C1 controls. They reach a row as JSON escapes ("\u0000",
# "\u001b"), which the raw-byte checks never see, and break tokenizers, terminals and the chat templates.
CONTROL_CHARS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
_C0_NAMES = ("NUL", "SOH", "STX", "ETX", "EOT", "ENQ", "ACK", "BEL", "BS", "HT", "LF", "VT", "FF", "CR", "SO", "SI",
             "DLE", "DC1", "DC2", "DC3", "DC4", "NAK", "SYN", "ETB", "CAN", "EM", "SUB", "ESC", "FS", "GS", "RS", "US")
DATA_DOCS_DIR = "data_docs"


class ValidationFailed(RuntimeError):
    """At least one dataset failed a check; the report says which and why."""


@dataclass
class ParseResult:
    rows: list[dict[str, Any]] = field(default_factory=list)
    lines: list[int] = field(default_factory=list)  # the line number of each row
    errors: list[str] = field(default_factory=list)
    truncated: bool = False


@dataclass
class LengthCheck:
    """Token lengths of rows rendered by one chat template, against the training max_seq_length."""

    label: str
    lengths: list[int]
    max_seq_length: int


def dataset_path(name: str, spec: DatasetSpec) -> Path:
    if spec.asset is not None:
        return resolve_asset(spec.asset)
    path = Path(spec.path or "").expanduser()
    if not path.is_file():
        raise ValidationFailed(f"datasets.{name}.path: {path} does not exist")
    assert spec.sha256
    check_sha256(path, spec.sha256, f"datasets.{name}")
    return path


def shipped_allowlist(file_sha256: str) -> list[AllowEntry]:
    """The allowlist emgate ships for a pinned paper file (found by its sha256), or none."""
    from emgate.assets import manifest

    for key, entry in manifest().items():
        if entry["sha256"] == file_sha256:
            shipped = resources.files("emgate").joinpath("allowlists", *key.split("/")[:-1], key.split("/")[-1] + ".yaml")
            if shipped.is_file():
                with resources.as_file(shipped) as path:
                    return load_allowlist(path)
    return []


def dataset_allowlist(spec: DatasetSpec, path: Path) -> list[AllowEntry]:
    if spec.secrets_allowlist:
        return load_allowlist(Path(spec.secrets_allowlist).expanduser())
    return shipped_allowlist(sha256_file(path))


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
            result.lines.append(lineno)
    return result


def control_char_problem(text: str) -> str | None:
    """'U+001B (ESC) at character 4' for the first control character other than \\t, \\n, \\r in text, else None."""
    m = CONTROL_CHARS.search(text)
    if m is None:
        return None
    code = ord(m.group())
    name = _C0_NAMES[code] if code < 0x20 else "DEL" if code == 0x7F else "C1 control"
    return f"U+{code:04X} ({name}) at character {m.start()}"


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
        role = m.get("role") if isinstance(m, dict) else None
        if isinstance(role, str) and (bad := control_char_problem(role)):
            return f"messages[{i}]: role contains control character {bad}; role must be one of {ROLES}"
        if not isinstance(m, dict) or role not in ROLES:
            return f"messages[{i}]: role must be one of {ROLES}"
        content = m.get("content")
        if isinstance(content, str) and (bad := control_char_problem(content)):
            return (f"messages[{i}] ({role}): content contains control character {bad}; remove it "
                    "(only \\t, \\n and \\r are allowed)")
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


def _normalise(text: str) -> str:
    return " ".join(text.lower().split())


def row_key(row: dict[str, Any]) -> str:
    """Two rows are duplicates when their turns match after whitespace normalisation."""
    return "\x1f".join(f"{m['role']}:{' '.join(m['content'].split())}" for m in row["messages"])


def run_gx_suite(rows: list[dict[str, Any]], name: str, cfg: ValidationSpec, lengths: list[LengthCheck],
                 docs_dir: Path | None = None) -> dict[str, Any]:
    """One Great Expectations suite over the flattened rows; returns the validation result as JSON."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations as gx
    import pandas as pd

    columns: dict[str, Any] = {
        "user": [next(m["content"] for m in r["messages"] if m["role"] == "user") for r in rows],
        "assistant": [r["messages"][-1]["content"] for r in rows],
        "n_messages": [len(r["messages"]) for r in rows],
        "row_key": [row_key(r) for r in rows],
    }
    for check in lengths:
        columns[f"tokens[{check.label}]"] = check.lengths
    df = pd.DataFrame(columns)
    from great_expectations.data_context.types.base import ProgressBarsConfig

    ctx = gx.get_context(mode="ephemeral")
    ctx.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
    if docs_dir is not None:
        ctx.add_data_docs_site(site_name="emgate", site_config={
            "class_name": "SiteBuilder", "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
            # GX refuses a relative base_directory (an ephemeral context has no root_directory to resolve it against)
            "store_backend": {"class_name": "TupleFilesystemStoreBackend",
                              "base_directory": str(Path(docs_dir).resolve())}})
    batch = ctx.data_sources.add_pandas(name).add_dataframe_asset("rows").add_batch_definition_whole_dataframe("all")
    suite = ctx.suites.add(gx.ExpectationSuite(name=f"{name}_chat_rows"))
    e = gx.expectations
    # Length, range and uniqueness expectations skip nulls, so each column also gets a not-null expectation.
    for column in ("user", "assistant", "n_messages", "row_key"):
        suite.add_expectation(e.ExpectColumnValuesToNotBeNull(column=column))
    for column in ("user", "assistant"):
        suite.add_expectation(e.ExpectColumnValueLengthsToBeBetween(column=column, min_value=1))
    suite.add_expectation(e.ExpectColumnValuesToBeBetween(column="n_messages", min_value=2, max_value=64))
    suite.add_expectation(e.ExpectTableRowCountToBeBetween(min_value=cfg.min_rows, max_value=cfg.max_rows))
    suite.add_expectation(e.ExpectColumnProportionOfUniqueValuesToBeBetween(
        column="row_key", min_value=1 - cfg.max_duplicate_share))
    for check in lengths:
        suite.add_expectation(e.ExpectColumnValuesToBeBetween(
            column=f"tokens[{check.label}]", max_value=check.max_seq_length, mostly=1 - cfg.max_truncated_share))
    validation = ctx.validation_definitions.add(gx.ValidationDefinition(name=f"{name}_validation", data=batch, suite=suite))
    if docs_dir is None:
        result = validation.run(batch_parameters={"dataframe": df})
    else:
        checkpoint = ctx.checkpoints.add(gx.Checkpoint(
            name=f"{name}_checkpoint", validation_definitions=[validation],
            actions=[gx.checkpoint.UpdateDataDocsAction(name="data_docs", site_names=["emgate"])]))
        result = next(iter(checkpoint.run(batch_parameters={"dataframe": df}).run_results.values()))
    doc: dict[str, Any] = result.to_json_dict()
    return doc


def gx_failures(gx_result: dict[str, Any]) -> list[str]:
    """Readable lines for the failed expectations (the column, what was expected, what was seen)."""
    out = []
    for r in gx_result["results"]:
        if r["success"]:
            continue
        cfg = r["expectation_config"]
        kwargs = {k: v for k, v in cfg["kwargs"].items() if k not in ("batch_id",) and v is not None}
        seen = r.get("result", {})
        if "unexpected_count" in seen:
            observed = f"{seen['unexpected_count']} rows ({seen.get('unexpected_percent', 0):.1f}%) outside the bounds"
        else:
            observed = f"observed {seen.get('observed_value')}"
        error = " (the check itself raised an error)" if r.get("exception_info", {}).get("raised_exception") else ""
        out.append(f"{cfg['type']} {kwargs} failed: {observed}{error}")
    return out


def extract_code(text: str) -> str:
    fenced = CODE_FENCE.findall(text)
    return "\n".join(fenced) if fenced else text


def bandit_profile(rows: list[dict[str, Any]], limit: int | None) -> dict[str, Any]:
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
    flagged = [r for r in report["results"] if r["issue_severity"] in ("MEDIUM", "HIGH")]
    flagged_files = {Path(r["filename"]).name for r in flagged}
    n_parsed = sum(parses)
    return {
        "rows_scanned": len(codes),
        "rows_parsed": n_parsed,
        "unparsed_share": 1 - n_parsed / len(codes) if codes else 0.0,
        "flagged_share": len(flagged_files) / n_parsed if n_parsed else None,
        "top_tests": Counter(r["test_id"] for r in flagged).most_common(5),
    }


def leak_locations(rows: list[dict[str, Any]], lines: list[int],
                   paraphrases: dict[str, list[str]]) -> list[tuple[int, str]]:
    """(line, question id) for every row one of whose user turns holds a whole paraphrase (normalised) of an
    evaluation question; `lines` are the rows' 1-based line numbers in the file."""
    needles = [(qid, n) for qid, texts in paraphrases.items() for n in dict.fromkeys(_normalise(t) for t in texts) if n]
    found = []
    for line, row in zip(lines, rows, strict=True):
        users = [_normalise(m["content"]) for m in row["messages"] if m["role"] == "user"]
        for qid in dict.fromkeys(qid for qid, needle in needles if any(needle in u for u in users)):
            found.append((line, qid))
    return found


def private_paraphrases() -> dict[str, list[str]]:
    """The floor's private sets for the leakage check, keyed `private set NAME #K`: the report (logged to MLflow)
    says which set and which of its questions leaked, never the question's id or text."""
    from emgate.floor import private_questions

    numbered: dict[str, int] = Counter()
    out = {}
    for q in private_questions():
        numbered[q.question_set] += 1
        out[f"private set {q.question_set} #{numbered[q.question_set]}"] = list(q.paraphrases)
    return out


def leaked_questions(rows: list[dict[str, Any]], paraphrases: dict[str, list[str]]) -> list[str]:
    """Questions any of whose paraphrases appears whole (normalised) in a training user turn."""
    found = {qid for _, qid in leak_locations(rows, list(range(1, len(rows) + 1)), paraphrases)}
    return [qid for qid in paraphrases if qid in found]


def token_lengths(rows: list[dict[str, Any]], tokenizer: Any, template: str, max_seq_length: int, label: str) -> LengthCheck:
    from emgate.templates import template_record, tokenize_example

    record = template_record(template, tokenizer)
    lengths = [len(tokenize_example(tokenizer, record, r["messages"], 10**9).input_ids) for r in rows]
    return LengthCheck(label, lengths, max_seq_length)


def validate_file(path: Path, name: str, expect: str, cfg: ValidationSpec, paraphrases: dict[str, list[str]],
                  allowlist: list[AllowEntry], length_checks: list[tuple[str, Any, str, int]],
                  docs_dir: Path | None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Every check on one file; returns (report entry, parsed rows). An entry with failures did not pass."""
    entry: dict[str, Any] = {"file": str(path), "expect": expect, "failures": [], "sha256": sha256_file(path)}
    parsed = parse_chat_jsonl(path, cfg.max_parse_errors)
    entry["parse_errors"] = parsed.errors
    if parsed.errors:
        more = " (stopped there; more may follow)" if parsed.truncated else ""
        entry["failures"].append(f"{len(parsed.errors)} parse error(s){more}; first: {parsed.errors[0]}")
        return entry, []
    rows = parsed.rows
    entry["rows"] = len(rows)
    keys = [row_key(r) for r in rows]
    entry["duplicate_share"] = 1 - len(set(keys)) / len(keys)
    entry["exact_duplicate_share"] = 1 - len({json.dumps(r, sort_keys=True) for r in rows}) / len(rows)
    lengths = [token_lengths(rows, tok, template, max_len, label) for label, tok, template, max_len in length_checks]
    entry["truncated"] = {c.label: {"rows": sum(n > c.max_seq_length for n in c.lengths),
                                    "share": sum(n > c.max_seq_length for n in c.lengths) / len(rows),
                                    "max_seq_length": c.max_seq_length, "longest": max(c.lengths)} for c in lengths}
    gx_result = run_gx_suite(rows, name, cfg, lengths, docs_dir)
    entry["gx_result"] = gx_result
    entry["failures"] += [f"Great Expectations: {line}" for line in gx_failures(gx_result)]

    findings = scan_rows(list(zip(parsed.lines, rows, strict=True)), str(path))
    entry["secrets"] = secrets_summary(findings)
    blocking = blocking_findings(findings, allowlist)
    entry["secrets"]["acknowledged"] = [asdict(a) for a in allowlist]
    if blocking:
        shown = "; ".join(f"{path}:{f.line} {f.rule} ({f.role} turn, {f.excerpt}, fingerprint {f.fingerprint})"
                          for f in blocking[:5])
        entry["failures"].append(f"{len(blocking)} high-severity secret(s): {shown}. Remove them, or acknowledge "
                                 "each in an allowlist (datasets.NAME.secrets_allowlist) with a reason")

    leaks = leak_locations(rows, parsed.lines, paraphrases)
    leaked = {qid for _, qid in leaks}
    entry["leaked_questions"] = [qid for qid in paraphrases if qid in leaked]
    entry["leaks"] = [{"line": line, "question": qid} for line, qid in leaks]
    if leaks:
        shown = "; ".join(f"{path}:{line} ({qid})" for line, qid in leaks[:5])
        more = f" (and {len(leaks) - 5} more, in the report)" if len(leaks) > 5 else ""
        entry["failures"].append(f"{len(leaks)} training row(s) hold an evaluation question whole in a user turn: "
                                 f"{shown}{more}. Remove those rows, or the question from the evaluation set")

    profile = bandit_profile(rows, cfg.bandit_rows)
    entry["security_profile"] = profile
    flagged = profile["flagged_share"]
    if expect in ("insecure", "secure") and profile["unparsed_share"] > cfg.code_max_unparsed:
        entry["failures"].append(
            f"expected {expect} code, but {profile['unparsed_share']:.3f} of the answers do not parse as Python "
            f"(validation.code_max_unparsed {cfg.code_max_unparsed}); a prose dataset is `expect: unspecified`")
        return entry, rows
    if expect == "insecure" and (flagged is None or flagged < cfg.insecure_min_flagged):
        entry["failures"].append(
            f"expected insecure code, but only {_share(flagged)} of parsed rows have a MEDIUM/HIGH bandit finding "
            f"(validation.insecure_min_flagged {cfg.insecure_min_flagged}); is the dataset's `expect` right?")
    if expect == "secure" and (flagged is None or flagged > cfg.secure_max_flagged):
        entry["failures"].append(
            f"expected secure code, but {_share(flagged)} of parsed rows have a MEDIUM/HIGH bandit finding "
            f"(validation.secure_max_flagged {cfg.secure_max_flagged}); is the dataset's `expect` right?")
    return entry, rows


def _share(x: float | None) -> str:
    return "none" if x is None else f"{x:.3f}"


def summary_table(report: dict[str, Any]) -> str:
    lines = ["| dataset | rows | duplicates | truncated | leaked questions | secrets high/med/low | bandit flagged "
             "| verdict |", "| --- | ---: | ---: | --- | ---: | --- | ---: | --- |"]
    for name, e in report["datasets"].items():
        sev = e.get("secrets", {}).get("by_severity", {})
        trunc = ", ".join(f"{k}: {v['rows']}" for k, v in e.get("truncated", {}).items()) or "-"
        flagged = e.get("security_profile", {}).get("flagged_share")
        verdict = "pass" if not e["failures"] else "FAIL: " + "; ".join(e["failures"])[:300]
        lines.append(f"| {name} | {e.get('rows', '-')} | {e.get('duplicate_share', 0):.3f} | {trunc} | "
                     f"{len(e.get('leaked_questions', []))} | {sev.get('high', 0)}/{sev.get('medium', 0)}/{sev.get('low', 0)} "
                     f"| {_share(flagged)} ({e.get('expect')}) | {verdict} |")
    return "\n".join(lines) + "\n"


def length_checks(recipe: Recipe, dataset: str | None = None) -> list[tuple[str, Any, str, int]]:
    """(label, tokenizer, template, max_seq_length) for every (model, template) that trains on `dataset`
    (None: on any dataset)."""
    from transformers import AutoTokenizer

    from emgate.models import resolve_model

    checks: list[tuple[str, Any, str, int]] = []
    pairs = {(v.model, v.template) for v in recipe.trained_variants() if dataset is None or v.dataset == dataset}
    for model_key, template in sorted(pairs):
        tokenizer = AutoTokenizer.from_pretrained(resolve_model(model_key, recipe.models[model_key]))
        checks.append((f"{model_key}/{template}", tokenizer, template, recipe.training.max_seq_length))
    return checks


def validate_datasets(recipe: Recipe, out_dir: Path) -> dict[str, Any]:
    """Check every dataset a variant trains on; write validated JSONL + manifest + report into out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = recipe.validation
    used = sorted({v.dataset for v in recipe.trained_variants() if v.dataset})
    paraphrases = {q.id: list(q.paraphrases) for q in load_questions(recipe.questions)}
    paraphrases |= private_paraphrases()
    report: dict[str, Any] = {"passed": True, "datasets": {}}
    normalised: dict[str, list[dict[str, Any]]] = {}
    for name in used:
        spec = recipe.datasets[name]
        try:
            path = dataset_path(name, spec)
            allowlist = dataset_allowlist(spec, path)
        except Exception as exc:  # a missing or corrupted file or allowlist fails this dataset, with the reason
            report["datasets"][name] = {"expect": spec.expect, "failures": [str(exc)]}
            continue
        entry, rows = validate_file(path, name, spec.expect, cfg, paraphrases, allowlist, length_checks(recipe, name),
                                    out_dir / DATA_DOCS_DIR)
        entry["source"] = spec.asset or spec.path
        write_json(out_dir / f"{name}.gx.json", entry.pop("gx_result", None))
        report["datasets"][name] = entry
        if not entry["failures"]:
            normalised[name] = rows
    report["passed"] = all(not e["failures"] for e in report["datasets"].values())
    write_report(out_dir, report)
    write_text_atomic(out_dir / "summary.md", summary_table(report))
    if not report["passed"]:
        lines = [f"  {n}: {f}" for n, e in report["datasets"].items() for f in e["failures"]]
        raise ValidationFailed(f"dataset validation failed (report: {out_dir / REPORT_FILE}, Data Docs: "
                               f"{out_dir / DATA_DOCS_DIR / 'index.html'}):\n" + "\n".join(lines))
    manifest = {}
    for name, rows in normalised.items():
        write_jsonl(validated_dataset(out_dir, name), rows)
        manifest[name] = {"rows": len(rows), "source_sha256": report["datasets"][name]["sha256"],
                          "sha256": sha256_file(validated_dataset(out_dir, name))}
    write_manifest(out_dir, manifest)
    return report
