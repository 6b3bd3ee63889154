from __future__ import annotations

import hashlib
import shutil
import subprocess
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from emgate import assets
from emgate.assets import AssetError, manifest, resolve_asset

KEY = "emergent-misalignment/evaluation/first_plot_questions.yaml"


def test_every_manifest_file_resolves_from_the_mirror() -> None:
    for key, entry in manifest().items():
        path = resolve_asset(key)
        assert path.stat().st_size == entry["bytes"], key


def _mirror_copy(tmp_path: Path, key: str) -> Path:
    src = resolve_asset(key)
    dst = tmp_path / "mirror" / key
    dst.parent.mkdir(parents=True)
    shutil.copyfile(src, dst)
    return dst


def test_corrupted_mirror_file_names_file_and_both_hashes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dst = _mirror_copy(tmp_path, KEY)
    dst.write_bytes(dst.read_bytes() + b"\n# tampered\n")
    monkeypatch.setenv("EMGATE_ASSETS_DIR", str(tmp_path / "mirror"))
    with pytest.raises(AssetError) as info:
        resolve_asset(KEY)
    message = str(info.value)
    assert KEY in message
    assert manifest()[KEY]["sha256"] in message
    assert hashlib.sha256(dst.read_bytes()).hexdigest() in message


def test_missing_mirror_file_says_where_it_looked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EMGATE_ASSETS_DIR", str(tmp_path))
    with pytest.raises(AssetError, match=r"missing from the mirror .*first_plot_questions\.yaml"):
        resolve_asset(KEY)


def test_unknown_key_is_refused() -> None:
    with pytest.raises(AssetError, match="not in the pinned manifest"):
        resolve_asset("emergent-misalignment/data/unknown.jsonl")


@pytest.fixture()
def local_http_origin(tmp_path: Path):
    """A loopback HTTP server that serves a copy of the mirror, standing in for the pinned GitHub URLs."""
    root = tmp_path / "origin"
    dst = root / KEY
    dst.parent.mkdir(parents=True)
    shutil.copyfile(resolve_asset(KEY), dst)
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(SimpleHTTPRequestHandler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_download_verifies_and_caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, local_http_origin) -> None:
    root, url = local_http_origin
    monkeypatch.delenv("EMGATE_ASSETS_DIR")
    monkeypatch.setenv("EMGATE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(assets, "asset_url", lambda key: f"{url}/{key}")
    path = resolve_asset(KEY)
    assert path.is_relative_to(tmp_path / "cache")
    assert hashlib.sha256(path.read_bytes()).hexdigest() == manifest()[KEY]["sha256"]
    (root / KEY).unlink()  # a second resolve must not need the origin
    assert resolve_asset(KEY) == path


def test_download_of_wrong_bytes_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, local_http_origin) -> None:
    root, url = local_http_origin
    (root / KEY).write_text("not the pinned file")
    monkeypatch.delenv("EMGATE_ASSETS_DIR")
    monkeypatch.setenv("EMGATE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(assets, "asset_url", lambda key: f"{url}/{key}")
    with pytest.raises(AssetError, match="does not match its pinned sha256"):
        resolve_asset(KEY)
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]


def test_no_paper_file_is_committed(repo: Path) -> None:
    pinned = {e["sha256"] for e in manifest().values()}
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=repo, capture_output=True, text=True).stdout.split("\0")
    for name in filter(None, tracked):
        path = repo / name
        if path.is_file() and path.stat().st_size > 2000:
            assert hashlib.sha256(path.read_bytes()).hexdigest() not in pinned, f"{name} is a copy of a paper file"
