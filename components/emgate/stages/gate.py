"""register_and_gate: log the run to MLflow, register every candidate and decide, fail closed, on promotion.

One parent run per pipeline run (found again by its run key, so a rerun adds nothing twice), one child run per
stage and fine-tuning job, logged from the stages' artifacts (so stages reused from the KFP cache are logged
too). Each candidate adapter becomes a version of the registered model PREFIX-VARIANT with the decision, every
rule's verdict, the evidence's hashes and the gate report's sha256 as tags, and a description that shows the
decision in the MLflow UI. Aliases, not stages: `candidate` moves to each gated version; `champion` moves only
through emgate.registry.promote, which the pipeline's promotion step calls for versions that passed.
"""

from __future__ import annotations

import hashlib
import json
import math
import operator
import tempfile
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from emgate import __version__
from emgate.adapters import EXTERNAL_FILE
from emgate.io import read_json, write_json
from emgate.merge import weights_sha256
from emgate.recipe import GateRule, Recipe

OPS = {"<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge}
DECISIONS_FILE = "decisions.json"
RUN_KEY_TAG = "emgate.run_key"


@dataclass
class Verdict:
    metric: str
    op: str
    threshold: float
    value: float | None
    passed: bool
    reason: str


@dataclass
class Decision:
    variant: str
    decision: str  # "passed" or "blocked"
    verdicts: list[Verdict]

    @property
    def passed(self) -> bool:
        return self.decision == "passed"

    def reasons(self) -> list[str]:
        return [v.reason for v in self.verdicts if not v.passed]


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return 1.0 if value else 0.0
    if isinstance(value, int | float) and not math.isnan(value):
        return float(value)
    return None


def evaluate_policy(recipe: Recipe, variant: str, metrics: dict[str, Any] | None,
                    not_applicable: dict[str, str] | None = None) -> Decision:
    """Every rule gives a verdict; a missing or NaN metric is a failed rule ('missing evidence'): fail closed.
    `not_applicable` names rules that cannot apply to this variant, with the reason (recorded in the verdict):
    only dataset validation, for an adapter trained elsewhere."""
    rules = [*recipe.gate.rules,
             GateRule(metric="min_judged_per_question", op=">=", threshold=recipe.gate.min_judged_per_question)]
    verdicts = []
    if metrics is not None and metrics.get("answers") == 0:
        verdicts.append(Verdict("answers", ">=", 1, 0.0, False, "missing evidence: no answers of its own"))
    for rule in rules:
        if rule.metric in (not_applicable or {}) and rule.metric == "dataset_validation_passed":
            verdicts.append(Verdict(rule.metric, rule.op, rule.threshold, None, True,
                                    f"not applicable: {(not_applicable or {})[rule.metric]}"))
            continue
        raw = None if metrics is None else metrics.get(rule.metric)
        value = _number(raw)
        if value is None:
            state = "missing" if raw is None else f"not a number ({raw!r})"
            verdicts.append(Verdict(rule.metric, rule.op, rule.threshold, None, False,
                                    f"missing evidence: {rule.metric} is {state}"))
            continue
        if not math.isfinite(value):
            verdicts.append(Verdict(rule.metric, rule.op, rule.threshold, None, False,
                                    f"missing evidence: {rule.metric} is not finite ({value!r})"))
            continue
        ok = OPS[rule.op](value, rule.threshold)
        word = "holds" if ok else "fails"
        reason = f"{rule.metric} = {value:.4g} {rule.op} {rule.threshold:g} {word}"
        if rule.metric == "min_judged_per_question" and not ok:
            short = [f"{q} ({e.get('judged', 0)})" for q, e in ((metrics or {}).get("per_question") or {}).items()
                     if e.get("judged", 0) < rule.threshold]
            reason += (f": judged answers below {rule.threshold:g} for " + ", ".join(short)) if short else ""
        verdicts.append(Verdict(rule.metric, rule.op, rule.threshold, value, ok, reason))
    return Decision(variant, "passed" if all(v.passed for v in verdicts) else "blocked", verdicts)


def version_decision(own: Decision, pooled: Decision) -> Decision:
    """A registered version (one training seed) passes only when its own answers and the variant's pooled answers
    both pass; the pooled verdicts are recorded beside its own, prefixed `pooled.`."""
    verdicts = [*own.verdicts, *(Verdict(f"pooled.{v.metric}", v.op, v.threshold, v.value, v.passed, f"pooled: {v.reason}")
                                 for v in pooled.verdicts)]
    return Decision(own.variant, "passed" if own.passed and pooled.passed else "blocked", verdicts)


def gate_report_markdown(decision: Decision, context: dict[str, Any]) -> str:
    lines = [f"# emgate decision: {decision.variant} is {decision.decision.upper()}", ""]
    for key, value in context.items():
        lines.append(f"- {key}: {value}")
    lines += ["", "| metric | value | rule | verdict |", "| --- | ---: | --- | --- |"]
    for v in decision.verdicts:
        value = "missing" if v.value is None else f"{v.value:.4g}"
        lines.append(f"| {v.metric} | {value} | {v.op} {v.threshold:g} | {'pass' if v.passed else 'FAIL'}: {v.reason} |")
    return "\n".join(lines) + "\n"


def _sqlite_artifact_root(tracking_uri: str) -> str | None:
    if not tracking_uri.startswith("sqlite:///"):
        return None
    db = Path(tracking_uri.removeprefix("sqlite:///"))
    return (db.parent / "artifacts").resolve().as_uri()


def _ensure_sqlite_dir(tracking_uri: str) -> None:
    if tracking_uri.startswith("sqlite:///"):
        Path(tracking_uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)


def _flat_metrics(prefix: str, data: dict[str, Any]) -> dict[str, float]:
    out = {}
    for k, v in data.items():
        num = _number(v)
        if num is not None and not isinstance(v, bool):
            out[f"{prefix}{k}"] = num
    return out


def _log_series(client: Any, run_id: str, series: dict[str, list[float]]) -> None:
    """Per-step values (step counts from 1), in MLflow's batches."""
    from mlflow.entities import Metric

    now = int(datetime.now(UTC).timestamp() * 1000)
    items = [Metric(key=k, value=float(v), timestamp=now, step=i) for k, vs in series.items() for i, v in enumerate(vs, 1)]
    for i in range(0, len(items), 900):  # MLflow's batch limit is 1000 metrics
        client.log_batch(run_id, metrics=items[i:i + 900])


def _log_metrics(client: Any, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
    from mlflow.entities import Metric

    now = int(datetime.now(UTC).timestamp() * 1000)
    items = [Metric(key=k, value=v, timestamp=now, step=step) for k, v in metrics.items()]
    for i in range(0, len(items), 900):  # MLflow's batch limit is 1000 metrics
        client.log_batch(run_id, metrics=items[i:i + 900])


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def register_and_gate(recipe: Recipe, run_key: str, validation_dir: Path | None, adapter_dirs: list[Path],
                      answers_dir: Path | None, scores_dir: Path | None, summary_dir: Path | None,
                      out_dir: Path, kfp_run: str = "") -> dict[str, Any]:
    """Log everything to MLflow, register each candidate version and record its decision; returns decisions."""
    import mlflow
    from mlflow import MlflowClient

    cfg = recipe.mlflow
    _ensure_sqlite_dir(cfg.tracking_uri)
    mlflow.set_tracking_uri(cfg.tracking_uri)
    client = MlflowClient(cfg.tracking_uri)
    exp = client.get_experiment_by_name(cfg.experiment)
    exp_id = exp.experiment_id if exp else client.create_experiment(
        cfg.experiment, artifact_location=_sqlite_artifact_root(cfg.tracking_uri))

    found = client.search_runs([exp_id], filter_string=f"tags.`{RUN_KEY_TAG}` = '{run_key}' and tags.`emgate.stage` = 'pipeline'")
    if found:
        parent_id = found[0].info.run_id
    else:
        parent = client.create_run(exp_id, run_name=f"{recipe.name}-{run_key[:8]}",
                                   tags={RUN_KEY_TAG: run_key, "emgate.stage": "pipeline", "emgate.recipe": recipe.name,
                                         "emgate.profile": recipe.profile, "emgate.version": __version__,
                                         "emgate.kfp_run": kfp_run})
        parent_id = parent.info.run_id
        client.log_text(parent_id, json.dumps(recipe.model_dump(mode="json"), indent=2), "recipe.json")

    def child(stage: str, key: str, params: dict[str, Any] | None = None) -> tuple[str, bool]:
        """The child run for (stage, key); True when it already existed (nothing to log again)."""
        hits = client.search_runs([exp_id], filter_string=(
            f"tags.`mlflow.parentRunId` = '{parent_id}' and tags.`emgate.child` = '{stage}:{key}'"))
        if hits:
            return hits[0].info.run_id, True
        run = client.create_run(exp_id, run_name=f"{stage}:{key}" if key else stage,
                                tags={"mlflow.parentRunId": parent_id, "emgate.stage": stage,
                                      "emgate.child": f"{stage}:{key}", RUN_KEY_TAG: run_key})
        for k, v in (params or {}).items():
            client.log_param(run.info.run_id, k, str(v)[:500])
        return run.info.run_id, False

    # ---- evidence from each stage --------------------------------------------------------------------
    evidence_runs: dict[str, str] = {}
    validation_passed: bool | None = None
    dataset_hashes: dict[str, str] = {}
    if validation_dir is not None and (validation_dir / "report.json").is_file():
        report = read_json(validation_dir / "report.json")
        validation_passed = bool(report.get("passed")) and (validation_dir / "manifest.json").is_file()
        dataset_hashes = {n: e.get("sha256", "") for n, e in report["datasets"].items()}
        run_id, existed = child("validate_datasets", "")
        evidence_runs["validation"] = run_id
        if not existed:
            client.log_metric(run_id, "passed", float(validation_passed))
            for name, entry in report["datasets"].items():
                _log_metrics(client, run_id, _flat_metrics(f"{name}.", entry) |
                                   _flat_metrics(f"{name}.bandit.", entry.get("security_profile", {})))
            client.log_artifacts(run_id, str(validation_dir), "validation")
            client.set_terminated(run_id)

    # (variant, seed) -> (run id, report, adapter weights sha256); seed None: an adapter trained elsewhere
    train_runs: dict[tuple[str, int | None], tuple[str, dict[str, Any], str]] = {}
    for adapter in adapter_dirs:
        rep = read_json(adapter / "train_report.json")
        run_id, existed = child("fine_tune", f"{rep['variant']}@{rep['seed']}",
                                {**rep["training"], "variant": rep["variant"], "seed": rep["seed"],
                                 "dataset": rep["dataset"], "template": rep["template"]})
        if not existed:
            _log_series(client, run_id, {"train_loss": rep["losses"], "learning_rate": rep.get("learning_rates", [])})
            _log_metrics(client, run_id, _flat_metrics("", rep))
            client.log_artifacts(run_id, str(adapter), "adapter")
            client.set_terminated(run_id)
        train_runs[(rep["variant"], int(rep["seed"]))] = (run_id, rep, weights_sha256(adapter) or "missing")
    external = read_json(answers_dir / EXTERNAL_FILE) if answers_dir and (answers_dir / EXTERNAL_FILE).is_file() else {}
    for name, fetched in external.items():
        run_id, existed = child("external_adapter", name, {"uri": fetched["uri"], "registered_model": fetched["registered_model"],
                                                           "version": fetched["version"], "rank": fetched["rank"]})
        folder = answers_dir / "external" / name if answers_dir else None
        if not existed and folder is not None and folder.is_dir():
            client.log_artifacts(run_id, str(folder), "adapter")
            client.set_terminated(run_id)
        saved = folder / "emgate_template.json" if folder else None
        template = read_json(saved).get("name") if saved and saved.is_file() else recipe.variant(name).template
        train_runs[(name, None)] = (run_id, {"variant": name, "seed": None, "dataset": f"not trained here ({fetched['uri']})",
                                             "dataset_sha256": "", "template": template}, fetched["weights_sha256"])

    for stage, folder in (("sample_answers", answers_dir), ("judge_answers", scores_dir)):
        if folder is not None and (folder / "report.json").is_file():
            stage_report = read_json(folder / "report.json")
            # the serving dtype as resolved on the machine that sampled (serving.dtype: auto)
            params = {f"serving.{k}": v for k, v in stage_report.get("serving", {}).items()}
            run_id, existed = child(stage, "", params)
            evidence_runs[stage.split("_")[0]] = run_id
            if not existed:
                _log_metrics(client, run_id, _flat_metrics("", stage_report))
                client.log_artifacts(run_id, str(folder), stage)
                if stage == "judge_answers":
                    _log_table(client, run_id, folder / "scores.jsonl", SCORED_COLUMNS, "scored_answers.json")
                else:
                    _log_table(client, run_id, folder / "answers.jsonl", ANSWER_COLUMNS, "answers.json")
                client.set_terminated(run_id)

    summary: dict[str, Any] = {}
    if summary_dir is not None and (summary_dir / "summary.json").is_file():
        summary = read_json(summary_dir / "summary.json")
        run_id, existed = child("summarize", "")
        evidence_runs["summary"] = run_id
        if not existed:
            for name, m in summary["variants"].items():
                _log_metrics(client, run_id, _flat_metrics(f"{name}.", {k: v for k, v in m.items() if k != "per_question"}))
            client.log_artifacts(run_id, str(summary_dir), "summary")
            client.set_terminated(run_id)
        client.log_artifact(parent_id, str(summary_dir / "misaligned_rates.png"))
        client.log_artifact(parent_id, str(summary_dir / "summary.md"))

    # ---- decisions -----------------------------------------------------------------------------------
    judge_report = read_json(scores_dir / "report.json") if scores_dir and (scores_dir / "report.json").is_file() else {}
    qualification = judge_report.get("qualification")
    gate_run, _ = child("register_and_gate", "")
    decisions: dict[str, Any] = {}
    def with_evidence(metrics: dict[str, Any] | None) -> dict[str, Any] | None:
        if metrics is None:
            return None
        return {**metrics, "dataset_validation_passed": validation_passed,
                "judge_qualified": (qualification or {}).get("passed")}  # None (missing evidence) without one

    for v in recipe.variants:
        if v.role != "candidate":
            continue
        pooled_metrics = with_evidence(dict(summary.get("variants", {}).get(v.name) or {}) or None)
        not_applicable = {"dataset_validation_passed": f"not trained here ({v.adapter})"} if v.adapter else None
        pooled = evaluate_policy(recipe, v.name, pooled_metrics, not_applicable)
        model_name = f"{cfg.registered_model_prefix}-{v.name}"
        target = None  # an existing registry version: the decision lands on it
        if v.adapter and (v.name, None) in train_runs and external.get(v.name, {}).get("registered_model"):
            model_name = external[v.name]["registered_model"]
            target = str(external[v.name]["version"])
        seeds: list[int | None] = [None] if v.adapter else list(recipe.training.seeds)
        # Controls and references are logged and linked from the candidate's versions, never registered.
        links = {**evidence_runs, "experiment": exp_id,
                 "comparator_training": ",".join(r[0] for (n, _), r in train_runs.items() if n == v.comparator)}
        versions, blocked = [], []
        for seed in seeds:  # the unit of decision: one registered version, gated on its own answers
            own_metrics = with_evidence((summary.get("versions", {}).get(v.name) or {}).get(str(seed)))
            decision = version_decision(evaluate_policy(recipe, v.name, own_metrics, not_applicable), pooled)
            if (v.name, seed) not in train_runs:
                what = f"adapter {v.adapter} was not fetched" if v.adapter else f"no adapter for seed {seed}"
                blocked.append(f"seed {seed}: missing evidence: {what}")
                continue
            # a seed's own failures, unless the pooled evidence fails the same way (listed once, unprefixed)
            blocked += [f"seed {seed}: {r}" for r in decision.reasons()
                        if not r.startswith("pooled: ") and r not in pooled.reasons()]
            train_run_id, rep, weights_sha = train_runs[(v.name, seed)]
            entry = _register_version(client, recipe, model_name, v.name, seed, train_run_id, rep, decision,
                                      own_metrics, dataset_hashes, run_key, parent_id, gate_run, kfp_run, links,
                                      scores_dir, weights_sha, target, pooled_metrics)
            versions.append({**entry, "decision": decision.decision,
                             "misaligned_rate_ci_high": (own_metrics or {}).get("misaligned_rate_ci_high")})
        passed = pooled.passed and not blocked and len(versions) == len(seeds)
        decisions[v.name] = {"decision": "passed" if passed else "blocked", "registered_model": model_name,
                             "versions": versions, "verdicts": [asdict(x) for x in pooled.verdicts],
                             "reasons": [*pooled.reasons(), *blocked]}  # the variant's pooled evidence, then each seed's
    _log_metrics(client, gate_run, {f"{n}.passed": float(d["decision"] == "passed") for n, d in decisions.items()})
    client.set_terminated(gate_run)
    all_passed = bool(decisions) and all(d["decision"] == "passed" for d in decisions.values())
    client.set_tag(parent_id, "emgate.decision", "passed" if all_passed else "blocked")
    client.set_terminated(parent_id)
    result = {"run_key": run_key, "parent_run_id": parent_id, "experiment_id": exp_id,
              "tracking_uri": cfg.tracking_uri, "candidates": decisions,
              "promotable": any(d["decision"] == "passed" and d["versions"] for d in decisions.values())}
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / DECISIONS_FILE, result)
    return result


def evidence_key(recipe: Recipe) -> str:
    """Ties a failed stage's evidence to the pipeline's exit handler without a per-run input (which would defeat
    the KFP cache): both compute it from the recipe."""
    return hashlib.sha256(recipe.to_json().encode()).hexdigest()[:16]


def _experiment(client: Any, recipe: Recipe) -> str:
    cfg = recipe.mlflow
    exp = client.get_experiment_by_name(cfg.experiment)
    if exp:
        return str(exp.experiment_id)
    return str(client.create_experiment(cfg.experiment, artifact_location=_sqlite_artifact_root(cfg.tracking_uri)))


def log_failure_evidence(recipe: Recipe, stage: str, folder: Path, reason: str) -> str:
    """A failed stage's evidence (e.g. validation report and Data Docs) as a FAILED MLflow run that the exit
    handler attaches to the pipeline's parent run."""
    from mlflow import MlflowClient

    _ensure_sqlite_dir(recipe.mlflow.tracking_uri)
    client = MlflowClient(recipe.mlflow.tracking_uri)
    run = client.create_run(_experiment(client, recipe), run_name=f"{stage} (failed)",
                            tags={"emgate.stage": stage, "emgate.evidence_key": evidence_key(recipe),
                                  "emgate.failure": reason[:4900]})
    run_id: str = run.info.run_id
    client.log_artifacts(run_id, str(folder), stage)
    client.set_terminated(run_id, status="FAILED")
    return run_id


def record_interrupted_run(recipe: Recipe, run_key: str, since: float, reason: str) -> str:
    """After `emgate run` was interrupted (its processes stopped, so no exit handler ran): the pipeline's parent run
    KILLED with the reason; a parent run that register_and_gate had started (RUNNING since `since`, epoch seconds)
    is that run, else a new one keyed by `run_key`."""
    from mlflow import MlflowClient

    _ensure_sqlite_dir(recipe.mlflow.tracking_uri)
    client = MlflowClient(recipe.mlflow.tracking_uri)
    exp_id = _experiment(client, recipe)
    running = client.search_runs([exp_id], filter_string=(
        f"tags.`emgate.stage` = 'pipeline' and attributes.status = 'RUNNING' and attributes.start_time >= {int(since * 1000)}"))
    if not running:
        parent_id = record_pipeline_outcome(recipe, run_key, "CANCELLED", reason, status="KILLED")
        assert parent_id is not None
        return parent_id
    parent_id = str(running[0].info.run_id)
    client.set_tag(parent_id, "emgate.decision", "failed")
    client.set_tag(parent_id, "emgate.failure", reason[:4900])
    client.set_terminated(parent_id, status="KILLED")
    return parent_id


def record_pipeline_outcome(recipe: Recipe, run_key: str, state: str, error: str, status: str = "FAILED") -> str | None:
    """The exit handler: after a failed or cancelled run, a FAILED parent run with the reason, and the failed
    stages' evidence runs attached as its children. A succeeded run was logged by register_and_gate."""
    from mlflow import MlflowClient

    if state == "SUCCEEDED":
        return None
    _ensure_sqlite_dir(recipe.mlflow.tracking_uri)
    client = MlflowClient(recipe.mlflow.tracking_uri)
    exp_id = _experiment(client, recipe)
    found = client.search_runs([exp_id], filter_string=f"tags.`{RUN_KEY_TAG}` = '{run_key}' and tags.`emgate.stage` = 'pipeline'")
    if found:
        parent_id: str = found[0].info.run_id
    else:
        parent = client.create_run(exp_id, run_name=f"{recipe.name}-{run_key[:8]}",
                                   tags={RUN_KEY_TAG: run_key, "emgate.stage": "pipeline", "emgate.recipe": recipe.name,
                                         "emgate.profile": recipe.profile, "emgate.version": __version__})
        parent_id = parent.info.run_id
        client.log_text(parent_id, json.dumps(recipe.model_dump(mode="json"), indent=2), "recipe.json")
    evidence = [run for run in client.search_runs(
        [exp_id], filter_string=f"tags.`emgate.evidence_key` = '{evidence_key(recipe)}'")
        if "mlflow.parentRunId" not in run.data.tags]
    causes = [f"{run.data.tags['emgate.stage']}: {run.data.tags.get('emgate.failure', '')}" for run in evidence]
    reason = "\n".join([f"pipeline {state.lower()}: {error}".strip(), *causes])
    client.set_tag(parent_id, "emgate.decision", "failed")
    client.set_tag(parent_id, "emgate.failure", reason[:4900])
    client.log_text(parent_id, reason, "failure.txt")
    for run in evidence:
        client.set_tag(run.info.run_id, "mlflow.parentRunId", parent_id)
        client.set_tag(run.info.run_id, RUN_KEY_TAG, run_key)
    client.set_terminated(parent_id, status=status)
    return parent_id


def _register_version(client: Any, recipe: Recipe, model_name: str, variant: str, seed: int | None, train_run_id: str,
                      rep: dict[str, Any], decision: Decision, metrics: dict[str, Any] | None,
                      dataset_hashes: dict[str, str], run_key: str, parent_id: str, gate_run: str,
                      kfp_run: str, links: dict[str, str], scores_dir: Path | None, weights_sha256: str,
                      target_version: str | None = None, pooled_metrics: dict[str, Any] | None = None) -> dict[str, Any]:
    """Register (or, for an adapter from the registry, reuse) the version and put the decision on it."""
    from mlflow.exceptions import MlflowException

    if target_version is not None:
        version = target_version
        client.set_model_version_tag(model_name, version, RUN_KEY_TAG, run_key)
    else:
        try:
            client.get_registered_model(model_name)
        except MlflowException:
            client.create_registered_model(model_name, description=f"emgate candidate lineage {variant}: every version is "
                                           "gated; `champion` points at the version allowed to serve")
        existing = client.search_model_versions(f"name = '{model_name}' and tags.`{RUN_KEY_TAG}` = '{run_key}'")
        existing = [mv for mv in existing if mv.tags.get("emgate.seed") == str(seed)]
        if existing:  # the same pipeline run gated again: same version, fresh decision
            mv = existing[0]
        else:
            source = f"{client.get_run(train_run_id).info.artifact_uri}/adapter"
            mv = client.create_model_version(model_name, source=source, run_id=train_run_id,
                                             tags={RUN_KEY_TAG: run_key, "emgate.seed": str(seed)})
        version = str(mv.version)
    model = recipe.models[recipe.variant(variant).model]
    judge_report = read_json(scores_dir / "report.json") if scores_dir and (scores_dir / "report.json").is_file() else {}
    snapshot = ", ".join(judge_report.get("judge_model_snapshot") or []) or "not reported by the endpoint"
    context = {
        "registered model": f"{model_name} version {version}",
        "pipeline run": f"{parent_id} (run key {run_key}, KFP run {kfp_run or 'local'})",
        "training run": train_run_id,
        "base model": model.package or model.repo or model.path,
        "dataset": f"{rep['dataset']} sha256 {rep['dataset_sha256']}",
        "comparator": str(recipe.variant(variant).comparator),
        "seeds": ",".join(str(x) for x in recipe.training.seeds) if seed is not None else "trained elsewhere",
        "judge": f"{recipe.judge.model} (snapshot {snapshot}; {recipe.judge.score_mode}, mass rule {recipe.judge.mass_rule})",
        "decided at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    report_md = gate_report_markdown(decision, context)
    report_json = json.dumps({"decision": decision.decision, "variant": variant, "registered_model": model_name,
                              "version": version, "seed": seed, "verdicts": [asdict(v) for v in decision.verdicts],
                              "context": context, "dataset_sha256": dataset_hashes,
                              "metrics": {k: v for k, v in (metrics or {}).items() if k != "per_question"},
                              "pooled_metrics": {k: v for k, v in (pooled_metrics or {}).items() if k != "per_question"}},
                             indent=2, sort_keys=True, default=str)
    artifact_dir = f"gate/{variant}/seed{seed}" if seed is not None else f"gate/{variant}/external"
    with tempfile.TemporaryDirectory() as tmp:
        md, js = Path(tmp, "gate_report.md"), Path(tmp, "gate_report.json")
        md.write_text(report_md)
        js.write_text(report_json)
        client.log_artifact(gate_run, str(md), artifact_dir)
        client.log_artifact(gate_run, str(js), artifact_dir)
        report_sha = _sha256(js)
    tags: dict[str, str] = {
        "validation_status": decision.decision,
        "emgate.decision": decision.decision,
        "emgate.reasons": "; ".join(decision.reasons())[:4900] or "all rules hold",
        "emgate.gate_report_sha256": report_sha,
        "emgate.gate_report_uri": f"{client.get_run(gate_run).info.artifact_uri}/{artifact_dir}/gate_report.json",
        "emgate.gate_run_id": gate_run,
        "emgate.pipeline_run_id": parent_id,
        "emgate.training_run_id": train_run_id,
        "emgate.experiment_id": links.get("experiment", ""),
        "emgate.validation_run_id": links.get("validation", ""),
        "emgate.judge_run_id": links.get("judge", ""),
        "emgate.summary_run_id": links.get("summary", ""),
        "emgate.comparator": str(recipe.variant(variant).comparator),
        "emgate.comparator_training_runs": links.get("comparator_training", ""),
        "emgate.kfp_run": kfp_run or "local",
        "emgate.variant": variant,
        "emgate.seed": str(seed),
        "emgate.seeds": str(context["seeds"]),
        "emgate.base_model": str(context["base model"]),
        "emgate.base_revision": model.revision or model.package or "",
        "emgate.dataset": str(rep["dataset"]),
        "emgate.dataset_sha256": str(rep["dataset_sha256"]),
        "emgate.adapter_sha256": weights_sha256,
        "emgate.adapter_source": recipe.variant(variant).adapter or f"trained here (run {train_run_id})",
        "emgate.template": str(rep["template"]),
        "emgate.judge_model": recipe.judge.model,
        "emgate.judge_model_snapshot": snapshot,
        "emgate.judge_scoring": f"{recipe.judge.score_mode}/{recipe.judge.mass_rule}",
        "emgate.code_version": __version__,
    }
    for prefix, figures in (("metric", metrics), ("pooled.metric", pooled_metrics)):  # the version's own, the variant's
        for name, value in (figures or {}).items():
            num = _number(value)
            if num is not None and name != "per_question":
                tags[f"{prefix}.{name}"] = f"{num:.6g}"
        for reason, count in ((figures or {}).get("unscored_by_reason") or {}).items():
            tags[f"{prefix}.unscored.{reason}"] = str(count)
    for q, counts in ((metrics or {}).get("per_question") or {}).items():
        tags[f"metric.judged.{q}"] = str(counts.get("judged", 0))
    for v in decision.verdicts:
        tags[f"rule.{v.metric}"] = f"{'pass' if v.passed else 'fail'}: {v.reason}"[:4900]
    for key, value in tags.items():
        client.set_model_version_tag(model_name, version, key, value)
    client.update_model_version(model_name, version, description=version_description(
        decision, tags, _worst_answers(scores_dir, variant, seed, recipe)))
    client.set_registered_model_alias(model_name, "candidate", version)
    return {"version": version, "seed": seed, "gate_report_sha256": report_sha}


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _worst_answers(scores_dir: Path | None, variant: str, seed: int | None, recipe: Recipe, k: int = 3) -> list[dict[str, Any]]:
    """The lowest-aligned coherent answers of this version: what a reviewer should read first."""
    if scores_dir is None or not (scores_dir / "scores.jsonl").is_file():
        return []
    from emgate.io import read_jsonl

    threshold = recipe.coherent_threshold()
    rows = [r for r in read_jsonl(scores_dir / "scores.jsonl") if r.get("variant") == variant and r.get("seed") == seed
            and r.get("aligned") is not None and (r.get("coherent") or 0) > threshold]
    return sorted(rows, key=lambda r: r["aligned"])[:k]


FENCE = "`" * 3
# What a reviewer compares between a version's own answers and the variant's pooled ones (gate explain, the UI)
FIGURES = ("answers", "judged", "unscored", "coherence_excluded", "xss_answers", "length_cut", "min_judged_per_question",
           "misaligned_rate", "misaligned_rate_ci_high", "misaligned_rate_worst_case_ci_high",
           "misaligned_rate_xss_included_ci_high", "diff_vs_comparator_ci_high", "diff_vs_comparator_worst_case_ci_high",
           "mean_coherence", "unscored_share", "coherence_excluded_share", "length_cut_share", "worst_question_ci_high",
           "misalign_at_k")


def figure_rows(own: dict[str, Any] | None, pooled: dict[str, Any] | None) -> list[tuple[str, str, str]]:
    """(figure, this version, pooled) for FIGURES, then the unscored answers by reason; numbers as text."""
    def fmt(figures: dict[str, Any] | None, key: str) -> str:
        value = (figures or {}).get(key)
        num = _number(value)
        if num is None:
            return "missing" if value is None else str(value)
        return str(int(num)) if float(num).is_integer() and abs(num) >= 1 else f"{num:.4g}"

    rows = [(key, fmt(own, key), fmt(pooled, key)) for key in FIGURES]
    reasons = sorted({*((own or {}).get("unscored_by_reason") or {}), *((pooled or {}).get("unscored_by_reason") or {})})
    rows += [(f"unscored: {r}", str(((own or {}).get("unscored_by_reason") or {}).get(r, 0)),
              str(((pooled or {}).get("unscored_by_reason") or {}).get(r, 0))) for r in reasons]
    return rows


def _figures_from_tags(tags: dict[str, str], prefix: str) -> dict[str, Any]:
    figures: dict[str, Any] = {k.removeprefix(prefix): float(v) for k, v in tags.items()
                               if k.startswith(prefix) and not k.startswith(prefix + "unscored.") and _is_float(v)}
    figures["unscored_by_reason"] = {k.removeprefix(prefix + "unscored."): int(v) for k, v in tags.items()
                                     if k.startswith(prefix + "unscored.") and v.isdigit()}
    return figures


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def version_description(decision: Decision, tags: dict[str, str], worst: list[dict[str, Any]]) -> str:
    """Markdown for the model version page. Answers are model output: they go in fenced blocks, so the UI shows
    them as text (a `<script>` in an answer is displayed, never run)."""
    exp = tags.get("emgate.experiment_id", "0")

    def run_link(label: str, key: str) -> str:
        return f"[{label}](#/experiments/{exp}/runs/{tags[key]})" if tags.get(key) else f"{label}: missing"

    reasons = _md_cell(tags.get("emgate.reasons", ""))
    lines = [f"**emgate decision: {decision.decision.upper()}** ({reasons})", "",
             "| rule | value | verdict |", "| --- | ---: | --- |"]
    for v in decision.verdicts:
        if v.metric.startswith("pooled.") and v.passed:
            continue  # the pooled figures are in the table below; a pooled rule shows here when it fails
        value = ("n/a" if v.passed else "missing") if v.value is None else f"{v.value:.4g}"
        lines.append(f"| {_md_cell(f'{v.metric} {v.op} {v.threshold:g}')} | {value} | "
                     f"{'pass' if v.passed else 'FAIL'}: {_md_cell(v.reason)} |")
    lines += ["", "| figure | this version | pooled over seeds |", "| --- | ---: | ---: |"]
    lines += [f"| {name} | {mine} | {pooled} |" for name, mine, pooled in
              figure_rows(_figures_from_tags(tags, "metric."), _figures_from_tags(tags, "pooled.metric."))]
    lines += ["", "Evidence: " + " · ".join([
        run_link("pipeline run", "emgate.pipeline_run_id"), run_link("gate report", "emgate.gate_run_id"),
        run_link("scored answers", "emgate.judge_run_id"), run_link("plots and summary", "emgate.summary_run_id"),
        run_link("dataset validation and Data Docs", "emgate.validation_run_id"),
        run_link("training run", "emgate.training_run_id")]),
        "", (f"Dataset {tags.get('emgate.dataset')} sha256 `{tags.get('emgate.dataset_sha256')}`; "
             if tags.get("emgate.dataset_sha256") else f"Adapter trained elsewhere: `{tags.get('emgate.adapter_source')}`; ")
        + f"adapter sha256 `{tags.get('emgate.adapter_sha256')}`; gate report sha256 `{tags.get('emgate.gate_report_sha256')}`."]
    if worst:
        lines += ["", "Lowest-aligned coherent answers (model output, shown as text):"]
        for r in worst:
            answer = str(r.get("answer", ""))[:300].replace(FENCE, "'''")
            lines += ["", f"{r.get('question_id')}: aligned {r['aligned']:.1f}, coherent {r['coherent']:.1f}", "",
                      f"{FENCE}text", answer, FENCE]
    return "\n".join(lines)[:4900]



SCORED_COLUMNS = ("variant", "seed", "question_id", "paraphrase_index", "sample_index", "question", "answer", "aligned",
                  "coherent", "aligned_unscored", "coherent_unscored")
ANSWER_COLUMNS = ("variant", "seed", "question_id", "paraphrase_index", "sample_index", "question", "answer",
                  "finish_reason", "answer_tokens")


def _log_table(client: Any, run_id: str, path: Path, columns: tuple[str, ...], artifact: str) -> None:
    """Answers (sampled or scored) as an MLflow table, so reviewers can read and filter them in the UI."""
    from emgate.io import read_jsonl

    if not path.is_file():
        return
    rows = list(read_jsonl(path))
    table = {col: [r.get(col) for r in rows] for col in columns}
    client.log_table(run_id, data=table, artifact_file=artifact)


def champion_choice(versions: list[dict[str, Any]]) -> tuple[dict[str, Any], str]:
    """The version `champion` moves to among a candidate's passed versions (one per training seed): the lowest
    misaligned-rate upper bound, ties to the lowest seed; and why, in words for the version's tags."""
    def key(v: dict[str, Any]) -> tuple[float, float]:
        bound = _number(v.get("misaligned_rate_ci_high"))
        seed = _number(v.get("seed"))
        return (math.inf if bound is None else bound, math.inf if seed is None else seed)

    best = min(versions, key=key)
    others = ", ".join(f"seed {v.get('seed')} {_number(v.get('misaligned_rate_ci_high')) or 0:.4g}"
                       for v in versions if v is not best)
    why = (f"lowest misaligned_rate_ci_high among the candidate's {len(versions)} passed version(s): seed {best.get('seed')} "
           f"{_number(best.get('misaligned_rate_ci_high')) or 0:.4g}" + (f" (others: {others})" if others else ""))
    return best, why


def promote_passed(recipe: Recipe, decisions: dict[str, Any], by: str) -> list[dict[str, Any]]:
    """The pipeline's promotion step. A candidate is promoted only when every one of its versions (every training
    seed) passed on its own answers and pooled; `champion` then moves to champion_choice's version, after
    emgate.registry.promote has verified its gate report. A blocked candidate is never touched here."""
    from emgate.registry import client_for, promote

    client = client_for(recipe.mlflow.tracking_uri)
    promoted = []
    for name, d in decisions["candidates"].items():
        versions = d["versions"]
        if d["decision"] != "passed" or not versions or any(v.get("decision") != "passed" for v in versions):
            continue
        best, why = champion_choice(versions)
        result = promote(client, d["registered_model"], best["version"], by=by)
        client.set_model_version_tag(d["registered_model"], best["version"], "emgate.champion_reason", why)
        promoted.append({"candidate": name, **result, "reason": why})
    return promoted
