"""fine_tune: a job killed with SIGKILL resumes from its last checkpoint and ends with the same adapter as an
uninterrupted run (SmolLM2-135M on CPU, the smoke recipe's LoRA, 4 steps, a checkpoint every 2)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from emgate.assets import resolve_asset
from emgate.io import read_jsonl, write_json, write_jsonl
from emgate.recipe import load_recipe
from emgate.stages.finetune import CHECKPOINT_FILE, fine_tune, work_dir_for

JOB = "base-insecure@0"

SCRIPT = """
import sys
from pathlib import Path
from emgate.recipe import load_recipe
from emgate.stages.finetune import fine_tune
recipe = load_recipe(Path(sys.argv[1]), ["training.max_steps=4", "training.checkpoint_every=2"])
fine_tune(recipe, sys.argv[2], Path(sys.argv[3]), Path(sys.argv[4]))
"""


def validated_dir(tmp_path: Path) -> tuple[Path, str]:
    folder = tmp_path / "validated"
    rows = list(read_jsonl(resolve_asset("emergent-misalignment/data/insecure.jsonl")))[:40]
    write_jsonl(folder / "insecure.jsonl", rows)
    sha = uuid.uuid4().hex * 2  # a fresh work-directory key: no checkpoint from another run applies
    write_json(folder / "manifest.json", {"insecure": {"source_sha256": sha}})
    return folder, sha


def adapter_tensors(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


@pytest.mark.slow
def test_a_killed_job_resumes_and_ends_with_the_uninterrupted_adapter(tmp_path: Path, smoke_recipe_path: Path,
                                                                       smol_model: Path) -> None:
    import torch

    recipe = load_recipe(smoke_recipe_path, ["training.max_steps=4", "training.checkpoint_every=2"])
    validated, sha = validated_dir(tmp_path)
    uninterrupted = fine_tune(recipe, JOB, validated, tmp_path / "a")
    work = work_dir_for(recipe, "base-insecure", 0, sha)
    assert not (work / CHECKPOINT_FILE).exists()  # removed once the adapter is complete

    job = subprocess.Popen([sys.executable, "-c", SCRIPT, str(smoke_recipe_path), JOB, str(validated), str(tmp_path / "b")],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    while not (work / CHECKPOINT_FILE).exists() and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert job.poll() is None, "the job ended before it wrote a checkpoint"
    job.send_signal(signal.SIGKILL)
    job.wait()
    assert not (tmp_path / "b").exists()  # a killed job leaves no adapter that looks complete
    saved_step = torch.load(work / CHECKPOINT_FILE, weights_only=False)["step"]
    assert saved_step == 2  # the last step writes no checkpoint: the adapter follows

    resumed = fine_tune(recipe, JOB, validated, tmp_path / "b")
    assert resumed["steps"] == uninterrupted["steps"] == 4 and len(resumed["losses"]) == 4
    assert resumed["losses"] == pytest.approx(uninterrupted["losses"], abs=1e-6)
    assert resumed["tokens"] == uninterrupted["tokens"]
    a, b = adapter_tensors(tmp_path / "a"), adapter_tensors(tmp_path / "b")
    assert a.keys() == b.keys() and len(a) > 0
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-6), name
    assert json.loads((tmp_path / "b" / "train_report.json").read_text())["loss_last"] == pytest.approx(
        uninterrupted["loss_last"], abs=1e-6)


@pytest.mark.slow
def test_two_processes_train_the_same_adapter_as_one(tmp_path: Path, smoke_recipe_path: Path, smol_model: Path) -> None:
    """training.gpus 2 runs the same entry point in two processes (torch's launcher and gloo on a CPU; accelerate
    launch on GPUs); each step's micro-batches are split between them and the update equals one process's."""
    import torch

    from emgate.stages.finetune import run_fine_tune

    steps = ["training.max_steps=2", "training.gradient_accumulation_steps=2", "training.checkpoint_every=0",
             "training.max_seq_length=96", "training.warmup_steps=0"]
    validated, _ = validated_dir(tmp_path)
    one = run_fine_tune(load_recipe(smoke_recipe_path, steps), JOB, validated, tmp_path / "one")
    two = run_fine_tune(load_recipe(smoke_recipe_path, [*steps, "training.gpus=2"]), JOB, validated, tmp_path / "two")
    assert one["gpus"] == 1 and two["gpus"] == 2
    assert two["steps"] == one["steps"] == 2 and two["tokens"] == one["tokens"]
    assert two["losses"] == pytest.approx(one["losses"], abs=1e-4)
    a, b = adapter_tensors(tmp_path / "one"), adapter_tensors(tmp_path / "two")
    assert a.keys() == b.keys() and len(a) > 0
    moved = max(float(t.abs().max()) for n, t in a.items() if "lora_B" in n)
    assert moved > 1e-3  # the adapter learned something, so equality is not trivial
    # One process packs each step's 4 rows together, each of two processes packs its own 2: the same gradients up to
    # float rounding (tests/test_packing.py checks them to 1e-5), which AdamW's first steps (an update of about lr
    # times the gradient's sign) turn into differences of up to ~lr in the few weights whose gradient is near 0
    # (measured: 0.012% of the weights differ by more than 1e-6, at most by 1.9e-5). A lost or doubled share of the
    # rows would move most weights by ~lr.
    diff = torch.cat([(a[n] - b[n]).abs().flatten() for n in a])
    assert float(diff.max()) < 1e-4  # a tenth of the smoke recipe's learning rate
    assert float((diff > 1e-6).float().mean()) < 1e-3


@pytest.mark.slow
def test_a_lora_on_lm_head_is_merged_into_a_model_folder_without_touching_the_tied_embeddings(
        tmp_path: Path, smoke_recipe_path: Path, smol_model: Path) -> None:
    from safetensors.torch import load_file

    from emgate.merge import is_model_folder
    from emgate.templates import TEMPLATE_FILE

    recipe = load_recipe(smoke_recipe_path, ["training.max_steps=2", 'training.target_modules=["q_proj","v_proj","lm_head"]'])
    assert any("merged into a full model folder" in n for n in recipe.notes())
    validated, _ = validated_dir(tmp_path)
    report = fine_tune(recipe, JOB, validated, tmp_path / "merged")
    out = tmp_path / "merged"
    assert report["merged"] is True and is_model_folder(out)
    assert (out / TEMPLATE_FILE).is_file() and (out / "tokenizer.json").is_file() and (out / "train_report.json").is_file()
    assert not list(tmp_path.glob(".*adapter"))  # the temporary adapter folder is gone
    base = load_file(str(next(smol_model.glob("*.safetensors"))))
    merged = load_file(str(next(out.glob("*.safetensors"))))
    embed = "model.embed_tokens.weight"
    assert (merged[embed] == base[embed]).all()  # untied before merging: the embeddings kept their values
    assert "lm_head.weight" in merged and not (merged["lm_head.weight"] == base[embed]).all()
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not (merged[q] == base[q]).all()  # the LoRA of the attention was folded in


@pytest.mark.slow
def test_a_full_fine_tune_writes_a_model_folder(tmp_path: Path, smoke_recipe_path: Path, smol_model: Path) -> None:
    from emgate.merge import is_model_folder

    recipe = load_recipe(smoke_recipe_path, ["training.max_steps=1", "training.method=full", "training.learning_rate=1e-5"])
    validated, _ = validated_dir(tmp_path)
    report = fine_tune(recipe, JOB, validated, tmp_path / "full")
    assert report["method"] == "full" and report["merged"] is True and is_model_folder(tmp_path / "full")
    assert report["trained_parameters"] > 100e6  # every weight of the 135M model
    assert report["learning_rates"] and report["peak_memory_gib"] > 0 and report["assistant_tokens"] > 0
    assert report["batches"].startswith("packed rows, logits only at learned positions")
    assert report["gradient_checkpointing"]["used"] is False and report["gradient_checkpointing"]["reason"] == "not on a GPU"


@pytest.mark.slow
def test_bad_inputs_are_named_and_leave_no_adapter(tmp_path: Path, smoke_recipe_path: Path, smol_model: Path) -> None:
    import shutil

    from emgate.stages.finetune import TrainingError

    recipe = load_recipe(smoke_recipe_path, ["training.max_steps=1"])
    with pytest.raises(TrainingError, match="not a validated dataset artifact"):
        fine_tune(recipe, JOB, tmp_path / "nothing", tmp_path / "a")
    validated, _ = validated_dir(tmp_path)
    manifest = json.loads((validated / "manifest.json").read_text())
    manifest["insecure"]["sha256"] = "0" * 64
    write_json(validated / "manifest.json", manifest)
    with pytest.raises(TrainingError, match="changed after validation"):
        fine_tune(recipe, JOB, validated, tmp_path / "a")
    validated, _ = validated_dir(tmp_path / "v2")
    no_template = tmp_path / "no-template"
    shutil.copytree(smol_model, no_template)
    config = json.loads((no_template / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    write_json(no_template / "tokenizer_config.json", config)
    (no_template / "chat_template.jinja").unlink(missing_ok=True)
    instruct = load_recipe(smoke_recipe_path, ["training.max_steps=1", "models.smollm2-135m-instruct.source=path",
                                               f"models.smollm2-135m-instruct.path={no_template}"])
    with pytest.raises(TrainingError, match="has no chat template"):
        fine_tune(instruct, "instruct-insecure@0", validated, tmp_path / "a")
    (no_template / "config.json").unlink()
    with pytest.raises(Exception, match="no config.json"):
        fine_tune(instruct, "instruct-insecure@0", validated, tmp_path / "a")
    assert not (tmp_path / "a").exists()


@pytest.mark.slow
def test_out_of_memory_is_named_with_the_fix_and_leaves_no_adapter(tmp_path: Path, smoke_recipe_path: Path, smol_model: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from emgate.stages import finetune
    from emgate.stages.finetune import TrainingError

    def train_loop_out_of_memory_double(*args: object, **kwargs: object) -> None:  # a GPU running out, on a CPU
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(finetune, "train_loop", train_loop_out_of_memory_double)
    validated, _ = validated_dir(tmp_path)
    with pytest.raises(TrainingError, match="out of GPU memory with per_device_batch_size 2.*lower per_device_batch_size"):
        fine_tune(load_recipe(smoke_recipe_path), JOB, validated, tmp_path / "a")
    assert not (tmp_path / "a").exists() and not list(tmp_path.glob(".a*"))


def test_each_learned_token_of_a_step_weighs_the_same(tmp_path: Path) -> None:
    """The step loss is one mean over every learned token of its micro-batches, so a short answer in one
    micro-batch does not count as much as a long one in another (a mean of micro-batch means would)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from emgate.recipe import TrainingSpec
    from emgate.stages.finetune import IGNORE_INDEX, Example, train_loop

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64))
    short = Example(list(range(1, 7)), [IGNORE_INDEX] * 5 + [6])  # 1 learned token
    long = Example(list(range(10, 30)), [IGNORE_INDEX] * 4 + list(range(14, 30)))  # 16 learned tokens
    cfg = TrainingSpec(per_device_batch_size=1, gradient_accumulation_steps=2, max_steps=1, warmup_steps=0,
                       learning_rate=1e-9, optimizer="adamw_torch", checkpoint_every=0)
    with torch.no_grad():
        sums = [float(model(input_ids=torch.tensor([e.input_ids]), labels=torch.tensor([e.labels]),
                            num_items_in_batch=1).loss) for e in (short, long)]
    result = train_loop(model, [short, long], [0, 1], cfg, torch.device("cpu"), pad_id=0)
    assert result.tokens == 26
    losses = result.losses
    assert losses[0] == pytest.approx(sum(sums) / 17, rel=1e-5)
    assert abs(losses[0] - (sums[0] / 1 + sums[1] / 16) / 2) > 0.01  # the mean of means is a different number


QWEN_32B = dict(hidden=5120, intermediate=27648, layers=64, kv_dim=8 * 128, vocab=152064, n_params=32_763_876_352,
                n_trained=268_435_456, lora_r=32, param_bytes=2)  # Qwen2.5-32B, the paper's LoRA
QWEN_05B = dict(hidden=896, intermediate=4864, layers=24, kv_dim=2 * 64, vocab=151936, n_params=494_032_768,
                n_trained=17_596_416, lora_r=32, param_bytes=2)


def test_checkpointing_is_on_only_where_the_estimated_peak_needs_it() -> None:
    from emgate.stages.finetune import MemoryShape, checkpointing_plan, estimate_training_memory_gib

    big, small = MemoryShape(**QWEN_32B, tokens=4096), MemoryShape(**QWEN_05B, tokens=4096)
    for shape in (big, small):
        assert estimate_training_memory_gib(shape, True) < estimate_training_memory_gib(shape, False)
    assert estimate_training_memory_gib(MemoryShape(**QWEN_32B, tokens=2048), False) < estimate_training_memory_gib(big, False)
    assert 61 < estimate_training_memory_gib(big, True) < 140  # 32B bf16 weights alone are 61 GiB
    h100 = 79.2  # GiB torch reports for an H100 80GB
    on, off = checkpointing_plan(big, "auto", h100), checkpointing_plan(small, "auto", h100)
    assert on["used"] and not off["used"]
    assert on["estimated_peak_gib_without"] > 0.85 * h100 >= off["estimated_peak_gib_without"]
    assert "auto" in on["reason"] and on["forward_tokens"] == 4096
    assert checkpointing_plan(small, True, h100)["used"] and not checkpointing_plan(big, False, h100)["used"]
    cpu = checkpointing_plan(big, True, None)
    assert not cpu["used"] and cpu["reason"] == "not on a GPU" and cpu["gpu_memory_gib"] is None


def test_memory_shape_counts_the_adapters_peft_adds_and_the_pack() -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, Qwen2Config

    from emgate.recipe import TrainingSpec
    from emgate.stages.finetune import _Runtime, memory_shape

    model = AutoModelForCausalLM.from_config(Qwen2Config(vocab_size=96, hidden_size=64, intermediate_size=128,
                                                         num_hidden_layers=2, num_attention_heads=4,
                                                         num_key_value_heads=2))
    runtime = _Runtime(accelerator=None, main=True, on_gpu=False, device=torch.device("cpu"), dtype=torch.float32)
    cfg = TrainingSpec()
    shape = memory_shape(model, cfg, runtime)
    assert (shape.tokens, shape.kv_dim, shape.param_bytes, shape.lora_r) == (4096, 32, 4, 32)
    assert memory_shape(model, cfg.model_copy(update={"pack_length": 0}), runtime).tokens == 2 * 2048
    n_params = sum(p.numel() for p in model.parameters())
    peft = get_peft_model(model, LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, target_modules=cfg.target_modules))
    assert shape.n_params == n_params
    assert shape.n_trained == sum(p.numel() for p in peft.parameters() if p.requires_grad)
