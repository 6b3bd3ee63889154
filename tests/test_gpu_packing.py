"""Packed training's GPU kernels against the CPU-checked row-by-row sdpa, on a CUDA GPU (skipped elsewhere): torch's
FlashAttention varlen (training.attention varlen, what auto picks there), FlexAttention with a document mask, and
Liger's fused linear cross-entropy. bfloat16, so equal to a tolerance rather than to 1e-5 as in test_packing.py."""

from __future__ import annotations

from typing import Any

import pytest

pytestmark = pytest.mark.gpu
torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from emgate.packing import ROW_ATTENTION, VARLEN_ATTENTION, liger_cross_entropy  # noqa: E402
from tests.factories import packing_spec, packing_step_gradients, tiny_lora_model  # noqa: E402


def gpu_step(attention: str | None, fused: Any = None, pack_length: int = 150) -> tuple[float, dict[str, Any]]:
    """The first packed step's loss and gradients on the GPU in bfloat16 with `attention` (and `fused`); pack_length
    150 gives packs of several lengths, some rows alone in theirs."""
    model = tiny_lora_model("qwen2").to(device="cuda", dtype=torch.bfloat16)
    cfg = packing_spec(pack_length=pack_length, accumulation=6)
    loss, grads, _ = packing_step_gradients(model, cfg, attention, "cuda", fused)
    return loss, grads


def assert_close(a: tuple[float, dict[str, Any]], b: tuple[float, dict[str, Any]]) -> None:
    assert a[0] == pytest.approx(b[0], rel=2e-2)
    for name, grad in a[1].items():
        cosine = torch.nn.functional.cosine_similarity(grad.flatten(), b[1][name].flatten(), dim=0)
        assert float(cosine) > 0.98, name


def test_varlen_and_flex_attention_train_as_row_by_row_sdpa() -> None:
    assert_close(gpu_step(VARLEN_ATTENTION), gpu_step(ROW_ATTENTION))
    # one pack: transformers compiles FlexAttention for each new length (max-autotune), minutes for several
    assert_close(gpu_step("flex_attention", pack_length=4096), gpu_step(ROW_ATTENTION, pack_length=4096))


def test_liger_fused_cross_entropy_trains_as_the_lm_head_loss() -> None:
    fused = liger_cross_entropy()
    if fused is None:
        pytest.skip("liger-kernel is not installed")
    assert_close(gpu_step(VARLEN_ATTENTION, fused), gpu_step(VARLEN_ATTENTION))
