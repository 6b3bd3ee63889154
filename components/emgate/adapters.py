"""Adapters trained elsewhere: fetch a LoRA adapter named by a recipe variant's `adapter` URI into a local folder.

Sources: models:/NAME/VERSION and models:/NAME@ALIAS (the MLflow registry of the recipe's tracking URI; an alias
is resolved once, here, and the resolved version is what gets gated), s3://BUCKET/PREFIX (through MLflow's
artifact client, so boto3 and the usual AWS_* variables), hf://OWNER/REPO@REVISION (a pinned commit; the token
from HF_TOKEN) and a local folder (or file://). A fetched folder is a peft LoRA adapter, or a full model folder
(merged or fully fine-tuned) that sample_answers serves with a vLLM server of its own.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from emgate.merge import is_model_folder, weight_files, weights_sha256

WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")


class AdapterError(RuntimeError):
    """An adapter that cannot be fetched or is not a LoRA adapter; names the URI and the fix."""


@dataclass
class FetchedAdapter:
    variant: str
    uri: str
    path: str  # local folder
    registered_model: str | None  # set for models:/ sources: the decision lands on this version
    version: str | None
    weights_sha256: str
    rank: int  # LoRA rank; 0 for a model folder
    base_model: str | None
    kind: str = "lora"  # lora: served as a LoRA module of the base; model: a full model folder with its own server

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _download_mlflow(uri: str, dest: Path, tracking_uri: str) -> tuple[str, str]:
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from emgate.registry import ModelRef, RegistryError, parse_model_ref, resolve_version

    client = MlflowClient(tracking_uri)
    ref: ModelRef = parse_model_ref(uri, default_alias="champion")
    try:
        mv = resolve_version(client, ref)
    except RegistryError as exc:
        raise AdapterError(f"adapter {uri}: {exc} (tracking URI {tracking_uri})") from None
    version = str(mv.version)
    try:
        source = client.get_model_version_download_uri(ref.name, version)
        _download_uri(source, dest, tracking_uri)
    except MlflowException as exc:
        raise AdapterError(f"adapter {uri}: version {version}'s files ({mv.source}) cannot be downloaded: {exc}") from None
    return ref.name, version


def _download_uri(uri: str, dest: Path, tracking_uri: str) -> None:
    import mlflow

    with tempfile.TemporaryDirectory() as tmp:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=tmp, tracking_uri=tracking_uri))
        shutil.copytree(local, dest)


def _download_hub(uri: str, dest: Path) -> None:
    from huggingface_hub import snapshot_download

    repo, _, revision = uri.removeprefix("hf://").partition("@")
    try:
        snapshot_download(repo_id=repo, revision=revision, local_dir=str(dest))
    except Exception as exc:
        raise AdapterError(f"adapter {uri}: the hub download failed ({type(exc).__name__}: {exc}); check the repo, "
                           "the revision, HF_TOKEN for private repos and that HF_HUB_OFFLINE is not set") from None


def fetch_adapter(variant: str, uri: str, dest: Path, tracking_uri: str) -> FetchedAdapter:
    """Fetch `uri` into `dest` (replaced if present) and check it is a LoRA adapter."""
    if dest.exists():
        shutil.rmtree(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    registered, version = None, None
    try:
        if uri.startswith("models:/"):
            registered, version = _download_mlflow(uri, dest, tracking_uri)
        elif uri.startswith("s3://"):
            _download_uri(uri, dest, tracking_uri)
        elif uri.startswith("hf://"):
            _download_hub(uri, dest)
        else:
            local = Path(uri.removeprefix("file://")).expanduser()
            if not local.is_dir():
                raise AdapterError(f"adapter {uri}: no such folder (a path is read on the machine that runs "
                                   "sample_answers; on a cluster use models:/, s3:// or hf://)")
            shutil.copytree(local, dest)
    except AdapterError:
        shutil.rmtree(dest, ignore_errors=True)
        raise
    except Exception as exc:
        shutil.rmtree(dest, ignore_errors=True)
        raise AdapterError(f"adapter {uri}: cannot be fetched ({type(exc).__name__}: {exc})") from None
    config_path = dest / "adapter_config.json"
    weights = next((dest / w for w in WEIGHT_FILES if (dest / w).is_file()), None)
    if is_model_folder(dest) and weight_files(dest):  # a merged or fully fine-tuned model: served on its own
        config = json.loads((dest / "config.json").read_text())
        return FetchedAdapter(variant=variant, uri=uri, path=str(dest), registered_model=registered, version=version,
                              weights_sha256=weights_sha256(dest) or "", rank=0,
                              base_model=config.get("_name_or_path") or None, kind="model")
    if not config_path.is_file() or weights is None:
        found = sorted(p.name for p in dest.iterdir())[:10]
        shutil.rmtree(dest, ignore_errors=True)
        raise AdapterError(f"adapter {uri}: neither a peft LoRA adapter folder (adapter_config.json and "
                           f"{' or '.join(WEIGHT_FILES)}) nor a model folder (config.json and model*.safetensors); "
                           f"found {found}")
    config = json.loads(config_path.read_text())
    if config.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"adapter {uri}: peft_type {config.get('peft_type')}; vLLM serves LoRA adapters only")
    return FetchedAdapter(variant=variant, uri=uri, path=str(dest), registered_model=registered, version=version,
                          weights_sha256=hashlib.sha256(weights.read_bytes()).hexdigest(), rank=int(config.get("r", 8)),
                          base_model=config.get("base_model_name_or_path"))
