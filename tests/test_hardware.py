"""serving.dtype: auto resolves from the machine (CPU flags, GPU capability) before vLLM sees it."""

from __future__ import annotations

from pathlib import Path

import pytest

from emgate.hardware import AUTO_DTYPE_ENV, Machine, cpu_flags, resolve_dtype
from emgate.recipe import RecipeError, ServingSpec
from emgate.stages.sample import served_dtype, work_dir_for
from emgate.vllm_server import VllmServer

AVX2 = frozenset({"fpu", "sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw"})  # AVX-512 without its bf16 extension


@pytest.fixture(autouse=True)
def _no_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(AUTO_DTYPE_ENV, raising=False)


@pytest.mark.parametrize(("flags", "gpu", "expected"), [
    (AVX2, None, "float32"),
    (AVX2 | {"avx512_bf16"}, None, "bfloat16"),
    (AVX2 | {"amx_tile", "amx_bf16", "amx_int8"}, None, "bfloat16"),
    (frozenset(), None, "float32"),
    (AVX2, (9, 0), "bfloat16"),   # H100
    (AVX2, (8, 0), "bfloat16"),   # A100
    (AVX2 | {"avx512_bf16"}, (7, 5), "float16"),  # T4: no bfloat16 tensor cores, whatever the CPU
])
def test_auto_follows_the_hardware(flags: frozenset[str], gpu: tuple[int, int] | None, expected: str) -> None:
    assert resolve_dtype("auto", Machine(flags, gpu)) == expected


@pytest.mark.parametrize("explicit", ["bfloat16", "float16", "float32"])
def test_an_explicit_dtype_is_kept(explicit: str) -> None:
    assert resolve_dtype(explicit, Machine(AVX2, None)) == explicit


def test_the_override_variable_wins_and_is_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(AUTO_DTYPE_ENV, "float32")
    assert resolve_dtype("auto", Machine(AVX2 | {"avx512_bf16"}, None)) == "float32"
    assert resolve_dtype("bfloat16", Machine(AVX2, None)) == "bfloat16"  # only `auto` is affected
    monkeypatch.setenv(AUTO_DTYPE_ENV, "fp8")
    with pytest.raises(RecipeError, match=r"EMGATE_AUTO_DTYPE='fp8'.*bfloat16, float16, float32"):
        resolve_dtype("auto", Machine(AVX2, None))


def test_cpu_flags_are_read_from_cpuinfo(tmp_path: Path) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: fpu avx2 avx512_bf16 amx_tile\n\n"
                    "processor\t: 1\nflags\t\t: fpu avx2\n")
    assert cpu_flags(info) == {"fpu", "avx2", "avx512_bf16", "amx_tile"}
    assert cpu_flags(tmp_path / "missing") == frozenset()


def test_the_server_gets_the_resolved_dtype(monkeypatch: pytest.MonkeyPatch) -> None:
    for resolved in ("float32", "bfloat16"):
        monkeypatch.setenv(AUTO_DTYPE_ENV, resolved)
        cmd = VllmServer(model_path=Path("m"), served_name="m", serving=ServingSpec(), port=1).command()
        assert cmd[cmd.index("--dtype") + 1] == resolved
    assert ServingSpec().dtype == "auto"  # the default


def test_the_resolved_dtype_is_part_of_the_sample_resume_key(monkeypatch: pytest.MonkeyPatch, smoke_recipe) -> None:
    assert smoke_recipe.serving.dtype == "auto"
    keys = {}
    for resolved in ("float32", "bfloat16"):
        monkeypatch.setenv(AUTO_DTYPE_ENV, resolved)
        assert served_dtype(smoke_recipe) == resolved
        keys[resolved] = work_dir_for(smoke_recipe, "smollm2-135m-instruct", [])
    assert keys["float32"] != keys["bfloat16"]
    monkeypatch.setenv(AUTO_DTYPE_ENV, "float32")
    assert work_dir_for(smoke_recipe, "smollm2-135m-instruct", []) == keys["float32"]  # stable for one dtype
