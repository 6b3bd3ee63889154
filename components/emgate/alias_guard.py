"""The alias guard: an MLflow model-registry webhook receiver that reverts what no signed record supports.

MLflow 3 delivers registry webhooks (alias created or deleted, version tag set or deleted), signed with HMAC-SHA256
over `delivery-id.timestamp.body` (Standard Webhooks style). For each delivery the guard re-reads the registry (events
may arrive late or out of order, so the payload's value is never trusted) and compares it with the version's signed
decision records (emgate.decisions):

- `champion` set on a version whose current decision does not verify (a signed pass, or a signed override by an
  approver) is moved back, compare-and-set, to the newest other version that verifies, or removed;
- a decision tag (`emgate.decision`, `validation_status`) that differs from the signed current decision is set back
  to it, or deleted when the version has no signed decision; a deleted one is restored;
- `emgate.override=true` without a signed override record of the current decision is deleted.

Each revert is logged and noted on the version (`emgate.guard_reverted`). Webhooks act after the fact: between the
move and the revert (seconds) a reader can see the forged state, so serving still runs `emgate gate verify`.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from emgate.registry import CHAMPION, ModelRef, RegistryError, fallback_champion, move_champion, verify_version

WEBHOOK_NAME = "emgate-alias-guard"
WEBHOOK_SECRET_ENV = "EMGATE_WEBHOOK_SECRET"  # the HMAC secret shared with MLflow's webhook (a Kubernetes Secret)
EVENTS = ("model_version_alias.created", "model_version_alias.deleted", "model_version_tag.set",
          "model_version_tag.deleted")
TOLERANCE_S = 300  # seconds a delivery's timestamp may be off: Standard Webhooks' recommended replay window
MAX_BODY_BYTES = 1 << 20  # MLflow's registry payloads are a few hundred bytes; anything larger is refused
DECISION_TAGS = ("emgate.decision", "validation_status")
OVERRIDE_TAG = "emgate.override"
REVERTED_TAG = "emgate.guard_reverted"
PENDING = "pending"

log = logging.getLogger("emgate.guard")


class SignatureError(ValueError):
    """A delivery whose HMAC signature or timestamp does not check: it is refused (401) and nothing is read."""


def sign(secret: str, delivery_id: str, timestamp: str, body: str) -> str:
    """The X-MLflow-Signature value MLflow sends for this delivery: v1,base64(HMAC-SHA256(id.timestamp.body))."""
    digest = hmac.new(secret.encode(), f"{delivery_id}.{timestamp}.{body}".encode(), hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def check_signature(secret: str, headers: Mapping[str, str], body: bytes, *, now: float | None = None,
                    tolerance_s: float = TOLERANCE_S) -> None:
    """Raise SignatureError unless the headers carry a valid signature of `body` from within `tolerance_s`."""
    lowered = {k.lower(): v for k, v in headers.items()}
    values = {}
    for header in ("X-MLflow-Delivery-Id", "X-MLflow-Timestamp", "X-MLflow-Signature"):
        value = lowered.get(header.lower(), "").strip()
        if not value:
            raise SignatureError(f"no {header} header: not a signed MLflow webhook delivery")
        values[header] = value
    try:
        stamp = int(values["X-MLflow-Timestamp"])
    except ValueError:
        raise SignatureError(f"X-MLflow-Timestamp {values['X-MLflow-Timestamp']!r} is not a Unix time") from None
    skew = abs((time.time() if now is None else now) - stamp)
    if skew > tolerance_s:
        raise SignatureError(f"delivery timestamp is {skew:.0f} s off (more than {tolerance_s:.0f} s): a replay, or a "
                             "clock that needs NTP")
    try:
        text = body.decode()
    except UnicodeDecodeError:
        raise SignatureError("the body is not UTF-8") from None
    expected = sign(secret, values["X-MLflow-Delivery-Id"], values["X-MLflow-Timestamp"], text)
    offered = values["X-MLflow-Signature"].split()  # Standard Webhooks: space-separated, one per secret in rotation
    if not any(hmac.compare_digest(expected, candidate) for candidate in offered):
        raise SignatureError("the HMAC signature does not match: a wrong secret, or a forged delivery")


@dataclass
class GuardAction:
    event: str
    name: str
    version: str | None
    action: str  # kept | reverted | ignored
    message: str


class Guard:
    """Checks each event against the signed records. One event at a time, so two reverts never race each other."""

    def __init__(self, client: Any, public_keys: Any, override_keys: Any) -> None:
        self.client, self.public_keys, self.override_keys = client, public_keys, override_keys
        self._lock = threading.Lock()

    def handle(self, event: Mapping[str, Any]) -> GuardAction:
        kind = f"{event.get('entity')}.{event.get('action')}"
        raw = event.get("data")
        data: Mapping[str, Any] = raw if isinstance(raw, Mapping) else {}
        name, version = str(data.get("name", "")), data.get("version")
        version = None if version is None else str(version)
        if kind not in EVENTS or not name:
            return GuardAction(kind, name, version, "ignored", f"not an event the guard checks ({', '.join(EVENTS)})")
        with self._lock:
            try:
                if kind == "model_version_alias.created":
                    return self._alias_set(kind, name, version, str(data.get("alias", "")))
                if kind == "model_version_alias.deleted":
                    return GuardAction(kind, name, version, "ignored", f"alias {data.get('alias')!r} removed: a removal "
                                       "promotes nothing, so it is left as it is")
                return self._tag_changed(kind, name, version, str(data.get("key", "")))
            except RegistryError as exc:
                return GuardAction(kind, name, version, "ignored", f"not in the registry now: {exc}")

    def _verify(self, name: str, version: str) -> Any:
        return verify_version(self.client, ModelRef(name, version=version), allow_override=True,
                              public_keys=self.public_keys, override_keys=self.override_keys, check_files=False)

    def _note(self, name: str, version: str, message: str) -> None:
        stamp = datetime.now(UTC).isoformat(timespec="seconds")
        self.client.set_model_version_tag(name, version, REVERTED_TAG, f"{stamp}: {message}"[:4900])

    def _alias_set(self, kind: str, name: str, version: str | None, alias: str) -> GuardAction:
        if alias != CHAMPION:
            return GuardAction(kind, name, version, "ignored", f"alias {alias!r} is not {CHAMPION!r}")
        try:
            holder = str(self.client.get_model_version_by_alias(name, CHAMPION).version)
        except Exception:  # no champion any more: nothing is promoted
            return GuardAction(kind, name, version, "ignored", f"{CHAMPION} is unset now")
        check = self._verify(name, holder)
        if check.ok:
            return GuardAction(kind, name, holder, "kept", f"{CHAMPION} on version {holder}: its current decision "
                               "verifies" + (" (signed override)" if check.override else ""))
        fallback = fallback_champion(self.client, name, instead_of=holder, public_keys=self.public_keys,
                                     override_keys=self.override_keys, older_only=False, check_files=False)
        moved = move_champion(self.client, name, expected=holder, to=fallback)
        message = f"{CHAMPION} was set on version {holder}, which does not verify ({'; '.join(check.problems)})"
        if not moved["moved"]:
            return GuardAction(kind, name, holder, "kept", f"{message}; {moved['message']}")
        self._note(name, holder, f"{message}; reverted: {moved['message']}")
        return GuardAction(kind, name, holder, "reverted", f"{message}; {moved['message']}")

    def _tag_changed(self, kind: str, name: str, version: str | None, key: str) -> GuardAction:
        if version is None or key not in (*DECISION_TAGS, OVERRIDE_TAG):
            return GuardAction(kind, name, version, "ignored", f"tag {key!r} is not a decision tag")
        tags = dict(self.client.get_model_version(name, version).tags or {})
        now = tags.get(key)
        check = self._verify(name, version)
        if key == OVERRIDE_TAG:
            if now == "true" and check.override is None:
                self.client.delete_model_version_tag(name, version, key)
                message = f"{key}=true has no signed override record of the current decision: tag deleted"
                self._note(name, version, message)
                return GuardAction(kind, name, version, "reverted", message)
            return GuardAction(kind, name, version, "kept", f"{key} is {now!r}")
        if now == PENDING:
            return GuardAction(kind, name, version, "kept", f"{key} is pending: a gate run is deciding (verify refuses it)")
        signed = (check.report or {}).get("decision") if check.integrity in ("intact", "pending") else None
        if check.integrity == "legacy":
            return GuardAction(kind, name, version, "ignored", "a legacy version: no signed decision to compare with")
        if signed is None and check.sequence is None:
            if now is None:
                return GuardAction(kind, name, version, "kept", f"{key} is unset and no signed decision exists")
            self.client.delete_model_version_tag(name, version, key)
            message = f"{key}={now!r} on a version with no signed gate decision: tag deleted"
        elif signed is None:
            return GuardAction(kind, name, version, "ignored", "the signed decision does not check ("
                               + "; ".join(check.integrity_problems) + "): verify refuses it; left for a re-gate")
        elif now == signed:
            return GuardAction(kind, name, version, "kept", f"{key}={now!r} matches signed decision #{check.sequence}")
        else:
            self.client.set_model_version_tag(name, version, key, signed)
            message = (f"{key} was {now!r}, the signed decision #{check.sequence} is {signed!r}: "
                       + ("restored" if now is None else "set back"))
        self._note(name, version, message)
        return GuardAction(kind, name, version, "reverted", message)


def serve(guard: Guard, secret: str, host: str, port: int) -> ThreadingHTTPServer:
    """An HTTP server (not started): POST /webhook takes signed deliveries, GET /healthz answers 200."""

    class Handler(BaseHTTPRequestHandler):
        def _reply(self, status: int, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            self._reply(200, {"status": "ok"}) if self.path == "/healthz" else self._reply(404, {"error": "not found"})

        def do_POST(self) -> None:
            if self.path != "/webhook":
                return self._reply(404, {"error": "POST webhooks to /webhook"})
            length = int(self.headers.get("Content-Length") or 0)
            if length > MAX_BODY_BYTES:
                return self._reply(413, {"error": f"body over {MAX_BODY_BYTES} bytes"})
            body = self.rfile.read(length)
            try:
                check_signature(secret, dict(self.headers.items()), body)
                event = json.loads(body)
            except SignatureError as exc:
                log.warning(json.dumps({"refused": str(exc), "from": self.client_address[0]}))
                return self._reply(401, {"error": str(exc)})
            except json.JSONDecodeError as exc:
                return self._reply(400, {"error": f"the body is not JSON: {exc}"})
            try:
                result = guard.handle(event)
            except Exception as exc:  # the registry failed: 500 makes MLflow retry the delivery
                log.error(json.dumps({"event": event.get("entity"), "error": f"{type(exc).__name__}: {exc}"}))
                return self._reply(500, {"error": f"{type(exc).__name__}: {exc}"})
            (log.warning if result.action == "reverted" else log.info)(json.dumps(asdict(result)))
            return self._reply(200, asdict(result))

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002  (the base class's name)
            log.debug(format, *args)

    return ThreadingHTTPServer((host, port), Handler)


def register_webhook(client: Any, url: str, secret: str) -> tuple[str, bool]:
    """Create the guard's webhook on the MLflow server, or update it (same name) to this URL, secret and events.
    Returns (webhook id, created)."""
    token = None
    while True:
        page = client.list_webhooks(max_results=100, page_token=token)
        for hook in page:
            if hook.name == WEBHOOK_NAME:
                client.update_webhook(hook.webhook_id, url=url, events=list(EVENTS), secret=secret, status="ACTIVE")
                return hook.webhook_id, False
        token = page.token
        if not token:
            break
    hook = client.create_webhook(name=WEBHOOK_NAME, url=url, events=list(EVENTS), secret=secret,
                                 description="emgate alias guard: reverts champion moves and decision tags that no "
                                             "signed decision supports")
    return hook.webhook_id, True
