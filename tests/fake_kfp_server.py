"""FakeKfpServer: a test double of the Kubeflow Pipelines REST API (v2beta1), for unit tests only.

It keeps pipelines, pipeline versions, experiments and recurring runs in memory, answers the calls kfp.Client
makes for `emgate schedule`, and records every request (method, path, query, headers, body) so tests can check
what reached the cluster.
"""

from __future__ import annotations

import json
import threading
import uuid
from dataclasses import dataclass, field
from email.parser import BytesParser
from email.policy import HTTP
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

API = "/apis/v2beta1"


@dataclass
class Recorded:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]  # names in lower case
    body: Any = None  # parsed JSON, or {"fields": {...}, "file": text} for a multipart upload
    files: dict[str, str] = field(default_factory=dict)


def _multipart(content_type: str, raw: bytes) -> tuple[dict[str, str], dict[str, str]]:
    message = BytesParser(policy=HTTP).parsebytes(f"Content-Type: {content_type}\r\n\r\n".encode() + raw)
    fields: dict[str, str] = {}
    files: dict[str, str] = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        payload = part.get_payload(decode=True).decode()
        if part.get_filename():
            files[str(name)] = payload
        else:
            fields[str(name)] = payload
    return fields, files


class FakeKfpServer:
    def __init__(self) -> None:
        self.requests: list[Recorded] = []
        self.pipelines: dict[str, dict[str, Any]] = {}
        self.versions: dict[str, dict[str, Any]] = {}
        self.experiments: dict[str, dict[str, Any]] = {}
        self.recurring: dict[str, dict[str, Any]] = {}
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _handle(self) -> None:
                url = urlparse(self.path)
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                record = Recorded(self.command, url.path, parse_qs(url.query),
                                  {k.lower(): v for k, v in self.headers.items()})
                if raw and self.headers.get("Content-Type", "").startswith("multipart/"):
                    record.body, record.files = _multipart(self.headers["Content-Type"], raw)
                elif raw:
                    record.body = json.loads(raw)
                with outer.lock:
                    outer.requests.append(record)
                    status, data = outer.route(record)
                payload = json.dumps(data).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_POST = do_DELETE = _handle  # noqa: N815 (http.server's naming)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeKfpServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    # -- the API ---------------------------------------------------------------------------------------------
    def route(self, r: Recorded) -> tuple[int, Any]:
        q = {k: v[0] for k, v in r.query.items()}
        p = r.path.removeprefix(API)
        if r.method == "GET" and p == "/healthz":
            return 200, {"multi_user": False}
        if r.method == "GET" and p == "/pipelines":
            wanted = _display_name_filter(q.get("filter"))
            found = [x for x in self.pipelines.values() if wanted is None or x["display_name"] == wanted]
            return 200, {"pipelines": found, "total_size": len(found)} if found else {}
        if r.method == "POST" and p == "/pipelines/upload":
            name = q.get("name") or r.body.get("name")
            if any(x["display_name"] == name for x in self.pipelines.values()):
                return 409, {"error": f"pipeline {name} exists", "code": 6}
            pid = str(uuid.uuid4())
            self.pipelines[pid] = {"pipeline_id": pid, "display_name": name, "namespace": q.get("namespace", "")}
            vid = str(uuid.uuid4())
            self.versions[vid] = {"pipeline_id": pid, "pipeline_version_id": vid, "display_name": name,
                                  "spec": r.files.get("uploadfile", "")}
            return 200, self.pipelines[pid]
        if r.method == "POST" and p == "/pipelines/upload_version":
            pid = q.get("pipelineid") or r.body.get("pipelineid")
            if pid not in self.pipelines:
                return 404, {"error": f"no pipeline {pid}", "code": 5}
            vid = str(uuid.uuid4())
            self.versions[vid] = {"pipeline_id": pid, "pipeline_version_id": vid, "display_name": q.get("name"),
                                  "spec": r.files.get("uploadfile", "")}
            return 200, {k: v for k, v in self.versions[vid].items() if k != "spec"}
        if r.method == "GET" and p.startswith("/pipelines/") and p.endswith("/versions"):
            pid = p.split("/")[2]
            found = [{k: v for k, v in x.items() if k != "spec"} for x in self.versions.values() if x["pipeline_id"] == pid]
            return 200, {"pipeline_versions": found, "total_size": len(found)}
        if r.method == "GET" and p == "/experiments":
            wanted = _display_name_filter(q.get("filter"))
            found = [x for x in self.experiments.values() if wanted is None or x["display_name"] == wanted]
            return 200, {"experiments": found, "total_size": len(found)} if found else {}
        if r.method == "POST" and p == "/experiments":
            eid = str(uuid.uuid4())
            self.experiments[eid] = {"experiment_id": eid, "display_name": r.body["display_name"],
                                     "namespace": r.body.get("namespace") or ""}
            return 200, self.experiments[eid]
        if r.method == "GET" and p == "/recurringruns":
            found = [x for x in self.recurring.values() if x["experiment_id"] == q.get("experiment_id")]
            return 200, {"recurringRuns": found, "total_size": len(found)} if found else {}
        if r.method == "POST" and p == "/recurringruns":
            rid = str(uuid.uuid4())
            run = dict(r.body, recurring_run_id=rid, status="ENABLED" if r.body.get("mode") == "ENABLE" else "DISABLED")
            self.recurring[rid] = run
            return 200, run
        if r.method == "POST" and p.startswith("/recurringruns/") and p.endswith(":disable"):
            rid = p.split("/")[2].removesuffix(":disable")
            if rid not in self.recurring:
                return 404, {"error": f"no recurring run {rid}", "code": 5}
            self.recurring[rid].update(mode="DISABLE", status="DISABLED")
            return 200, {}
        return 404, {"error": f"FakeKfpServer does not implement {r.method} {r.path}", "code": 12}

    def enabled_runs(self) -> list[dict[str, Any]]:
        return [r for r in self.recurring.values() if r["status"] == "ENABLED"]

    def spec_of(self, version_id: str) -> str:
        return str(self.versions[version_id]["spec"])


def _display_name_filter(text: str | None) -> str | None:
    if not text:
        return None
    for predicate in json.loads(text).get("predicates", []):
        if predicate.get("key") in ("display_name", "name"):
            return str(predicate.get("string_value") or predicate.get("stringValue"))
    return None
