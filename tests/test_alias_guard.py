"""The alias guard's delivery check (emgate.alias_guard.check_signature) against MLflow's own signer, and the events
it leaves alone. Its reverts run against a real server's webhooks in tests/test_mlflow_auth.py."""

from __future__ import annotations

import json

import pytest
from mlflow.webhooks.delivery import _generate_hmac_signature

from emgate.alias_guard import Guard, SignatureError, check_signature, sign

SECRET = "guard-test-secret-0123456789"
BODY = json.dumps({"entity": "model_version_alias", "action": "created", "data": {"name": "m", "alias": "champion",
                                                                                    "version": "1"}})
NOW = 1_800_000_000


def headers(signature: str, timestamp: int = NOW, delivery: str = "d-1") -> dict[str, str]:
    return {"X-MLflow-Delivery-Id": delivery, "X-MLflow-Timestamp": str(timestamp), "X-MLflow-Signature": signature}


def test_a_delivery_signed_as_mlflow_signs_it_passes() -> None:
    mlflow_signature = _generate_hmac_signature(SECRET, "d-1", str(NOW), BODY)
    assert sign(SECRET, "d-1", str(NOW), BODY) == mlflow_signature
    check_signature(SECRET, headers(mlflow_signature), BODY.encode(), now=NOW + 10)
    lowercase = {k.lower(): v for k, v in headers(mlflow_signature).items()}
    check_signature(SECRET, lowercase, BODY.encode(), now=NOW)
    rotating = f"v1,b2xkLXNlY3JldA== {mlflow_signature}"  # Standard Webhooks: one signature per secret in rotation
    check_signature(SECRET, headers(rotating), BODY.encode(), now=NOW)


@pytest.mark.parametrize(("case", "message"), [
    ("tampered body", "does not match"),
    ("wrong secret", "does not match"),
    ("other delivery id", "does not match"),
    ("old timestamp", "s off"),
    ("future timestamp", "s off"),
    ("no signature", "no X-MLflow-Signature"),
    ("no timestamp", "no X-MLflow-Timestamp"),
    ("timestamp not a number", "not a Unix time"),
])
def test_a_forged_or_replayed_delivery_is_refused(case: str, message: str) -> None:
    good = sign(SECRET, "d-1", str(NOW), BODY)
    body, sent, now = BODY.encode(), headers(good), NOW
    if case == "tampered body":
        body = BODY.replace('"1"', '"2"').encode()
    elif case == "wrong secret":
        sent = headers(sign("another-secret-0123456789", "d-1", str(NOW), BODY))
    elif case == "other delivery id":
        sent = headers(good, delivery="d-2")
    elif case == "old timestamp":
        now = NOW + 301
    elif case == "future timestamp":
        now = NOW - 301
    elif case == "no signature":
        sent.pop("X-MLflow-Signature")
    elif case == "no timestamp":
        sent.pop("X-MLflow-Timestamp")
    else:
        sent["X-MLflow-Timestamp"] = "yesterday"
    with pytest.raises(SignatureError, match=message):
        check_signature(SECRET, sent, body, now=now)


@pytest.mark.parametrize("event", [
    {"entity": "model_version", "action": "created", "data": {"name": "m", "version": "1"}},
    {"entity": "registered_model", "action": "created", "data": {"name": "m"}},
    {"entity": "model_version_tag", "action": "set"},  # no data
    {"entity": "model_version_alias", "action": "created", "data": "not a mapping"},
])
def test_events_the_guard_does_not_check_are_ignored_without_touching_the_registry(event: dict) -> None:
    guard = Guard(client=None, public_keys={}, override_keys={})  # None: any registry call would raise
    assert guard.handle(event).action == "ignored"
