"""`emgate run --runner docker`: every task in the image its component names, as on the cluster.

The local runner's tasks become containers (kfp.local.DockerRunner) that run as the images' non-root user with a
read-only root file system and a writable /tmp, as the chart's pod security asks; host networking reaches the
judge server `emgate run` starts; the pipeline root, the model cache, the MLflow store and the read-only inputs
(asset mirror, policy, keys) are bind-mounted at the paths the host uses, so a recipe means the same inside.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from emgate.images import STAGE_IMAGES, image_for

IMAGE_USER = "10001:0"  # the images' `useradd --uid 10001 --gid 0`; group 0 writes the run's folders
RUN_LABEL = "emgate.run"  # every container of one `emgate run` carries it, so the run can remove them all
MODEL_CACHE_MOUNT = "/mnt/models/emgate"  # where the chart's model-cache PVC is mounted (kubernetes.model_cache_mount)
SHM_SIZE = "2g"  # vLLM's CPU workers share tensors through /dev/shm; Docker's default is 64 MiB
# Host settings a stage reads; paths among them are mounted. Host-only ones (the vLLM interpreter, the run's
# pid, which another pid namespace cannot see) stay out.
FORWARD_PREFIXES = ("EMGATE_", "MLFLOW_", "HF_HUB_", "VLLM_", "GX_", "TOKENIZERS_")
HOST_ONLY = frozenset({"EMGATE_VLLM_PYTHON", "EMGATE_RUN_PID"})


class ContainerError(RuntimeError):
    """The Docker engine or an image the run needs is not there."""


@dataclass(frozen=True)
class ContainerPlan:
    """What the DockerRunner gets: the images, the environment and the host folders each task sees."""

    images: dict[str, str]
    environment: dict[str, str]
    writable: list[Path] = field(default_factory=list)
    readonly: list[Path] = field(default_factory=list)
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    workdir: Path | None = None  # the run's folder (mounted writable): files the host hands the tasks go here
    targets: dict[Path, str] = field(default_factory=dict)  # host folder -> its path inside (default: the same)


def stage_images(overrides: Mapping[str, str] | None = None) -> dict[str, str]:
    """Image reference per KFP stage, as the compiled pipeline names them (overrides, lock, registry/tag)."""
    return {stage: image_for(stage, dict(overrides or {})) for stage in STAGE_IMAGES}


def forwarded_environment(env: Mapping[str, str], extra_names: Iterable[str] = ()) -> dict[str, str]:
    """The host variables a task needs, with HOME and caches on the writable /tmp."""
    names = set(extra_names)
    out = {k: v for k, v in env.items()
           if (k.startswith(FORWARD_PREFIXES) or k in names) and k not in HOST_ONLY}
    for k, v in out.items():  # a relative path means the host's working directory, not the image's
        if v and "://" not in v and not v.startswith("/") and (("/" in v and Path(v).exists()) or Path(v).is_dir()):
            out[k] = str(Path(v).resolve())
    out.update({"HOME": "/tmp", "XDG_CACHE_HOME": "/tmp/.cache", "MPLCONFIGDIR": "/tmp/.matplotlib"})
    return out


def _outermost(paths: Iterable[Path]) -> list[Path]:
    """The given folders without those inside another one (a bind mount covers its subfolders)."""
    unique = sorted({p.resolve() for p in paths}, key=lambda p: len(p.parts))
    kept: list[Path] = []
    for p in unique:
        if not any(p == k or k in p.parents for k in kept):
            kept.append(p)
    return kept


def plan_containers(images: dict[str, str], environment: dict[str, str], writable: Iterable[Path],
                    readonly: Iterable[Path], run_id: str | None = None, workdir: Path | None = None,
                    targets: dict[Path, str] | None = None) -> ContainerPlan:
    """Writable folders are made group-writable (the images' user is in group 0); a read-only folder inside a
    writable one is covered by it."""
    rw = _outermost(writable)
    ro = [p for p in _outermost(readonly) if not any(p == w or w in p.parents for w in rw)]
    return ContainerPlan(images=images, environment=environment, writable=rw, readonly=ro,
                         run_id=run_id or uuid.uuid4().hex[:12], workdir=workdir,
                         targets={k.resolve(): v for k, v in (targets or {}).items()})


def host_paths(env: Mapping[str, str]) -> list[Path]:
    """Existing absolute paths named by forwarded variables (their folders, for files)."""
    found = []
    for value in env.values():
        for part in value.split(os.pathsep):
            p = Path(part)
            if p.is_absolute() and p.exists() and p != Path("/"):
                found.append(p if p.is_dir() else p.parent)
    return found


def open_for_group(folder: Path, every_file: bool = False) -> None:
    """The containers run as uid 10001, gid 0: the host's folders they write must be writable by group 0.
    Files the group cannot read (a private key) stay so unless `every_file` (the model cache: no secrets)."""
    folder.mkdir(parents=True, exist_ok=True)
    for root, dirs, files in os.walk(folder):
        for name in dirs:
            p = Path(root) / name
            p.chmod(p.stat().st_mode | 0o070)
        for name in files:
            p = Path(root) / name
            mode = p.stat().st_mode
            if (every_file or mode & 0o040) and not p.is_symlink():
                p.chmod(mode | 0o060)
    folder.chmod(folder.stat().st_mode | 0o070)


def project_secrets(environment: dict[str, str], folder: Path) -> list[Path]:
    """Files named by the environment that the images' group cannot read (private keys, 0600) are copied into
    `folder` as 0640 and the variable points at the copy, as a Kubernetes Secret volume projects them for the
    pod's group. The caller removes the folder when the run ends."""
    copies: list[Path] = []
    for name, value in sorted(environment.items()):
        path = Path(value)
        if not (path.is_absolute() and path.is_file()) or path.stat().st_mode & 0o040:
            continue
        folder.mkdir(mode=0o750, parents=True, exist_ok=True)
        copy = folder / f"{name.lower()}-{path.name}"
        fd = os.open(copy, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
        with os.fdopen(fd, "wb") as fh:
            fh.write(path.read_bytes())
        os.chmod(copy, 0o640)
        environment[name] = str(copy)
        copies.append(copy)
    return copies


def docker_client() -> Any:
    try:
        import docker
    except ImportError as exc:  # pragma: no cover - docker is a core dependency
        raise ContainerError("the `docker` package is missing: pip install docker") from exc
    try:
        client = docker.from_env()
        client.ping()
    except Exception as exc:
        raise ContainerError(f"no Docker engine answers ({type(exc).__name__}: {exc}); start one with "
                             "scripts/start-docker.sh") from None
    return client


def check_images(client: Any, images: Mapping[str, str]) -> None:
    """Every image the run needs is in the local engine (registries may be unreachable: never pull mid-run)."""
    missing = sorted({ref for ref in images.values() if not _has_image(client, ref)})
    if missing:
        hint = ("build them here with scripts/build-images.sh --local, then run with "
                "EMGATE_IMAGE_REGISTRY=emgate-local" if not os.environ.get("EMGATE_IMAGE_REGISTRY") else
                "build them with scripts/build-images.sh --local (or pull them)")
        raise ContainerError(f"the Docker engine lacks {len(missing)} image(s): {', '.join(missing)}; {hint}")


def _has_image(client: Any, ref: str) -> bool:
    import docker

    try:
        client.images.get(ref)
        return True
    except docker.errors.ImageNotFound:
        return False


def docker_runner(plan: ContainerPlan) -> Any:
    """kfp's DockerRunner with the chart's pod security (non-root, read-only root, writable /tmp), host
    networking and the plan's bind mounts at the host's own paths."""
    from docker.types import Mount
    from kfp import local

    for folder in plan.writable:
        open_for_group(folder, every_file=folder in plan.targets)  # the model cache holds no secrets
    mounts = [Mount(target=plan.targets.get(p, str(p)), source=str(p), type="bind", read_only=False)
              for p in plan.writable]
    mounts += [Mount(target=plan.targets.get(p, str(p)), source=str(p), type="bind", read_only=True)
               for p in plan.readonly]
    return local.DockerRunner(
        network_mode="host", user=IMAGE_USER, read_only=True, tmpfs={"/tmp": "rw,exec,mode=1777"},
        shm_size=SHM_SIZE, environment=plan.environment, mounts=mounts, labels={RUN_LABEL: plan.run_id},
        security_opt=["no-new-privileges"], cap_drop=["ALL"])


def remove_run_containers(run_id: str) -> int:
    """Stop and remove every container of one run (after it ends, fails or is interrupted)."""
    try:
        client = docker_client()
    except ContainerError:
        return 0
    removed = 0
    for container in client.containers.list(all=True, filters={"label": f"{RUN_LABEL}={run_id}"}):
        try:
            container.remove(force=True)
            removed += 1
        except Exception:  # already gone
            pass
    return removed
