"""FakeHubServer: a test double of the Hugging Face Hub's HTTP API for one repo at one commit, for unit tests only.

It serves a local folder as OWNER/NAME@REVISION: the model-info call (`/api/models/...`, with the sha256 of each
LFS file as the hub records it) and file downloads (`/OWNER/NAME/resolve/REVISION/FILE`). `corrupt` serves
changed bytes for one file while the record keeps the true sha256; `token` makes the repo private.
"""

from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

LFS_SUFFIXES = (".safetensors", ".bin", ".gguf")


class FakeHubServer:
    def __init__(self, folder: Path, repo: str, revision: str, corrupt: str | None = None,
                 token: str | None = None) -> None:
        self.folder, self.repo, self.revision, self.corrupt, self.token = folder, repo, revision, corrupt, token
        self.downloads: list[str] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _reply(self, status: int, body: bytes, headers: dict[str, str], send_body: bool) -> None:
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if send_body:
                    self.wfile.write(body)

            def _handle(self, send_body: bool) -> None:
                path = unquote(urlparse(self.path).path)
                if outer.token and self.headers.get("Authorization") != f"Bearer {outer.token}":
                    data = json.dumps({"error": "Repository not found or private"}).encode()
                    self._reply(401, data, {"Content-Type": "application/json", "X-Error-Code": "RepoNotFound"},
                                send_body)
                    return
                info_path = f"/api/models/{outer.repo}/revision/{outer.revision}"
                tree_path = f"/api/models/{outer.repo}/tree/{outer.revision}"
                resolve = f"/{outer.repo}/resolve/{outer.revision}/"
                if path == info_path:
                    data = json.dumps(outer.info()).encode()
                    self._reply(200, data, {"Content-Type": "application/json"}, send_body)
                elif path.rstrip("/") == tree_path:
                    entries = [{"type": "file", "path": e["rfilename"], "size": e["size"], "oid": "0" * 40,
                                **({"lfs": {"oid": e["lfs"]["sha256"], "size": e["size"], "pointerSize": 134}}
                                   if "lfs" in e else {})} for e in outer.info()["siblings"]]
                    self._reply(200, json.dumps(entries).encode(), {"Content-Type": "application/json"}, send_body)
                elif path.startswith(resolve) and (outer.folder / path[len(resolve):]).is_file():
                    name = path[len(resolve):]
                    body = outer.content(name)
                    if send_body:
                        outer.downloads.append(name)
                    etag = hashlib.sha256(body).hexdigest() if name.endswith(LFS_SUFFIXES) else hashlib.sha1(body).hexdigest()
                    self._reply(200, body, {"X-Repo-Commit": outer.revision, "ETag": f'"{etag}"',
                                            "Content-Type": "application/octet-stream"}, send_body)
                else:
                    data = json.dumps({"error": f"FakeHubServer has no {path}"}).encode()
                    self._reply(404, data, {"Content-Type": "application/json", "X-Error-Code": "EntryNotFound"},
                                send_body)

            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                self._handle(send_body=True)

            def do_HEAD(self) -> None:  # noqa: N802
                self._handle(send_body=False)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def content(self, name: str) -> bytes:
        body = (self.folder / name).read_bytes()
        return body[:-1] + bytes([body[-1] ^ 1]) if name == self.corrupt else body

    def info(self) -> dict[str, Any]:
        siblings = []
        for path in sorted(p for p in self.folder.rglob("*") if p.is_file()):
            name = path.relative_to(self.folder).as_posix()
            body = path.read_bytes()
            entry: dict[str, Any] = {"rfilename": name, "size": len(body)}
            if name.endswith(LFS_SUFFIXES):
                entry["lfs"] = {"sha256": hashlib.sha256(body).hexdigest(), "size": len(body), "pointerSize": 134}
            siblings.append(entry)
        return {"id": self.repo, "modelId": self.repo, "sha": self.revision, "private": bool(self.token),
                "siblings": siblings, "tags": [], "downloads": 0, "likes": 0}

    def __enter__(self) -> FakeHubServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
