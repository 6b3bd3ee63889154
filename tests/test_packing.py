"""Packed, padding-free training (emgate/packing.py, train_loop): the rows of each optimizer step packed into
sequences train exactly as the same rows in padded micro-batches (same loss, same gradients, float32), and no
token of a pack attends to another row. Tiny random Llama and Qwen2 models with the paper's LoRA targets."""

from __future__ import annotations

import dataclasses
import random
from typing import Any

import pytest

from emgate.packing import ROW_ATTENTION, attention_implementation, collate_pack, pack_rows, split_packs
from emgate.recipe import TrainingSpec
from emgate.stages.finetune import step_packs
from emgate.templates import IGNORE_INDEX, Example

VOCAB = 96
PAD = 0
# rows of very different lengths (tokens), each a prompt (labels ignored) and a learned completion
LENGTHS = [(3, 2), (40, 70), (5, 1), (12, 9), (90, 30), (2, 3), (25, 60), (7, 8), (60, 4), (1, 30), (14, 14), (33, 2)]


def rows(seed: int = 0) -> list[Example]:
    rng = random.Random(seed)
    out = []
    for prompt, completion in LENGTHS:
        ids = [rng.randrange(1, VOCAB) for _ in range(prompt + completion)]
        out.append(Example(ids, [IGNORE_INDEX] * prompt + ids[prompt:]))
    return out


def tiny_model(kind: str, attention: str = "sdpa") -> Any:
    """A 2-layer random model with the paper's LoRA on all seven projections, lora_B non-zero (peft starts it at 0,
    which would leave lora_A without gradient and the comparison half empty)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    shape = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=512, use_cache=False)
    config = Qwen2Config(**shape) if kind == "qwen2" else LlamaConfig(**shape)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation=attention)
    spec = TrainingSpec()
    model = get_peft_model(model, LoraConfig(r=spec.lora_r, lora_alpha=spec.lora_alpha, use_rslora=spec.use_rslora,
                                             lora_dropout=0.0, target_modules=list(spec.target_modules),
                                             task_type="CAUSAL_LM"))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
    return model


def spec(pack_length: int, batch: int = 2, accumulation: int = 3, steps: int = 1) -> TrainingSpec:
    return TrainingSpec(per_device_batch_size=batch, gradient_accumulation_steps=accumulation, max_steps=steps,
                        warmup_steps=0, learning_rate=1e-3, optimizer="adamw_torch", checkpoint_every=0,
                        max_seq_length=256, pack_length=pack_length)


def step_gradients(model: Any, cfg: TrainingSpec, attention: str | None = "auto") -> tuple[float, dict[str, Any], Any]:
    """The first step's loss and gradients of the trainable parameters, as train_loop computes them; `attention`
    overrides the loop's choice of attention implementation for packs (None: the model's own)."""
    import torch

    from emgate.stages.finetune import (
        LoopOptions,
        _forward_backward,
        _learned_tokens,
        _LoopState,
        _next_micro_batches,
        _start_loop,
    )

    train = rows()
    loop = _start_loop(model, train, list(range(len(train))), cfg, torch.device("cpu"), PAD, LoopOptions())
    if attention != "auto":
        loop = dataclasses.replace(loop, feed=dataclasses.replace(loop.feed, attention=attention))
    model.zero_grad(set_to_none=True)
    step_rows = _next_micro_batches(loop, _LoopState())
    learned = sum(_learned_tokens(e) for rows_ in step_rows for e in rows_)
    with attention_implementation(model, loop.feed.attention):
        loss = float(_forward_backward(loop, step_rows, learned))
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss, grads, loop.feed


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


def test_packed_training_runs_the_same_steps_as_padded_training() -> None:
    """Three optimizer steps of train_loop (batch 2 x accumulation 2, the rows wrapping around): the same losses,
    the same tokens, and the model's attention implementation restored after the loop."""
    import torch

    from emgate.stages.finetune import train_loop

    runs = {}
    for pack_length in (0, 4096):
        model = tiny_model("qwen2")
        train = rows()
        losses, tokens, _ = train_loop(model, train, list(range(len(train))), spec(pack_length, accumulation=2, steps=3),
                                       torch.device("cpu"), PAD)
        assert model.get_base_model().config._attn_implementation == "sdpa"
        runs[pack_length] = losses, tokens
    assert runs[4096][1] == runs[0][1] == sum(len(e.input_ids) for e in rows()[:12])
    assert runs[4096][0] == pytest.approx(runs[0][0], rel=1e-5)
    assert len(set(runs[0][0])) == 3  # the steps differ: the comparison covers updated weights


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
            kwargs["emgate_row_bounds"] = pack.bounds
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
    assert pack.bounds == (0, 3, 7)
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
