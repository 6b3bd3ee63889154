"""The emgate pipeline graph, built from a recipe.

slice_recipe -> fetch_model -> validate_datasets -> fine_tune (one task per variant and seed) -> sample_answers -> judge_answers
-> summarize -> register_and_gate -> promote_passed (under dsl.If: only when a candidate passed).
The recipe travels as one JSON pipeline parameter whose default is the
recipe the pipeline was compiled from, so a compiled YAML is self-contained and a run can override it;
slice_recipe hands each cached stage only the fields it reads (emgate.slices).
"""

# No `from __future__ import annotations`: KFP reads the real annotation objects.

from typing import Any

from kfp import dsl, kubernetes

from emgate.kfp.components import make_components
from emgate.recipe import Recipe
from emgate.slices import PINNED_ENV, pinned_json


def build_pipeline(recipe: Recipe, cluster: bool = True) -> Any:
    """The pipeline function. `cluster=False` (the local runner) leaves out the Kubernetes settings: GPUs, the
    model-cache PVC, Secrets and environment variables, which would mean nothing, or the wrong thing, locally."""
    comps = make_components(recipe.images or None)
    jobs = recipe.training_jobs()
    k8s = ClusterSettings(recipe) if cluster else None
    gpu = recipe.profile != "smoke"  # smoke trains and serves SmolLM2 on CPUs
    serves = recipe.serving.endpoint is None  # with an endpoint, sample_answers only sends requests

    def _stages(recipe_json: Any) -> None:
        # Each cached stage gets only the recipe fields it reads (emgate.slices), so its cache key changes only
        # when one of them does; the gate, promotion and the exit handler get the whole recipe.
        sliced = comps.slice_recipe(recipe_json=recipe_json)
        sliced.set_display_name("slice the recipe")
        part = sliced.outputs
        fetched = comps.fetch_model(recipe_json=part["fetch_model"])
        fetched.set_display_name("fetch models (cache)")
        validated = comps.validate_datasets(recipe_json=part["validate_datasets"])
        validated.set_display_name("validate datasets")
        validated.after(fetched)
        if jobs:
            with dsl.ParallelFor(items=jobs, parallelism=1 if recipe.profile == "smoke" else 0) as job:
                job_slice = comps.slice_fine_tune_job(recipe_json=recipe_json, job=job)
                job_slice.set_display_name("slice the recipe for the job")
                trained = comps.fine_tune(recipe_json=job_slice.output, job=job, validated=validated.outputs["validated"])
                trained.set_display_name("fine-tune")
            adapters = dsl.Collected(trained.outputs["adapter"])
            sampled = comps.sample_answers(recipe_json=part["sample_answers"], adapters=adapters)
        else:  # only adapters trained elsewhere (and references): nothing to fine-tune
            sampled = comps.sample_answers_untrained(recipe_json=part["sample_answers"])
            sampled.after(validated)
        sampled.set_display_name("sample answers (vLLM)")
        if recipe.external_variants():
            # An adapter URI (models:/NAME@ALIAS, a folder) can point at new weights under the same recipe:
            # never reuse old answers for it.
            sampled.set_caching_options(False)
        judged = comps.judge_answers(recipe_json=part["judge_answers"], answers=sampled.outputs["answers"])
        judged.set_display_name("judge answers")
        summary = comps.summarize(recipe_json=part["summarize"], scores=judged.outputs["scores"])
        summary.set_display_name("summarize")
        evidence = {"recipe_json": recipe_json, "kfp_run": dsl.PIPELINE_JOB_ID_PLACEHOLDER,
                    "validated": validated.outputs["validated"], "answers": sampled.outputs["answers"],
                    "scores": judged.outputs["scores"], "summary": summary.outputs["summary"]}
        if jobs:
            gate = comps.register_and_gate(adapters=dsl.Collected(trained.outputs["adapter"]), **evidence)
        else:
            gate = comps.register_and_gate_untrained(**evidence)
        gate.set_display_name("register and gate (MLflow)")
        gate.set_caching_options(False)  # every run decides anew and logs to its own MLflow parent run
        # A string condition: the local runner skips float comparisons silently (ENVIRONMENT.md).
        with dsl.If(gate.outputs["Output"] == "true", name="a-candidate-passed"):
            promoted = comps.promote_passed(recipe_json=recipe_json, kfp_run=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
                                            decisions=gate.outputs["decisions"])
            promoted.set_display_name("promote passed versions (champion alias)")
            promoted.set_caching_options(False)
        if k8s:
            k8s.apply(sliced, "slice_recipe")
            k8s.apply(fetched, "fetch_model", retry=True)
            k8s.apply(validated, "validate_datasets")
            if jobs:
                k8s.apply(job_slice, "slice_fine_tune_job")
                k8s.apply(trained, "fine_tune", gpus=recipe.training.gpus if gpu else 0)
            k8s.apply(sampled, "sample_answers", gpus=recipe.serving.tensor_parallel_size if gpu and serves else 0,
                      retry=True)
            k8s.apply(judged, "judge_answers", retry=True)
            k8s.apply(summary, "summarize")
            k8s.apply(gate, "register_and_gate", retry=True)
            k8s.apply(promoted, "promote_passed", retry=True)

    @dsl.pipeline(name=f"emgate-{recipe.name}",
                  description=f"emgate misalignment gate, recipe {recipe.name} ({recipe.profile})")
    def emgate_pipeline(recipe_json: str = recipe.to_json()) -> None:
        # Runs after everything else, even on failure: a failed run becomes a FAILED MLflow run with the reason.
        outcome = comps.record_outcome(recipe_json=recipe_json, kfp_run=dsl.PIPELINE_JOB_ID_PLACEHOLDER)
        outcome.set_display_name("record outcome (MLflow)")
        outcome.set_caching_options(False)
        if k8s:
            k8s.apply(outcome, "record_outcome", retry=True)
        with dsl.ExitHandler(outcome, name="emgate"):
            _stages(recipe_json)  # KFP returns no outputs from inside an exit handler: read decisions.json

    return emgate_pipeline


class ClusterSettings:
    """kfp-kubernetes settings of one task: GPUs with their node selector, tolerations and an in-memory /dev/shm
    on the GPU stages only; the model-cache PVC everywhere; each Secret only on the stages that use it."""

    def __init__(self, recipe: Recipe) -> None:
        self.spec = recipe.kubernetes
        self.pinned = pinned_json(recipe)  # every task refuses a run whose recipe_json moves one of these
        models = recipe.models.values()
        adapters = [v.adapter or "" for v in recipe.variants]
        names = self.spec.secrets
        mlflow = recipe.mlflow.tracking_uri.startswith(("http://", "https://"))
        mlflow_stages = set(STAGES) - {"fetch_model", "slice_recipe", "slice_fine_tune_job"}
        self.secrets: list[tuple[set[str], str, dict[str, str]]] = []
        if mlflow:
            self.secrets.append((mlflow_stages, names.mlflow,
                                 {"username": "MLFLOW_TRACKING_USERNAME", "password": "MLFLOW_TRACKING_PASSWORD"}))
        judge_keys = {"api-key": recipe.judge.api_key_env} if recipe.judge.api_key_env and recipe.judge.serve is None else {}
        judge_keys |= {f"api-key-{m.name}": m.api_key_env for m in recipe.judge.panel if m.api_key_env}  # panel judges
        if judge_keys:
            self.secrets.append(({"judge_answers"}, names.judge, judge_keys))
        s3_stages = ({"fetch_model"} if any(m.source == "s3" for m in models) else set()) | (
            {"sample_answers"} if any(a.startswith("s3://") for a in adapters) else set())
        if s3_stages:
            self.secrets.append((s3_stages, names.s3, {"access-key-id": "AWS_ACCESS_KEY_ID",
                                                      "secret-access-key": "AWS_SECRET_ACCESS_KEY"}))
        hub_stages = ({"fetch_model"} if any(m.source == "hub" for m in models) else set()) | (
            {"sample_answers"} if any(a.startswith("hf://") for a in adapters) else set())
        if hub_stages:
            self.secrets.append((hub_stages, names.hub, {"token": "HF_TOKEN"}))
        endpoint = recipe.serving.endpoint
        if endpoint is not None and endpoint.api_key_env:
            self.secrets.append(({"sample_answers"}, names.endpoint, {"api-key": endpoint.api_key_env}))

    def apply(self, task: Any, stage: str, gpus: int = 0, retry: bool = False) -> None:
        spec = self.spec
        if gpus:
            task.set_accelerator_type(spec.gpu_resource).set_accelerator_limit(gpus)
            for key, value in spec.gpu_node_selector.items():
                kubernetes.add_node_selector(task, label_key=key, label_value=value)
            for t in spec.gpu_tolerations:
                kubernetes.add_toleration(task, key=t.key, operator=t.operator, value=t.value, effect=t.effect)
            # vLLM's workers and torch's DataLoader share tensors through /dev/shm; a container's default is 64 MiB.
            kubernetes.empty_dir_mount(task, volume_name="dshm", mount_path="/dev/shm", medium="Memory",
                                       size_limit=spec.shm_size)
        if spec.policy_configmap and stage in POLICY_STAGES:  # compiled in: a run's parameter cannot move it
            kubernetes.use_config_map_as_volume(task, config_map_name=spec.policy_configmap, mount_path=POLICY_MOUNT)
            task.set_env_variable("EMGATE_POLICY_FILE", f"{POLICY_MOUNT}/policy.yaml")
        if spec.private_questions_secret and stage in POLICY_STAGES:
            kubernetes.use_secret_as_volume(task, secret_name=spec.private_questions_secret, mount_path=PRIVATE_MOUNT)
        if spec.gate_key_secret and stage in ("register_and_gate", "promote_passed"):  # the gate's two tasks
            kubernetes.use_secret_as_volume(task, secret_name=spec.gate_key_secret, mount_path=GATE_KEY_MOUNT)
            task.set_env_variable("EMGATE_GATE_SIGNING_KEY_FILE", f"{GATE_KEY_MOUNT}/gate.key")
        if spec.gate_public_key_configmap and stage in ("register_and_gate", "promote_passed"):
            kubernetes.use_config_map_as_volume(task, config_map_name=spec.gate_public_key_configmap,
                                                mount_path=GATE_PUBLIC_MOUNT)
            task.set_env_variable("EMGATE_GATE_PUBLIC_KEY", GATE_PUBLIC_MOUNT)
        if spec.model_cache_pvc:
            kubernetes.mount_pvc(task, pvc_name=spec.model_cache_pvc, mount_path=spec.model_cache_mount)
            task.set_env_variable("EMGATE_CACHE_DIR", f"{spec.model_cache_mount.rstrip('/')}/emgate")
        for name, value in spec.env.items():
            task.set_env_variable(name, value)
        task.set_env_variable(PINNED_ENV, self.pinned)
        for stages, secret, keys in self.secrets:
            if stage in stages:
                kubernetes.use_secret_as_env(task, secret_name=secret, secret_key_to_env=keys)
        if spec.image_pull_secrets:
            kubernetes.set_image_pull_secrets(task, spec.image_pull_secrets)
        if retry and spec.retries:
            task.set_retry(num_retries=spec.retries, backoff_duration="60s", backoff_factor=2.0,
                           backoff_max_duration="1800s")


# The tasks that read the platform's gate floor (the gate's, and the private question sets' readers), and where its
# ConfigMap and the private sets' Secret are mounted on them
POLICY_STAGES = ("slice_recipe", "validate_datasets", "sample_answers", "judge_answers", "summarize",
                 "register_and_gate", "promote_passed")
POLICY_MOUNT = "/etc/emgate/policy"
PRIVATE_MOUNT = "/etc/emgate/private"
GATE_KEY_MOUNT = "/etc/emgate/gate-key"  # the gate's signing key (Secret), on register_and_gate and promote_passed
GATE_PUBLIC_MOUNT = "/etc/emgate/gate-public"  # the verifiers' public keys (ConfigMap), as a folder of *.pem
# Stage names as ClusterSettings.apply knows them.
STAGES = ("slice_recipe", "slice_fine_tune_job", "fetch_model", "validate_datasets", "fine_tune", "sample_answers",
          "judge_answers", "summarize",
          "register_and_gate", "promote_passed", "record_outcome")


def compile_pipeline(recipe: Recipe, path: str) -> None:
    from kfp import compiler

    compiler.Compiler().compile(build_pipeline(recipe), package_path=path)
