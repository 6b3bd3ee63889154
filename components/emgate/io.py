"""Small file helpers: JSON and JSONL written atomically, so a failed stage leaves no half-written file."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any


def write_text_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> int:
    lines = [json.dumps(r, ensure_ascii=False, sort_keys=True) for r in rows]
    write_text_atomic(path, "".join(line + "\n" for line in lines))
    return len(lines)


class DataError(ValueError):
    """A stage's input artifact is unreadable, truncated or inconsistent; names the file and line."""


def read_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    with path.open(encoding="utf-8") as fh:
        for number, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path} line {number}: not valid JSON ({exc.msg} at column {exc.colno}); the file is "
                                "truncated or corrupt: rerun the stage that wrote it") from None
            if not isinstance(row, dict):
                raise DataError(f"{path} line {number}: expected a JSON object, found {type(row).__name__}")
            yield row


def read_rows_checked(path: Path, report_path: Path, count_key: str = "answers") -> list[dict[str, Any]]:
    """All rows of a stage's JSONL output, checked against the row count its report.json recorded."""
    rows = list(read_jsonl(path))
    if not report_path.is_file():
        raise DataError(f"{report_path} is missing: the stage that wrote {path.name} did not finish")
    expected = read_json(report_path).get(count_key)
    if expected != len(rows):
        raise DataError(f"{path} has {len(rows)} rows but {report_path.name} recorded {expected}: the file is truncated "
                        "or was changed after the stage finished; rerun that stage")
    return rows
