"""The registry side of the gate: promote a version, verify a decision before serving, explain a decision.

A version's tags are a copy for the MLflow UI: anyone with EDIT on the registered model can rewrite them, so
`verify_version` trusts none. It finds the version's current decision (the newest signed decision record,
emgate.decisions), checks its signature and the signed gate report it points at, recomputes every verdict from the
report's figures and policy, checks the platform's floor, and hashes the files that will be served against the
decision's. It fails closed on anything missing. Promotion moves the `champion` alias (a compare-and-set); a blocked
version moves only with a signed override record (who, why, when) of its current decision.
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


def set_version_tags(client: Any, name: str, version: str, tags: dict[str, str]) -> None:
    """Set many tags on one model version, in order. MlflowClient.set_model_version_tag re-reads the registered model
    before every tag (to refuse a prompt), which doubles the requests of a gate run (~150 tags a version); here the
    model is checked once and the tags go through the client's own registry client."""
    from mlflow.prompt.registry_utils import has_prompt_tag

    if has_prompt_tag(client.get_registered_model(name)._tags):
        raise ValueError(f"{name} is a prompt in the registry, not a model")
    registry = client._get_registry_client()
    for key, value in tags.items():
        registry.set_model_version_tag(name, version, key, value)


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


def _stale_pending(tags: dict[str, str]) -> bool:
    """A decision left pending by a gate run that died (older than PENDING_STALE_S): the version is ungated."""
    from emgate.decisions import PENDING, PENDING_STALE_S

    if tags.get("validation_status") != PENDING:
        return False
    try:
        since = datetime.fromisoformat(tags.get("emgate.pending_since", ""))
    except ValueError:
        return True  # no readable start: nobody is deciding it
    return (datetime.now(UTC) - since).total_seconds() > PENDING_STALE_S


def resolve_version(client: Any, ref: ModelRef) -> Any:
    """The model version `ref` names; NotFound (which of model, version or alias, and what there is instead) or
    StoreUnavailable (the store failed) otherwise."""
    from mlflow.exceptions import MlflowException

    with _store_errors(client):
        model = _registered_model(client, ref.name)
        if ref.alias == NEWEST_UNGATED:
            versions = client.search_model_versions(f"name = '{ref.name}'")
            ungated = [v for v in versions if "validation_status" not in (v.tags or {}) or _stale_pending(v.tags)]
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
    report: dict[str, Any] | None = None  # the signed report's payload (or a legacy report), when it checks
    override: dict[str, str] | None = None  # the signed override of the current decision, when there is one
    integrity: str = "missing"  # a REPORT_INTEGRITY key
    sequence: int | None = None  # the current decision record's
    experiment_id: str | None = None  # where the current decision record lives (overrides go beside it)
    integrity_problems: list[str] = field(default_factory=list)  # what no override can excuse
    notes: list[str] = field(default_factory=list)  # records found that count for nothing (bad signatures)


def _download(client: Any, uri: str) -> bytes:
    import mlflow

    with tempfile.TemporaryDirectory() as tmp:
        local = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=tmp,
                                                    tracking_uri=client.tracking_uri)
        return Path(local).read_bytes()


# How far a version's decision can be trusted, apart from what it decided: a blocked version's signed report is
# as intact as a passed one's. Keys are `explain()["report_integrity"]`; values are what `emgate gate explain` prints.
REPORT_INTEGRITY = {
    "intact": "report intact (signed decision record and report: signatures and sha256 check)",
    "sha256_mismatch": "report does NOT match its recorded sha256 (possible tampering): the signed decision record "
                       "holds another",
    "bad_signature": "the report's signature does NOT verify with the trusted keys (possible tampering, or a key "
                     "that is not trusted)",
    "missing": "no signed decision record (never gated, or gated by another emgate's key)",
    "legacy": "legacy, unsigned: gated before decisions were signed (only tags back it); gate it again",
    "unreadable": "no report (the gate report artifact cannot be read)",
    "not_json": "report matches its recorded sha256 but is not JSON",
    "pending": "pending: a gate run is writing its decision, or died doing it",
}
LEGACY_HELP = ("it was gated before decisions were signed: gate it again (emgate schedule --mode gate-newest, or a "
               "pipeline run on its adapter), or accept it knowingly with --allow-legacy")


def check_gate_report(client: Any, mv: Any) -> tuple[dict[str, Any] | None, list[str], str]:
    """A LEGACY version's gate report from its tags, what is wrong with it and its REPORT_INTEGRITY key; the report
    is None unless it matches its sha256 tag and parses. Only `--allow-legacy` trusts this."""
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


def _signed_report(client: Any, record: Any, keys: Any) -> tuple[dict[str, Any] | None, list[str], str]:
    """The payload of the report a decision record points at, when its sha256 and signature check."""
    from emgate.signing import SignatureError, verify_signed

    try:
        raw = _download(client, record.report_uri)
    except Exception as exc:
        return None, [f"missing evidence: the gate report {record.report_uri} cannot be read ({type(exc).__name__}: "
                      f"{_one_line(str(exc))})"], "unreadable"
    actual = hashlib.sha256(raw).hexdigest()
    if actual != record.report_sha256:
        return None, [f"the gate report's sha256 is {actual[:16]}..., its signed decision record says "
                      f"{record.report_sha256[:16]}...: the report was changed after the decision"], "sha256_mismatch"
    try:
        envelope = json.loads(raw)
    except json.JSONDecodeError as exc:
        return None, [f"the gate report {record.report_uri} is not JSON ({exc})"], "not_json"
    try:
        return verify_signed(envelope, keys), [], "intact"
    except SignatureError as exc:
        return None, [f"the gate report's signature does not verify: {exc}"], "bad_signature"


def served_file_problems(client: Any, mv: Any, expected: dict[str, str] | None, model_dir: Path | None) -> list[str]:
    """The files the decision was about against the version's files where serving reads them (`model_dir`), or
    else its registered source, downloaded; streamed sha256. One line per file that differs."""
    from emgate.signing import compare_digests, file_digests

    if not expected:
        return ["missing evidence: the decision records no sha256 of the files to be served"]
    try:
        if model_dir is not None:
            actual = file_digests(model_dir)
            where = str(model_dir)
        else:
            import mlflow

            with tempfile.TemporaryDirectory() as tmp:
                local = mlflow.artifacts.download_artifacts(artifact_uri=str(mv.source), dst_path=tmp,
                                                            tracking_uri=client.tracking_uri)
                actual = file_digests(local)
            where = str(mv.source)
    except Exception as exc:
        return [f"missing evidence: the version's files cannot be hashed ({type(exc).__name__}: {_one_line(str(exc))})"]
    return [f"the files served differ from the decision ({where}): {d}" for d in compare_digests(expected, actual)]


def _check_current(client: Any, mv: Any, current: Any, keys: Any, result: Verification, floor: Any,  # noqa: PLR0913
                   model_dir: Path | None | bool) -> list[str]:
    """Check the current decision record's report into result (integrity problems, report, state); returns what
    the decision itself holds against the version (a block, floor rules), which an override may excuse.
    `model_dir` False: the served files are not hashed."""
    from emgate.policy import floor_problems, recheck_report

    integrity, decided = result.integrity_problems, list[str]()
    name, version = mv.name, str(mv.version)
    report, problems, state = _signed_report(client, current, keys)
    integrity += problems
    result.integrity = state if result.integrity != "pending" else result.integrity
    if report is None:
        return decided
    result.report = report
    if (str(report.get("registered_model")), str(report.get("version"))) != (name, version):
        integrity.append(f"the gate report is for {report.get('registered_model')} version {report.get('version')}, "
                         f"not {name} version {version}")
    if report.get("decision") != current.decision:
        integrity.append(f"the decision record says {current.decision}, its report {report.get('decision')}")
    integrity += recheck_report(report)
    if str(report.get("source")) != str(mv.source):
        integrity.append(f"the decision is about source {report.get('source')}, the version's source is {mv.source}")
    if model_dir is not False:
        integrity += served_file_problems(client, mv, report.get("files"), model_dir if isinstance(model_dir, Path) else None)
    failed = [v for v in report.get("verdicts", []) if isinstance(v, dict) and not v.get("passed")]
    if report.get("decision") != "passed" or failed:
        reasons = "; ".join(str(v.get("reason")) for v in failed) or "no reason recorded"
        decided.append(f"the gate blocked this version: {reasons}")
    decided += floor_problems(floor, list(report.get("verdicts", [])), report.get("policy") or {})
    return decided


def verify_version(client: Any, ref: ModelRef, allow_override: bool = False, floor: Any = None, *,  # noqa: PLR0913
                   raise_not_found: bool = False, public_keys: Any = None, override_keys: Any = None,
                   allow_legacy: bool = False, model_dir: Path | None = None, check_files: bool = True) -> Verification:
    """Passes only for a version whose CURRENT decision (the newest signed decision record, emgate.decisions) is a
    pass: the record and the report it points at verify with `public_keys` (default $EMGATE_GATE_PUBLIC_KEY), the
    report's sha256 matches, every verdict follows from the report's figures and policy, every rule of `floor`
    (default emgate.floor.load_floor()) was applied at least as strictly, and the files served (`model_dir`, else the
    version's registered source) hash to what the decision recorded. An override passes only with allow_override
    and a signed override record (approvers' keys, $EMGATE_OVERRIDE_PUBLIC_KEY) of that very decision. A version
    gated before decisions were signed passes only with allow_legacy, on the old tag-and-hash checks. Fails closed
    otherwise: a reference that names no version is a failed Verification (version None), or NotFound with
    raise_not_found; a store that fails raises StoreUnavailable."""
    from emgate.decisions import PENDING, load_history, trusted_override_keys
    from emgate.floor import load_floor
    from emgate.signing import load_public_keys

    floor = floor if floor is not None else load_floor(read_private=False)
    keys = public_keys if public_keys is not None else load_public_keys()
    approvers = override_keys if override_keys is not None else trusted_override_keys()
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
    result = Verification(str(ref), version, False)
    with _store_errors(client):
        history = load_history(client, ref.name, version, keys, approvers)
    result.notes = list(history.ignored)
    integrity = result.integrity_problems
    current = history.current
    if tags.get("emgate.decision") == PENDING:
        integrity.append(f"pending: gate run {tags.get('emgate.pending_run_id', '?')} began deciding this version at "
                         f"{tags.get('emgate.pending_since', '?')} and has not finished; wait for it, or gate it again")
        result.integrity = "pending"
    if current is None:
        if tags.get("emgate.gate_report_uri") and not history.ignored:
            return _verify_legacy(client, mv, ref, result, floor, allow_override, allow_legacy)
        if not keys:
            integrity.append("no trusted public key to check the gate's signature with: set EMGATE_GATE_PUBLIC_KEY "
                             "(the gate's public key: PEM text, a .pem file or a folder of them) or pass --public-key")
        elif history.ignored:
            integrity.append(f"no decision record on this version verifies with the trusted keys ({len(history.ignored)}"
                             f" found; {history.ignored[0]})")
            result.integrity = "bad_signature"
        else:
            integrity.append("missing evidence: no signed gate decision on this version (emgate never gated it)")
        result.problems = [*integrity]
        return result
    result.sequence, result.experiment_id = current.sequence, history.experiments.get(current.sequence)
    integrity += history.conflicts()
    decided = _check_current(client, mv, current, keys, result, floor, model_dir if check_files else False)
    override = history.override_for_current()
    if override is not None:
        result.override = {"by": override.actor, "reason": override.reason, "at": override.time.isoformat()}
    if decided and override is not None and not allow_override:
        decided = [f"blocked by the gate and promoted by override ({override.actor}: {override.reason}); pass "
                   f"--allow-override to accept overridden versions. {'; '.join(decided)}"]
    elif decided and override is not None:
        decided = []
    if tags.get("emgate.override") == "true" and override is None:
        result.notes.append("the version's emgate.override tag is not backed by a signed override record: ignored")
    result.problems = [*integrity, *decided]
    result.ok = not result.problems
    return result


def _verify_legacy(client: Any, mv: Any, ref: ModelRef, result: Verification, floor: Any, allow_override: bool,  # noqa: PLR0913
                   allow_legacy: bool) -> Verification:
    """A version gated before decisions were signed: refused, or with allow_legacy, the old checks on its tags."""
    from emgate.policy import floor_problems

    tags = mv.tags or {}
    result.integrity = "legacy"
    if not allow_legacy:
        result.integrity_problems.append(f"legacy, unsigned: {LEGACY_HELP}")
        result.problems = list(result.integrity_problems)
        return result
    report, problems = load_gate_report(client, mv)
    result.report = report
    result.notes.append("legacy, unsigned decision accepted with --allow-legacy: its tags are trusted")
    if tags.get("emgate.override") == "true":
        result.override = {k.removeprefix("emgate.override_"): v for k, v in tags.items()
                           if k.startswith("emgate.override_")}
    if report is not None:
        if str(report.get("registered_model")) != ref.name or str(report.get("version")) != str(mv.version):
            problems.append(f"the gate report is for {report.get('registered_model')} version {report.get('version')}, "
                            f"not {ref.name} version {mv.version}")
        failed = [v for v in report.get("verdicts", []) if not v.get("passed")]
        if not report.get("verdicts"):
            problems.append("missing evidence: the gate report has no rule verdicts")
        if report.get("decision") != "passed" or failed:
            reasons = "; ".join(str(v.get("reason")) for v in failed) or "no reason recorded"
            if not (result.override and allow_override):
                problems.append(f"the gate blocked this version: {reasons}")
        if not (result.override and allow_override):
            problems += floor_problems(floor, list(report.get("verdicts", [])), report.get("policy") or {})
        if tags.get("emgate.decision") != report.get("decision"):
            problems.append(f"the version's emgate.decision tag ({tags.get('emgate.decision')}) disagrees with its "
                            f"gate report ({report.get('decision')})")
    result.problems = problems
    result.ok = not problems
    return result


def load_gate_report(client: Any, mv: Any) -> tuple[dict[str, Any] | None, list[str]]:
    """A legacy version's gate report and what is wrong with it (empty list: it matches its sha256 tag)."""
    report, problems, _ = check_gate_report(client, mv)
    return report, problems


def actor() -> str:
    return os.environ.get(ACTOR_ENV) or getpass.getuser()


def _champion(client: Any, name: str) -> str | None:
    try:
        return str(client.get_model_version_by_alias(name, CHAMPION).version)
    except Exception:  # no champion yet
        return None


def fallback_champion(client: Any, name: str, *, instead_of: str, public_keys: Any, override_keys: Any = None,
                      older_only: bool = True, check_files: bool = True) -> str | None:
    """The version `champion` falls back to when `instead_of` may not hold it: the newest version (older than
    `instead_of` with older_only) whose current decision verifies (an override counts when `override_keys` trust
    it; its registered files are hashed with check_files), or None."""
    for mv in sorted(client.search_model_versions(f"name = '{name}'"), key=lambda m: -int(m.version)):
        number = str(mv.version)
        if number == str(instead_of) or (older_only and int(number) > int(instead_of)):
            continue
        if verify_version(client, ModelRef(name, version=number), allow_override=override_keys is not None,
                          public_keys=public_keys, override_keys=override_keys or {}, check_files=check_files).ok:
            return number
    return None


def move_champion(client: Any, name: str, *, expected: str | None, to: str | None) -> dict[str, Any]:
    """Compare-and-set `champion`: point it at `to` (None: remove it) only while it still points at `expected`
    (None: no champion). MLflow has no atomic alias update, so the check is re-read immediately before the write;
    a move that lost the race is reported, never forced."""
    holder = _champion(client, name)
    if holder != expected:
        return {"moved": False, "from": holder, "to": holder,
                "message": f"{CHAMPION} is {f'version {holder}' if holder else 'unset'} now, not "
                           f"{f'version {expected}' if expected else 'unset'}: someone moved it meanwhile; left as it is"}
    if to is None:
        client.delete_registered_model_alias(name, CHAMPION)
        message = f"{CHAMPION} removed from version {expected}: no earlier version's current decision verifies"
    else:
        client.set_registered_model_alias(name, CHAMPION, str(to))
        message = (f"{CHAMPION} moved from version {expected} to version {to}" if expected else
                   f"{CHAMPION} set to version {to}")
    return {"moved": True, "from": expected, "to": to, "message": message}


def promote(client: Any, name: str, version: str, *, override: bool = False, reason: str | None = None,  # noqa: PLR0913
            by: str | None = None, public_keys: Any = None) -> dict[str, Any]:
    """Point `champion` at name/version, a compare-and-set against the version that held it. Refuses a version
    whose current decision is not a verified pass unless override=True with a reason; an override is a signed
    record (an approver's key, $EMGATE_OVERRIDE_SIGNING_KEY_FILE) of that decision, with a copy as tags. Only a
    version whose evidence is intact can be overridden: a tampered or unsigned one is gated again, not overridden.
    Credentials that may not write the version (MLflow basic auth) raise AccessDenied before the alias moves."""
    from mlflow.exceptions import MlflowException

    from emgate.decisions import OVERRIDE_SIGNING_KEY_ENV, append_override
    from emgate.signing import OverrideRecord, SigningKeyError, load_signing_key

    ref = ModelRef(name, version=str(version))
    check = verify_version(client, ref, raise_not_found=True, public_keys=public_keys)  # no such version: refused
    by = by or actor()
    now = datetime.now(UTC)
    if not check.ok and not override:
        raise PromotionRefused(f"{ref} is not promoted: " + "; ".join(check.problems) +
                               ". To promote it anyway: --override --reason \"why\" (a signed record)")
    previous = _champion(client, name)
    with _store_errors(client):
        try:
            if not check.ok:
                if not (reason and reason.strip()):
                    raise PromotionRefused(f"{ref}: --override needs --reason \"...\": the reason is signed and "
                                           "recorded with the override")
                if check.integrity_problems or check.sequence is None or check.experiment_id is None:
                    raise PromotionRefused(f"{ref} cannot be overridden: its evidence does not check ("
                                           + "; ".join(check.integrity_problems or check.problems)
                                           + "); an override excuses a decision, never a broken one: gate it again")
                path = os.environ.get(OVERRIDE_SIGNING_KEY_ENV, "").strip()
                if not path:
                    raise PromotionRefused(f"{ref}: an override is signed by an approver: set "
                                           f"{OVERRIDE_SIGNING_KEY_ENV} to your override key's file (`emgate gate "
                                           "keygen`; its public key goes in the verifiers' EMGATE_OVERRIDE_PUBLIC_KEY)")
                try:
                    key = load_signing_key(path)
                except SigningKeyError as exc:
                    raise PromotionRefused(f"{ref}: {OVERRIDE_SIGNING_KEY_ENV}: {exc}") from None
                record = OverrideRecord(registered_model=name, version=str(version), decision_sequence=check.sequence,
                                        actor=by, reason=reason, time=now)
                append_override(client, check.experiment_id, record, key)
                for k, value in {"emgate.override": "true", "emgate.override_by": by,
                                 "emgate.override_reason": record.reason, "emgate.override_at": now.isoformat(timespec="seconds"),
                                 "emgate.override_problems": "; ".join(check.problems)[:4900]}.items():
                    client.set_model_version_tag(name, str(version), k, value)
            client.set_model_version_tag(name, str(version), "emgate.promoted_by", by)
            client.set_model_version_tag(name, str(version), "emgate.promoted_at", now.isoformat(timespec="seconds"))
            moved = move_champion(client, name, expected=previous, to=str(version))  # last: after its audit tags
        except MlflowException as exc:
            if denied := _access_denied(exc, f"set its tags or its {CHAMPION!r} alias"):
                raise AccessDenied(f"{ref} is not promoted: {denied}") from None
            raise
    if not moved["moved"]:
        raise PromotionRefused(f"{ref} is not promoted: {moved['message']}; check it and promote again")
    return {"model": name, "version": str(version), "previous_champion": previous, "by": by,
            "at": now.isoformat(timespec="seconds"), "override": not check.ok}


def explain(client: Any, ref: ModelRef, *, floor: Any = None, public_keys: Any = None) -> dict[str, Any]:
    """Everything a reviewer needs about one version's decision: verdicts, tags, evidence links. Three separate
    answers: `decision` (what the gate decided), `report_integrity` (whether the decision is signed and its report
    the one the decision recorded, a REPORT_INTEGRITY key) and `verified` (whether `gate verify --allow-override`
    accepts it, under `floor` and `public_keys` as verify_version defaults them)."""
    mv = resolve_version(client, ref)
    check = verify_version(client, ModelRef(ref.name, version=str(mv.version)), allow_override=True, floor=floor,
                           public_keys=public_keys)
    tags = dict(mv.tags or {})
    aliases = [a for a in (getattr(mv, "aliases", None) or [])]
    links = evidence_links(client.tracking_uri, tags, ref.name, str(mv.version))
    report = check.report
    if report is None and check.integrity == "legacy":
        report, _, _ = check_gate_report(client, mv)
    decision = (report or {}).get("decision") if check.integrity in ("intact", "pending") and report else None
    return {"name": ref.name, "version": str(mv.version), "aliases": aliases, "tags": tags, "report": report,
            "problems": check.integrity_problems, "links": links, "verified": check.ok,
            "decision": decision or tags.get("emgate.decision", "undecided"), "report_integrity": check.integrity,
            "report_status": REPORT_INTEGRITY[check.integrity], "verification_problems": check.problems,
            "override": check.override is not None, "decision_sequence": check.sequence, "notes": check.notes}


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
