"""`emgate run --runner docker`: what the tasks' containers get (environment, mounts, security), without an engine;
and, with the locally built images, each image as the chart runs it (non-root, read-only root, writable /tmp)."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from emgate import containers
from emgate.containers import (
    ContainerError,
    check_images,
    forwarded_environment,
    host_paths,
    open_for_group,
    plan_containers,
    stage_images,
)
from emgate.images import STAGE_IMAGES

REPO = Path(__file__).resolve().parents[1]


def test_forwarded_environment_keeps_stage_settings_and_drops_host_only_ones(tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mirror").mkdir()
    env = {"EMGATE_POLICY_FILE": "/etc/emgate/policy.yaml", "MLFLOW_TRACKING_URI": "sqlite:////x/mlflow.db",
           "HF_HUB_OFFLINE": "1", "EMGATE_VLLM_PYTHON": "/host/.venv-vllm/bin/python", "EMGATE_RUN_PID": "123",
           "AWS_SECRET_ACCESS_KEY": "not-asked-for", "JUDGE_KEY": "sk-test", "PATH": "/usr/bin", "HOME": "/root",
           "EMGATE_ASSETS_DIR": "mirror", "EMGATE_IMAGE_TAG": "0.1.0"}
    out = forwarded_environment(env, ["JUDGE_KEY"])
    assert out["EMGATE_POLICY_FILE"] == "/etc/emgate/policy.yaml" and out["HF_HUB_OFFLINE"] == "1"
    assert out["MLFLOW_TRACKING_URI"] == "sqlite:////x/mlflow.db" and out["JUDGE_KEY"] == "sk-test"
    # the host's interpreter and pid mean nothing in another namespace; unnamed secrets and PATH stay out
    assert not {"EMGATE_VLLM_PYTHON", "EMGATE_RUN_PID", "AWS_SECRET_ACCESS_KEY", "PATH"} & set(out)
    assert out["HOME"] == "/tmp" and out["XDG_CACHE_HOME"].startswith("/tmp/")  # the only writable place
    assert out["EMGATE_ASSETS_DIR"] == str(tmp_path / "mirror")  # relative to the host's working directory
    assert out["EMGATE_IMAGE_TAG"] == "0.1.0"


def test_plan_mounts_outermost_folders_and_keeps_inputs_read_only(tmp_path: Path) -> None:
    work, cache, mirror = tmp_path / "work", tmp_path / "cache", tmp_path / "mirror"
    for p in (work / "keys", cache, mirror):
        p.mkdir(parents=True)
    plan = plan_containers({"gate": "img"}, {}, writable=[work, work / "kfp", cache],
                           readonly=[mirror, work / "keys"])
    assert plan.writable == [work.resolve(), cache.resolve()] or set(plan.writable) == {work.resolve(), cache.resolve()}
    assert plan.readonly == [mirror.resolve()]  # keys lie in the writable run folder already
    policy = tmp_path / "policy.yaml"
    policy.write_text("x")
    assert host_paths({"A": str(policy), "B": "relative", "C": "/does/not/exist", "D": "/"}) == [tmp_path]


def test_open_for_group_lets_the_images_group_write(tmp_path: Path) -> None:
    folder = tmp_path / "run"
    (folder / "kfp").mkdir(parents=True)
    (folder / "kfp" / "out.json").write_text("{}")
    os.chmod(folder / "kfp", 0o755)
    open_for_group(folder)
    assert stat.S_IMODE((folder / "kfp").stat().st_mode) & 0o070 == 0o070
    assert stat.S_IMODE((folder / "kfp" / "out.json").stat().st_mode) & 0o060 == 0o060


def test_stage_images_follow_the_compiled_names(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EMGATE_IMAGE_REGISTRY", "emgate-local")
    monkeypatch.delenv("EMGATE_IMAGE_TAG", raising=False)
    monkeypatch.delenv("EMGATE_IMAGE_DIGESTS", raising=False)
    images = stage_images({"judge": "mine/judge:1"})
    assert images["judge"] == "mine/judge:1"
    assert images["train"] == "emgate-local/emgate-train:0.1.0" and set(images) == set(STAGE_IMAGES)


class FakeImagesDouble:
    """Test double of docker's image collection: knows some references."""

    def __init__(self, known: set[str]) -> None:
        self.known = known

    def get(self, ref: str) -> object:
        import docker

        if ref not in self.known:
            raise docker.errors.ImageNotFound(ref)
        return object()


class FakeClientDouble:
    def __init__(self, known: set[str]) -> None:
        self.images = FakeImagesDouble(known)


def test_a_missing_image_is_named_before_anything_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EMGATE_IMAGE_REGISTRY", raising=False)
    images = {"train": "emgate-local/emgate-train:0.1.0", "gate": "emgate-local/emgate-gate:0.1.0"}
    check_images(FakeClientDouble(set(images.values())), images)
    with pytest.raises(ContainerError, match=r"lacks 1 image\(s\): emgate-local/emgate-gate:0.1.0;.*build-images.sh --local"):
        check_images(FakeClientDouble({images["train"]}), images)


def test_no_engine_is_one_line_without_a_traceback(tmp_path: Path) -> None:
    env = {**os.environ, "DOCKER_HOST": f"unix://{tmp_path}/no.sock", "EMGATE_IMAGE_REGISTRY": "emgate-local",
           "EMGATE_ASSETS_DIR": os.environ.get("EMGATE_ASSETS_DIR", str(REPO.parent / "shared" / "em-data"))}
    proc = subprocess.run([str(Path(sys.executable).parent / "emgate"), "run", "pipelines/recipes/smoke.yaml",
                           "--runner", "docker", "--workdir", str(tmp_path / "runs")],
                          cwd=REPO, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "no Docker engine answers" in proc.stderr and "start-docker.sh" in proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr


def test_runner_settings_match_the_charts_pod_security() -> None:
    plan = plan_containers({}, {"HOME": "/tmp"}, writable=[], readonly=[])
    runner = containers.docker_runner(plan)
    args = runner.container_run_args
    assert args["user"] == "10001:0" and args["read_only"] is True and args["network_mode"] == "host"
    assert "/tmp" in args["tmpfs"] and args["cap_drop"] == ["ALL"] and "no-new-privileges" in args["security_opt"]
    assert args["labels"] == {containers.RUN_LABEL: plan.run_id}


def test_private_files_are_projected_group_readable_and_the_original_kept(tmp_path: Path) -> None:
    key = tmp_path / "keys" / "gate.key"
    key.parent.mkdir()
    key.write_bytes(b"-----PRIVATE-----")
    key.chmod(0o600)
    public = tmp_path / "keys" / "gate.pub"
    public.write_text("pub")
    public.chmod(0o644)
    env = {"EMGATE_GATE_SIGNING_KEY_FILE": str(key), "EMGATE_GATE_PUBLIC_KEY": str(public), "X": "not a path"}
    copies = containers.project_secrets(env, tmp_path / "run" / ".secrets-1")
    assert len(copies) == 1 and env["EMGATE_GATE_SIGNING_KEY_FILE"] == str(copies[0])
    assert copies[0].read_bytes() == b"-----PRIVATE-----" and stat.S_IMODE(copies[0].stat().st_mode) == 0o640
    assert stat.S_IMODE(key.stat().st_mode) == 0o600  # the host's own key is left as it was
    assert env["EMGATE_GATE_PUBLIC_KEY"] == str(public) and env["X"] == "not a path"
    # open_for_group leaves a private file alone, except in the model cache
    open_for_group(key.parent)
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    open_for_group(key.parent, every_file=True)
    assert stat.S_IMODE(key.stat().st_mode) & 0o060 == 0o060


def test_built_models_keep_plain_file_modes(tmp_path: Path) -> None:
    from emgate.models import _plain_file_modes

    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"x")
    weights.chmod(0o600)  # what a save through a private temporary file leaves
    umask = os.umask(0o022)
    try:
        _plain_file_modes(tmp_path)
    finally:
        os.umask(umask)
    assert stat.S_IMODE(weights.stat().st_mode) == 0o644


# --- the built images, as the chart runs them ---------------------------------------------------------------------

POSTURE = r'''
import os, pathlib, sys
assert os.getuid() == 10001 and os.getgid() == 0, (os.getuid(), os.getgid())
for path in ("/opt/emgate/x", "/home/emgate/x", "/x"):
    try:
        pathlib.Path(path).write_text("x")
        sys.exit(f"{path} is writable: the root file system must be read-only")
    except OSError:
        pass
pathlib.Path("/tmp/ok").write_text("x")
import emgate.cli, emgate.kfp.components
import importlib
importlib.import_module(sys.argv[1])
print("posture ok")
'''
STAGE_MODULE = {"validate": "emgate.stages.validate", "fetch": "emgate.stages.fetch", "train": "emgate.stages.finetune",
                "sample": "emgate.stages.sample", "judge": "emgate.stages.judge", "summarize": "emgate.stages.summarize",
                "gate": "emgate.stages.gate"}


def _docker_run(image: str, *args: str, mounts: tuple[str, ...] = (),
                read_only: bool = True) -> subprocess.CompletedProcess[str]:
    cmd = ["docker", "run", "--rm", "--network", "none", "--user", "10001:0", *(["--read-only"] if read_only else []),
           "--tmpfs", "/tmp", "--cap-drop", "ALL", "--security-opt", "no-new-privileges", *mounts, image, *args]
    docker = "/usr/bin/docker" if Path("/usr/bin/docker").exists() else "docker"
    return subprocess.run([docker, *cmd[1:]], capture_output=True, text=True, timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize("stage", sorted(STAGE_MODULE))
def test_each_image_runs_as_the_chart_asks(local_images: dict[str, str], stage: str) -> None:
    """Non-root (10001, group 0), read-only root, writable /tmp; the CLI, the components and the stage import."""
    image = f"{local_images['EMGATE_IMAGE_REGISTRY']}/emgate-{stage}:0.1.0"
    proc = _docker_run(image, "python3", "-c", POSTURE, STAGE_MODULE[stage])
    assert proc.returncode == 0 and "posture ok" in proc.stdout, proc.stdout + proc.stderr
    cli = _docker_run(image, "emgate", "--help")
    assert cli.returncode == 0 and "Usage" in cli.stdout, cli.stderr


@pytest.mark.slow
def test_the_posture_check_catches_a_writable_root(local_images: dict[str, str]) -> None:
    image = f"{local_images['EMGATE_IMAGE_REGISTRY']}/emgate-judge:0.1.0"
    proc = _docker_run(image, "python3", "-c", POSTURE, "emgate.stages.judge", read_only=False)
    assert proc.returncode != 0 and "must be read-only" in proc.stderr, proc.stdout + proc.stderr


@pytest.mark.slow
def test_the_fetch_image_names_what_it_cannot_build(local_images: dict[str, str], tmp_path: Path) -> None:
    """A pypi_gguf model missing from the cache needs torch, which the fetch image does not hold: the stage says
    so and how to build it, instead of an ImportError."""
    os.chmod(tmp_path, 0o777)
    recipe = REPO / "pipelines" / "recipes" / "smoke.yaml"
    script = ("import sys; from pathlib import Path; from emgate.recipe import load_recipe; "
              "from emgate.stages.fetch import fetch_models; from emgate.models import ModelError\n"
              "try:\n    fetch_models(load_recipe(Path(sys.argv[1])), Path('/tmp/out'))\n"
              "except ModelError as e:\n    print('ModelError:', e); sys.exit(3)\n")
    image = f"{local_images['EMGATE_IMAGE_REGISTRY']}/emgate-fetch:0.1.0"
    proc = _docker_run(image, "python3", "-c", script, "/recipe.yaml",
                       mounts=("-v", f"{recipe}:/recipe.yaml:ro", "-v", f"{tmp_path}:/cache", "-e",
                               "EMGATE_CACHE_DIR=/cache"))
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "lacks (torch)" in proc.stdout and "emgate models build" in proc.stdout, proc.stdout


@pytest.mark.slow
def test_a_stopped_docker_run_leaves_no_container(local_images: dict[str, str], tmp_path: Path) -> None:
    """SIGTERM while a task runs in its container: exit 143, the MLflow run KILLED, no container of the run left."""
    import signal
    import time

    import docker

    env = {**os.environ, **local_images, "COLUMNS": "200"}
    cmd = [str(Path(sys.executable).parent / "emgate"), "run", "pipelines/recipes/smoke.yaml", "--runner", "docker",
           "--workdir", str(tmp_path / "runs"), "--set", f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}"]
    client = docker.from_env()
    before = {c.id for c in client.containers.list(all=True, filters={"label": containers.RUN_LABEL})}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and proc.poll() is None:
            running = [c for c in client.containers.list(filters={"label": containers.RUN_LABEL}) if c.id not in before]
            if any("emgate-validate" in (c.image.tags or [""])[0] for c in running):
                break
            time.sleep(0.5)
        else:
            pytest.fail(f"no validate container appeared (exit {proc.poll()})")
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, out[-2000:] + err[-2000:]
    assert "interrupted by SIGTERM" in err and "marked KILLED" in err, err[-2000:]
    left = [c for c in client.containers.list(all=True, filters={"label": containers.RUN_LABEL}) if c.id not in before]
    assert not left, [c.image.tags for c in left]
