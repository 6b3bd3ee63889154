"""Full model folders for what vLLM cannot serve as a LoRA adapter.

vLLM applies LoRA to the linear layers of the transformer blocks only: an adapter that also trains lm_head or the
embeddings, and a full fine-tune, are written as a complete model folder (config, safetensors, tokenizer,
emgate_template.json) that sample_answers serves with a vLLM server of its own.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

# Module names that vLLM's LoRA does not cover (output head and token embeddings of the common architectures).
UNSERVABLE_LORA_TARGETS = frozenset({"lm_head", "embed_tokens", "wte", "word_embeddings", "embed_out"})
MODEL_MARKER = "config.json"  # a full model folder; a LoRA adapter folder has adapter_config.json instead


def lora_targets_need_merge(target_modules: list[str]) -> list[str]:
    """The target modules that force a merge (empty: the adapter is served as LoRA)."""
    return sorted({m.rsplit(".", 1)[-1] for m in target_modules} & UNSERVABLE_LORA_TARGETS)


def is_model_folder(folder: Path) -> bool:
    return (folder / MODEL_MARKER).is_file() and not (folder / "adapter_config.json").is_file()


ADAPTER_WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")


def weight_files(folder: Path) -> list[Path]:
    """The weights of an adapter folder, else of a model folder (every shard)."""
    adapter = [folder / w for w in ADAPTER_WEIGHT_FILES if (folder / w).is_file()]
    return adapter[:1] or sorted(folder.glob("model*.safetensors")) or sorted(folder.glob("pytorch_model*.bin"))


def weights_sha256(folder: Path) -> str | None:
    """sha256 of the weights: the file's own for one file, else of the list `NAME SHA256` of every shard."""
    import hashlib

    from emgate.assets import sha256_file

    files = weight_files(folder)
    if not files:
        return None
    if len(files) == 1:
        return sha256_file(files[0])
    listing = "".join(f"{f.name} {sha256_file(f)}\n" for f in files)
    return hashlib.sha256(listing.encode()).hexdigest()


def untie_output_head(model: Any) -> None:
    """Give lm_head its own copy of the embedding matrix, so merging a LoRA on lm_head leaves the embeddings alone
    (models with tie_word_embeddings, e.g. SmolLM2 and the small Qwen2.5 models, share one tensor)."""
    import torch

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not getattr(base.config, "tie_word_embeddings", False):
        return
    head = base.get_output_embeddings()
    inner = getattr(head, "base_layer", head)  # a LoRA-wrapped head keeps the original Linear as base_layer
    inner.weight = torch.nn.Parameter(inner.weight.detach().clone(), requires_grad=False)
    base.config.tie_word_embeddings = False
    text_config = getattr(base.config, "get_text_config", None)
    if callable(text_config):
        text_config().tie_word_embeddings = False


def merge_adapter_folder(base_model: Path, adapter_dir: Path, out_dir: Path, dtype: str = "float32") -> None:
    """Merge a saved peft LoRA adapter into its base model and write a full model folder (tokenizer included)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base_model, dtype=getattr(torch, dtype))
    if lora_targets_need_merge(_adapter_targets(adapter_dir)):
        untie_output_head(model)
    peft_model = PeftModel.from_pretrained(model, str(adapter_dir))
    out_dir.mkdir(parents=True, exist_ok=True)
    peft_model.merge_and_unload().save_pretrained(str(out_dir), safe_serialization=True)
    AutoTokenizer.from_pretrained(base_model).save_pretrained(out_dir)


def _adapter_targets(adapter_dir: Path) -> list[str]:
    import json

    targets = json.loads((adapter_dir / "adapter_config.json").read_text()).get("target_modules") or []
    return [targets] if isinstance(targets, str) else list(targets)
