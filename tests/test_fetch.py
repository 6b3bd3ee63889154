"""fetch_model: hub and S3 models land in the cache only after their sha256 checks pass.

The hub is FakeHubServer and S3 is moto's server (test doubles); the download code is the real
huggingface_hub and boto3, run through `emgate models build` in a subprocess so the hub client reads
HF_ENDPOINT at import as it would in the fetch image.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.fake_hub_server import FakeHubServer

REVISION = "0123456789abcdef0123456789abcdef01234567"
KEY = "smollm2-135m-instruct"  # the smoke recipe's model key: every other section refers to it


@pytest.fixture()
def model_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "upstream"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    (folder / "model.safetensors").write_bytes(os.urandom(4096))
    (folder / "tokenizer.json").write_text("{}")
    return folder


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def fetch(tmp_path: Path, smoke_recipe_path: Path, spec: dict, env: dict[str, str]) -> subprocess.CompletedProcess:
    data = yaml.safe_load(smoke_recipe_path.read_text())
    data["models"][KEY] = spec
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(data))
    full_env = {**os.environ, "EMGATE_CACHE_DIR": str(tmp_path / "cache"), "HF_HOME": str(tmp_path / "hf"),
                "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_XET": "1", **env}
    return subprocess.run([sys.executable, "-m", "emgate.cli", "models", "build", str(recipe)], env=full_env,
                          capture_output=True, text=True, timeout=300)


def cached_folders(tmp_path: Path) -> list[Path]:
    models = tmp_path / "cache" / "models"
    return sorted(p for p in models.iterdir() if not p.name.startswith(".")) if models.is_dir() else []


def hub_spec(**extra: object) -> dict:
    return {"source": "hub", "kind": "instruct", "repo": "acme/tiny-model", "revision": REVISION, **extra}


def test_hub_model_is_fetched_at_its_commit_and_checked(tmp_path, smoke_recipe_path, model_folder) -> None:
    with FakeHubServer(model_folder, "acme/tiny-model", REVISION) as hub:
        proc = fetch(tmp_path, smoke_recipe_path, hub_spec(), {"HF_ENDPOINT": hub.url})
        assert proc.returncode == 0, proc.stdout + proc.stderr
        [folder] = cached_folders(tmp_path)
        assert (folder / "model.safetensors").read_bytes() == (model_folder / "model.safetensors").read_bytes()
        stamp = json.loads((folder / "emgate_fetched.json").read_text())
        assert stamp["sha256"] == {"model.safetensors": sha(model_folder / "model.safetensors")}  # the hub's record
        assert stamp["source"]["revision"] == REVISION
        downloads = len(hub.downloads)
        again = fetch(tmp_path, smoke_recipe_path, hub_spec(), {"HF_ENDPOINT": hub.url})
        assert again.returncode == 0 and len(hub.downloads) == downloads  # the cache is reused


def test_corrupt_hub_download_leaves_nothing_in_the_cache(tmp_path, smoke_recipe_path, model_folder) -> None:
    with FakeHubServer(model_folder, "acme/tiny-model", REVISION, corrupt="model.safetensors") as hub:
        proc = fetch(tmp_path, smoke_recipe_path, hub_spec(), {"HF_ENDPOINT": hub.url})
    assert proc.returncode == 1
    assert f"model.safetensors from acme/tiny-model@{REVISION} has sha256" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert cached_folders(tmp_path) == []
    assert not any((tmp_path / "cache" / "models").iterdir())  # no half-written hidden folder either


def test_recipe_sha256_must_agree_with_the_hub(tmp_path, smoke_recipe_path, model_folder) -> None:
    wrong = hub_spec(sha256={"model.safetensors": "0" * 64})
    with FakeHubServer(model_folder, "acme/tiny-model", REVISION) as hub:
        proc = fetch(tmp_path, smoke_recipe_path, wrong, {"HF_ENDPOINT": hub.url})
    assert proc.returncode == 1 and "the hub records" in proc.stderr
    assert cached_folders(tmp_path) == []


def test_private_hub_repo_needs_the_token(tmp_path, smoke_recipe_path, model_folder) -> None:
    with FakeHubServer(model_folder, "acme/tiny-model", REVISION, token="hf_secret_token") as hub:
        denied = fetch(tmp_path, smoke_recipe_path, hub_spec(), {"HF_ENDPOINT": hub.url, "HF_TOKEN": ""})
        assert denied.returncode == 1 and "needs HF_TOKEN" in denied.stderr, denied.stderr
        allowed = fetch(tmp_path, smoke_recipe_path, hub_spec(), {"HF_ENDPOINT": hub.url, "HF_TOKEN": "hf_secret_token"})
        assert allowed.returncode == 0, allowed.stderr
        assert "hf_secret_token" not in denied.stderr + denied.stdout + allowed.stderr + allowed.stdout


@pytest.fixture()
def s3(model_folder: Path):
    boto3 = pytest.importorskip("boto3")
    moto_server = pytest.importorskip("moto.server")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    env = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL_S3": url}
    client = boto3.client("s3", endpoint_url=url, aws_access_key_id="test", aws_secret_access_key="test",
                          region_name="us-east-1")
    client.create_bucket(Bucket="models")
    for path in model_folder.iterdir():
        client.upload_file(str(path), "models", f"tiny/v1/{path.name}")
    yield env
    server.stop()


def s3_spec(digest: str) -> dict:
    return {"source": "s3", "kind": "instruct", "uri": "s3://models/tiny/v1", "sha256": {"model.safetensors": digest}}


def test_s3_model_is_fetched_and_checked(tmp_path, smoke_recipe_path, model_folder, s3) -> None:
    proc = fetch(tmp_path, smoke_recipe_path, s3_spec(sha(model_folder / "model.safetensors")), s3)
    assert proc.returncode == 0, proc.stderr
    [folder] = cached_folders(tmp_path)
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "emgate_fetched.json", "model.safetensors",
                                                        "tokenizer.json"]


def test_s3_model_with_another_sha256_is_refused(tmp_path, smoke_recipe_path, s3) -> None:
    proc = fetch(tmp_path, smoke_recipe_path, s3_spec("f" * 64), s3)
    assert proc.returncode == 1 and "expected ffff" in proc.stderr and "nothing was put in the cache" in proc.stderr
    assert cached_folders(tmp_path) == []


def test_s3_model_without_checksums_is_refused_at_load(smoke_recipe_path) -> None:
    from emgate.recipe import RecipeError, recipe_from_mapping

    data = yaml.safe_load(smoke_recipe_path.read_text())
    data["models"][KEY] = {"source": "s3", "kind": "instruct", "uri": "s3://models/tiny/v1"}
    with pytest.raises(RecipeError, match="source s3 needs `sha256` for the weight files"):
        recipe_from_mapping(data)
