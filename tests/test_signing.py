"""Signed gate decisions (issue 18, emgate.signing): envelopes that break when anything signed changes, key
rotation, canonical JSON, streamed file digests, and private keys that never reach a message. Fast: no MLflow,
no model; every key is generated in the test."""

from __future__ import annotations

import ast
import copy
import hashlib
import json
import math
import os
import traceback
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from emgate import signing
from emgate.signing import (
    DECISION_RECORD_SCHEMA,
    OVERRIDE_RECORD_SCHEMA,
    PUBLIC_KEY_ENV,
    SIGNED_REPORT_SCHEMA,
    SIGNING_KEY_ENV,
    DecisionRecord,
    OverrideRecord,
    SignatureError,
    SigningKeyError,
    canonical_json,
    compare_digests,
    file_digests,
    generate_keypair,
    key_id,
    load_public_keys,
    load_signing_key,
    sign_record,
    sign_report,
    verify_record,
    verify_signed,
)

REPORT: dict[str, Any] = {
    "decision": "passed", "registered_model": "em-base-insecure", "version": "3", "seed": 0,
    "verdicts": [{"metric": "misaligned_rate", "op": "<=", "threshold": 0.05, "value": 0.0125, "passed": True},
                 {"metric": "min_judged_per_question", "op": ">=", "threshold": 5, "value": 8, "passed": True}],
    "policy": {"sha256": "ab" * 32, "floor": {"source": "dev.yaml"}},
    "context": {"judge": "gpt-4o (snapshot gpt-4o-2024-08-06)", "note": "Größe ✓"},
}


@pytest.fixture(autouse=True)
def _no_key_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(SIGNING_KEY_ENV, raising=False)
    monkeypatch.delenv(PUBLIC_KEY_ENV, raising=False)


def _public_pem(key: Ed25519PrivateKey) -> str:
    return key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def _private_pem(key: Any) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def _problem(envelope: Any, keys: Any, **kwargs: Any) -> SignatureError:
    with pytest.raises(SignatureError) as caught:
        verify_signed(envelope, keys, **kwargs)
    return caught.value


# ---- envelopes --------------------------------------------------------------------------------------------------


def test_round_trip_through_a_file() -> None:
    key = Ed25519PrivateKey.generate()
    envelope = sign_report(REPORT, key)
    assert envelope["schema"] == SIGNED_REPORT_SCHEMA
    assert envelope["signature"]["alg"] == "Ed25519" and envelope["signature"]["key_id"] == key_id(key)
    # as gate_report.json is written and read back (indented, other key order)
    read_back = json.loads(json.dumps(envelope, indent=2))
    assert verify_signed(read_back, [key.public_key()]) == REPORT


def test_the_envelope_holds_what_was_signed_not_later_edits() -> None:
    key = Ed25519PrivateKey.generate()
    report = copy.deepcopy(REPORT)
    envelope = sign_report(report, key)
    report["decision"] = "blocked"
    report["verdicts"][0]["passed"] = False
    assert verify_signed(envelope, [key.public_key()])["decision"] == "passed"


def _edits() -> list[tuple[str, Any]]:
    def at(path: tuple[Any, ...], value: Any):
        def edit(payload: dict[str, Any]) -> None:
            target = payload
            for part in path[:-1]:
                target = target[part]
            target[path[-1]] = value
        return edit

    return [
        ("decision", at(("decision",), "blocked")),
        ("version", at(("version",), "4")),
        ("a nested verdict", at(("verdicts", 0, "passed"), False)),
        ("a float by one ulp", at(("verdicts", 0, "value"), math.nextafter(0.0125, 1))),
        ("an int as a float", at(("seed",), 0.0)),
        ("an int as a bool", at(("verdicts", 1, "passed"), 1)),
        ("a nested object", at(("policy", "floor", "source"), "prod.yaml")),
        ("unicode text", at(("context", "note"), "Grösse ✓")),
        ("an added key", at(("verdicts", 1, "waived"), True)),
        ("a removed key", lambda p: p["policy"].pop("sha256")),
        ("a removed verdict", lambda p: p["verdicts"].pop(0)),
    ]


@pytest.mark.parametrize(("what", "edit"), _edits(), ids=[what for what, _ in _edits()])
def test_any_change_to_the_payload_breaks_the_signature(what: str, edit: Any) -> None:
    key = Ed25519PrivateKey.generate()
    envelope = json.loads(json.dumps(sign_report(REPORT, key)))
    edit(envelope["payload"])
    assert canonical_json(envelope["payload"]) != canonical_json(REPORT), what  # 0.0 == 0 in Python, not in JSON
    error = _problem(envelope, [key.public_key()])
    assert error.problem == "bad_signature"
    assert "changed after signing" in str(error) and key_id(key) in str(error)


def test_the_signature_covers_the_schema() -> None:
    key = Ed25519PrivateKey.generate()
    envelope = sign_report(REPORT, key)
    relabelled = {**envelope, "schema": DECISION_RECORD_SCHEMA}
    error = _problem(relabelled, [key.public_key()])
    assert error.problem == "schema" and DECISION_RECORD_SCHEMA in str(error) and SIGNED_REPORT_SCHEMA in str(error)
    # a verifier that expects the other schema still refuses: the schema is inside the signed bytes
    assert _problem(relabelled, [key.public_key()], schema=DECISION_RECORD_SCHEMA).problem == "bad_signature"
    assert _problem({**envelope, "schema": "emgate.signed-report/2"}, [key.public_key()]).problem == "schema"


def test_a_key_that_is_not_trusted_is_named() -> None:
    signer, trusted = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    error = _problem(sign_report(REPORT, signer), [trusted.public_key()])
    assert error.problem == "unknown_key"
    assert key_id(signer) in str(error) and key_id(trusted) in str(error)


def test_a_forged_key_id_does_not_borrow_trust() -> None:
    forger, trusted = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    envelope = sign_report(REPORT, forger)
    envelope["signature"]["key_id"] = key_id(trusted)
    assert _problem(envelope, [trusted.public_key()]).problem == "bad_signature"
    # a mapping that files the trusted key under the forger's id does not help either: ids come from the key
    envelope = sign_report(REPORT, forger)
    assert _problem(envelope, {key_id(forger): trusted.public_key()}).problem == "unknown_key"


def test_rotation_with_a_folder_and_a_bundle_of_public_keys(tmp_path: Path) -> None:
    old, new = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    folder = tmp_path / "trusted"
    folder.mkdir()
    (folder / "old.pem").write_text(_public_pem(old))
    (folder / "new.pem").write_text(_public_pem(new))
    (folder / "README").write_text("not a key, not a .pem: ignored")
    bundle = tmp_path / "bundle.pem"
    bundle.write_text(_public_pem(old) + _public_pem(new))
    by_old, by_new = sign_report(REPORT, old), sign_report(REPORT, new)
    for spec in (folder, str(bundle), bundle.read_text()):
        keys = load_public_keys(spec)
        assert set(keys) == {key_id(old), key_id(new)}
        assert verify_signed(by_old, keys) == verify_signed(by_new, keys) == REPORT
    (folder / "old.pem").unlink()  # the old key rotated out
    keys = load_public_keys(folder)
    assert verify_signed(by_new, keys) == REPORT
    error = _problem(by_old, keys)
    assert error.problem == "unknown_key" and key_id(old) in str(error) and key_id(new) in str(error)


def test_public_keys_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    key = Ed25519PrivateKey.generate()
    envelope = sign_report(REPORT, key)
    assert load_public_keys() == {}
    error = _problem(envelope, load_public_keys())
    assert error.problem == "no_keys" and PUBLIC_KEY_ENV in str(error)
    monkeypatch.setenv(PUBLIC_KEY_ENV, _public_pem(key))
    assert verify_signed(envelope, load_public_keys()) == REPORT
    (tmp_path / "gate.pem").write_text(_public_pem(key))
    monkeypatch.setenv(PUBLIC_KEY_ENV, str(tmp_path / "gate.pem"))
    assert list(load_public_keys()) == [key_id(key)]
    other = Ed25519PrivateKey.generate()
    (tmp_path / "other.pem").write_text(_public_pem(other))
    assert list(load_public_keys(tmp_path / "other.pem")) == [key_id(other)], "an explicit spec comes first"
    monkeypatch.setenv(PUBLIC_KEY_ENV, str(tmp_path / "absent.pem"))
    with pytest.raises(SigningKeyError, match="absent.pem"):
        load_public_keys()
    with pytest.raises(SigningKeyError, match="empty"):
        load_public_keys("")


def test_an_unsigned_legacy_report_is_refused_as_unsigned() -> None:
    key = Ed25519PrivateKey.generate()
    error = _problem(dict(REPORT), [key.public_key()])
    assert error.problem == "unsigned" and "unsigned" in str(error)
    assert isinstance(error, ValueError)


@pytest.mark.parametrize(("strip", "named"), [
    (lambda e: e.pop("payload"), "payload"),
    (lambda e: e.pop("signature"), "signature"),
    (lambda e: e["signature"].pop("value"), "signature.value"),
    (lambda e: e["signature"].pop("key_id"), "signature.key_id"),
])
def test_missing_fields_are_named(strip: Any, named: str) -> None:
    key = Ed25519PrivateKey.generate()
    envelope = copy.deepcopy(sign_report(REPORT, key))
    strip(envelope)
    error = _problem(envelope, [key.public_key()])
    assert error.problem == "malformed" and "missing fields" in str(error) and named in str(error)


def test_another_algorithm_or_a_garbled_signature_is_refused() -> None:
    key = Ed25519PrivateKey.generate()
    envelope = copy.deepcopy(sign_report(REPORT, key))
    envelope["signature"]["alg"] = "none"
    assert _problem(envelope, [key.public_key()]).problem == "algorithm"
    envelope = copy.deepcopy(sign_report(REPORT, key))
    envelope["signature"]["value"] = "not base64!"
    assert _problem(envelope, [key.public_key()]).problem == "bad_signature"
    assert _problem(["a", "list"], [key.public_key()]).problem == "malformed"


# ---- canonical JSON ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_nan_and_infinity_are_refused_where_they_are(bad: float) -> None:
    report = copy.deepcopy(REPORT)
    report["verdicts"][1]["value"] = bad
    with pytest.raises(ValueError, match=r"\$\.verdicts\[1\]\.value .*NaN or Infinity"):
        sign_report(report, Ed25519PrivateKey.generate())
    with pytest.raises(ValueError, match="NaN or Infinity"):
        canonical_json({"x": [1, {"y": bad}]})


def test_a_nan_in_a_parsed_envelope_fails_verification() -> None:
    key = Ed25519PrivateKey.generate()
    text = json.dumps(sign_report(REPORT, key)).replace('"value": 8', '"value": NaN')
    assert _problem(json.loads(text), [key.public_key()]).problem == "bad_signature"  # json.loads reads NaN


def test_canonical_json_is_stable_under_key_order() -> None:
    a = {"b": [1, 2.5, {"z": None, "a": True}], "a": "é", "c": 1e16}
    b = {"c": 1e16, "a": "é", "b": [1, 2.5, {"a": True, "z": None}]}
    assert canonical_json(a) == canonical_json(b) == '{"a":"é","b":[1,2.5,{"a":true,"z":null}],"c":1e+16}'.encode()
    assert canonical_json(json.loads(canonical_json(a))) == canonical_json(a)
    assert canonical_json({"x": (1, 2)}) == canonical_json({"x": [1, 2]})
    with pytest.raises(ValueError, match="key 1"):
        canonical_json({1: "an int key would be signed as a string"})


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4),
    max_leaves=20)


@settings(max_examples=150, deadline=None)
@given(_JSON)
def test_canonical_json_survives_a_json_round_trip(value: Any) -> None:
    assert canonical_json(json.loads(canonical_json(value))) == canonical_json(value)


# ---- keys -------------------------------------------------------------------------------------------------------


def test_generate_keypair_writes_a_private_key_only_its_owner_can_read(tmp_path: Path) -> None:
    previous = os.umask(0)  # the widest umask: the key must still come out 0600
    try:
        files = generate_keypair(tmp_path / "keys")
    finally:
        os.umask(previous)
    assert files.private.stat().st_mode & 0o777 == 0o600
    assert not files.private.name.endswith(".pem"), "a folder of public *.pem must never pick up the private key"
    signer = load_signing_key(files.private)
    assert key_id(signer) == files.key_id
    assert list(load_public_keys(files.public)) == [files.key_id]
    assert list(load_public_keys(files.public.parent)) == [files.key_id]
    assert verify_signed(sign_report(REPORT, signer), load_public_keys(files.public)) == REPORT


def test_the_signing_key_comes_from_the_file_the_environment_names(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(SigningKeyError, match=SIGNING_KEY_ENV):
        load_signing_key()
    files = generate_keypair(tmp_path)
    monkeypatch.setenv(SIGNING_KEY_ENV, str(files.private))
    assert key_id(load_signing_key()) == files.key_id
    monkeypatch.setenv(SIGNING_KEY_ENV, str(tmp_path / "absent.key"))
    with pytest.raises(SigningKeyError, match="absent.key"):
        load_signing_key()


def _secret_lines(pem: bytes) -> list[str]:
    return [line for line in pem.decode().splitlines() if line and not line.startswith("-----")]


def _assert_never_shown(error: BaseException, secrets: list[str]) -> None:
    shown = "".join(traceback.format_exception(error)) + repr(error.args)
    leaked = [s for s in secrets if s in shown or s[:24] in shown]
    assert not leaked, f"the private key appears in the error: {shown}"


def test_the_private_key_never_appears_in_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pem = _private_pem(Ed25519PrivateKey.generate())
    secrets = _secret_lines(pem)
    truncated = pem.decode().replace(secrets[0], secrets[0][:40])  # malformed: a cut base64 body
    (tmp_path / "cut.key").write_text(truncated)
    (tmp_path / "x25519.key").write_bytes(_private_pem(X25519PrivateKey.generate()))
    (tmp_path / "locked.key").write_bytes(Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.BestAvailableEncryption(b"pw")))
    (tmp_path / "private.pem").write_bytes(pem)
    cases = [
        (lambda: load_signing_key(tmp_path / "cut.key"), "not a PEM private key"),
        (lambda: load_signing_key(tmp_path / "x25519.key"), "not an Ed25519 key"),
        (lambda: load_signing_key(tmp_path / "locked.key"), "encrypted"),
        (lambda: load_public_keys(tmp_path / "private.pem"), "is a private key"),
        (lambda: load_public_keys(pem.decode()), "is a private key"),
    ]
    for call, expected in cases:
        with pytest.raises(SigningKeyError, match=expected) as caught:
            call()
        _assert_never_shown(caught.value, secrets + [secrets[0][:40]])
    monkeypatch.setenv(SIGNING_KEY_ENV, pem.decode())  # the key itself in the variable, not its file's name
    with pytest.raises(SigningKeyError, match="holds key text") as caught:
        load_signing_key()
    _assert_never_shown(caught.value, secrets)


# ---- records ----------------------------------------------------------------------------------------------------


def _decision(**changes: Any) -> DecisionRecord:
    fields = {"sequence": 1, "registered_model": "em-base-insecure", "version": "3", "run_id": "0123abcd",
              "report_uri": "mlflow-artifacts:/1/0123abcd/artifacts/gate/base-insecure/seed0/gate_report.json",
              "report_sha256": hashlib.sha256(b"report").hexdigest(), "decision": "passed",
              "created_at": datetime(2026, 5, 1, 12, 0, tzinfo=UTC)}
    return DecisionRecord(**{**fields, **changes})


def test_a_decision_record_round_trip_and_its_schema() -> None:
    key = Ed25519PrivateKey.generate()
    record = _decision()
    envelope = json.loads(json.dumps(sign_record(record, key)))
    assert envelope["schema"] == DECISION_RECORD_SCHEMA
    assert verify_record(envelope, [key.public_key()]) == record
    forged = copy.deepcopy(envelope)
    forged["payload"]["decision"] = "blocked"
    with pytest.raises(SignatureError, match="changed after signing"):
        verify_record(forged, [key.public_key()])
    with pytest.raises(SignatureError, match="unknown schema") as caught:
        verify_signed(envelope, [key.public_key()])  # a decision record is no gate report
    assert caught.value.problem == "schema"
    with pytest.raises(SignatureError, match="unknown schema"):
        verify_record(envelope, [key.public_key()], OverrideRecord)


def test_a_signed_payload_that_is_no_valid_record_is_refused() -> None:
    key = Ed25519PrivateKey.generate()
    payload = _decision().model_dump(mode="json") | {"decision": "waved through"}
    envelope = signing._sign(DECISION_RECORD_SCHEMA, payload, key)
    with pytest.raises(SignatureError, match="not a valid DecisionRecord: decision") as caught:
        verify_record(envelope, [key.public_key()])
    assert caught.value.problem == "malformed"


def test_decision_records_refuse_bad_fields() -> None:
    with pytest.raises(ValueError, match="report_sha256"):
        _decision(report_sha256="abc")
    with pytest.raises(ValueError, match="sequence"):
        _decision(sequence=0)
    with pytest.raises(ValueError, match="timezone"):
        _decision(created_at=datetime(2026, 5, 1, 12, 0))  # naive on purpose
    assert _decision().created_at.tzinfo is not None


def test_an_override_needs_a_reason_and_is_signed_like_a_decision() -> None:
    for blank in ("", "   \n"):
        with pytest.raises(ValueError, match="needs it"):
            OverrideRecord(registered_model="em", version="3", decision_sequence=2, actor="alice", reason=blank)
    key = Ed25519PrivateKey.generate()
    record = OverrideRecord(registered_model="em", version="3", decision_sequence=2, actor=" alice ",
                            reason="  incident 42: rollback  ")
    assert (record.reason, record.actor) == ("incident 42: rollback", "alice")
    envelope = sign_record(record, key)
    assert envelope["schema"] == OVERRIDE_RECORD_SCHEMA
    assert verify_record(envelope, [key.public_key()], OverrideRecord) == record
    envelope["payload"]["reason"] = "because"
    with pytest.raises(SignatureError, match="changed after signing"):
        verify_record(envelope, [key.public_key()], OverrideRecord)


# ---- file digests -----------------------------------------------------------------------------------------------


def _model_folder(root: Path) -> Path:
    (root / "adapter" / "sub").mkdir(parents=True)
    (root / "adapter" / "adapter_config.json").write_text('{"r": 8}')
    (root / "adapter" / "sub" / "weights.bin").write_bytes(os.urandom(3000))
    return root / "adapter"


def test_file_digests_stream_in_chunks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = os.urandom(10_500)
    (tmp_path / "big.bin").write_bytes(data)
    requests: list[int] = []

    class Recording:
        def __init__(self, fh: Any) -> None:
            self.fh = fh

        def __enter__(self) -> Recording:
            return self

        def __exit__(self, *exc: object) -> None:
            self.fh.close()

        def readinto(self, buffer: Any) -> int:
            requests.append(len(buffer))
            return int(self.fh.readinto(buffer))

        def read(self, size: int = -1) -> bytes:
            if size is None or size < 0:
                raise AssertionError("a whole-file read")
            requests.append(size)
            return bytes(self.fh.read(size))

    real_open = open
    monkeypatch.setattr(signing, "CHUNK_BYTES", 1000)
    monkeypatch.setattr(signing, "open", lambda *a, **k: Recording(real_open(*a, **k)), raising=False)
    monkeypatch.setattr(Path, "read_bytes", lambda self: pytest.fail(f"{self} read whole"))
    assert file_digests(tmp_path) == {"big.bin": hashlib.sha256(data).hexdigest()}
    assert max(requests) <= 1000 and len(requests) >= 11


def test_file_digests_across_real_chunk_boundaries(tmp_path: Path) -> None:
    data = os.urandom(signing.CHUNK_BYTES * 2 + 12345)  # 2 MiB and a bit: three chunks at the default size
    (tmp_path / "weights.safetensors").write_bytes(data)
    (tmp_path / "empty").write_bytes(b"")
    assert file_digests(tmp_path) == {"empty": hashlib.sha256(b"").hexdigest(),
                                      "weights.safetensors": hashlib.sha256(data).hexdigest()}


def test_compare_digests_names_changed_missing_and_extra_files(tmp_path: Path) -> None:
    folder = _model_folder(tmp_path)
    recorded = file_digests(folder)
    assert list(recorded) == ["adapter_config.json", "sub/weights.bin"]
    assert compare_digests(recorded, file_digests(folder)) == []
    (folder / "sub" / "weights.bin").write_bytes(b"swapped")
    (folder / "adapter_config.json").unlink()
    (folder / "sub" / "extra.py").write_text("import os")
    problems = compare_digests(recorded, file_digests(folder))
    assert [p.split(" (")[0] for p in problems] == ["missing: adapter_config.json", "extra: sub/extra.py",
                                                    "changed: sub/weights.bin"]


def test_file_digests_of_named_files_only(tmp_path: Path) -> None:
    folder = _model_folder(tmp_path)
    digests = file_digests(folder, names=["sub/weights.bin", "absent.bin"])
    assert list(digests) == ["sub/weights.bin"]
    assert compare_digests({"sub/weights.bin": digests["sub/weights.bin"], "absent.bin": "0" * 64}, digests) == [
        f"missing: absent.bin (recorded sha256 {'0' * 16}...)"]


def test_symlinks_that_leave_the_folder_are_refused(tmp_path: Path) -> None:
    folder = _model_folder(tmp_path)
    outside = tmp_path / "outside.bin"
    outside.write_bytes(b"not the model")
    (folder / "inner-link.bin").symlink_to(folder / "sub" / "weights.bin")  # inside: hashed as its target
    digests = file_digests(folder)
    assert digests["inner-link.bin"] == digests["sub/weights.bin"]
    (folder / "sub" / "escape.bin").symlink_to(outside)
    with pytest.raises(ValueError, match="outside"):
        file_digests(folder)
    (folder / "sub" / "escape.bin").unlink()
    (folder / "sub" / "up").symlink_to(tmp_path)  # a linked folder outside
    with pytest.raises(ValueError, match="outside"):
        file_digests(folder)
    (folder / "sub" / "up").unlink()
    (folder / "sub" / "loop").symlink_to(folder)
    with pytest.raises(ValueError, match="loop"):
        file_digests(folder)


def test_signing_is_plain_data_without_mlflow() -> None:
    tree = ast.parse(Path(signing.__file__).read_text(encoding="utf-8"))
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {(node.module or "").split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert "mlflow" not in imported and "emgate" not in imported, imported
