"""Recurring pipeline runs on a Kubeflow cluster, through kfp.Client.

KFP reads a 6-field cron with seconds first ("0 0 3 * * *" is 03:00:00 every day); a 5-field expression would
be read with its fields shifted, so it is refused here. The KFP API cannot update a recurring run: a changed
schedule disables the old one (kept for the audit trail) and creates a new one; an unchanged one is left alone.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from emgate.recipe import Recipe, VariantSpec
from emgate.registry import NEWEST_UNGATED

Mode = Literal["retrain", "gate-newest"]
MAX_CONCURRENCY = 1  # runs of one schedule at a time: a second would race the first for GPUs and the registry


class ScheduleError(ValueError):
    """A schedule that cannot be created; the message names the option and the fix."""


_CRON_FIELDS = ("second", "minute", "hour", "day of month", "month", "day of week")
_CRON_ATOM = re.compile(r"^(\*|\?|[0-9A-Za-z]+(-[0-9A-Za-z]+)?|\*/\d+|[0-9A-Za-z]+(-[0-9A-Za-z]+)?/\d+)$")


def check_cron(expression: str) -> str:
    """The expression if it is a 6-field cron (seconds first), else a ScheduleError that says how to fix it."""
    fields = expression.split()
    if len(fields) == 5:
        raise ScheduleError(
            f"--cron {expression!r} has 5 fields; KFP reads 6, seconds first, so this would shift every field "
            f"(minute read as second, ...). Put the seconds in front: '0 {expression}'")
    if len(fields) != 6:
        raise ScheduleError(f"--cron {expression!r} has {len(fields)} fields; KFP needs 6: "
                            f"{' '.join(_CRON_FIELDS)} (e.g. '0 0 3 * * *' = 03:00:00 every day)")
    for name, value in zip(_CRON_FIELDS, fields, strict=True):
        if not all(_CRON_ATOM.match(part) for part in value.split(",")):
            raise ScheduleError(f"--cron {expression!r}: the {name} field {value!r} is not cron syntax")
    return expression


def gate_newest_recipe(recipe: Recipe) -> Recipe:
    """The recipe that gates, instead of training, the newest registered version of each candidate that has no
    decision yet; each candidate is compared with the un-fine-tuned reference of its model (added if missing)."""
    variants: list[VariantSpec] = []
    references = {v.model: v.name for v in recipe.variants if v.role == "reference"}
    prefix = recipe.mlflow.registered_model_prefix
    for v in recipe.variants:
        if v.role == "candidate":
            if v.model not in references:
                references[v.model] = f"{v.model}-reference"[:63]
                variants.append(VariantSpec(name=references[v.model], role="reference", model=v.model,
                                            template=v.template))
            adapter = v.adapter or f"models:/{prefix}-{v.name}@{NEWEST_UNGATED}"
            variants.append(v.model_copy(update={"dataset": None, "adapter": adapter,
                                                 "comparator": references[v.model]}))
        elif v.role == "reference":
            variants.append(v)
    data = recipe.model_dump(mode="json")
    data.update(name=f"{recipe.name}-gate"[:63], datasets={}, variants=[x.model_dump(mode="json") for x in variants],
                description=f"{recipe.description} (gates the newest ungated registered version of each candidate)")
    return Recipe.model_validate(data)


@dataclass
class ScheduleResult:
    pipeline_id: str
    pipeline_version_id: str
    experiment_id: str
    recurring_run_id: str
    created: bool  # False: an identical schedule was already enabled
    disabled: list[str] = field(default_factory=list)  # ids of replaced recurring runs


def make_client(host: str, namespace: str | None) -> Any:
    """kfp.Client for HOST: the projected service-account token ($KF_PIPELINES_SA_TOKEN_PATH) when mounted (in a
    cluster), else the bearer token in $KFP_TOKEN, else none (a port-forward). Tokens are never printed."""
    import kfp
    from kfp.client import KF_PIPELINES_SA_TOKEN_ENV, KF_PIPELINES_SA_TOKEN_PATH
    from kfp.client.set_volume_credentials import ServiceAccountTokenVolumeCredentials

    token_path = os.environ.get(KF_PIPELINES_SA_TOKEN_ENV) or KF_PIPELINES_SA_TOKEN_PATH
    kwargs: dict[str, Any] = {"host": host}
    if namespace:
        kwargs["namespace"] = namespace
    if Path(token_path).is_file():
        kwargs["credentials"] = ServiceAccountTokenVolumeCredentials(path=token_path)
    elif os.environ.get("KFP_TOKEN"):
        kwargs["existing_token"] = os.environ["KFP_TOKEN"]
    with warnings.catch_warnings():  # "This client only works with Kubeflow Pipeline v2.0.0-beta.2 and later"
        warnings.simplefilter("ignore", FutureWarning)
        return kfp.Client(**kwargs)


def _enabled(run: Any) -> bool:
    status = str(run.status or "")
    return status == "ENABLED" or (status in ("", "STATUS_UNSPECIFIED") and str(run.mode or "") == "ENABLE")


def _all(list_call: Any, attr: str, **kwargs: Any) -> list[Any]:
    items: list[Any] = []
    token = ""
    while True:
        page = list_call(page_token=token, page_size=100, **kwargs)
        items.extend(getattr(page, attr) or [])
        token = page.next_page_token or ""
        if not token:
            return items


def schedule_pipeline(recipe: Recipe, client: Any, cron: str, experiment: str, name: str,
                      namespace: str | None = None, mode: Mode = "retrain") -> ScheduleResult:
    """Upload the compiled pipeline (one version per distinct YAML) and make NAME the one enabled recurring run."""
    from emgate_pipelines.graph import compile_pipeline

    check_cron(cron)
    effective = gate_newest_recipe(recipe) if mode == "gate-newest" else recipe
    with tempfile.TemporaryDirectory() as tmp:
        package = str(Path(tmp) / f"{effective.name}.yaml")
        compile_pipeline(effective, package)
        digest = hashlib.sha256(Path(package).read_bytes()).hexdigest()[:12]
        pipeline_name = f"emgate-{effective.name}"
        version_name = f"{pipeline_name}-{digest}"
        pipeline_id = client.get_pipeline_id(pipeline_name)
        if pipeline_id is None:
            pipeline_id = client.upload_pipeline(package, pipeline_name=pipeline_name, namespace=namespace,
                                                 description=effective.description[:1000]).pipeline_id
        versions = _all(client.list_pipeline_versions, "pipeline_versions", pipeline_id=pipeline_id)
        version = next((v for v in versions if v.display_name == version_name), None)
        if version is None:
            version = client.upload_pipeline_version(package, pipeline_version_name=version_name,
                                                     pipeline_id=pipeline_id)
    version_id = version.pipeline_version_id
    experiment_id = client.create_experiment(experiment, namespace=namespace).experiment_id  # get-or-create
    existing = [r for r in _all(client.list_recurring_runs, "recurring_runs", experiment_id=experiment_id)
                if r.display_name == name and _enabled(r)]
    for run in existing:
        same_version = run.pipeline_version_reference and run.pipeline_version_reference.pipeline_version_id == version_id
        cron_now = run.trigger.cron_schedule.cron if run.trigger and run.trigger.cron_schedule else None
        if same_version and cron_now == cron and len(existing) == 1:
            return ScheduleResult(pipeline_id, version_id, experiment_id, run.recurring_run_id, created=False)
    disabled = []
    for run in existing:
        client.disable_recurring_run(run.recurring_run_id)
        disabled.append(run.recurring_run_id)
    created = client.create_recurring_run(
        experiment_id=experiment_id, job_name=name, cron_expression=cron, max_concurrency=MAX_CONCURRENCY,
        no_catchup=True, pipeline_id=pipeline_id, version_id=version_id, enabled=True,
        description=f"emgate {mode}: recipe {recipe.name}, pipeline version {version_name}")
    return ScheduleResult(pipeline_id, version_id, experiment_id, created.recurring_run_id, created=True,
                          disabled=disabled)
