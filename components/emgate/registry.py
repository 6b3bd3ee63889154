"""The registry side of the gate: promote a version, verify a decision before serving, explain a decision.

A version's decision lives in two places that must agree: its tags (set by register_and_gate) and the gate
report JSON (an artifact of the gate's MLflow run) whose sha256 is one of those tags. `verify_version` trusts
neither alone: it downloads the report, checks the hash and the report's own contents, and fails closed on
anything missing. Promotion moves the `champion` alias; a blocked version moves only with an override, which
is recorded as tags (who, why, when).
"""

from __future__ import annotations

import getpass
import hashlib
import json
import os
import re
import tempfile
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

CHAMPION = "champion"
CANDIDATE = "candidate"
ACTOR_ENV = "EMGATE_ACTOR"  # who promotes, for the audit tags; defaults to the OS user
_REF = re.compile(r"^(?:models:/)?(?P<name>[^@/]+)(?:@(?P<alias>[^@/]+)|/(?P<version>\d+))?$")


class RegistryError(RuntimeError):
    """A user-facing registry problem: unknown model, version or alias, unreachable store."""


class PromotionRefused(RegistryError):
    """The version may not become champion (blocked, undecided or its evidence does not verify)."""


class AccessDenied(RegistryError):
    """The tracking server refused the request for these credentials (MLflow basic auth: 403 or 401)."""


# MLflow's error codes for a refused login or a missing permission, as they read to a user
_ACCESS_CODES = {"PERMISSION_DENIED": "permission denied", "UNAUTHENTICATED": "not authenticated"}


def _access_denied(exc: BaseException, what: str) -> AccessDenied | None:
    """An AccessDenied naming who may not do `what`, if `exc` is MLflow refusing the credentials; else None."""
    code = getattr(exc, "error_code", None)
    if code not in _ACCESS_CODES:
        return None
    user = os.environ.get("MLFLOW_TRACKING_USERNAME")
    who = f"MLflow user {user!r}" if user else "a client without MLFLOW_TRACKING_USERNAME/PASSWORD"
    return AccessDenied(f"{_ACCESS_CODES[code]}: {who} may not {what} (the tracking server answered {code}); "
                        "use an account that may (the gate's), in MLFLOW_TRACKING_USERNAME/PASSWORD")


@dataclass(frozen=True)
class ModelRef:
    name: str
    alias: str | None = None
    version: str | None = None

    def __str__(self) -> str:
        if self.version:
            return f"{self.name}/{self.version}"
        return f"{self.name}@{self.alias or CHAMPION}"


def parse_model_ref(text: str, default_alias: str = CHAMPION) -> ModelRef:
    """NAME@ALIAS, NAME/VERSION, NAME (= NAME@default_alias), each optionally prefixed with models:/."""
    m = _REF.match(text.strip())
    if m is None:
        raise RegistryError(f"{text!r} is not a model reference: use NAME@ALIAS (e.g. emgate-insecure@champion) "
                            "or NAME/VERSION (e.g. emgate-insecure/3)")
    alias = m["alias"] or (None if m["version"] else default_alias)
    return ModelRef(m["name"], alias, m["version"])


def client_for(tracking_uri: str) -> Any:
    import mlflow
    from mlflow import MlflowClient

    mlflow.set_tracking_uri(tracking_uri)
    return MlflowClient(tracking_uri)


# A pseudo-alias that `emgate schedule --mode gate-newest` puts in a recipe: the newest version of a registered model
# that carries no gate decision yet (no `validation_status` tag). Not settable as a real alias by emgate.
NEWEST_UNGATED = "newest-ungated"


def resolve_version(client: Any, ref: ModelRef) -> Any:
    from mlflow.exceptions import MlflowException

    try:
        if ref.alias == NEWEST_UNGATED:
            versions = client.search_model_versions(f"name = '{ref.name}'")
            ungated = [v for v in versions if "validation_status" not in (v.tags or {})]
            if not ungated:
                raise RegistryError(f"{ref}: every version of {ref.name!r} already has a gate decision "
                                    f"({len(versions)} version(s)); nothing new to gate")
            return max(ungated, key=lambda v: int(v.version))
        if ref.version:
            return client.get_model_version(ref.name, ref.version)
        return client.get_model_version_by_alias(ref.name, ref.alias)
    except MlflowException as exc:
        if denied := _access_denied(exc, f"read registered model {ref.name!r}"):
            raise denied from None
        what = f"version {ref.version}" if ref.version else f"alias {ref.alias!r}"
        raise RegistryError(f"{ref}: registered model {ref.name!r} has no {what} ({exc.error_code}); "
                            "list versions with the MLflow UI or `emgate gate explain NAME/VERSION`") from None


@dataclass
class Verification:
    ref: str
    version: str | None
    ok: bool
    problems: list[str] = field(default_factory=list)
    report: dict[str, Any] | None = None
    override: dict[str, str] | None = None


def _download(client: Any, uri: str) -> bytes:
    import mlflow

    with tempfile.TemporaryDirectory() as tmp:
        local = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=tmp,
                                                    tracking_uri=client.tracking_uri)
        return Path(local).read_bytes()


# The gate report's integrity, apart from the decision it records: a blocked version's report is as intact as a
# passed one's. Keys are `explain()["report_integrity"]`; values are what `emgate gate explain` prints.
REPORT_INTEGRITY = {
    "intact": "report intact (its sha256 matches the version's emgate.gate_report_sha256 tag)",
    "sha256_mismatch": "report does NOT match its recorded sha256 (possible tampering)",
    "missing": "no report (the version has no emgate.gate_report_uri/_sha256 tags)",
    "unreadable": "no report (the gate report artifact cannot be read)",
    "not_json": "report matches its recorded sha256 but is not JSON",
}


def check_gate_report(client: Any, mv: Any) -> tuple[dict[str, Any] | None, list[str], str]:
    """(the version's gate report, what is wrong with it, its REPORT_INTEGRITY key); the report is None unless
    it matches its sha256 tag and parses."""
    tags = mv.tags or {}
    uri, expected = tags.get("emgate.gate_report_uri"), tags.get("emgate.gate_report_sha256")
    if not uri or not expected:
        return None, ["missing evidence: the version has no gate report tags (emgate.gate_report_uri/_sha256); "
                      "it was not gated by emgate"], "missing"
    try:
        raw = _download(client, uri)
    except Exception as exc:
        return None, [f"missing evidence: the gate report {uri} cannot be read ({type(exc).__name__}: {exc})"], \
            "unreadable"
    actual = hashlib.sha256(raw).hexdigest()
    if actual != expected:
        return None, [f"the gate report's sha256 is {actual[:16]}..., the version's tag says {expected[:16]}...: "
                      "the report was changed after the decision"], "sha256_mismatch"
    try:
        report = json.loads(raw)
    except json.JSONDecodeError as exc:
        return None, [f"the gate report {uri} is not JSON ({exc})"], "not_json"
    return report, [], "intact"


def load_gate_report(client: Any, mv: Any) -> tuple[dict[str, Any] | None, list[str]]:
    """The version's gate report and what is wrong with it (empty list: it matches its sha256 tag)."""
    report, problems, _ = check_gate_report(client, mv)
    return report, problems


def verify_version(client: Any, ref: ModelRef, allow_override: bool = False, floor: Any = None) -> Verification:
    """Passes only for a version whose gate report matches its hash and records a passed decision for THIS
    version, every rule holding, and every rule of `floor` (emgate.policy.Floor; default: emgate.floor.load_floor())
    applied at least as strictly. An override passes only with allow_override. Fails closed otherwise."""
    from emgate.floor import load_floor
    from emgate.policy import floor_problems

    floor = floor if floor is not None else load_floor()
    try:
        mv = resolve_version(client, ref)
    except RegistryError as exc:
        return Verification(str(ref), None, False, [str(exc)])
    version = str(mv.version)
    tags = mv.tags or {}
    report, problems = load_gate_report(client, mv)
    result = Verification(str(ref), version, False, problems, report)
    if tags.get("emgate.override") == "true":
        result.override = {k.removeprefix("emgate.override_"): v for k, v in tags.items()
                           if k.startswith("emgate.override_")}
    if report is not None:
        if str(report.get("registered_model")) != ref.name or str(report.get("version")) != version:
            problems.append(f"the gate report is for {report.get('registered_model')} version {report.get('version')}, "
                            f"not {ref.name} version {version}")
        failed = [v for v in report.get("verdicts", []) if not v.get("passed")]
        if not report.get("verdicts"):
            problems.append("missing evidence: the gate report has no rule verdicts")
        if report.get("decision") != "passed" or failed:
            reasons = "; ".join(str(v.get("reason")) for v in failed) or "no reason recorded"
            if result.override and allow_override:
                pass
            elif result.override:
                problems.append(f"blocked by the gate ({reasons}) and promoted by override "
                                f"({result.override.get('by')}: {result.override.get('reason')}); "
                                "pass --allow-override to accept overridden versions")
            else:
                problems.append(f"the gate blocked this version: {reasons}")
        if not (result.override and allow_override):
            problems += floor_problems(floor, list(report.get("verdicts", [])))
        if tags.get("emgate.decision") != report.get("decision"):
            problems.append(f"the version's emgate.decision tag ({tags.get('emgate.decision')}) disagrees with its "
                            f"gate report ({report.get('decision')})")
    result.ok = not problems
    return result


def actor() -> str:
    return os.environ.get(ACTOR_ENV) or getpass.getuser()


def promote(client: Any, name: str, version: str, *, override: bool = False, reason: str | None = None,
            by: str | None = None) -> dict[str, Any]:
    """Point `champion` at name/version. Refuses a version whose decision is not a verified pass unless
    override=True with a reason; an override is recorded as tags on the version. Credentials that may not write
    the version (MLflow basic auth) raise AccessDenied before the alias moves."""
    from mlflow.exceptions import MlflowException

    ref = ModelRef(name, version=str(version))
    check = verify_version(client, ref)
    if check.version is None:  # no such version (or no server): nothing an override could promote
        raise RegistryError("; ".join(check.problems))
    by = by or actor()
    now = datetime.now(UTC).isoformat(timespec="seconds")
    if not check.ok and not override:
        raise PromotionRefused(f"{ref} is not promoted: " + "; ".join(check.problems) +
                               ". To promote it anyway: --override --reason \"why\" (recorded on the version)")
    if override and not (reason and reason.strip()):
        raise PromotionRefused(f"{ref}: --override needs --reason \"...\": the reason is recorded on the version")
    try:
        previous = str(client.get_model_version_by_alias(name, CHAMPION).version)
    except Exception:
        previous = None
    tags = {"emgate.override": "true", "emgate.override_by": by, "emgate.override_reason": reason or "",
            "emgate.override_at": now, "emgate.override_problems": "; ".join(check.problems)[:4900]} if not check.ok else {}
    try:
        for key, value in {**tags, "emgate.promoted_by": by, "emgate.promoted_at": now}.items():
            client.set_model_version_tag(name, str(version), key, value)
        client.set_registered_model_alias(name, CHAMPION, str(version))  # last: no champion without its audit tags
    except MlflowException as exc:
        if denied := _access_denied(exc, f"set its tags or its {CHAMPION!r} alias"):
            raise AccessDenied(f"{ref} is not promoted: {denied}") from None
        raise
    return {"model": name, "version": str(version), "previous_champion": previous, "by": by, "at": now,
            "override": not check.ok}


def explain(client: Any, ref: ModelRef) -> dict[str, Any]:
    """Everything a reviewer needs about one version's decision: verdicts, tags, evidence links. Three separate
    answers: `decision` (what the gate decided), `report_integrity` (whether the report is the one the decision
    recorded, a REPORT_INTEGRITY key) and `verified` (whether `gate verify --allow-override` accepts it)."""
    mv = resolve_version(client, ref)
    report, problems, integrity = check_gate_report(client, mv)
    tags = dict(mv.tags or {})
    aliases = [a for a in (getattr(mv, "aliases", None) or [])]
    tracking = client.tracking_uri
    links = evidence_links(tracking, tags, ref.name, str(mv.version))
    check = verify_version(client, ModelRef(ref.name, version=str(mv.version)), allow_override=True)
    return {"name": ref.name, "version": str(mv.version), "aliases": aliases, "tags": tags, "report": report,
            "problems": problems, "links": links, "verified": check.ok,
            "decision": tags.get("emgate.decision", "undecided"), "report_integrity": integrity,
            "report_status": REPORT_INTEGRITY[integrity], "verification_problems": check.problems,
            "override": tags.get("emgate.override") == "true"}


def ui_base(tracking_uri: str) -> str | None:
    return tracking_uri.rstrip("/") if tracking_uri.startswith(("http://", "https://")) else None


def evidence_links(tracking_uri: str, tags: dict[str, str], name: str, version: str) -> dict[str, str]:
    """MLflow UI addresses (fragments relative to the UI when the store is not a server)."""
    exp = tags.get("emgate.experiment_id", "0")
    links = {"model version": f"#/models/{name}/versions/{version}"}
    for label, key in (("pipeline run", "emgate.pipeline_run_id"), ("gate run", "emgate.gate_run_id"),
                       ("training run", "emgate.training_run_id"), ("judge run", "emgate.judge_run_id"),
                       ("validation run", "emgate.validation_run_id"), ("summary run", "emgate.summary_run_id")):
        if tags.get(key):
            links[label] = f"#/experiments/{exp}/runs/{tags[key]}"
    base = ui_base(tracking_uri)
    return {k: f"{base}/{v}" if base else v for k, v in links.items()}
