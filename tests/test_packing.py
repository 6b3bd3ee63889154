"""Packed, padding-free training (emgate/packing.py, train_loop): the rows of each optimizer step packed into
sequences train exactly as the same rows in padded micro-batches (same loss, same gradients, float32), and no
token of a pack attends to another row. Tiny random Llama and Qwen2 models with the paper's LoRA targets."""

from __future__ import annotations

from typing import Any

import pytest

from emgate.packing import ROW_ATTENTION, attention_implementation, collate_pack, pack_rows, split_packs
from emgate.stages.finetune import step_packs
from emgate.templates import IGNORE_INDEX, Example
from tests.factories import PACKING_PAD, PACKING_VOCAB
from tests.factories import packing_rows as rows
from tests.factories import packing_spec as spec
from tests.factories import packing_step_gradients as step_gradients
from tests.factories import tiny_lora_model as tiny_model

VOCAB, PAD = PACKING_VOCAB, PACKING_PAD


@pytest.mark.parametrize("kind", ["qwen2", "llama"])
def test_packed_steps_give_the_padded_micro_batches_loss_and_gradients(kind: str) -> None:
    import torch

    model = tiny_model(kind)
    loss0, grads0, feed0 = step_gradients(model, spec(pack_length=0, accumulation=6))  # all 12 rows, 6 micro-batches
    assert not feed0.packed
    assert sum(float(g.abs().sum()) for n, g in grads0.items() if "lora_A" in n) > 0  # both LoRA factors learn
    for pack_length in (4096, 150):  # one pack for the step; several, some rows alone in theirs
        for attention in ("auto", None):  # emgate's row-by-row sdpa; transformers' block-diagonal sdpa mask
            loss, grads, feed = step_gradients(model, spec(pack_length=pack_length, accumulation=6), attention)
            assert feed.packed and feed.logits_only, feed
            assert feed.attention == (ROW_ATTENTION if attention == "auto" else None)
            assert loss == pytest.approx(loss0, rel=1e-5, abs=1e-6), (pack_length, attention)
            assert grads.keys() == grads0.keys()
            for name, grad in grads.items():
                assert torch.allclose(grad, grads0[name], rtol=1e-5, atol=1e-5 * float(grads0[name].abs().max())), (
                    name, pack_length, attention, float((grad - grads0[name]).abs().max()))


def test_a_sliding_window_model_packs_with_its_own_windowed_masks() -> None:
    """A model whose sliding window (16 tokens) is shorter than its rows: auto keeps the model's own attention, whose
    packed masks keep the window, and trains as padded micro-batches; row-by-row sdpa, which sees whole rows, gives
    another loss (what choose_attention guards against), and asking for it is refused with the fix."""
    import torch

    from emgate.packing import choose_attention, sliding_window
    from emgate.stages.finetune import TrainingError, _feed, train_loop

    model = tiny_model("mistral-window")
    assert sliding_window(model.get_base_model().config) == 16
    loss0, grads0, _ = step_gradients(model, spec(pack_length=0, accumulation=6))
    loss, grads, feed = step_gradients(model, spec(pack_length=4096, accumulation=6))
    assert feed.packed and feed.attention is None
    assert loss == pytest.approx(loss0, rel=1e-5, abs=1e-6)
    for name, grad in grads.items():
        assert torch.allclose(grad, grads0[name], rtol=1e-5, atol=1e-5 * float(grads0[name].abs().max())), name
    whole_rows, _, _ = step_gradients(model, spec(pack_length=4096, accumulation=6), ROW_ATTENTION)
    assert abs(whole_rows - loss0) > 1e-4 * abs(loss0)
    cfg = spec(4096).model_copy(update={"attention": "rows"})
    with pytest.raises(TrainingError, match="sliding-window layers see only the last 16 tokens"):
        train_loop(model, rows(), list(range(12)), cfg, torch.device("cpu"), PAD)
    short_rows = spec(4096).model_copy(update={"max_seq_length": 16})  # no row is longer than the window
    assert _feed(model, short_rows, None, torch.device("cpu")).attention == ROW_ATTENTION
    assert choose_attention("auto", "sdpa", torch.device("cpu"), torch.float32, 16) is None
    assert sliding_window(tiny_model("qwen2").get_base_model().config) is None


def test_emgates_attention_functions_get_no_mask_for_a_pack_and_the_padding_mask_otherwise() -> None:
    """transformers builds no T x T mask for a pack under emgate's attention (they read the rows from RowSpans);
    a padded batch still gets sdpa's padding mask."""
    import torch
    from transformers import Qwen2Config
    from transformers.masking_utils import create_causal_mask

    from emgate.packing import register_row_attention

    register_row_attention()
    config = Qwen2Config(hidden_size=16, num_attention_heads=2, num_key_value_heads=1, num_hidden_layers=1)
    positions = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3]])
    embeds = torch.zeros(1, 9, 16)
    config._attn_implementation = "sdpa"
    assert create_causal_mask(config=config, inputs_embeds=embeds, attention_mask=None, cache=None,
                              position_ids=positions).shape == (1, 1, 9, 9)  # what sdpa itself would build
    config._attn_implementation = ROW_ATTENTION
    assert create_causal_mask(config=config, inputs_embeds=embeds, attention_mask=None, cache=None,
                              position_ids=positions) is None
    padding = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1, 1]])
    mask = create_causal_mask(config=config, inputs_embeds=embeds, attention_mask=padding, cache=None,
                              position_ids=torch.arange(9)[None])
    assert mask is not None and not bool(mask[0, 0, 5, 0]) and bool(mask[0, 0, 5, 2])


def test_packed_training_runs_the_same_steps_as_padded_training() -> None:
    """Three optimizer steps of train_loop (batch 2 x accumulation 2, the rows wrapping around): the same losses,
    the same tokens, and the model's attention implementation restored after the loop."""
    import torch

    from emgate.stages.finetune import train_loop

    runs = {}
    for pack_length in (0, 4096):
        model = tiny_model("qwen2")
        train = rows()
        result = train_loop(model, train, list(range(len(train))), spec(pack_length, accumulation=2, steps=3),
                            torch.device("cpu"), PAD)
        assert model.get_base_model().config._attn_implementation == "sdpa"
        assert result.feed.startswith("packed rows" if pack_length else "micro-batches padded")
        runs[pack_length] = result.losses, result.tokens
    assert runs[4096][1] == runs[0][1] == sum(len(e.input_ids) for e in rows()[:12])
    assert runs[4096][0] == pytest.approx(runs[0][0], rel=1e-5)
    assert len(set(runs[0][0])) == 3  # the steps differ: the comparison covers updated weights


def test_the_next_steps_rows_are_prepared_before_the_loop_waits_for_this_steps_loss(monkeypatch) -> None:
    """The loop collates step k+1 (and queues its copy to the device) before it reads step k's loss, the one point
    where it waits for the device; each step starts where the one before ended in the order, wrapping around, and
    nothing is prepared after the last step."""
    import torch

    import emgate.stages.finetune as finetune

    events: list[tuple[str, int]] = []
    prepare = finetune._prepare_step

    def recording_prepare(loop: Any, cursor: int) -> Any:
        events.append(("prepare", cursor))
        return prepare(loop, cursor)

    monkeypatch.setattr(finetune, "_prepare_step", recording_prepare)
    train = rows()
    cfg = spec(4096, batch=2, accumulation=3, steps=4).model_copy(update={"epochs": 2})  # 6 rows a step, 12 rows
    options = finetune.LoopOptions(on_step=lambda step, of, loss: events.append(("loss", step)))
    result = finetune.train_loop(tiny_model("qwen2"), train, list(range(len(train))), cfg, torch.device("cpu"),
                                 PACKING_PAD, options)
    assert events == [("prepare", 0), ("prepare", 6), ("loss", 1), ("prepare", 12), ("loss", 2), ("prepare", 18),
                      ("loss", 3), ("loss", 4)]
    seen = [train[i % len(train)] for i in range(24)]
    assert len(train) < 24 and result.tokens == sum(len(e.input_ids) for e in seen)


@pytest.mark.parametrize("kind", ["qwen2", "llama"])
@pytest.mark.parametrize("attention", ["sdpa", ROW_ATTENTION, "eager"])
def test_no_token_of_a_pack_attends_to_another_row(kind: str, attention: str) -> None:
    """Row B's logits in the pack [A, B, C] are B's logits alone, whatever A's tokens are; A's own logits move (the
    check can fail), and without restarting position ids B's logits do move (what packing must prevent)."""
    import torch

    model = tiny_model(kind).eval()
    a, b, c = rows()[1], rows()[4], rows()[6]
    a2 = Example([(t % (VOCAB - 1)) + 1 for t in a.input_ids[::-1]], a.labels)

    def logits(pack_rows_: list[Example], packed_positions: bool = True) -> Any:
        pack = collate_pack(pack_rows_)
        kwargs: dict[str, Any] = {"position_ids": pack.position_ids} if packed_positions else {}
        if attention == ROW_ATTENTION and packed_positions:
            kwargs["emgate_row_bounds"] = pack.spans
        with torch.no_grad(), attention_implementation(model, attention):
            return model(input_ids=pack.input_ids, use_cache=False, **kwargs).logits[0]

    na, nb = len(a.input_ids), len(b.input_ids)
    alone = logits([b])
    first, second = logits([a, b, c]), logits([a2, b, c])
    assert torch.allclose(first[na:na + nb], alone, atol=1e-5), float((first[na:na + nb] - alone).abs().max())
    assert torch.allclose(second[na:na + nb], alone, atol=1e-5)
    assert torch.allclose(first[na + nb:], second[na + nb:], atol=1e-5)  # C sees neither A nor B
    assert float((first[:na] - second[:na]).abs().max()) > 1e-3  # A's tokens changed A's logits
    leaky = logits([a, b, c], packed_positions=False), logits([a2, b, c], packed_positions=False)
    assert float((leaky[0][na:na + nb] - leaky[1][na:na + nb]).abs().max()) > 1e-3


def test_pack_rows_keeps_the_order_and_never_splits_a_row() -> None:
    train = rows()
    packs = pack_rows(train, 100)
    assert [e for p in packs for e in p] == train
    sizes = [sum(len(e.input_ids) for e in p) for p in packs]
    assert all(s <= 100 or len(p) == 1 for s, p in zip(sizes, packs, strict=True))
    assert [len(p) for p in packs if sum(len(e.input_ids) for e in p) > 100] == [1, 1]  # the 110 and 120-token rows
    assert all(sizes[i] + len(packs[i + 1][0].input_ids) > 100 for i in range(len(packs) - 1))  # greedy: each pack full
    assert pack_rows(train, 10**6) == [train]


def test_a_pack_predicts_only_inside_its_rows() -> None:
    a = Example([5, 6, 7], [IGNORE_INDEX, 6, 7])
    b = Example([8, 9, 10, 11], [8, IGNORE_INDEX, 10, 11])  # a learned first label: nothing in row b predicts it
    pack = collate_pack([a, b])
    assert pack.input_ids.tolist() == [[5, 6, 7, 8, 9, 10, 11]]
    assert pack.position_ids.tolist() == [[0, 1, 2, 0, 1, 2, 3]]
    assert pack.bounds == (0, 3, 7) and pack.cu_seqlens.tolist() == [0, 3, 7] and pack.spans.longest == 4
    assert pack.keep.tolist() == [0, 1, 4, 5] and pack.targets.tolist() == [6, 7, 10, 11]
    # the model's own loss shifts labels by one: row b's first label must not be a target of row a's last token
    assert pack.labels.tolist() == [[IGNORE_INDEX, 6, 7, IGNORE_INDEX, IGNORE_INDEX, 10, 11]]


def test_several_processes_share_each_steps_rows_with_as_many_packs_each() -> None:
    train = rows()
    step = [train[i:i + 2] for i in range(0, 12, 2)]  # 6 micro-batches of 2 rows
    for pack_length in (4096, 120, 60, 1):
        shares = [step_packs(step, pack_length, world=2, rank=r) for r in range(2)]
        assert len(shares[0]) == len(shares[1])  # FSDP: the same number of forward passes on every process
        for r, share in enumerate(shares):
            assert [e for p in share for e in p] == [e for j in range(r, 6, 2) for e in step[j]]
    assert step_packs(step, 4096) == [train]
    assert step_packs(step, 4096, world=3, rank=1) == [step[1] + step[4]]


def test_split_packs_cuts_at_row_boundaries_in_order() -> None:
    train = rows()
    split = split_packs([train[:5], train[5:7]], 4)
    assert split is not None and len(split) == 4 and [e for p in split for e in p] == train[:7]
    assert split_packs([train[:2]], 3) is None


def varlen_attn_reference_double(query: Any, key: Any, value: Any, cu_seq_q: Any, cu_seq_k: Any, max_q: int, max_k: int,
                                 *, scale: float | None = None, window_size: tuple[int, int] = (-1, -1),
                                 enable_gqa: bool = False) -> Any:
    """Test double of torch.nn.attention.varlen.varlen_attn (a CUDA FlashAttention kernel, absent on a CPU): the
    same contract, written with plain sdpa on each row. (T, heads, dim) in and out; causal only for window (-1, 0)."""
    import torch

    assert query.dtype == key.dtype == value.dtype and cu_seq_q.dtype == torch.int32 and cu_seq_q is cu_seq_k
    assert query.dim() == 3 and query.shape[0] == int(cu_seq_q[-1]) and max_q == max_k
    assert max_q == max(int(b - a) for a, b in zip(cu_seq_q[:-1], cu_seq_q[1:], strict=True))
    assert window_size == (-1, 0)  # emgate asks for causal attention
    assert enable_gqa == (query.shape[1] != key.shape[1])
    out = []
    for a, b in zip(cu_seq_q.tolist()[:-1], cu_seq_q.tolist()[1:], strict=True):
        q, k, v = (t[a:b].transpose(0, 1) for t in (query, key, value))
        out.append(torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale,
                                                                    enable_gqa=enable_gqa).transpose(0, 1))
    return torch.cat(out)


@pytest.mark.parametrize("kind", ["qwen2", "llama"])
def test_varlen_attention_trains_as_padded_micro_batches_with_a_reference_kernel_double(kind: str, monkeypatch) -> None:
    """emgate's VARLEN_ATTENTION around torch's varlen_attn: the (1, heads, T, dim) <-> (T, heads, dim) layout, the
    row offsets, causal window, grouped-query heads and scale it passes give the padded micro-batches' loss and
    gradients. The kernel is replaced by varlen_attn_reference_double here (it needs CUDA); test_gpu_packing runs
    the real one on a GPU."""
    import torch
    from torch.nn.attention import varlen

    from emgate.packing import VARLEN_ATTENTION

    calls: list[int] = []

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return varlen_attn_reference_double(*args, **kwargs)

    monkeypatch.setattr(varlen, "varlen_attn", counted)
    model = tiny_model(kind)
    loss0, grads0, _ = step_gradients(model, spec(pack_length=0, accumulation=6))
    loss, grads, feed = step_gradients(model, spec(pack_length=150, accumulation=6), VARLEN_ATTENTION)
    assert feed.spans and calls  # the kernel ran, once per layer and pack
    assert loss == pytest.approx(loss0, rel=1e-5, abs=1e-6)
    for name, grad in grads.items():
        assert torch.allclose(grad, grads0[name], rtol=1e-5, atol=1e-5 * float(grads0[name].abs().max())), name


def test_the_attention_setting_picks_what_runs_and_names_why_a_choice_cannot() -> None:
    import torch

    from emgate.packing import ROW_ATTENTION, VARLEN_ATTENTION, choose_attention, varlen_probe, varlen_unavailable

    cpu = torch.device("cpu")
    assert varlen_unavailable(cpu, torch.bfloat16) is not None
    assert choose_attention("auto", "sdpa", cpu, torch.float32) == ROW_ATTENTION
    assert choose_attention("auto", "eager", cpu, torch.float32) is None  # not an sdpa model: its own attention
    assert choose_attention("rows", "sdpa", cpu, torch.float32) == ROW_ATTENTION
    assert choose_attention("mask", "sdpa", cpu, torch.float32) is None
    with pytest.raises(ValueError, match="varlen cannot run here: it needs a CUDA GPU"):
        choose_attention("varlen", "sdpa", cpu, torch.bfloat16)
    with pytest.raises(ValueError, match="no backward pass on a CPU"):
        choose_attention("flex", "sdpa", cpu, torch.float32)
    with pytest.raises(ValueError, match="runs eager; use auto or mask"):
        choose_attention("rows", "eager", cpu, torch.float32)
    # the probe that keeps auto off a kernel this torch build lacks: here the real kernel fails (no CPU version)
    assert "varlen_attn failed a test call here (NotImplementedError" in str(varlen_probe("cpu", torch.bfloat16))
    if torch.cuda.is_available() and varlen_unavailable(torch.device("cuda"), torch.bfloat16) is None:
        assert choose_attention("auto", "sdpa", torch.device("cuda"), torch.bfloat16) == VARLEN_ATTENTION


def test_train_loop_refuses_an_attention_or_fused_loss_that_cannot_run_here() -> None:
    """A recipe asking for varlen or Liger's fused cross-entropy on a CPU fails at the loop's start with the fix,
    not with a kernel error mid-step."""
    import torch

    from emgate.stages.finetune import TrainingError, train_loop

    train = rows()
    for extra, message in (({"attention": "varlen"}, "training.attention varlen cannot run here"),
                           ({"fused_cross_entropy": True}, "training.fused_cross_entropy needs a CUDA GPU")):
        cfg = spec(4096).model_copy(update=extra)
        with pytest.raises(TrainingError, match=message):
            train_loop(tiny_model("qwen2"), train, list(range(len(train))), cfg, torch.device("cpu"), PAD)


def fused_cross_entropy_double(weight: Any, hidden: Any, targets: Any) -> Any:
    """Test double of Liger's fused linear cross-entropy (Triton, CUDA only): the same contract, summed, in torch."""
    import torch

    return torch.nn.functional.cross_entropy((hidden @ weight.T).float(), targets, reduction="sum")


def test_the_fused_loss_path_gives_the_lm_head_loss_and_gradients_with_a_kernel_double() -> None:
    """pack_loss with a fused linear cross-entropy takes the hidden states at the learned positions and the LM head's
    weight; with fused_cross_entropy_double in place of Liger's kernel it gives the logits path's loss and
    gradients, so what the kernel gets is right (bench/finetune_gpu.py measures the kernel itself)."""
    import torch

    model = tiny_model("qwen2")
    cfg = spec(pack_length=150, accumulation=6)
    loss0, grads0, feed = step_gradients(model, cfg)
    assert feed.fused is None
    loss, grads, feed = step_gradients(model, cfg, fused=fused_cross_entropy_double)
    assert feed.fused is fused_cross_entropy_double and "fused linear cross-entropy" in feed.describe()
    assert loss == pytest.approx(loss0, rel=1e-5, abs=1e-6)
    for name, grad in grads.items():
        assert torch.allclose(grad, grads0[name], rtol=1e-5, atol=1e-5 * float(grads0[name].abs().max())), name
