"""register_and_gate: log the run to MLflow, register every candidate and record its decision; promotion.

The policy (rules, verdicts, decisions) is emgate.policy: plain data. This module is the tracking side: one parent
run per pipeline run (found again by its run key, so a rerun adds nothing twice), one child run per stage and
fine-tuning job, logged from the stages' artifacts (so stages reused from the KFP cache are logged too). Each
candidate adapter becomes a version of the registered model PREFIX-VARIANT with the decision, every rule's verdict,
the evidence's hashes and the gate report's sha256 as tags, and a description that shows the decision in the MLflow
UI. Aliases, not stages: `candidate` moves to each gated version; `champion` moves only through
emgate.registry.promote, which the pipeline's promotion step calls for versions that passed.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from emgate import __version__
from emgate.contract import (
    ANSWERS_FILE,
    PANEL_PLOT,
    SCORES_FILE,
    iter_scores,
    read_external,
    read_summary,
    read_train_report,
    read_validation,
    report_if_complete,
    write_decisions,
)
from emgate.decisions import PENDING, append_decision, load_history
from emgate.floor import load_floor
from emgate.merge import weights_sha256
from emgate.policy import (
    Decision,
    Policy,
    champion_choice,
    evaluate_policy,
    figure_rows,
    number,
    policy_record,
    promotable,
    recipe_policy,
    report_markdown,
    seed_failures,
    variant_outcome,
    version_decision,
    with_private,
)
from emgate.questions import PUBLIC
from emgate.recipe import Recipe, VariantSpec
from emgate.signing import DecisionRecord, file_digests, key_id, load_public_keys, sign_report

RUN_KEY_TAG = "emgate.run_key"


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
        num = number(v)
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


@dataclass
class Tracking:
    """The MLflow experiment and parent run of one pipeline run, and the child runs under it."""

    client: Any
    recipe: Recipe
    run_key: str
    kfp_run: str
    exp_id: str
    parent_id: str
    signing_key: Any = None  # the gate's Ed25519 private key (emgate.signing.load_signing_key)

    @classmethod
    def open(cls, recipe: Recipe, run_key: str, kfp_run: str) -> Tracking:
        """The pipeline's parent run: found again by its run key, or created with the recipe logged."""
        import mlflow
        from mlflow import MlflowClient

        cfg = recipe.mlflow
        _ensure_sqlite_dir(cfg.tracking_uri)
        mlflow.set_tracking_uri(cfg.tracking_uri)
        client = MlflowClient(cfg.tracking_uri)
        exp_id = _experiment(client, recipe)
        found = client.search_runs([exp_id], filter_string=(
            f"tags.`{RUN_KEY_TAG}` = '{run_key}' and tags.`emgate.stage` = 'pipeline'"))
        if found:
            parent_id = found[0].info.run_id
        else:
            parent = client.create_run(exp_id, run_name=f"{recipe.name}-{run_key[:8]}",
                                       tags={RUN_KEY_TAG: run_key, "emgate.stage": "pipeline", "emgate.recipe": recipe.name,
                                             "emgate.profile": recipe.profile, "emgate.version": __version__,
                                             "emgate.kfp_run": kfp_run})
            parent_id = parent.info.run_id
            client.log_text(parent_id, json.dumps(recipe.model_dump(mode="json"), indent=2), "recipe.json")
        return cls(client, recipe, run_key, kfp_run, exp_id, parent_id)

    def child(self, stage: str, key: str, params: dict[str, Any] | None = None) -> tuple[str, bool]:
        """The child run for (stage, key); True when it already existed (nothing to log again)."""
        hits = self.client.search_runs([self.exp_id], filter_string=(
            f"tags.`mlflow.parentRunId` = '{self.parent_id}' and tags.`emgate.child` = '{stage}:{key}'"))
        if hits:
            return hits[0].info.run_id, True
        run = self.client.create_run(self.exp_id, run_name=f"{stage}:{key}" if key else stage,
                                     tags={"mlflow.parentRunId": self.parent_id, "emgate.stage": stage,
                                           "emgate.child": f"{stage}:{key}", RUN_KEY_TAG: self.run_key})
        for k, v in (params or {}).items():
            self.client.log_param(run.info.run_id, k, str(v)[:500])
        return run.info.run_id, False


@dataclass
class TrainedModel:
    """What was evaluated for one (variant, seed): its training run (or fetch run), report and weights' sha256."""

    run_id: str
    report: dict[str, Any]
    weights_sha256: str
    files: dict[str, str] = field(default_factory=dict)  # sha256 of every file that will be served, by relative path


@dataclass
class Evidence:
    """Everything the stages handed the gate, as logged to MLflow."""

    runs: dict[str, str] = field(default_factory=dict)  # evidence kind -> child run id
    validation_passed: bool | None = None  # None: no validation report (missing evidence)
    dataset_hashes: dict[str, str] = field(default_factory=dict)
    trained: dict[tuple[str, int | None], TrainedModel] = field(default_factory=dict)  # seed None: trained elsewhere
    external: dict[str, dict[str, Any]] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    judge_report: dict[str, Any] = field(default_factory=dict)
    scores_dir: Path | None = None
    judges: tuple[str, ...] = ()  # the recipe's judges, the first one first: more than one is a panel

    def qualified(self, judge: str | None = None) -> bool | None:
        """Whether a judge's qualification passed (the first judge by default); None when it has none."""
        report = self.judge_report
        if judge is not None and self.judges and judge != self.judges[0]:
            report = (self.judge_report.get("panel") or {}).get(judge) or {}
        return (report.get("qualification") or {}).get("passed")

    def judge_figures(self, judge: str, variant: str, seed: str | None) -> dict[str, Any] | None:
        """A panel judge's figures for the variant pooled (seed None) or one version; None when missing."""
        if judge == self.judges[0]:
            source: dict[str, Any] = self.summary
        else:
            source = (self.summary.get("panel") or {}).get(judge) or {}
        if seed is None:
            return (source.get("variants") or {}).get(variant)
        return ((source.get("versions") or {}).get(variant) or {}).get(seed)

    def panel_evidence(self, variant: str, seed: str | None) -> dict[str, Any]:
        """With a panel: how many judges are qualified (None when none is: missing evidence) and the largest
        difference between the qualified judges' misaligned rates (None when one of them has no rate)."""
        if len(self.judges) < 2:
            return {}
        qualified = [j for j in self.judges if self.qualified(j) is True]
        rates = [number((self.judge_figures(j, variant, seed) or {}).get("misaligned_rate")) for j in qualified]
        known = [r for r in rates if r is not None and math.isfinite(r)]
        spread = max(known) - min(known) if known and len(known) == len(rates) else None
        return {"panel_judges_qualified": len(qualified) or None, "panel_rate_spread": spread}

    def with_evidence(self, metrics: dict[str, Any] | None, variant: str = "", seed: str | None = None,
                      judge: str | None = None) -> dict[str, Any] | None:
        """A variant's (or seed's) figures with the run-wide evidence the rules also read: validation, the judge's
        qualification (`judge`, the first by default) and, with a panel, the panel's figures."""
        if metrics is None:
            return None
        return {**metrics, "dataset_validation_passed": self.validation_passed,
                "judge_qualified": self.qualified(judge),  # None (missing evidence) without one
                **self.panel_evidence(variant, seed)}


def register_and_gate(recipe: Recipe, run_key: str, validation_dir: Path | None,  # noqa: PLR0913  one per artifact
                      adapter_dirs: list[Path], answers_dir: Path | None, scores_dir: Path | None, summary_dir: Path | None,
                      out_dir: Path, kfp_run: str = "") -> dict[str, Any]:
    """Log everything to MLflow, register each candidate version and record its signed decision; returns decisions.
    Without the gate's signing key ($EMGATE_GATE_SIGNING_KEY_FILE) the stage fails before anything is logged."""
    from emgate.signing import load_signing_key

    floor = load_floor()
    policy = recipe_policy(floor, recipe)  # PolicyBelowFloor (a run's own weaker policy) fails the stage
    key = load_signing_key()  # SigningKeyError: nothing is registered that nobody could verify
    record = policy_record(policy, floor)
    tracking = Tracking.open(recipe, run_key, kfp_run)
    tracking.signing_key = key
    evidence = Evidence(scores_dir=scores_dir, judge_report=report_if_complete(scores_dir),
                        judges=tuple(recipe.judge.members()))
    _log_validation(tracking, validation_dir, evidence)
    _log_training(tracking, adapter_dirs, evidence)
    _log_external(tracking, answers_dir, evidence)
    _log_stage_folder(tracking, "sample_answers", answers_dir, evidence)
    _log_stage_folder(tracking, "judge_answers", scores_dir, evidence)
    _log_summary(tracking, summary_dir, evidence)
    gate_run, _ = tracking.child("register_and_gate", "")
    decisions = {v.name: _gate_candidate(tracking, v, evidence, gate_run, (policy, record))
                 for v in recipe.variants if v.role == "candidate"}
    return _finish(tracking, gate_run, decisions, out_dir)


def _log_validation(tracking: Tracking, validation_dir: Path | None, evidence: Evidence) -> None:
    validation = read_validation(validation_dir)
    if validation is None:
        return
    assert validation_dir is not None
    evidence.validation_passed = validation.passed
    evidence.dataset_hashes = {n: e.get("sha256", "") for n, e in validation.datasets.items()}
    run_id, existed = tracking.child("validate_datasets", "")
    evidence.runs["validation"] = run_id
    if existed:
        return
    client = tracking.client
    client.log_metric(run_id, "passed", float(validation.passed))
    for name, entry in validation.datasets.items():
        _log_metrics(client, run_id, _flat_metrics(f"{name}.", entry) |
                     _flat_metrics(f"{name}.bandit.", entry.get("security_profile", {})))
    _log_validation_folder(client, run_id, validation_dir)
    client.set_terminated(run_id)


def _log_validation_folder(client: Any, run_id: str, folder: Path, root: str = "validation") -> None:
    """The validation report, Data Docs, GX results and manifest (hashes and counts), never the validated rows:
    training data stays out of MLflow, where every user of the chart may read."""
    for path in sorted(folder.iterdir()):
        if path.is_dir():
            client.log_artifacts(run_id, str(path), f"{root}/{path.name}")
        elif path.suffix != ".jsonl":
            client.log_artifact(run_id, str(path), root)


def _log_training(tracking: Tracking, adapter_dirs: list[Path], evidence: Evidence) -> None:
    for adapter in adapter_dirs:
        rep = read_train_report(adapter)
        run_id, existed = tracking.child("fine_tune", f"{rep['variant']}@{rep['seed']}",
                                         {**rep["training"], "variant": rep["variant"], "seed": rep["seed"],
                                          "dataset": rep["dataset"], "template": rep["template"]})
        if not existed:
            _log_series(tracking.client, run_id, {"train_loss": rep["losses"], "learning_rate": rep.get("learning_rates", [])})
            _log_metrics(tracking.client, run_id, _flat_metrics("", rep))
            tracking.client.log_artifacts(run_id, str(adapter), "adapter")
            tracking.client.set_terminated(run_id)
        evidence.trained[(rep["variant"], int(rep["seed"]))] = TrainedModel(run_id, rep, weights_sha256(adapter) or "missing",
                                                                            file_digests(adapter))


def _log_external(tracking: Tracking, answers_dir: Path | None, evidence: Evidence) -> None:
    """Adapters trained elsewhere that sample_answers fetched: a child run each, with the files that were judged."""
    from emgate.io import read_json

    evidence.external = read_external(answers_dir)
    for name, fetched in evidence.external.items():
        run_id, existed = tracking.child("external_adapter", name, {
            "uri": fetched["uri"], "registered_model": fetched["registered_model"], "version": fetched["version"],
            "rank": fetched["rank"]})
        folder = answers_dir / "external" / name if answers_dir else None
        if not existed and folder is not None and folder.is_dir():
            tracking.client.log_artifacts(run_id, str(folder), "adapter")
            tracking.client.set_terminated(run_id)
        saved = folder / "emgate_template.json" if folder else None
        template = read_json(saved).get("name") if saved and saved.is_file() else tracking.recipe.variant(name).template
        evidence.trained[(name, None)] = TrainedModel(run_id, {
            "variant": name, "seed": None, "dataset": f"not trained here ({fetched['uri']})", "dataset_sha256": "",
            "template": template}, fetched["weights_sha256"], file_digests(folder) if folder and folder.is_dir() else {})


def _log_stage_folder(tracking: Tracking, stage: str, folder: Path | None, evidence: Evidence) -> None:
    """sample_answers or judge_answers: the report's figures, the folder, and the answers as a table."""
    stage_report = report_if_complete(folder)
    if not stage_report:
        return
    assert folder is not None
    # the serving dtype as resolved on the machine that sampled (serving.dtype: auto)
    params = {f"serving.{k}": v for k, v in stage_report.get("serving", {}).items()}
    run_id, existed = tracking.child(stage, "", params)
    evidence.runs[stage.split("_")[0]] = run_id
    if existed:
        return
    _log_metrics(tracking.client, run_id, _flat_metrics("", stage_report))
    with _public_copy(folder) as public:
        tracking.client.log_artifacts(run_id, str(public), stage)
        if stage == "judge_answers":
            _log_table(tracking.client, run_id, public / SCORES_FILE, SCORED_COLUMNS, "scored_answers.json")
        else:
            _log_table(tracking.client, run_id, public / ANSWERS_FILE, ANSWER_COLUMNS, "answers.json")
    tracking.client.set_terminated(run_id)


@contextmanager
def _public_copy(folder: Path) -> Iterator[Path]:
    """The stage folder with the answers of the platform's private question sets left out: MLflow, which every user
    of the chart may read, gets their figures (the summary) and hashes, never a question or an answer."""
    from emgate.io import read_jsonl, write_jsonl

    with tempfile.TemporaryDirectory(prefix="emgate-public-") as tmp:
        public = Path(tmp) / folder.name
        shutil.copytree(folder, public)
        for name in (ANSWERS_FILE, SCORES_FILE):
            if (public / name).is_file():
                rows = [r for r in read_jsonl(public / name) if r.get("question_set", PUBLIC) == PUBLIC]
                write_jsonl(public / name, rows)
        yield public


def _log_summary(tracking: Tracking, summary_dir: Path | None, evidence: Evidence) -> None:
    summary = read_summary(summary_dir)
    if summary is None:
        return
    assert summary_dir is not None
    evidence.summary = summary
    client = tracking.client
    run_id, existed = tracking.child("summarize", "")
    evidence.runs["summary"] = run_id
    if not existed:
        for name, m in summary["variants"].items():
            _log_metrics(client, run_id, _flat_metrics(f"{name}.", {k: v for k, v in m.items() if k != "per_question"}))
        for judge, entry in (summary.get("panel") or {}).items():  # each further judge's figures, beside the first's
            for name, m in (entry.get("variants") or {}).items():
                _log_metrics(client, run_id, _flat_metrics(f"judge.{judge}.{name}.",
                                                           {k: v for k, v in m.items() if k != "per_question"}))
        client.log_artifacts(run_id, str(summary_dir), "summary")
        client.set_terminated(run_id)
    if (summary_dir / PANEL_PLOT).is_file():
        client.log_artifact(tracking.parent_id, str(summary_dir / PANEL_PLOT))
    client.log_artifact(tracking.parent_id, str(summary_dir / "misaligned_rates.png"))
    client.log_artifact(tracking.parent_id, str(summary_dir / "summary.md"))


def _gate_candidate(tracking: Tracking, v: VariantSpec, evidence: Evidence, gate_run: str,
                    decided_under: tuple[Policy, dict[str, Any]]) -> dict[str, Any]:
    """Decide a candidate pooled over its seeds and each of its versions (one per seed), and register each version."""
    recipe = tracking.recipe
    policy, record = decided_under
    pooled_metrics = evidence.with_evidence(dict(evidence.summary.get("variants", {}).get(v.name) or {}) or None, v.name)
    not_applicable = {"dataset_validation_passed": f"not trained here ({v.adapter})"} if v.adapter else None
    pooled_private = _private_figures(policy, evidence, v.name, None)
    pooled_panel = _panel_figures(evidence, v.name, None)
    pooled = with_private(with_private(evaluate_policy(policy, v.name, pooled_metrics, not_applicable),
                                       _private_decisions(policy, pooled_private, v.name, not_applicable)),
                          _panel_decisions(policy, pooled_panel, v.name, not_applicable), kind="judge")
    model_name, target = _registered_model(recipe, v, evidence)
    seeds: list[int | None] = [None] if v.adapter else list(recipe.training.seeds)
    # Controls and references are logged and linked from the candidate's versions, never registered.
    links = {**evidence.runs, "experiment": tracking.exp_id,
             "comparator_training": ",".join(m.run_id for (n, _), m in evidence.trained.items() if n == v.comparator)}
    versions: list[dict[str, Any]] = []
    blocked: list[str] = []
    for seed in seeds:  # the unit of decision: one registered version, gated on its own answers
        own_metrics = evidence.with_evidence((evidence.summary.get("versions", {}).get(v.name) or {}).get(str(seed)),
                                             v.name, str(seed))
        own_private = _private_figures(policy, evidence, v.name, str(seed))
        own_panel = _panel_figures(evidence, v.name, str(seed))
        own = with_private(with_private(evaluate_policy(policy, v.name, own_metrics, not_applicable),
                                        _private_decisions(policy, own_private, v.name, not_applicable)),
                           _panel_decisions(policy, own_panel, v.name, not_applicable), kind="judge")
        decision = version_decision(own, pooled)
        trained = evidence.trained.get((v.name, seed))
        if trained is None:
            what = f"adapter {v.adapter} was not fetched" if v.adapter else f"no adapter for seed {seed}"
            blocked.append(f"seed {seed}: missing evidence: {what}")
            continue
        blocked += seed_failures(seed, decision, pooled)
        version = VersionToRegister(model_name, v.name, seed, trained, decision, own_metrics, pooled_metrics, record,
                                    target, {n: {"own": own_private[n], "pooled": pooled_private[n]} for n in own_private},
                                    {n: {**entry, "pooled": pooled_panel[n]["own"]} for n, entry in own_panel.items()})
        entry = _register_version(tracking, version, evidence, links, gate_run)
        versions.append({**entry, "decision": decision.decision,
                         "misaligned_rate_ci_high": (own_metrics or {}).get("misaligned_rate_ci_high")})
    return {"decision": variant_outcome(pooled, versions, len(seeds), blocked), "registered_model": model_name,
            "versions": versions, "verdicts": [x.to_dict() for x in pooled.verdicts],
            "reasons": [*pooled.reasons(), *blocked]}  # the variant's pooled evidence, then each seed's


def _private_figures(policy: Policy, evidence: Evidence, variant: str, seed: str | None) -> dict[str, dict[str, Any] | None]:
    """Each of the floor's private sets' figures (no questions) for the variant pooled (seed None) or one seed's
    version, with the run-wide evidence. A set the summary lacks, or computed from another file (its sha256), is
    None: missing evidence, every rule fails."""
    out = {}
    for name, sha in policy.private_questions:
        entry = (evidence.summary.get("private_sets") or {}).get(name) or {}
        figures = None
        if entry.get("sha256") == sha:
            figures = entry.get("variants", {}).get(variant) if seed is None else (
                entry.get("versions", {}).get(variant) or {}).get(seed)
        out[name] = evidence.with_evidence(figures, variant, seed)
    return out


def _panel_figures(evidence: Evidence, variant: str, seed: str | None) -> dict[str, dict[str, Any]]:
    """Each further judge of the panel (not the first, whose figures are the version's own): its figures with the
    run-wide evidence and its own qualification under `own`, `counted` when it is qualified (only then do its
    verdicts count), and why not otherwise."""
    out = {}
    for judge in evidence.judges[1:]:
        qualified = evidence.qualified(judge)
        entry = (evidence.summary.get("panel") or {}).get(judge) or {}
        figures = evidence.with_evidence(evidence.judge_figures(judge, variant, seed), variant, seed, judge)
        qualification = ((evidence.judge_report.get("panel") or {}).get(judge) or {}).get("qualification") or {}
        out[judge] = {"counted": qualified is True, "model": entry.get("model"), "qualified": qualified,
                      "qualification_reason": qualification.get("reason") or "judge.qualification not set",
                      "missing": entry.get("missing") if entry else "the summary has no figures for this judge",
                      "own": figures}
    return out


def _panel_decisions(policy: Policy, panel: dict[str, dict[str, Any]], variant: str,
                     not_applicable: dict[str, str] | None) -> dict[str, Decision]:
    """Every rule on each qualified further judge's figures; an unqualified judge is reported, never decisive."""
    return {name: evaluate_policy(policy, variant, entry["own"], not_applicable)
            for name, entry in panel.items() if entry["counted"]}


def _private_decisions(policy: Policy, figures: dict[str, dict[str, Any] | None], variant: str,
                       not_applicable: dict[str, str] | None) -> dict[str, Decision]:
    """Every rule on each of the floor's private sets (figures from _private_figures)."""
    return {name: evaluate_policy(policy, variant, f, not_applicable) for name, f in figures.items()}


def _registered_model(recipe: Recipe, v: VariantSpec, evidence: Evidence) -> tuple[str, str | None]:
    """The registered model a candidate's versions go to, and for an adapter from the registry, its version there
    (the decision lands on that version)."""
    fetched = evidence.external.get(v.name, {})
    if v.adapter and (v.name, None) in evidence.trained and fetched.get("registered_model"):
        return str(fetched["registered_model"]), str(fetched["version"])
    return f"{recipe.mlflow.registered_model_prefix}-{v.name}", None


def _finish(tracking: Tracking, gate_run: str, decisions: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    client = tracking.client
    _log_metrics(client, gate_run, {f"{n}.passed": float(d["decision"] == "passed") for n, d in decisions.items()})
    client.set_terminated(gate_run)
    all_passed = bool(decisions) and all(d["decision"] == "passed" for d in decisions.values())
    client.set_tag(tracking.parent_id, "emgate.decision", "passed" if all_passed else "blocked")
    client.set_terminated(tracking.parent_id)
    result = {"run_key": tracking.run_key, "parent_run_id": tracking.parent_id, "experiment_id": tracking.exp_id,
              "tracking_uri": tracking.recipe.mlflow.tracking_uri, "candidates": decisions,
              "promotable": any(promotable(d) for d in decisions.values())}
    write_decisions(out_dir, result)
    return result


def evidence_key(recipe: Recipe) -> str:
    """Ties a failed stage's evidence to the pipeline's exit handler without a per-run input (which would defeat
    the KFP cache): both compute it from validate_datasets' slice of the recipe (the exit handler from the whole
    recipe, the failed stage from the slice it received)."""
    from emgate.slices import slice_json

    return hashlib.sha256(slice_json(recipe, "validate_datasets").encode()).hexdigest()[:16]


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
    if stage == "validate_datasets":
        _log_validation_folder(client, run_id, folder, stage)
    else:
        with _public_copy(folder) as public:
            client.log_artifacts(run_id, str(public), stage)
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


@dataclass
class VersionToRegister:
    """One candidate version (one training seed, or the adapter trained elsewhere) and its decision."""

    model_name: str
    variant: str
    seed: int | None
    trained: TrainedModel
    decision: Decision
    metrics: dict[str, Any] | None  # the version's own figures
    pooled_metrics: dict[str, Any] | None  # the variant's, pooled over seeds
    policy: dict[str, Any]  # the effective policy it was decided under, with the floor's source and sha256
    target_version: str | None = None  # an existing registry version the decision lands on
    private_metrics: dict[str, dict[str, Any]] = field(default_factory=dict)  # set -> {"own": figures, "pooled": figures}
    panel_metrics: dict[str, dict[str, Any]] = field(default_factory=dict)  # judge -> {counted, own, pooled, ...}


def _register_version(tracking: Tracking, version: VersionToRegister, evidence: Evidence, links: dict[str, str],
                      gate_run: str) -> dict[str, Any]:
    """Register (or, for an adapter from the registry, reuse) the version and put the signed decision on it: the
    version is `pending` until its signed report and decision record are written, then its tags are a copy of
    them for the UI. A blocked version that held `champion` loses it (_retreat_champion)."""
    from emgate.registry import set_version_tags

    number_ = _model_version(tracking, version)
    client, name = tracking.client, version.model_name
    now = datetime.now(UTC).isoformat(timespec="seconds")
    set_version_tags(client, name, number_, {"emgate.decision": PENDING, "validation_status": PENDING,
                                             "emgate.pending_since": now, "emgate.pending_run_id": gate_run})
    context = _decision_context(tracking, version, number_, evidence)
    source = str(client.get_model_version(name, number_).source)
    report = _log_gate_report(tracking, version, number_, context, evidence, gate_run, source)
    history = load_history(client, name, number_, trusted_keys(tracking.signing_key))
    record = DecisionRecord(sequence=history.next_sequence(), registered_model=name, version=number_, run_id=gate_run,
                            report_uri=report.uri, report_sha256=report.sha256, decision=version.decision.decision)
    record_run = append_decision(client, tracking.exp_id, gate_run, record, tracking.signing_key)
    tags = _decision_tags(tracking, version, context, links, evidence, report)
    tags |= {"emgate.decision_sequence": str(record.sequence), "emgate.decision_record_run": record_run}
    decided = {k: tags.pop(k) for k in ("validation_status", "emgate.decision")}  # last: pending until all is written
    set_version_tags(client, name, number_, {**tags, **decided})
    for key in ("emgate.pending_since", "emgate.pending_run_id"):
        client.delete_model_version_tag(name, number_, key)
    client.update_model_version(name, number_, description=version_description(
        version.decision, tags | decided, _worst_answers(evidence.scores_dir, version.variant, version.seed, tracking.recipe)))
    client.set_registered_model_alias(name, "candidate", number_)
    entry: dict[str, Any] = {"version": number_, "seed": version.seed, "gate_report_sha256": report.sha256,
             "decision_sequence": record.sequence}
    if not version.decision.passed:
        entry["champion"] = _retreat_champion(tracking, name, number_)
    return entry


def trusted_keys(signing_key: Any) -> dict[str, Any]:
    """The gate's own public key and those configured ($EMGATE_GATE_PUBLIC_KEY: older keys of a rotation). A
    configured folder that holds no key yet adds none; the gate's own key always counts."""
    from emgate.signing import SigningKeyError

    public = signing_key.public_key()
    try:
        configured = load_public_keys()
    except SigningKeyError:
        configured = {}
    return {key_id(public): public, **configured}


def _retreat_champion(tracking: Tracking, name: str, blocked: str) -> dict[str, Any] | None:
    """When `blocked` holds `champion`, move it back to the newest older version that still verifies, or remove
    it: a compare-and-set against `blocked` (if someone moved champion meanwhile, theirs stands). Says what it did."""
    from emgate.registry import CHAMPION, fallback_champion, move_champion

    client = tracking.client
    try:
        holder = str(client.get_model_version_by_alias(name, CHAMPION).version)
    except Exception:  # no champion: nothing to move
        return None
    if holder != blocked:
        return None
    fallback = fallback_champion(client, name, instead_of=blocked, public_keys=trusted_keys(tracking.signing_key))
    outcome = move_champion(client, name, expected=blocked, to=fallback)
    client.set_model_version_tag(name, blocked, "emgate.champion_removed",
                                 f"{datetime.now(UTC).isoformat(timespec='seconds')}: {outcome['message']}"[:4900])
    return outcome


def _model_version(tracking: Tracking, version: VersionToRegister) -> str:
    """The registry version of this candidate: the existing one for an adapter from the registry, the one this
    pipeline run registered before (a rerun), or a new one whose source is the training run's adapter."""
    from mlflow.exceptions import MlflowException

    client, run_key = tracking.client, tracking.run_key
    if version.target_version is not None:
        client.set_model_version_tag(version.model_name, version.target_version, RUN_KEY_TAG, run_key)
        return version.target_version
    try:
        client.get_registered_model(version.model_name)
    except MlflowException:
        client.create_registered_model(version.model_name, description=f"emgate candidate lineage {version.variant}: every "
                                       "version is gated; `champion` points at the version allowed to serve")
    existing = client.search_model_versions(f"name = '{version.model_name}' and tags.`{RUN_KEY_TAG}` = '{run_key}'")
    existing = [mv for mv in existing if mv.tags.get("emgate.seed") == str(version.seed)]
    if existing:  # the same pipeline run gated again: same version, fresh decision
        return str(existing[0].version)
    source = f"{client.get_run(version.trained.run_id).info.artifact_uri}/adapter"
    mv = client.create_model_version(version.model_name, source=source, run_id=version.trained.run_id,
                                     tags={RUN_KEY_TAG: run_key, "emgate.seed": str(version.seed)})
    return str(mv.version)


def _decision_context(tracking: Tracking, version: VersionToRegister, number_: str, evidence: Evidence) -> dict[str, str]:
    """What the decision is about, in words: the header of the gate report."""
    recipe, rep = tracking.recipe, version.trained.report
    variant = recipe.variant(version.variant)
    model = recipe.models[variant.model]
    snapshot = _judge_snapshot(evidence)
    return {
        "registered model": f"{version.model_name} version {number_}",
        "pipeline run": f"{tracking.parent_id} (run key {tracking.run_key}, KFP run {tracking.kfp_run or 'local'})",
        "training run": version.trained.run_id,
        "base model": str(model.package or model.repo or model.path),
        "dataset": f"{rep['dataset']} sha256 {rep['dataset_sha256']}",
        "comparator": str(variant.comparator),
        "seeds": ",".join(str(x) for x in recipe.training.seeds) if version.seed is not None else "trained elsewhere",
        "judge": f"{recipe.judge.model} (snapshot {snapshot}; {recipe.judge.score_mode}, mass rule {recipe.judge.mass_rule}"
                 + (", CODE/REFUSAL rule" if recipe.judge.special_answers else "") + ")",
        "judge qualification": _qualification_line(evidence),
        **({"judge panel": _panel_line(evidence)} if len(evidence.judges) > 1 else {}),
        "decided at": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def _qualification_line(evidence: Evidence) -> str:
    q = evidence.judge_report.get("qualification")
    if not q:
        return "none (judge.qualification not set)"
    if q.get("passed"):
        return f"qualified, report sha256 {q.get('report_sha256')}"
    return f"not qualified: {q.get('reason')}"


def _panel_line(evidence: Evidence) -> str:
    """The panel in words: each judge and whether its figures counted."""
    parts = []
    for judge in evidence.judges:
        ok = evidence.qualified(judge)
        parts.append(f"{judge} ({'qualified, counted' if ok else 'not qualified, reported only'})")
    tolerance = evidence.judge_report.get("panel_tolerance")
    return ", ".join(parts) + (f"; rates may differ by at most {tolerance:g}" if tolerance is not None else "")


def _judge_snapshot(evidence: Evidence) -> str:
    return ", ".join(evidence.judge_report.get("judge_model_snapshot") or []) or "not reported by the endpoint"


@dataclass(frozen=True)
class GateReport:
    run_id: str  # the register_and_gate child run holding it
    sha256: str  # of gate_report.json
    uri: str


def _json_safe(obj: Any) -> Any:
    """`obj` as plain JSON that can be signed: NaN and infinities become null (a verdict on one is missing evidence
    either way, and says so in its detail), anything else non-JSON becomes its text."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_safe(v) for v in obj]
    return obj if obj is None or isinstance(obj, str | int | bool) else str(obj)


def _base_model(tracking: Tracking, variant: str) -> dict[str, Any]:
    """What the decision says about the base model: its recipe pin, and whether it is one."""
    spec = tracking.recipe.models[tracking.recipe.variant(variant).model]
    pin = {k: v for k, v in spec.model_dump(mode="json").items()
           if k in ("source", "kind", "repo", "revision", "package", "file", "uri", "path", "sha256") and v}
    pin["pinned"] = spec.source != "path" or bool(spec.sha256)
    return pin


def _log_gate_report(tracking: Tracking, version: VersionToRegister, number_: str, context: dict[str, str],  # noqa: PLR0913
                     evidence: Evidence, gate_run: str, source: str) -> GateReport:
    """The gate report in the gate run: Markdown for people, and gate_report.json, signed (emgate.signing) and
    self-contained: the decision, every verdict with its value, the figures, the effective policy, the judge, the
    runs, and the sha256 of every file that will be served and the base model's pin."""
    decision = version.decision
    strip = ("per_question",)
    qualification = evidence.judge_report.get("qualification")
    payload = _json_safe({
        "decision": decision.decision, "variant": version.variant, "registered_model": version.model_name,
        "version": number_, "seed": version.seed, "verdicts": [v.to_dict() for v in decision.verdicts],
        "context": context, "dataset_sha256": evidence.dataset_hashes, "policy": version.policy,
        "metrics": {k: v for k, v in (version.metrics or {}).items() if k not in strip},
        "pooled_metrics": {k: v for k, v in (version.pooled_metrics or {}).items() if k not in strip},
        "private_metrics": {n: {scope: {k: v for k, v in (f or {}).items() if k not in strip} for scope, f in sets.items()}
                            for n, sets in version.private_metrics.items()},
        "panel_metrics": {n: {k: ({m: x for m, x in (v or {}).items() if m not in strip} if k in ("own", "pooled") else v)
                              for k, v in entry.items()} for n, entry in version.panel_metrics.items()},
        "source": source, "files": version.trained.files, "adapter_sha256": version.trained.weights_sha256,
        "base_model": _base_model(tracking, version.variant),
        "judge": {"model": tracking.recipe.judge.model, "snapshot": evidence.judge_report.get("judge_model_snapshot"),
                  "score_mode": tracking.recipe.judge.score_mode, "mass_rule": tracking.recipe.judge.mass_rule,
                  "special_answers": tracking.recipe.judge.special_answers,
                  "qualification_sha256": hashlib.sha256(json.dumps(qualification, sort_keys=True, default=str).encode())
                  .hexdigest() if qualification else None, "qualified": (qualification or {}).get("passed"),
                  "qualification_verdict": (qualification or {}).get("verdict"),
                  "qualification_reason": (qualification or {}).get("reason"),
                  "name": tracking.recipe.judge.name,
                  "panel": [{"name": n, "model": e.get("model"), "qualified": e.get("qualified"), "counted": e.get("counted"),
                             "qualification_reason": e.get("qualification_reason")} for n, e in version.panel_metrics.items()],
                  "panel_tolerance": tracking.recipe.judge.panel_tolerance if version.panel_metrics else None},
        "runs": {"pipeline": tracking.parent_id, "gate": gate_run, "training": version.trained.run_id,
                 "run_key": tracking.run_key, "kfp_run": tracking.kfp_run or "local", "experiment": tracking.exp_id},
        "code_version": __version__})
    report_json = json.dumps(sign_report(payload, tracking.signing_key), indent=2, sort_keys=True)
    artifact_dir = f"gate/{version.variant}/" + (f"seed{version.seed}" if version.seed is not None else "external")
    with tempfile.TemporaryDirectory() as tmp:
        md, js = Path(tmp, "gate_report.md"), Path(tmp, "gate_report.json")
        md.write_text(report_markdown(decision, context))
        js.write_text(report_json)
        tracking.client.log_artifact(gate_run, str(md), artifact_dir)
        tracking.client.log_artifact(gate_run, str(js), artifact_dir)
        sha = _sha256(js)
    return GateReport(gate_run, sha, f"{tracking.client.get_run(gate_run).info.artifact_uri}/{artifact_dir}/gate_report.json")


def _decision_tags(tracking: Tracking, version: VersionToRegister, context: dict[str, str], links: dict[str, str],
                   evidence: Evidence, report: GateReport) -> dict[str, str]:
    """The version's tags: the decision and its reasons, the evidence's runs and hashes, every figure and verdict."""
    recipe, rep, decision = tracking.recipe, version.trained.report, version.decision
    variant = recipe.variant(version.variant)
    model = recipe.models[variant.model]
    tags: dict[str, str] = {
        "validation_status": decision.decision,
        "emgate.decision": decision.decision,
        "emgate.reasons": "; ".join(decision.reasons())[:4900] or "all rules hold",
        "emgate.gate_report_sha256": report.sha256,
        "emgate.gate_report_uri": report.uri,
        "emgate.gate_run_id": report.run_id,
        "emgate.pipeline_run_id": tracking.parent_id,
        "emgate.training_run_id": version.trained.run_id,
        "emgate.experiment_id": links.get("experiment", ""),
        "emgate.validation_run_id": links.get("validation", ""),
        "emgate.judge_run_id": links.get("judge", ""),
        "emgate.summary_run_id": links.get("summary", ""),
        "emgate.comparator": str(variant.comparator),
        "emgate.comparator_training_runs": links.get("comparator_training", ""),
        "emgate.kfp_run": tracking.kfp_run or "local",
        "emgate.variant": version.variant,
        "emgate.seed": str(version.seed),
        "emgate.seeds": context["seeds"],
        "emgate.base_model": context["base model"],
        "emgate.base_revision": model.revision or model.package or "",
        "emgate.dataset": str(rep["dataset"]),
        "emgate.dataset_sha256": str(rep["dataset_sha256"]),
        "emgate.adapter_sha256": version.trained.weights_sha256,
        "emgate.adapter_source": variant.adapter or f"trained here (run {version.trained.run_id})",
        "emgate.template": str(rep["template"]),
        "emgate.judge_model": recipe.judge.model,
        "emgate.judge_name": recipe.judge.name,
        "emgate.judge_model_snapshot": _judge_snapshot(evidence),
        "emgate.judge_scoring": f"{recipe.judge.score_mode}/{recipe.judge.mass_rule}"
                                + ("/special_answers" if recipe.judge.special_answers else ""),
        "emgate.code_version": __version__,
        "emgate.policy_sha256": str(version.policy["sha256"]),
        "emgate.floor_sha256": str(version.policy["floor"]["sha256"]),
        "emgate.floor_source": str(version.policy["floor"]["source"])[:4900],
    }
    for prefix, figures in (("metric", version.metrics), ("pooled.metric", version.pooled_metrics)):
        for name, value in (figures or {}).items():
            num = number(value)
            if num is not None and name != "per_question":
                tags[f"{prefix}.{name}"] = f"{num:.6g}"
        for reason, count in ((figures or {}).get("unscored_by_reason") or {}).items():
            tags[f"{prefix}.unscored.{reason}"] = str(count)
    for q, counts in ((version.metrics or {}).get("per_question") or {}).items():
        tags[f"metric.judged.{q}"] = str(counts.get("judged", 0))
    for v in decision.verdicts:
        tags[f"rule.{v.metric}"] = f"{'pass' if v.passed else 'fail'}: {v.reason}"[:4900]
    if version.panel_metrics:
        tags["emgate.judge_panel"] = _panel_line(evidence)[:4900]
    for judge, entry in version.panel_metrics.items():  # each further judge's figures, counted or reported only
        tags[f"judge.{judge}.status"] = ("qualified, counted" if entry.get("counted") else
                                         f"reported only: {entry.get('qualification_reason')}")[:4900]
        for scope, figures in (("metric", entry.get("own")), ("pooled.metric", entry.get("pooled"))):
            for name in PANEL_TAG_FIGURES:
                if (num := number((figures or {}).get(name))) is not None:
                    tags[f"judge.{judge}.{scope}.{name}"] = f"{num:.6g}"
    return tags


# The figures of each further panel judge copied onto the version's tags (the gate report holds them all).
PANEL_TAG_FIGURES = ("misaligned_rate", "misaligned_rate_ci_low", "misaligned_rate_ci_high", "diff_vs_comparator_ci_high",
                     "mean_coherence", "unscored_share")


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _worst_answers(scores_dir: Path | None, variant: str, seed: int | None, recipe: Recipe, k: int = 3) -> list[dict[str, Any]]:
    """The lowest-aligned coherent answers of this version: what a reviewer should read first."""
    threshold = recipe.coherent_threshold()
    rows = [r for r in iter_scores(scores_dir) if r.get("variant") == variant and r.get("seed") == seed
            and r.get("aligned") is not None and (r.get("coherent") or 0) > threshold]
    return sorted(rows, key=lambda r: r["aligned"])[:k]


FENCE = "`" * 3


def _figures_from_tags(tags: dict[str, str], prefix: str) -> dict[str, Any]:
    figures: dict[str, Any] = {k.removeprefix(prefix): float(v) for k, v in tags.items()
                               if k.startswith(prefix) and not k.startswith(prefix + "unscored.") and _is_float(v)}
    figures["unscored_by_reason"] = {k.removeprefix(prefix + "unscored."): int(v) for k, v in tags.items()
                                     if k.startswith(prefix + "unscored.") and v.isdigit()}
    return figures


def _rate_cell(tags: dict[str, str], prefix: str) -> str:
    rate = tags.get(f"{prefix}misaligned_rate")
    if rate is None:
        return "missing"
    return f"{float(rate):.3f} [{float(tags.get(f'{prefix}misaligned_rate_ci_low', 'nan')):.3f}, " \
           f"{float(tags.get(f'{prefix}misaligned_rate_ci_high', 'nan')):.3f}]"


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
        if v.metric.startswith(("pooled.", "judge.")) and v.passed:
            continue  # pooled and panel figures are in the tables below; their rules show here when they fail
        value = ("n/a" if v.passed else "missing") if v.value is None else f"{v.value:.4g}"
        lines.append(f"| {_md_cell(f'{v.metric} {v.op} {v.threshold:g}')} | {value} | "
                     f"{'pass' if v.passed else 'FAIL'}: {_md_cell(v.reason)} |")
    if tags.get("emgate.judge_panel"):
        lines += ["", f"Judge panel: {_md_cell(tags['emgate.judge_panel'])}", "",
                  "| judge | misaligned rate [CI], this version | status |", "| --- | ---: | --- |",
                  f"| {_md_cell(tags.get('emgate.judge_name', 'first'))} | {_rate_cell(tags, 'metric.')} | "
                  "the version's own figures |"]
        judges = sorted({k.split(".")[1] for k in tags if k.startswith("judge.") and k.endswith(".status")})
        lines += [f"| {_md_cell(j)} | {_rate_cell(tags, f'judge.{j}.metric.')} | {_md_cell(tags[f'judge.{j}.status'])} |"
                  for j in judges]
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


def promote_passed(recipe: Recipe, decisions: dict[str, Any], by: str) -> list[dict[str, Any]]:
    """The pipeline's promotion step. A candidate is promoted only when every one of its versions (every training
    seed) passed on its own answers and pooled; `champion` then moves to champion_choice's version, after
    emgate.registry.promote has verified its gate report. A blocked candidate is never touched here."""
    from emgate.registry import client_for, promote
    from emgate.signing import load_signing_key

    client = client_for(recipe.mlflow.tracking_uri)
    keys = trusted_keys(load_signing_key())  # the gate's key verifies its own decisions before champion moves
    promoted = []
    for name, d in decisions["candidates"].items():
        if not promotable(d):
            continue
        best, why = champion_choice(d["versions"])
        result = promote(client, d["registered_model"], best["version"], by=by, public_keys=keys)
        client.set_model_version_tag(d["registered_model"], best["version"], "emgate.champion_reason", why)
        promoted.append({"candidate": name, **result, "reason": why})
    return promoted
