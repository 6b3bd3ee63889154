"""The registry side of the gate: promote a version, verify a decision before serving, explain a decision.

A version's decision lives in two places that must agree: its tags (set by register_and_gate) and the gate
report JSON (an artifact of the gate's MLflow run) whose sha256 is one of those tags. `verify_version` trusts
neither alone: it downloads the report, checks the hash and the report's own contents, and fails closed on
anything missing. Promotion moves the `champion` alias; a blocked version moves only with an override, which
is recorded as tags (who, why, when).
"""

from __future__ import annotations

import contextlib
import difflib
import getpass
import hashlib
import json
import os
import re
import sqlite3
import tempfile
import urllib.parse
from collections.abc import Iterator
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


class NotFound(RegistryError):
    """The store has no such registered model, version or alias."""


class StoreUnavailable(RegistryError):
    """The tracking store is missing, is not an MLflow store, or its server does not answer."""


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


# ---- the store, checked before MLflow touches it ---------------------------------------------------------------
# MLflow creates a SQLite file it is pointed at (and runs its migrations in it) and retries an unreachable server
# for minutes; a command that only reads a decision must do neither.

STORE_HINT = ("pass --tracking-uri (or set MLFLOW_TRACKING_URI) to the store the pipeline logged to, "
              "sqlite:///PATH/mlflow.db or http(s)://HOST:PORT")
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")
_MLFLOW_TABLES = {"alembic_version", "registered_models", "model_versions"}
# What `fail_fast_http` sets where the user has not: 2 retries 1 s and 2 s apart (plus MLflow's jitter), 10 s a
# request, instead of MLflow's 7 retries with a backoff factor of 2 and 120 s a request (minutes on a dead server).
FAIL_FAST_HTTP = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                  "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


@contextlib.contextmanager
def fail_fast_http() -> Iterator[None]:
    """MLflow's HTTP retries and timeout cut to seconds for the length of the block, each only where its environment
    variable is unset; the environment is restored afterwards."""
    added = [k for k in FAIL_FAST_HTTP if k not in os.environ]
    os.environ.update({k: FAIL_FAST_HTTP[k] for k in added})
    try:
        yield
    finally:
        for k in added:
            os.environ.pop(k, None)


def _missing_path(path: Path, what: str = "file") -> str:
    """Why nothing is at `path`: the nearest folder above it that is missing, if any."""
    missing = path.parent
    if missing.is_dir():
        return f"no such {what}"
    while not missing.parent.is_dir():
        missing = missing.parent
    return f"there is no folder {missing}"


def _sqlite_problem(path: Path) -> str | None:
    """None when `path` is an MLflow SQLite store; else what it is instead. Opened read-only: never created,
    never migrated."""
    if not path.exists():
        return _missing_path(path)
    if path.is_dir():
        return "a folder, not an SQLite file"
    try:
        with contextlib.closing(sqlite3.connect(f"file:{urllib.parse.quote(str(path))}?mode=ro", uri=True)) as db:
            tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    except sqlite3.Error as exc:
        return f"not an SQLite database: {exc}"
    if not tables:
        return "an empty SQLite file, left as it is"
    if not _MLFLOW_TABLES.issubset(tables):
        return "an SQLite database without MLflow's tables, left as it is"
    return None


def _check_sqlite(uri: str) -> str:
    rest = uri.removeprefix("sqlite:///")
    raw, sep, query = rest.partition("?")
    db = Path(raw).resolve()
    problem = _sqlite_problem(db) if raw and raw != ":memory:" else "an in-memory store holds no models"
    if problem is None:
        return f"sqlite:///{db}{sep}{query}"
    fix = STORE_HINT
    if raw and not raw.startswith("/"):  # sqlite:///x is relative to the working directory; sqlite:////x is absolute
        fix = (f"did you mean sqlite:////{raw}? (four slashes: an absolute path; three: relative to the working "
               "directory)" if _sqlite_problem(Path("/" + raw)) is None else
               f"{STORE_HINT} (sqlite:///{raw} is relative to the working directory; sqlite:////PATH is absolute)")
    raise StoreUnavailable(f"no MLflow store at {db} ({problem}); {fix}")


def _check_path(uri: str) -> str:
    """A plain path or file: URI, which MLflow would read (and create) as a file store: name what is there."""
    raw = urllib.parse.unquote(urllib.parse.urlparse(uri).path) if uri.startswith("file:") else uri
    path = Path(raw).expanduser().resolve()
    if not path.exists():
        raise StoreUnavailable(f"no MLflow store at {path} ({_missing_path(path, 'file or folder')}); {STORE_HINT}")
    if path.is_file() and _sqlite_problem(path) is None:
        raise StoreUnavailable(f"{uri} is a file path, not a tracking URI: pass --tracking-uri sqlite:///{path}")
    if path.is_dir() and _sqlite_problem(path / "mlflow.db") is None:
        raise StoreUnavailable(f"{uri} is a folder, not a tracking URI: its store is sqlite:///{path / 'mlflow.db'}")
    what = "a folder (emgate reads no MLflow file store)" if path.is_dir() else "a file, not an MLflow SQLite store"
    raise StoreUnavailable(f"{path} is {what}; {STORE_HINT}")


def _check_server(uri: str, timeout: float) -> str:
    import httpx

    try:
        httpx.get(f"{uri.rstrip('/')}/health", timeout=timeout).raise_for_status()
    except httpx.HTTPError as exc:
        raise StoreUnavailable(f"the MLflow server at {uri} does not answer ({type(exc).__name__}: "
                               f"{_one_line(str(exc))}); check the URL (--tracking-uri or MLFLOW_TRACKING_URI) and "
                               "that the server runs") from None
    return uri


def check_tracking_uri(uri: str, timeout: float = 5.0) -> str:
    """The tracking URI to open (a SQLite path made absolute), or StoreUnavailable naming what is missing or
    unreachable and the fix. Reads only: a SQLite file or folder that is not there is not created, and a server
    gets one health request."""
    uri = uri.strip()
    if uri.startswith("sqlite:///"):
        return _check_sqlite(uri)
    if uri.startswith(("http://", "https://")):
        return _check_server(uri, timeout)
    if uri.startswith("file:") or not _SCHEME.match(uri):
        return _check_path(uri)
    raise StoreUnavailable(f"tracking URI {uri}: use sqlite:///PATH/mlflow.db (the pipeline's store) or http(s)://HOST:PORT "
                   "(an MLflow server)")


def open_registry(tracking_uri: str) -> Any:
    """An MlflowClient on a store that exists (check_tracking_uri first)."""
    return client_for(check_tracking_uri(tracking_uri))


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + "..."


def _not_found(exc: Any) -> bool:
    return getattr(exc, "error_code", None) in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE")


@contextlib.contextmanager
def _store_errors(client: Any) -> Iterator[None]:
    """An MLflow failure that is no answer about the model (a dead server, a broken database): one line."""
    from mlflow.exceptions import MlflowException

    try:
        yield
    except MlflowException as exc:
        if denied := _access_denied(exc, "read the registry"):
            raise denied from None
        raise StoreUnavailable(f"the MLflow store at {client.tracking_uri} failed ({_one_line(exc.message)}); check "
                               "that the server runs and reaches its database, then retry") from None


def _listing(items: list[str], limit: int = 10) -> str:
    return ", ".join(items[:limit]) + (f", ... ({len(items)} in all)" if len(items) > limit else "")


def _registered_model(client: Any, name: str) -> Any:
    """The registered model, or NotFound naming the store and the closest names in it."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_registered_model(name)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
    names = sorted(m.name for m in client.search_registered_models(max_results=1000))
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.6)
    there = (f"did you mean {' or '.join(repr(c) for c in close)}?" if close else
             f"it has {_listing(names)}" if names else "it has no registered models")
    raise NotFound(f"no registered model {name!r} in {client.tracking_uri}: {there} (check the name, or "
                   "--tracking-uri for the store the pipeline logged to)")


def _versions(client: Any, name: str) -> list[str] | None:
    """The registered model's versions, newest first; None when they cannot be listed."""
    from mlflow.exceptions import MlflowException

    try:
        found = client.search_model_versions(f"name = '{name}'")
    except MlflowException:  # e.g. a name the filter syntax cannot quote: say nothing rather than something wrong
        return None
    return [str(v) for v in sorted((int(v.version) for v in found), reverse=True)]


# A pseudo-alias that `emgate schedule --mode gate-newest` puts in a recipe: the newest version of a registered model
# that carries no gate decision yet (no `validation_status` tag). Not settable as a real alias by emgate.
NEWEST_UNGATED = "newest-ungated"


def resolve_version(client: Any, ref: ModelRef) -> Any:
    """The model version `ref` names; NotFound (which of model, version or alias, and what there is instead) or
    StoreUnavailable (the store failed) otherwise."""
    from mlflow.exceptions import MlflowException

    with _store_errors(client):
        model = _registered_model(client, ref.name)
        if ref.alias == NEWEST_UNGATED:
            versions = client.search_model_versions(f"name = '{ref.name}'")
            ungated = [v for v in versions if "validation_status" not in (v.tags or {})]
            if not ungated:
                raise RegistryError(f"{ref}: every version of {ref.name!r} already has a gate decision "
                                    f"({len(versions)} version(s)); nothing new to gate")
            return max(ungated, key=lambda v: int(v.version))
        try:
            if ref.version:
                return client.get_model_version(ref.name, ref.version)
            return client.get_model_version_by_alias(ref.name, ref.alias)
        except MlflowException as exc:
            if not _not_found(exc):
                raise
        found = _versions(client, ref.name)
        versions = ("its versions could not be listed" if found is None else
                    f"its versions: {_listing(found)}" if found else "it has no versions yet")
        if ref.version:
            raise NotFound(f"{ref}: registered model {ref.name!r} has no version {ref.version} ({versions})"
                           + ("; give one of its versions" if found else ""))
        aliases = ", ".join(f"{a} = version {v}" for a, v in sorted((getattr(model, "aliases", None) or {}).items()))
        how = {CHAMPION: f"no version is champion yet: `emgate promote {ref.name} VERSION` sets it after a verified "
                         "pass",
               CANDIDATE: "the gate sets candidate when it registers a version"}.get(ref.alias or "", "check the alias")
        raise NotFound(f"{ref}: registered model {ref.name!r} has no alias {ref.alias!r} (aliases set: "
                       f"{aliases or 'none'}; {versions}); {how}, or name a version: {ref.name}/VERSION")


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


def verify_version(client: Any, ref: ModelRef, allow_override: bool = False, floor: Any = None, *,
                   raise_not_found: bool = False) -> Verification:
    """Passes only for a version whose gate report matches its hash and records a passed decision for THIS
    version, every rule holding, and every rule of `floor` (emgate.policy.Floor; default: emgate.floor.load_floor())
    applied at least as strictly. An override passes only with allow_override. Fails closed otherwise: a reference
    that names no version is a failed Verification (version None), or NotFound with raise_not_found; a store
    that fails raises StoreUnavailable."""
    from emgate.floor import load_floor
    from emgate.policy import floor_problems

    floor = floor if floor is not None else load_floor(read_private=False)
    try:
        mv = resolve_version(client, ref)
    except StoreUnavailable:
        raise
    except RegistryError as exc:
        if raise_not_found:
            raise
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
            problems += floor_problems(floor, list(report.get("verdicts", [])), report.get("policy") or {})
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
    check = verify_version(client, ref, raise_not_found=True)  # no such version: nothing an override could promote
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
    with _store_errors(client):
        try:
            if not check.ok:
                for key, value in {"emgate.override": "true", "emgate.override_by": by,
                                   "emgate.override_reason": reason or "", "emgate.override_at": now,
                                   "emgate.override_problems": "; ".join(check.problems)[:4900]}.items():
                    client.set_model_version_tag(name, str(version), key, value)
            client.set_model_version_tag(name, str(version), "emgate.promoted_by", by)
            client.set_model_version_tag(name, str(version), "emgate.promoted_at", now)
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
