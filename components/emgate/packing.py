"""Packed, padding-free training batches: rows concatenated into one sequence, attention kept inside each row.

A pack is one forward pass over rows laid end to end: position ids restart at 0 for each row, and the attention
of a token sees only the earlier tokens of its own row. How attention stays inside the rows (training.attention,
`choose_attention`; tests/test_packing.py checks each against padded micro-batches):
  - rows (ROW_ATTENTION): emgate's attention function for sdpa models, causal sdpa on each row's slice of the
    pack, so the attention costs sum(len^2) instead of pack_length^2 (a block-diagonal mask makes sdpa compute
    every block); one sdpa call per row and layer;
  - varlen (VARLEN_ATTENTION): torch's FlashAttention varlen kernel (torch.nn.attention.varlen.varlen_attn, CUDA,
    bfloat16/float16, compute capability 8.0+) over the whole pack in one call per layer, rows given by their
    cumulative offsets, as FlashAttention-2's padding-free training does;
  - flex: transformers' flex_attention, whose mask code turns restarting position ids into a document mask
    (FlexAttention has no backward pass on a CPU);
  - mask: the model's own implementation with transformers' block-diagonal mask (masking_utils.create_causal_mask
    detects packed rows from the position ids when no attention_mask is passed; FlashAttention models take them
    as a varlen batch).
The loss is computed only where a learned token is predicted (`logits_to_keep`, the LM head and the cross-entropy
on those positions, or a fused linear cross-entropy on the hidden states there); models whose forward has no
`logits_to_keep` get their own loss on the packed labels.
"""

from __future__ import annotations

import functools
import inspect
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from emgate.templates import IGNORE_INDEX, Example

ROW_ATTENTION = "emgate_rows"  # attention implementation names registered with transformers
VARLEN_ATTENTION = "emgate_varlen"
ROW_BOUNDS_KWARG = "emgate_row_bounds"  # the forward keyword that carries a pack's RowSpans to emgate's attention
# training.attention -> the implementation the loop sets while it trains on packs (None: the model's own)
ATTENTION_IMPLEMENTATIONS: dict[str, str | None] = {"rows": ROW_ATTENTION, "varlen": VARLEN_ATTENTION,
                                                    "flex": "flex_attention", "mask": None}
VARLEN_MIN_CAPABILITY = (8, 0)  # FlashAttention-2's kernels, which varlen_attn runs: Ampere and newer


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
class RowSpans:
    """Where a pack's rows lie: what emgate's attention functions need, on the host and on the device."""

    bounds: tuple[int, ...]  # 0, len(row 1), len(row 1) + len(row 2), ..., T
    cu_seqlens: Any  # the same offsets as an int32 tensor on the pack's device (varlen_attn's cu_seq_q and cu_seq_k)
    longest: int  # tokens of the longest row (varlen_attn's max_q and max_k)


@dataclass(frozen=True)
class Pack:
    """The tensors of one packed forward pass (batch dimension 1)."""

    input_ids: Any  # (1, T)
    position_ids: Any  # (1, T), 0.. per row
    labels: Any  # (1, T): the rows' labels, each row's first one IGNORE_INDEX (nothing in its row predicts it)
    keep: Any  # (n,): positions whose next token is learned
    targets: Any  # (n,): those next tokens
    bounds: tuple[int, ...]  # row boundaries: 0, len(row 1), len(row 1) + len(row 2), ..., T
    cu_seqlens: Any  # (rows + 1,) int32: the bounds as a tensor

    @property
    def spans(self) -> RowSpans:
        return RowSpans(bounds=self.bounds, cu_seqlens=self.cu_seqlens,
                        longest=max(b - a for a, b in zip(self.bounds[:-1], self.bounds[1:], strict=True)))

    def to(self, device: Any) -> Pack:
        """The pack on `device`; to a GPU from pinned host memory without waiting for the copy (the forward pass is
        queued behind it on the same stream), so collating the next pack overlaps this one's work."""
        return Pack(input_ids=to_device(self.input_ids, device), position_ids=to_device(self.position_ids, device),
                    labels=to_device(self.labels, device), keep=to_device(self.keep, device),
                    targets=to_device(self.targets, device), bounds=self.bounds,
                    cu_seqlens=to_device(self.cu_seqlens, device))


def to_device(tensor: Any, device: Any) -> Any:
    """`tensor` on `device`; to a GPU from pinned host memory without waiting for the copy."""
    if getattr(device, "type", device) == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


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
                bounds=tuple(bounds), cu_seqlens=torch.tensor(bounds, dtype=torch.int32))


def pack_loss(model: Any, pack: Pack, learned: int, logits_only: bool, spans: bool, fused: Any = None) -> Any:
    """The pack's share of the step loss: its learned tokens' cross-entropy summed, divided by `learned` (the step's
    learned tokens). logits_only: the LM head and the cross-entropy only on `pack.keep`; else the model's own loss
    on the packed labels (each row's first label ignored, so no row predicts the next row's first token). spans:
    the pack's RowSpans go to emgate's attention function (ROW_ATTENTION, VARLEN_ATTENTION). fused: a fused linear
    cross-entropy, fused(lm_head weight, hidden states, targets) -> summed loss, run on the hidden states at
    `pack.keep` instead of the LM head and cross-entropy (logits_only models)."""
    import torch

    extra = {ROW_BOUNDS_KWARG: pack.spans} if spans else {}
    if not logits_only:
        return model(input_ids=pack.input_ids, position_ids=pack.position_ids, labels=pack.labels,
                     num_items_in_batch=learned, use_cache=False, **extra).loss
    if fused is not None:
        causal_lm = base_model(model)
        hidden = causal_lm.model(input_ids=pack.input_ids, position_ids=pack.position_ids, use_cache=False,
                                 **extra).last_hidden_state
        return fused(causal_lm.get_output_embeddings().weight, hidden[0, pack.keep], pack.targets) / learned
    logits = model(input_ids=pack.input_ids, position_ids=pack.position_ids, logits_to_keep=pack.keep,
                   use_cache=False, **extra).logits
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), pack.targets,
                                             reduction="sum") / learned


def liger_cross_entropy() -> Any:
    """Liger Kernel's fused linear cross-entropy (summed), which never holds a pack's logits in memory; None where
    liger-kernel is not installed (an installed one that fails to import raises its ImportError). Triton kernels:
    CUDA only."""
    import importlib.util

    if importlib.util.find_spec("liger_kernel") is None:
        return None
    from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss

    loss = LigerFusedLinearCrossEntropyLoss(reduction="sum")
    return lambda weight, hidden, targets: loss(weight, hidden, targets)


def _row_attention(module: Any, query: Any, key: Any, value: Any, attention_mask: Any, dropout: float = 0.0,
                   scaling: float | None = None, **kwargs: Any) -> tuple[Any, None]:
    """sdpa, causal, on each row of the pack: query/key/value (1, heads, T, head_dim) cut at the row bounds."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    spans: RowSpans | None = kwargs.get(ROW_BOUNDS_KWARG)
    if spans is None:  # not a pack (evaluation, generation): plain sdpa with the model's mask
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling)
    bounds = spans.bounds
    outputs = [sdpa_attention_forward(module, query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], None, dropout=dropout,
                                      scaling=scaling, is_causal=True)[0] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    return torch.cat(outputs, dim=1), None


def _varlen_attention(module: Any, query: Any, key: Any, value: Any, attention_mask: Any, dropout: float = 0.0,
                      scaling: float | None = None, **kwargs: Any) -> tuple[Any, None]:
    """FlashAttention varlen over the whole pack: query (1, heads, T, head_dim) and key/value (1, kv heads, T,
    head_dim) as (T, heads, head_dim), rows given by spans.cu_seqlens, causal inside each row (window (-1, 0)),
    grouped-query heads shared by the kernel. Returns (1, T, heads, head_dim), as transformers' attention functions."""
    from torch.nn.attention import varlen
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    spans: RowSpans | None = kwargs.get(ROW_BOUNDS_KWARG)
    if spans is None:  # not a pack (evaluation, generation): plain sdpa with the model's mask
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling)
    if dropout and module.training:  # varlen_attn has no attention dropout
        return _row_attention(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    q, k, v = (t[0].transpose(0, 1).contiguous() for t in (query, key, value))  # no copy: transformers' (1, T, heads, dim) views
    out = varlen.varlen_attn(q, k, v, spans.cu_seqlens, spans.cu_seqlens, spans.longest, spans.longest, scale=scaling,
                             window_size=(-1, 0), enable_gqa=q.shape[1] != k.shape[1])
    return out.unsqueeze(0), None  # type: ignore[union-attr]  # a tuple only with return_aux


def _padding_mask_only(*args: Any, **kwargs: Any) -> Any:
    """The mask interface of emgate's attention functions: sdpa's padding mask where there is padding, and no mask
    without it: they keep a pack's attention inside its rows from its RowSpans, so the T x T block-diagonal mask
    transformers would build for a pack (about 23 ms and 14 MB per forward pass of 3,788 tokens on a CPU) is never
    read, and an unpadded sequence runs causal sdpa. They are set only inside train_loop (attention_implementation),
    where no forward pass has a KV cache."""
    from transformers.masking_utils import sdpa_mask

    if kwargs.get("attention_mask") is None:
        return None
    return sdpa_mask(*args, **kwargs)


def register_row_attention() -> None:
    """Make ROW_ATTENTION and VARLEN_ATTENTION known to transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ROW_ATTENTION, _row_attention)
    AttentionMaskInterface.register(ROW_ATTENTION, _padding_mask_only)
    AttentionInterface.register(VARLEN_ATTENTION, _varlen_attention)
    AttentionMaskInterface.register(VARLEN_ATTENTION, _padding_mask_only)


def varlen_unavailable(device: Any, dtype: Any) -> str | None:
    """Why VARLEN_ATTENTION cannot run on `device` with weights of `dtype`; None when it can."""
    import torch

    if getattr(device, "type", device) != "cuda":
        return "it needs a CUDA GPU (torch's varlen_attn runs FlashAttention kernels)"
    try:
        from torch.nn.attention import varlen  # noqa: F401
    except ImportError:
        return f"torch {torch.__version__} has no torch.nn.attention.varlen (2.10 or newer has)"
    if dtype not in (torch.bfloat16, torch.float16):
        return f"it needs bfloat16 or float16 weights, not {dtype}"
    capability = torch.cuda.get_device_capability(device)
    if capability < VARLEN_MIN_CAPABILITY:
        return (f"it needs compute capability {'.'.join(map(str, VARLEN_MIN_CAPABILITY))} or newer, this GPU has "
                f"{'.'.join(map(str, capability))}")
    return varlen_probe(str(device), dtype)


@functools.cache
def varlen_probe(device: str, dtype: Any) -> str | None:
    """Why torch's varlen_attn fails a forward and backward pass on two tiny rows on `device`; None when it passes.
    A torch build without the kernel for this GPU then costs auto its choice, not the job."""
    import torch
    from torch.nn.attention import varlen

    try:
        q = torch.randn(8, 2, 64, device=device, dtype=dtype, requires_grad=True)
        cu = torch.tensor([0, 3, 8], device=device, dtype=torch.int32)
        out = varlen.varlen_attn(q, q, q, cu, cu, 5, 5, window_size=(-1, 0))
        out.sum().backward()  # type: ignore[union-attr]
    except Exception as exc:  # any failure (a missing kernel, another signature in this torch): not this kernel
        return f"torch's varlen_attn failed a test call here ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})"
    return None


def sliding_window(config: Any, longest_row: int | None = None) -> int | None:
    """The window (tokens) of the model's sliding-window attention layers (Mistral v0.1, Gemma 2 and 3, Qwen2 with
    use_sliding_window); None when every layer attends to the whole row, or when no row (at most `longest_row`
    tokens) is longer than the window."""
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if not window or (layer_types is not None and "sliding_attention" not in layer_types):
        return None
    return None if longest_row is not None and longest_row <= window else int(window)


def choose_attention(setting: str, implementation: str | None, device: Any, dtype: Any,
                     window: int | None = None) -> str | None:
    """The attention implementation packed training runs with (None: the model's own `implementation`), from
    training.attention. auto: VARLEN_ATTENTION where it runs (varlen_unavailable), else ROW_ATTENTION for sdpa
    models, else the model's own. rows and varlen need an sdpa model (they replace its attention function) and no
    sliding `window` that a row can outgrow (sliding_window(config, max_seq_length)): they attend to the whole row,
    while the model's own masks keep the window. An explicit choice that cannot run here raises ValueError with the
    reason."""
    sdpa = implementation in ("sdpa", ROW_ATTENTION, VARLEN_ATTENTION)
    if setting == "auto":
        if not sdpa or window is not None:
            return None
        return VARLEN_ATTENTION if varlen_unavailable(device, dtype) is None else ROW_ATTENTION
    if setting in ("rows", "varlen") and not sdpa:
        raise ValueError(f"training.attention {setting} replaces sdpa attention, and this model runs "
                         f"{implementation}; use auto or mask")
    if setting in ("rows", "varlen") and window is not None:
        raise ValueError(f"training.attention {setting} attends to whole rows, and this model's sliding-window "
                         f"layers see only the last {window} tokens, fewer than training.max_seq_length; use auto or "
                         f"mask (the model's own masks keep the window), or a max_seq_length of at most {window}")
    if setting == "varlen" and (why := varlen_unavailable(device, dtype)) is not None:
        raise ValueError(f"training.attention varlen cannot run here: {why}; use auto (varlen where it runs, rows "
                         "elsewhere) or rows")
    if setting == "flex" and getattr(device, "type", device) != "cuda":
        raise ValueError("training.attention flex cannot run here: FlexAttention has no backward pass on a CPU; use "
                         "auto or rows")
    return ATTENTION_IMPLEMENTATIONS[setting]


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
