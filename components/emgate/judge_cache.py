"""A persistent cache of the judge's raw next-token distributions, so a rerun costs zero requests.

One row per judge request, keyed by the sha256 of everything that decides the answer: the judge model, the
messages (the filled prompt template: template text, question and answer; and the reply prefix in
digit_expansion), max_tokens, temperature, top_logprobs and seed. The scoring mode and mass rule decide which
requests are made and how they are aggregated, not what a request returns, so rescoring under another rule
reuses the same rows. SQLite in WAL mode: several judge processes may share one file.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
from pathlib import Path
from typing import Any

SCHEMA = "CREATE TABLE IF NOT EXISTS judge_requests (key TEXT PRIMARY KEY, model TEXT, dist TEXT, snapshot TEXT)"


def request_key(request: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(request, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


class JudgeCache:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(path), check_same_thread=False, timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(SCHEMA)
        self._db.commit()
        self.hits = 0
        self.stores = 0

    def get(self, request: dict[str, Any]) -> tuple[dict[str, float], str] | None:
        with self._lock:
            row = self._db.execute("SELECT dist, snapshot FROM judge_requests WHERE key = ?",
                                   (request_key(request),)).fetchone()
        if row is None:
            return None
        self.hits += 1
        return json.loads(row[0]), row[1] or ""

    def put(self, request: dict[str, Any], dist: dict[str, float], snapshot: str) -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO judge_requests VALUES (?, ?, ?, ?)",
                             (request_key(request), str(request.get("model")), json.dumps(dist), snapshot))
            self._db.commit()
        self.stores += 1

    def close(self) -> None:
        with self._lock:
            self._db.close()
