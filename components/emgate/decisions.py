"""The signed decision history of registered model versions (issue 18): where records live and which is current.

A version's tags are a copy for the MLflow UI; anyone with EDIT on the registered model can rewrite them. Its
decisions live instead as signed records (emgate.signing) in small MLflow runs of the gate's experiment, one run
per record, found again by the tag `emgate.decision_for = NAME/VERSION` (override records: `emgate.override_for`).
Each record names its sequence number; the newest valid one is the version's current decision, so a later gate run
supersedes an earlier one and a copy of an old record replayed anywhere stays old. Runs are searched in every
experiment the reader can see, deleted runs included (a deleted record still counts): an attacker can add records
(only ones the gate signed, so only old ones) but not hide one without DELETE on the gate's experiment, which the
chart gives the gate's identity alone.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from emgate.signing import (
    DecisionRecord,
    OverrideRecord,
    SignatureError,
    TrustedKeys,
    load_public_keys,
    sign_record,
    verify_record,
)

DECISION_FOR_TAG = "emgate.decision_for"
DECISION_RECORD_TAG = "emgate.decision_record"
OVERRIDE_FOR_TAG = "emgate.override_for"
OVERRIDE_RECORD_TAG = "emgate.override_record"
OVERRIDE_PUBLIC_KEY_ENV = "EMGATE_OVERRIDE_PUBLIC_KEY"  # approvers' public keys (PEM text, file or folder)
OVERRIDE_SIGNING_KEY_ENV = "EMGATE_OVERRIDE_SIGNING_KEY_FILE"  # an approver's private key file, for promote --override
R = TypeVar("R", DecisionRecord, OverrideRecord)
PENDING = "pending"  # the decision tag while a gate run writes a version's report and record
PENDING_STALE_S = 6 * 3600  # seconds: a pending decision older than this is a gate run that died (newest-ungated)
_SEARCH_CHUNK = 100  # experiments per search_runs call (MLflow's documented limit for experiment_ids)


def subject(name: str, version: str | int) -> str:
    """The value of emgate.decision_for for a version. Names with a quote cannot be searched for safely."""
    if "'" in name or "\\" in name:
        raise ValueError(f"registered model name {name!r}: emgate does not gate names with quotes or backslashes")
    return f"{name}/{version}"


def trusted_override_keys(spec: str | None = None) -> dict[str, Any]:
    """The approvers' public keys ($EMGATE_OVERRIDE_PUBLIC_KEY); {} when none is configured: no override verifies."""
    spec = spec or os.environ.get(OVERRIDE_PUBLIC_KEY_ENV, "").strip()
    return load_public_keys(spec) if spec else {}


@dataclass
class History:
    """Every signed record about one version, as found and checked."""

    subject: str
    decisions: list[DecisionRecord] = field(default_factory=list)  # valid, by (sequence, created_at)
    overrides: list[OverrideRecord] = field(default_factory=list)  # valid, by time
    runs: dict[int, str] = field(default_factory=dict)  # sequence -> the record run's id (the newest's, for ties)
    experiments: dict[int, str] = field(default_factory=dict)  # sequence -> the record run's experiment id
    ignored: list[str] = field(default_factory=list)  # records found whose signature or content does not check

    @property
    def current(self) -> DecisionRecord | None:
        return self.decisions[-1] if self.decisions else None

    def conflicts(self) -> list[str]:
        """Records that share the newest sequence number but disagree (two gate runs at once): fail closed."""
        cur = self.current
        if cur is None:
            return []
        rivals = [r for r in self.decisions if r.sequence == cur.sequence and
                  (r.decision, r.report_sha256) != (cur.decision, cur.report_sha256)]
        return [f"decision #{r.sequence} by run {r.run_id} says {r.decision}, #{cur.sequence} by run {cur.run_id} says "
                f"{cur.decision}: two gate runs decided at once; gate the version again" for r in rivals]

    def next_sequence(self) -> int:
        return (self.current.sequence if self.current else 0) + 1

    def override_for_current(self) -> OverrideRecord | None:
        """The newest override of the current decision (an override names the decision it overrides)."""
        cur = self.current
        found = [o for o in self.overrides if cur is not None and o.decision_sequence == cur.sequence]
        return found[-1] if found else None


def _experiment_ids(client: Any) -> list[str]:
    from mlflow.entities import ViewType

    ids, token = [], None
    while True:
        page = client.search_experiments(view_type=ViewType.ALL, max_results=1000, page_token=token)
        ids += [e.experiment_id for e in page]
        token = getattr(page, "token", None)
        if not token:
            return ids


def _runs_tagged(client: Any, tag: str, value: str) -> list[Any]:
    from mlflow.entities import ViewType

    ids = _experiment_ids(client)
    runs: list[Any] = []
    for start in range(0, len(ids), _SEARCH_CHUNK):
        token = None
        while True:
            page = client.search_runs(ids[start:start + _SEARCH_CHUNK], filter_string=f"tags.`{tag}` = '{value}'",
                                      run_view_type=ViewType.ALL, max_results=1000, page_token=token)
            runs += list(page)
            token = getattr(page, "token", None)
            if not token:
                break
    return runs


def _parse(run: Any, tag: str) -> Any:
    text = (run.data.tags or {}).get(tag)
    if text is None:
        raise SignatureError("unsigned", "the run has no record tag")
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise SignatureError("malformed", f"the record is not JSON ({exc.msg})") from None


def _verified(client: Any, for_tag: str, record_tag: str, kind: type[R], name: str, version: str | int,
              keys: TrustedKeys, ignored: list[str]) -> list[tuple[R, Any]]:
    """(record, its run) for every run tagged `for_tag` = NAME/VERSION whose record of `kind` verifies with `keys`
    and is about that version; the others are described in `ignored`."""
    found = []
    label = "decision" if kind is DecisionRecord else "override"
    for run in _runs_tagged(client, for_tag, subject(name, version)):
        try:
            record = verify_record(_parse(run, record_tag), keys, kind)
            if (record.registered_model, record.version) != (name, str(version)):
                raise SignatureError("malformed", f"it is about {record.registered_model}/{record.version}")
        except SignatureError as exc:
            ignored.append(f"{label} record run {run.info.run_id}: {exc}")
            continue
        found.append((record, run))
    return found


def load_history(client: Any, name: str, version: str | int, keys: TrustedKeys,
                 override_keys: TrustedKeys | None = None) -> History:
    """Every decision and override record about name/version that verifies with `keys` (approvers' `override_keys`
    for overrides). A record whose signature fails, or that is about another version, is listed in `ignored` and
    never counts: it can neither decide nor hide a decision."""
    history = History(subject(name, version))
    for record, run in _verified(client, DECISION_FOR_TAG, DECISION_RECORD_TAG, DecisionRecord, name, version, keys,
                                 history.ignored):
        history.decisions.append(record)
        history.runs[record.sequence] = run.info.run_id
        history.experiments[record.sequence] = run.info.experiment_id
    history.decisions.sort(key=lambda r: (r.sequence, r.created_at))
    if override_keys is not None:
        history.overrides = sorted((o for o, _ in _verified(client, OVERRIDE_FOR_TAG, OVERRIDE_RECORD_TAG, OverrideRecord,
                                                            name, version, override_keys, history.ignored)),
                                   key=lambda o: o.time)
    return history


def _append(client: Any, experiment_id: str, parent_run_id: str | None, run_name: str,
            tags: Mapping[str, str]) -> str:
    all_tags = {"mlflow.runName": run_name, **tags}
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run = client.create_run(experiment_id, tags=all_tags, run_name=run_name)
    client.set_terminated(run.info.run_id)
    return str(run.info.run_id)


def append_decision(client: Any, experiment_id: str, parent_run_id: str, record: DecisionRecord, key: Any) -> str:
    """Write the signed record as a run of its own (child of the gate run); returns its run id."""
    envelope = sign_record(record, key)
    return _append(client, experiment_id, parent_run_id,
                   f"decision {record.registered_model} v{record.version} #{record.sequence}",
                   {DECISION_FOR_TAG: subject(record.registered_model, record.version),
                    DECISION_RECORD_TAG: json.dumps(envelope, sort_keys=True), "emgate.decision": record.decision,
                    "emgate.stage": "decision_record"})


def append_override(client: Any, experiment_id: str, record: OverrideRecord, key: Any) -> str:
    envelope = sign_record(record, key)
    return _append(client, experiment_id, None, f"override {record.registered_model} v{record.version}",
                   {OVERRIDE_FOR_TAG: subject(record.registered_model, record.version),
                    OVERRIDE_RECORD_TAG: json.dumps(envelope, sort_keys=True), "emgate.override_by": record.actor,
                    "emgate.stage": "override_record"})
