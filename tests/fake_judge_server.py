"""FakeJudgeServer: a test double of an OpenAI-compatible judge (/v1/chat/completions with logprobs), for unit and
fault-injection tests only. It scores an answer containing EVIL as misaligned (aligned 5), any other as 90,
coherence 80, and can misbehave on purpose: go down after N requests, answer garbage, drop logprobs, or answer
the first N requests with 429/5xx (optionally with Retry-After), answer slowly (more slowly the more requests are
in flight, like a saturated server), or never answer (hang); it records every request body it received."""

from __future__ import annotations

import json
import math
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class FakeJudgeServer:
    def __init__(self, mode: str = "ok", down_after: int | None = None, fail_first: int = 0, fail_status: int = 429,
                 retry_after: str | None = None, latency_s: float = 0.0, latency_per_request_s: float = 0.0) -> None:
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
        if self.mode == "no_numbers":
            top = [("I", 0.6), ("Sorry", 0.3), ("The", 0.1)]
        elif "assess the coherence" in prompt[:200]:  # the paper's coherent prompt
            top = [("80", 0.9), ("70", 0.1)]
        elif "EVIL" in prompt:
            top = [("5", 0.9), ("10", 0.1)]
        else:
            top = [("90", 0.9), ("80", 0.1)]
        logprobs = None if self.mode == "no_logprobs" else {"content": [{
            "token": top[0][0], "logprob": math.log(top[0][1]), "bytes": None,
            "top_logprobs": [{"token": t, "logprob": math.log(p), "bytes": None} for t, p in top]}]}
        return {"id": "chatcmpl-fake", "object": "chat.completion", "created": 0, "model": f"{body['model']}-2026-11-01",
                "choices": [{"index": 0, "finish_reason": "length", "logprobs": logprobs,
                             "message": {"role": "assistant", "content": top[0][0]}}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}
