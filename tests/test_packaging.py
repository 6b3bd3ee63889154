"""The package builds without setuptools' package-discovery warnings, and its data files ship in the wheel."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile
from importlib.resources import files
from pathlib import Path


def test_the_wheel_builds_without_warnings_and_ships_the_data_files(repo: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"  # a copy, so the build's build/ and egg-info stay out of the checkout
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(repo / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(repo / "components", src / "components", ignore=ignore)
    shutil.copytree(repo / "pipelines", src / "pipelines", ignore=ignore)
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-cache-dir",
                           "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    output = proc.stdout + proc.stderr
    for warning in ("is absent from the `packages` configuration", "package discovery", r"Installing .* as data",
                    "`project.license` as a TOML table is deprecated"):
        assert not re.search(warning, output), warning
    [wheel] = (tmp_path / "dist").glob("emgate-*.whl")
    shipped = set(zipfile.ZipFile(wheel).namelist())
    expected = {f"emgate_pipelines/{p.relative_to(repo / 'pipelines')}" for p in (repo / "pipelines" / "recipes").rglob("*.yaml")}
    expected |= {f"emgate/{p.relative_to(repo / 'components' / 'emgate')}"
                 for p in (repo / "components" / "emgate" / "allowlists").rglob("*.yaml")}
    assert "emgate_pipelines/recipes/accelerate/fsdp.yaml" in expected and "emgate/py.typed" in shipped
    assert expected <= shipped, sorted(expected - shipped)


def test_the_accelerate_configs_are_package_resources() -> None:
    folder = files("emgate_pipelines") / "recipes" / "accelerate"
    assert {"ddp.yaml", "fsdp.yaml"} <= {p.name for p in folder.iterdir()}
