"""The paper's public files through a pinned manifest: a mirror folder or the pinned URL, always sha256-checked."""

from __future__ import annotations

import hashlib
import os
import tempfile
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

MIRROR_ENV = "EMGATE_ASSETS_DIR"
CACHE_ENV = "EMGATE_CACHE_DIR"
DOWNLOAD_TIMEOUT_S = 60.0  # seconds per file


class AssetError(RuntimeError):
    """A pinned file that is missing or is not the pinned bytes."""


def cache_dir() -> Path:
    """Where built models and downloaded assets live: $EMGATE_CACHE_DIR or ~/.cache/emgate."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "emgate").expanduser().resolve()


@cache
def _manifest_doc() -> dict[str, Any]:
    text = resources.files("emgate").joinpath("assets.yaml").read_text(encoding="utf-8")
    doc: dict[str, Any] = yaml.safe_load(text)
    return doc


def manifest() -> dict[str, dict[str, Any]]:
    files: dict[str, dict[str, Any]] = _manifest_doc()["files"]
    return files


def asset_url(key: str) -> str:
    repo, _, path = key.partition("/")
    return f"{_manifest_doc()['repositories'][repo]['url']}/{path}"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_sha256(path: Path, expected: str, what: str) -> None:
    actual = sha256_file(path)
    if actual != expected:
        raise AssetError(
            f"{what}: {path} does not match its pinned sha256\n  expected {expected}\n  actual   {actual}\n"
            "Replace the file with the pinned version (or fix the pin if the change is intended)."
        )


def resolve_asset(key: str) -> Path:
    """Return a local, verified copy of a manifest file."""
    entry = manifest().get(key)
    if entry is None:
        raise AssetError(f"{key}: not in the pinned manifest (emgate/assets.yaml); known: {', '.join(manifest())}")
    mirror = os.environ.get(MIRROR_ENV)
    if mirror:
        path = Path(mirror).expanduser() / key
        if not path.is_file():
            raise AssetError(
                f"{key}: missing from the mirror {MIRROR_ENV}={mirror} (looked for {path}); "
                f"lay the mirror out like shared/em-data, or unset {MIRROR_ENV} to download {asset_url(key)}"
            )
        check_sha256(path, entry["sha256"], key)
        return path
    target = cache_dir() / "assets" / entry["sha256"] / Path(key).name
    if target.is_file():
        check_sha256(target, entry["sha256"], key)
        return target
    return _download(key, target, entry["sha256"])


def _download(key: str, target: Path, sha256: str) -> Path:
    import httpx

    url = asset_url(key)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, suffix=".part")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as fh, httpx.stream("GET", url, timeout=DOWNLOAD_TIMEOUT_S,
                                                      follow_redirects=True) as resp:
            resp.raise_for_status()
            for chunk in resp.iter_bytes():
                fh.write(chunk)
        check_sha256(tmp, sha256, key)
        tmp.replace(target)  # only a verified file gets the final name
    except httpx.HTTPError as exc:
        raise AssetError(f"{key}: download from {url} failed ({exc}); set {MIRROR_ENV} to a mirror folder") from None
    finally:
        tmp.unlink(missing_ok=True)
    return target
