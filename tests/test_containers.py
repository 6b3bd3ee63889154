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
