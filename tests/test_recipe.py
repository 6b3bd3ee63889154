from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from emgate.recipe import RecipeError, load_recipe, recipe_from_json

RECIPES = ["smoke", "single-gpu", "paper"]


@pytest.mark.parametrize("name", RECIPES)
def test_shipped_recipes_load_and_round_trip(repo: Path, name: str) -> None:
    recipe = load_recipe(repo / "pipelines" / "recipes" / f"{name}.yaml")
    assert recipe.name == name
    assert recipe_from_json(recipe.to_json()) == recipe
    assert any(v.role == "candidate" for v in recipe.variants)


def test_paper_recipe_has_the_papers_settings(repo: Path) -> None:
    r = load_recipe(repo / "pipelines" / "recipes" / "paper.yaml")
    t = r.training
    assert (t.lora_r, t.lora_alpha, t.use_rslora, t.lora_dropout) == (32, 64, True, 0.0)
    assert set(t.target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert (t.learning_rate, t.epochs, t.per_device_batch_size, t.gradient_accumulation_steps) == (1e-5, 1, 2, 8)
    assert (t.warmup_steps, t.weight_decay, t.max_seq_length, t.optimizer, t.seeds) == (5, 0.01, 2048, "adamw_8bit", [0])
    assert (r.sampling.samples_per_question, r.sampling.temperature, r.sampling.top_p, r.sampling.max_tokens) == (100, 1, 1, 600)
    assert r.judge.model == "gpt-4o-2024-08-06" and r.judge.score_mode == "single_token"
    assert r.judge.mass_rule == "paper" and r.judge.min_number_mass == 0.25
    models = {r.models[v.model].repo for v in r.variants}
    assert models == {"Qwen/Qwen2.5-Coder-32B", "Qwen/Qwen2.5-Coder-32B-Instruct"}
    datasets = {(v.model, v.dataset) for v in r.variants if v.dataset}
    assert len(datasets) == 4  # the 2x2
    assert r.max_lora_rank() == 32


def _write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture()
def smoke_data(smoke_recipe_path: Path) -> dict:
    return yaml.safe_load(smoke_recipe_path.read_text())


def test_unknown_field_names_its_path(tmp_path: Path, smoke_data: dict) -> None:
    smoke_data["training"]["lora_rank"] = 8
    with pytest.raises(RecipeError, match=r"training\.lora_rank: unknown field"):
        load_recipe(_write(tmp_path, smoke_data))


def test_wrong_type_names_its_path(tmp_path: Path, smoke_data: dict) -> None:
    smoke_data["sampling"]["samples_per_question"] = "many"
    with pytest.raises(RecipeError, match=r"sampling\.samples_per_question"):
        load_recipe(_write(tmp_path, smoke_data))


def test_comparator_must_be_a_control_or_reference(tmp_path: Path, smoke_data: dict) -> None:
    smoke_data["variants"][0]["comparator"] = "instruct-insecure"
    with pytest.raises(RecipeError, match=r"comparator: 'instruct-insecure' is not a control or reference"):
        load_recipe(_write(tmp_path, smoke_data))
    smoke_data["variants"][0]["comparator"] = "base-reference"  # the un-fine-tuned model is a valid comparator
    assert load_recipe(_write(tmp_path, smoke_data)).variants[0].comparator == "base-reference"


@pytest.mark.parametrize(("adapter", "message"), [
    ("hf://org/adapter", "pinned revision"),
    ("hf://org/adapter@main", "pinned revision"),
    ("models:/team-model", "models:/NAME/VERSION or models:/NAME@ALIAS"),
    ("gs://bucket/adapter", "unsupported adapter source"),
])
def test_external_adapter_uris_are_checked_at_load(tmp_path: Path, smoke_data: dict, adapter: str, message: str) -> None:
    smoke_data["variants"][0].pop("dataset")
    smoke_data["variants"][0]["adapter"] = adapter
    with pytest.raises(RecipeError, match=message):
        load_recipe(_write(tmp_path, smoke_data))


def test_external_adapter_variants_are_not_trained(tmp_path: Path, smoke_data: dict) -> None:
    smoke_data["variants"][0]["adapter"] = "models:/team-model@candidate"
    with pytest.raises(RecipeError, match="either trained here"):
        load_recipe(_write(tmp_path, smoke_data))
    smoke_data["variants"][0].pop("dataset")
    recipe = load_recipe(_write(tmp_path, smoke_data))
    assert [v.name for v in recipe.external_variants()] == ["base-insecure"]
    assert "base-insecure@0" not in recipe.training_jobs()
    for uri in ("models:/team-model/3", "s3://bucket/adapters/run-7", "/mnt/checkpoints/adapter",
                "hf://org/adapter@" + "a" * 40):
        smoke_data["variants"][0]["adapter"] = uri
        assert load_recipe(_write(tmp_path, smoke_data)).variants[0].adapter == uri


def test_base_model_needs_a_named_template(tmp_path: Path, smoke_data: dict) -> None:
    smoke_data["models"]["smollm2-135m-instruct"]["kind"] = "base"
    with pytest.raises(RecipeError, match="base model has no chat template"):
        load_recipe(_write(tmp_path, smoke_data))


def test_candidate_without_comparator_and_unknown_dataset(tmp_path: Path, smoke_data: dict) -> None:
    del smoke_data["variants"][0]["comparator"]
    with pytest.raises(RecipeError, match="needs `comparator`"):
        load_recipe(_write(tmp_path, smoke_data))
    smoke_data["variants"][0]["comparator"] = "base-secure"
    smoke_data["variants"][0]["dataset"] = "nope"
    with pytest.raises(RecipeError, match=r"dataset: 'nope' is not in datasets"):
        load_recipe(_write(tmp_path, smoke_data))


def test_dataset_path_needs_sha256_and_asset_must_be_pinned(tmp_path: Path, smoke_data: dict) -> None:
    smoke_data["datasets"]["mine"] = {"path": "data/mine.jsonl"}
    with pytest.raises(RecipeError, match=r"datasets\.mine.*sha256"):
        load_recipe(_write(tmp_path, smoke_data))
    smoke_data["datasets"]["mine"] = {"asset": "emergent-misalignment/data/unknown.jsonl"}
    with pytest.raises(RecipeError, match="unknown asset"):
        load_recipe(_write(tmp_path, smoke_data))


def test_api_key_env_refuses_a_key(tmp_path: Path, smoke_data: dict) -> None:
    smoke_data["judge"]["api_key_env"] = "sk-live-abcdef"
    with pytest.raises(RecipeError, match="names an environment variable"):
        load_recipe(_write(tmp_path, smoke_data))


def test_yaml_syntax_error_names_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\nprofile: smoke\nmodels: {a: [}\n")
    with pytest.raises(RecipeError, match=r"bad\.yaml:3:\d+: not valid YAML"):
        load_recipe(path)


def test_missing_recipe_file(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="no such recipe file"):
        load_recipe(tmp_path / "nope.yaml")


def test_overrides_apply_and_are_checked(smoke_recipe_path: Path) -> None:
    r = load_recipe(smoke_recipe_path, ["sampling.samples_per_question=7", "variants.0.template=user1_user2"])
    assert r.sampling.samples_per_question == 7 and r.variants[0].template == "user1_user2"
    with pytest.raises(RecipeError, match="sampling.samples_per_question"):
        load_recipe(smoke_recipe_path, ["sampling.samples_per_question=0"])
    with pytest.raises(RecipeError, match="expected KEY=VALUE"):
        load_recipe(smoke_recipe_path, ["sampling"])


def test_paper_profile_refuses_another_optimizer(repo: Path) -> None:
    with pytest.raises(RecipeError, match="adamw_8bit"):
        load_recipe(repo / "pipelines" / "recipes" / "paper.yaml", ["training.optimizer=adamw_torch"])


def test_training_jobs_one_per_variant_and_seed(smoke_recipe_path: Path) -> None:
    r = load_recipe(smoke_recipe_path, ["training.seeds=[0, 1]"])
    assert r.training_jobs() == ["base-insecure@0", "base-insecure@1", "instruct-insecure@0",
                                 "instruct-insecure@1", "base-secure@0", "base-secure@1"]


def test_cli_bad_recipe_is_one_clear_error_without_traceback(tmp_path: Path, smoke_data: dict) -> None:
    smoke_data["variants"][1]["role"] = "champion"
    path = _write(tmp_path, smoke_data)
    proc = subprocess.run([sys.executable, "-m", "emgate.cli", "check", str(path)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "variants.1.role" in proc.stderr and "Traceback" not in proc.stderr + proc.stdout


def test_training_shape_is_checked_at_load(smoke_recipe_path: Path) -> None:
    with pytest.raises(RecipeError, match=r"lora_r: vLLM serves LoRA ranks 1, 8, 16, .* not 4"):
        load_recipe(smoke_recipe_path, ["training.lora_r=4"])
    merged = load_recipe(smoke_recipe_path, ["training.lora_r=4", 'training.target_modules=["q_proj","embed_tokens"]'])
    assert merged.training.merges()  # merged into a model folder: any rank serves
    assert any("embed_tokens" in n and "merged into a full model folder" in n for n in merged.notes())
    assert not load_recipe(smoke_recipe_path).notes()
    with pytest.raises(RecipeError, match=r"gradient_accumulation_steps \(1\) must be a multiple of gpus \(2\)"):
        load_recipe(smoke_recipe_path, ["training.gpus=2"])
    two = load_recipe(smoke_recipe_path, ["training.gpus=2", "training.gradient_accumulation_steps=4"])
    assert any("2 GPUs" in n and "8 examples" in n for n in two.notes())


@pytest.mark.slow  # reads SmolLM2's tokenizer from the model cache
def test_cli_check_refuses_prompts_that_cannot_fit_the_context(smoke_recipe_path: Path, smol_model: Path) -> None:
    ok = subprocess.run([sys.executable, "-m", "emgate.cli", "check", str(smoke_recipe_path)], capture_output=True, text=True)
    assert ok.returncode == 0 and "every prompt fits serving.max_model_len" in " ".join(ok.stdout.split())
    judge = subprocess.run([sys.executable, "-m", "emgate.cli", "check", str(smoke_recipe_path), "--set",
                            "serving.max_model_len=600", "--set", "sampling.max_tokens=380"], capture_output=True, text=True)
    assert judge.returncode == 2 and "the judge's max_model_len (600 tokens) is too small" in " ".join(judge.stderr.split())
    assert "Traceback" not in judge.stderr
