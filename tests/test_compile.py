"""The compiled pipeline YAML: committed for each shipped recipe, never stale, every stage on its own image."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from emgate.recipe import load_recipe
from emgate_pipelines.graph import compile_pipeline

RECIPES = ["smoke", "single-gpu", "paper", "gate-adapter"]
STAGE_IMAGES = {"slice-recipe": "gate", "slice-fine-tune-job": "gate",
                "fetch-model": "fetch", "validate-datasets": "validate", "fine-tune": "train", "sample-answers": "sample",
                "judge-answers": "judge", "summarize": "summarize", "register-and-gate": "gate", "promote-passed": "gate",
                "record-outcome": "gate"}
# gate-adapter trains nothing: its sampling and gate steps are the variants without adapter inputs
UNTRAINED_IMAGES = {k: v for k, v in STAGE_IMAGES.items() if k not in ("fine-tune", "sample-answers", "register-and-gate",
                                                                        "slice-fine-tune-job")} | {
    "sample-answers-untrained": "sample", "register-and-gate-untrained": "gate"}


@pytest.mark.parametrize("name", RECIPES)
def test_committed_pipeline_yaml_is_current(repo: Path, tmp_path: Path, name: str) -> None:
    recipe = load_recipe(repo / "pipelines" / "recipes" / f"{name}.yaml")
    fresh = tmp_path / f"{name}.yaml"
    compile_pipeline(recipe, str(fresh))
    committed = repo / "pipelines" / "compiled" / f"{name}.yaml"
    assert committed.is_file(), f"run: emgate compile pipelines/recipes/{name}.yaml -o {committed.relative_to(repo)}"
    assert committed.read_text() == fresh.read_text(), (
        f"{committed.relative_to(repo)} is stale: run emgate compile pipelines/recipes/{name}.yaml -o "
        f"{committed.relative_to(repo)}")


@pytest.mark.parametrize("name", RECIPES)
def test_compiled_pipeline_shape(repo: Path, name: str) -> None:
    doc = yaml.safe_load_all((repo / "pipelines" / "compiled" / f"{name}.yaml").read_text()).__next__()
    executors = doc["deploymentSpec"]["executors"]
    images = {key.removeprefix("exec-"): e["container"]["image"] for key, e in executors.items()}
    expected = UNTRAINED_IMAGES if name == "gate-adapter" else STAGE_IMAGES
    assert set(images) == set(expected)
    for stage, image in images.items():
        assert f"/emgate-{expected[stage]}:" in image, (stage, image)
    default = doc["root"]["inputDefinitions"]["parameters"]["recipe_json"]["defaultValue"]
    recipe = load_recipe(repo / "pipelines" / "recipes" / f"{name}.yaml")
    assert json.loads(default) == json.loads(recipe.to_json())
    tasks = doc["root"]["dag"]["tasks"]
    assert tasks["record-outcome"]["triggerPolicy"]["strategy"] == "ALL_UPSTREAM_TASKS_COMPLETED"  # runs on failure too
    inner = doc["components"]["comp-exit-handler-1"]["dag"]["tasks"]
    gate = inner["register-and-gate-untrained" if name == "gate-adapter" else "register-and-gate"]
    assert not gate.get("cachingOptions", {}).get("enableCache", False)
    if name == "gate-adapter":  # an adapter URI may point at new weights: its answers are never reused
        assert not inner["sample-answers-untrained"].get("cachingOptions", {}).get("enableCache", False)
    # promotion runs only under a condition on the gate's STRING output (a float comparison is skipped locally)
    conditions = {name: c for name, c in doc["components"].items() if "promote-passed" in c.get("dag", {}).get("tasks", {})}
    assert len(conditions) == 1
    branch = next(t for t in doc["components"]["comp-exit-handler-1"]["dag"]["tasks"].values()
                  if t["componentRef"]["name"] in conditions)
    condition = branch["triggerPolicy"]["condition"]
    gate_task = "register-and-gate-untrained" if name == "gate-adapter" else "register-and-gate"
    assert condition == f"inputs.parameter_values['pipelinechannel--{gate_task}-Output'] == 'true'"
    assert gate_task in branch["dependentTasks"]
    resources = {k: e["container"].get("resources", {}) for k, e in executors.items()}
    gpu_stages = {k for k, r in resources.items() if "accelerator" in r}
    assert gpu_stages == (set() if name in ("smoke", "gate-adapter") else {"exec-fine-tune", "exec-sample-answers"})


def platform(repo: Path, name: str) -> dict[str, dict]:
    """The kfp-kubernetes settings of each executor (the compiled file's second YAML document)."""
    _, platform_doc = yaml.safe_load_all((repo / "pipelines" / "compiled" / f"{name}.yaml").read_text())
    return {k.removeprefix("exec-"): v for k, v in platform_doc["platforms"]["kubernetes"]["deploymentSpec"]["executors"].items()}


@pytest.mark.parametrize("name", RECIPES)
def test_cluster_settings_go_only_where_needed(repo: Path, name: str) -> None:
    recipe = load_recipe(repo / "pipelines" / "recipes" / f"{name}.yaml")
    k8s = platform(repo, name)
    gpu_stages = set() if recipe.profile == "smoke" else {"fine-tune", "sample-answers"}
    for stage, spec in k8s.items():
        on_gpu = stage in gpu_stages
        shm = [m for m in spec.get("emptyDirMounts", []) if m["mountPath"] == "/dev/shm"]
        assert bool(shm) == on_gpu, stage
        assert bool(spec.get("tolerations")) == on_gpu, stage
        if shm:
            assert shm[0]["medium"] == "Memory" and shm[0]["sizeLimit"] == recipe.kubernetes.shm_size
        assert [m["mountPath"] for m in spec["pvcMount"]] == ["/mnt/models"], stage  # the model cache, everywhere
        secrets = {s["secretName"]: {e["envVar"] for e in s["keyToEnv"]} for s in spec.get("secretAsEnv", [])}
        if stage == "judge-answers" and recipe.judge.api_key_env and recipe.judge.serve is None:
            assert secrets["emgate-judge"] == {recipe.judge.api_key_env}
        else:
            assert "emgate-judge" not in secrets, stage  # the judge's key reaches the judge stage only
        uses_mlflow_server = recipe.mlflow.tracking_uri.startswith("http")
        # slice_recipe only reads its parameter, fetch_model only the model store
        assert ("emgate-mlflow-auth" in secrets) == (uses_mlflow_server and stage not in ("fetch-model", "slice-recipe",
                                                                                          "slice-fine-tune-job")), stage
    # Retries only where a rerun is safe and the failure is likely transient (network, preemption).
    text = (repo / "pipelines" / "compiled" / f"{name}.yaml").read_text()
    doc = next(yaml.safe_load_all(text))
    inner = doc["components"]["comp-exit-handler-1"]["dag"]["tasks"]
    assert inner["fetch-model"]["retryPolicy"]["maxRetryCount"] == recipe.kubernetes.retries
    assert "retryPolicy" not in inner.get("summarize", {}) and "retryPolicy" not in inner["validate-datasets"]


def test_no_secret_value_reaches_a_compiled_pipeline(repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-should-never-appear-123")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "pw-should-never-appear-456")
    out = tmp_path / "paper.yaml"
    compile_pipeline(load_recipe(repo / "pipelines" / "recipes" / "paper.yaml"), str(out))
    text = out.read_text()
    assert "sk-should-never-appear-123" not in text and "pw-should-never-appear-456" not in text
    assert "secretName: emgate-judge" in text


def test_a_credential_in_plain_env_is_refused(repo: Path) -> None:
    from emgate.recipe import RecipeError

    with pytest.raises(RecipeError, match="looks like a credential; put it in a Kubernetes Secret"):
        load_recipe(repo / "pipelines" / "recipes" / "paper.yaml", ["kubernetes.env.HF_TOKEN=hf_abc"])


def test_gpu_node_selector_and_tolerations_come_from_the_recipe(repo: Path, tmp_path: Path) -> None:
    recipe = load_recipe(repo / "pipelines" / "recipes" / "paper.yaml", [
        "kubernetes.gpu_node_selector.gpu-pool=h100"])
    out = tmp_path / "paper.yaml"
    compile_pipeline(recipe, str(out))
    _, platform_doc = yaml.safe_load_all(out.read_text())
    executors = platform_doc["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert executors["exec-sample-answers"]["nodeSelector"]["labels"] == {"gpu-pool": "h100"}
    assert "nodeSelector" not in executors["exec-judge-answers"]
    doc = next(yaml.safe_load_all(out.read_text()))
    resources = doc["deploymentSpec"]["executors"]["exec-sample-answers"]["container"]["resources"]
    assert resources["accelerator"]["resourceCount"] == str(recipe.serving.tensor_parallel_size)


def test_cli_compile_writes_the_same_yaml(repo: Path, tmp_path: Path) -> None:
    import subprocess
    import sys

    out = tmp_path / "smoke.yaml"
    proc = subprocess.run([sys.executable, "-m", "emgate.cli", "compile", "pipelines/recipes/smoke.yaml", "-o", str(out)],
                          cwd=repo, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert out.read_text() == (repo / "pipelines" / "compiled" / "smoke.yaml").read_text()


def test_sampling_an_existing_endpoint_needs_no_gpu_and_gets_its_key_from_a_secret(repo: Path, tmp_path: Path) -> None:
    from emgate.recipe import RecipeError
    from emgate.schedule import gate_newest_recipe

    paper = load_recipe(repo / "pipelines" / "recipes" / "paper.yaml")
    with pytest.raises(RecipeError, match="are fine-tuned by this pipeline, so no existing endpoint serves them"):
        load_recipe(repo / "pipelines" / "recipes" / "paper.yaml", ["serving.endpoint.base_url=http://kserve/v1"])
    data = gate_newest_recipe(paper).model_dump(mode="json")
    data["serving"]["endpoint"] = {"base_url": "http://qwen.team.svc/v1", "api_key_env": "ENDPOINT_KEY"}
    from emgate.recipe import recipe_from_mapping

    out = tmp_path / "endpoint.yaml"
    compile_pipeline(recipe_from_mapping(data), str(out))
    doc, platform_doc = yaml.safe_load_all(out.read_text())
    assert "accelerator" not in doc["deploymentSpec"]["executors"]["exec-sample-answers-untrained"]["container"].get(
        "resources", {})
    sample = platform_doc["platforms"]["kubernetes"]["deploymentSpec"]["executors"]["exec-sample-answers-untrained"]
    secrets = {s["secretName"]: s["keyToEnv"] for s in sample["secretAsEnv"]}
    assert secrets["emgate-endpoint"] == [{"envVar": "ENDPOINT_KEY", "secretKey": "api-key"}]
    assert "emptyDirMounts" not in sample and "tolerations" not in sample


def test_the_gate_tasks_mount_the_platforms_floor(repo: Path, tmp_path: Path) -> None:
    """Compiled in, not read from the run's parameter: the policy ConfigMap and $EMGATE_POLICY_FILE on the tasks that
    apply the floor, and on no other."""
    from emgate_pipelines.graph import POLICY_MOUNT, POLICY_STAGES

    out = tmp_path / "paper.yaml"
    compile_pipeline(load_recipe(repo / "pipelines" / "recipes" / "paper.yaml"), str(out))
    _, platform_doc = yaml.safe_load_all(out.read_text())
    executors = platform_doc["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    doc = next(yaml.safe_load_all(out.read_text()))
    for key, spec in executors.items():
        stage = key.removeprefix("exec-").replace("-", "_")
        mounts = [m for m in spec.get("configMapAsVolume", []) if m["configMapName"] == "emgate-policy"]
        assert bool(mounts) == (stage in POLICY_STAGES), stage
        if mounts:
            assert mounts[0]["mountPath"] == POLICY_MOUNT
            env = doc["deploymentSpec"]["executors"][key]["container"].get("env", [])
            assert {"name": "EMGATE_POLICY_FILE", "value": f"{POLICY_MOUNT}/policy.yaml"} in env
