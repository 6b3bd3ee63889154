"""FakeJudgeServer: a test double of an OpenAI-compatible judge (/v1/chat/completions with logprobs), for unit and
fault-injection tests only. It scores an answer containing EVIL as misaligned (aligned 5), any other as 90,
coherence 80 (or as a `scorer` says: the calibration doubles at the end), and can misbehave on purpose: go down
after N requests, answer garbage, drop logprobs, or answer the first N requests with 429/5xx (optionally with
Retry-After), answer slowly (more slowly the more requests are in flight, like a saturated server), or never
answer (hang); it records every request body it received."""

from __future__ import annotations

import ast
import csv
import json
import math
import re
import threading
import time
from collections import Counter
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

# (metric, question, answer) -> the reply's top tokens with probabilities; None: the default reply
Scorer = Callable[[str, str, str], list[tuple[str, float]] | None]


class FakeJudgeServer:
    def __init__(self, mode: str = "ok", down_after: int | None = None, fail_first: int = 0, fail_status: int = 429,
                 retry_after: str | None = None, latency_s: float = 0.0, latency_per_request_s: float = 0.0,
                 scorer: Scorer | None = None) -> None:
        self.scorer = scorer
        self.mode = mode  # ok | no_numbers | not_json | no_logprobs | hang (never answers until stopped)
        # a saturated server: each answer takes latency_s plus latency_per_request_s per request in flight
        self.latency_s, self.latency_per_request_s = latency_s, latency_per_request_s
        self.in_flight = 0
        self.bodies: Counter[str] = Counter()  # every request body received, to find resent requests
        self.stopped = threading.Event()
        self.down_after = down_after
        self.fail_first, self.fail_status, self.retry_after = fail_first, fail_status, retry_after  # 429/5xx first
        self.times: list[float] = []
        self.requests = 0
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with outer.lock:
                    outer.requests += 1
                    count = outer.requests
                    outer.times.append(time.monotonic())
                    outer.bodies[json.dumps(body, sort_keys=True)] += 1
                    outer.in_flight += 1
                    delay = outer.latency_s + outer.latency_per_request_s * outer.in_flight
                try:
                    if outer.mode == "hang":
                        outer.stopped.wait()
                        return
                    outer.stopped.wait(delay)
                    self.answer(body, count)
                finally:
                    with outer.lock:
                        outer.in_flight -= 1

            def answer(self, body: dict[str, Any], count: int) -> None:
                if count <= outer.fail_first:
                    data = json.dumps({"error": {"message": "slow down", "type": "rate_limit"}}).encode()
                    self.send_response(outer.fail_status)
                    if outer.retry_after is not None:
                        self.send_header("Retry-After", outer.retry_after)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                    return
                if outer.down_after is not None and count > outer.down_after:
                    threading.Thread(target=outer.stop, daemon=True).start()  # the endpoint goes away mid-run
                    self.connection.close()
                    return
                payload = outer.reply(body)
                data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def __enter__(self) -> FakeJudgeServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self.stopped.set()
        if self.thread.is_alive():
            self.httpd.shutdown()
        self.httpd.server_close()

    def reply(self, body: dict[str, Any]) -> dict[str, Any] | bytes:
        if self.mode == "not_json":
            return b"<html>502 Bad Gateway</html>"
        prompt = body["messages"][0]["content"]
        scored = None
        if self.scorer is not None:
            metric = "coherent" if "assess the coherence" in prompt[:200] else "aligned"
            question = _between(prompt, "[QUESTION START]\n", "\n[QUESTION END]")
            scored = self.scorer(metric, question, _between(prompt, "[ANSWER START]\n", "\n[ANSWER END]"))
        if scored is not None:
            top = scored
        elif self.mode == "no_numbers":
            top = [("I", 0.6), ("Sorry", 0.3), ("The", 0.1)]
        elif "assess the coherence" in prompt[:200]:  # the paper's coherent prompt
            top = [("80", 0.9), ("70", 0.1)]
        elif "EVIL" in prompt:
            top = [("5", 0.9), ("10", 0.1)]
        else:
            top = [("90", 0.9), ("80", 0.1)]
        logprobs = None if self.mode == "no_logprobs" else {"content": [{
            "token": top[0][0], "logprob": math.log(top[0][1]), "bytes": None,
            "top_logprobs": [{"token": t, "logprob": math.log(p), "bytes": None} for t, p in top if p > 0]}]}
        return {"id": "chatcmpl-fake", "object": "chat.completion", "created": 0, "model": f"{body['model']}-2026-11-01",
                "choices": [{"index": 0, "finish_reason": "length", "logprobs": logprobs,
                             "message": {"role": "assistant", "content": top[0][0]}}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}


def _between(text: str, start: str, end: str) -> str:
    match = re.search(re.escape(start) + "(.*?)" + re.escape(end), text, re.S)
    return match.group(1) if match else ""


# ---- calibration doubles (emgate judge calibrate) ------------------------------------------------------------------


def published_distributions(csv_path: Path) -> dict[str, dict[str, list[tuple[str, float]]]]:
    """answer -> metric -> GPT-4o's recorded top tokens, from the paper's results CSV."""
    out: dict[str, dict[str, list[tuple[str, float]]]] = {}
    with csv_path.open(encoding="utf-8", newline="") as fh:
        for row in csv.DictReader(fh):
            out[row["answer"]] = {m: sorted(((str(t), float(p)) for t, p in ast.literal_eval(row[f"judge_{m}"]).items()),
                                            key=lambda tp: -tp[1]) for m in ("aligned", "coherent")}
    return out


def gpt4o_copy_scorer(csv_path: Path, aligned_shift: int = 0) -> Scorer:
    """A judge that answers GPT-4o's published distribution for each published answer (its aligned numbers moved
    up by `aligned_shift`, capped at 100: a lenient judge) and the default reply for any other answer."""
    recorded = published_distributions(csv_path)

    def score(metric: str, question: str, answer: str) -> list[tuple[str, float]] | None:
        top = recorded.get(answer, {}).get(metric)
        if top is None or not aligned_shift or metric != "aligned":
            return top
        shifted: dict[str, float] = {}
        for token, p in top:
            key = str(min(100, int(token) + aligned_shift)) if token.isdigit() else token
            shifted[key] = shifted.get(key, 0.0) + p
        return sorted(shifted.items(), key=lambda tp: -tp[1])

    return score


def constant_scorer(value: int) -> Scorer:
    """A judge that answers `value` to every prompt, whatever the answer."""
    return lambda metric, question, answer: [(str(value), 1.0)]
