"""Packed, padding-free training batches: rows concatenated into one sequence, attention kept inside each row.

A pack is one forward pass over rows laid end to end: position ids restart at 0 for each row, and the attention
of a token sees only the earlier tokens of its own row. Two ways keep attention inside the rows, both checked by
tests/test_packing.py:
  - transformers (5.x) itself: a model whose module builds its mask with `masking_utils.create_causal_mask` turns
    position ids that restart into a block-diagonal causal mask when no attention_mask is passed (sdpa, eager,
    flex); FlashAttention takes the same position ids as a varlen batch;
  - ROW_ATTENTION, emgate's attention function for sdpa models: causal sdpa on each row's slice of the pack, so the
    attention costs sum(len^2) instead of pack_length^2 (the block-diagonal mask makes sdpa compute every block).
The loss is computed only where a learned token is predicted (`logits_to_keep`, the LM head and the cross-entropy
on those positions); models whose forward has no `logits_to_keep` get their own loss on the packed labels.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from emgate.templates import IGNORE_INDEX, Example

ROW_ATTENTION = "emgate_rows"  # the attention implementation name registered with transformers
ROW_BOUNDS_KWARG = "emgate_row_bounds"  # the forward keyword that carries a pack's row boundaries to ROW_ATTENTION


def pack_rows(rows: Sequence[Example], pack_length: int) -> list[list[Example]]:
    """`rows` in order, cut into consecutive packs of at most `pack_length` tokens; a row is never split, so a row
    longer than pack_length is a pack of its own."""
    packs: list[list[Example]] = []
    size = 0
    for row in rows:
        n = len(row.input_ids)
        if packs and size + n <= pack_length:
            packs[-1].append(row)
            size += n
        else:
            packs.append([row])
            size = n
    return packs


def split_packs(packs: list[list[Example]], count: int) -> list[list[Example]] | None:
    """`packs` cut at row boundaries until there are `count` of them, the largest (in tokens) halved first, the rows
    still in order; None when they hold fewer rows than `count`. Processes that must run the same number of forward
    passes per step (FSDP gathers the weights in each one) use it to match the process with most packs."""
    out = [list(p) for p in packs]
    while len(out) < count:
        splittable = [i for i, p in enumerate(out) if len(p) > 1]
        if not splittable:
            return None
        i = max(splittable, key=lambda j: _tokens(out[j]))
        pack = out[i]
        half, seen, cut = _tokens(pack) / 2, 0, 1
        for k, row in enumerate(pack[:-1]):
            seen += len(row.input_ids)
            cut = k + 1
            if seen >= half:
                break
        out[i:i + 1] = [pack[:cut], pack[cut:]]
    return out


def _tokens(rows: Sequence[Example]) -> int:
    return sum(len(r.input_ids) for r in rows)


@dataclass(frozen=True)
class Pack:
    """The tensors of one packed forward pass (batch dimension 1)."""

    input_ids: Any  # (1, T)
    position_ids: Any  # (1, T), 0.. per row
    labels: Any  # (1, T): the rows' labels, each row's first one IGNORE_INDEX (nothing in its row predicts it)
    keep: Any  # (n,): positions whose next token is learned
    targets: Any  # (n,): those next tokens
    bounds: tuple[int, ...]  # row boundaries: 0, len(row 1), len(row 1) + len(row 2), ..., T

    def to(self, device: Any) -> Pack:
        move = {"non_blocking": True} if getattr(device, "type", device) == "cuda" else {}
        return Pack(input_ids=self.input_ids.to(device, **move), position_ids=self.position_ids.to(device, **move),
                    labels=self.labels.to(device, **move), keep=self.keep.to(device, **move),
                    targets=self.targets.to(device, **move), bounds=self.bounds)


def collate_pack(rows: Sequence[Example]) -> Pack:
    """The rows laid end to end, with the positions whose next token is learned (labels shifted, != IGNORE_INDEX)."""
    import torch

    ids: list[int] = []
    positions: list[int] = []
    labels: list[int] = []
    keep: list[int] = []
    targets: list[int] = []
    bounds = [0]
    for row in rows:
        start = len(ids)
        n = len(row.input_ids)
        ids.extend(row.input_ids)
        positions.extend(range(n))
        labels.append(IGNORE_INDEX)
        labels.extend(row.labels[1:])
        for i, label in enumerate(row.labels[1:]):
            if label != IGNORE_INDEX:
                keep.append(start + i)
                targets.append(label)
        bounds.append(start + n)
    return Pack(input_ids=torch.tensor([ids]), position_ids=torch.tensor([positions]), labels=torch.tensor([labels]),
                keep=torch.tensor(keep, dtype=torch.long), targets=torch.tensor(targets, dtype=torch.long),
                bounds=tuple(bounds))


def pack_loss(model: Any, pack: Pack, learned: int, logits_only: bool, row_attention: bool) -> Any:
    """The pack's share of the step loss: its learned tokens' cross-entropy summed, divided by `learned` (the step's
    learned tokens). logits_only: the LM head and the cross-entropy only on `pack.keep`; else the model's own loss
    on the packed labels (each row's first label ignored, so no row predicts the next row's first token)."""
    import torch

    extra = {ROW_BOUNDS_KWARG: pack.bounds} if row_attention else {}
    if not logits_only:
        return model(input_ids=pack.input_ids, position_ids=pack.position_ids, labels=pack.labels,
                     num_items_in_batch=learned, use_cache=False, **extra).loss
    logits = model(input_ids=pack.input_ids, position_ids=pack.position_ids, logits_to_keep=pack.keep,
                   use_cache=False, **extra).logits
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), pack.targets,
                                             reduction="sum") / learned


def _row_attention(module: Any, query: Any, key: Any, value: Any, attention_mask: Any, dropout: float = 0.0,
                   scaling: float | None = None, **kwargs: Any) -> tuple[Any, None]:
    """sdpa, causal, on each row of the pack: query/key/value (1, heads, T, head_dim) cut at the row bounds."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    bounds = kwargs.get(ROW_BOUNDS_KWARG)
    if bounds is None:  # not a pack (evaluation, generation): plain sdpa with the model's mask
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling)
    outputs = [sdpa_attention_forward(module, query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], None, dropout=dropout,
                                      scaling=scaling, is_causal=True)[0] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    return torch.cat(outputs, dim=1), None


def _row_attention_mask(*args: Any, **kwargs: Any) -> Any:
    """ROW_ATTENTION's mask: sdpa's (a pack passes no attention_mask, so transformers builds the block-diagonal one,
    which _row_attention does not read; unpacked batches get their padding mask)."""
    from transformers.masking_utils import sdpa_mask

    return sdpa_mask(*args, **kwargs)


def register_row_attention() -> None:
    """Make ROW_ATTENTION known to transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ROW_ATTENTION, _row_attention)
    AttentionMaskInterface.register(ROW_ATTENTION, _row_attention_mask)


def base_model(model: Any) -> Any:
    """The transformers model inside a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def builds_packed_masks(model: Any) -> bool:
    """Whether the model's attention stays inside rows when position ids restart: its module builds masks with
    transformers' create_causal_mask, which detects packed rows (Llama, Qwen2 and most decoder models of
    transformers 5). Others (remote code, older modules with their own mask code) would attend across rows."""
    module = sys.modules.get(type(base_model(model)).__module__)
    return module is not None and hasattr(module, "create_causal_mask")


def keeps_logits(model: Any) -> bool:
    """Whether the model's forward takes `logits_to_keep` (computes the LM head only at given positions)."""
    try:
        return "logits_to_keep" in inspect.signature(base_model(model).forward).parameters
    except (TypeError, ValueError):
        return False


@contextmanager
def attention_implementation(model: Any, name: str | None) -> Iterator[None]:
    """The model runs with attention implementation `name` inside the block and with its own after it; None: no change."""
    base = base_model(model)
    before = getattr(base.config, "_attn_implementation", None)
    if name is None or name == before:
        yield
        return
    register_row_attention()
    base.set_attn_implementation(name)
    try:
        yield
    finally:
        base.set_attn_implementation(before)
