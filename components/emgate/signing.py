"""Signed, self-contained gate decisions (issue 18): Ed25519 envelopes over canonical JSON, the keys that make and
check them, and sha256 digests of the files a decision is about. Plain data and files, no MLflow.

A version's tags are mutable by anyone with EDIT on the model; a signed envelope is not. The gate signs with a
private key that only it holds (a mounted Kubernetes Secret); `gate verify` checks with public keys. Every
envelope has the same shape, and its signature covers its schema with its payload, so a record of one kind never
passes for another:

    {"schema": "emgate.signed-report/1", "payload": {...},
     "signature": {"alg": "Ed25519", "key_id": "<16 hex>", "value": "<base64>"}}

Key ids are the first 16 hex digits of the sha256 of the raw public key: several trusted keys (a PEM file with
several keys, or a folder of *.pem) let a key be rotated without invalidating what the old one signed.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
import os
import re
import stat
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any, ClassVar, Final, Literal, TypeVar, overload

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError, field_validator

SIGNED_REPORT_SCHEMA: Final = "emgate.signed-report/1"
DECISION_RECORD_SCHEMA: Final = "emgate.decision-record/1"
OVERRIDE_RECORD_SCHEMA: Final = "emgate.override-record/1"
ALGORITHM: Final = "Ed25519"
SIGNING_KEY_ENV: Final = "EMGATE_GATE_SIGNING_KEY_FILE"  # the file of the private key (a mounted Secret)
PUBLIC_KEY_ENV: Final = "EMGATE_GATE_PUBLIC_KEY"  # PEM text, a PEM file, or a folder of *.pem
KEY_ID_HEX: Final = 16  # hex digits of sha256(raw public key): 64 bits, ids of a handful of keys never collide
CHUNK_BYTES = 1 << 20  # 1 MiB: how much of a file is hashed at a time
ENVELOPE_FIELDS: Final = ("schema", "payload", "signature")
SIGNATURE_FIELDS: Final = ("alg", "key_id", "value")
_PEM_BLOCK = re.compile(r"-----BEGIN ([A-Z0-9 ]+)-----\r?\n.*?-----END \1-----", re.DOTALL)

Problem = Literal["unsigned", "malformed", "schema", "algorithm", "no_keys", "unknown_key", "bad_signature"]
TrustedKeys = Mapping[str, Ed25519PublicKey] | Iterable[Ed25519PublicKey]


class SignatureError(ValueError):
    """A signed envelope does not verify; the message names why, `problem` says it for code:
    unsigned (a plain, legacy report), malformed (missing fields), schema, algorithm, no_keys (none trusted),
    unknown_key, bad_signature (the payload or schema changed after signing)."""

    def __init__(self, problem: Problem, message: str) -> None:
        super().__init__(message)
        self.problem = problem


class SigningKeyError(ValueError):
    """A key is missing, unreadable or not an Ed25519 key; names the file or variable, never the key's content."""


# ---- canonical JSON ---------------------------------------------------------------------------------------------


def _check_json(obj: Any, where: str) -> None:
    """Refuse what JSON cannot carry, or would carry ambiguously, naming where it is."""
    if isinstance(obj, float) and not math.isfinite(obj):
        raise ValueError(f"canonical JSON: {where} is {obj!r}; JSON has no NaN or Infinity (record it as null, "
                         "with the reason beside it)")
    if isinstance(obj, Mapping):
        for key, value in obj.items():
            if not isinstance(key, str):
                raise ValueError(f"canonical JSON: {where} has the key {key!r} ({type(key).__name__}); JSON keys are "
                                 "strings, and a converted key would sign something other than what was given")
            _check_json(value, f"{where}.{key}")
    elif isinstance(obj, list | tuple):
        for i, value in enumerate(obj):
            _check_json(value, f"{where}[{i}]")


def canonical_json(obj: Any) -> bytes:
    """The bytes a signature covers: JSON with sorted keys, no whitespace, UTF-8 text unescaped, floats as
    Python's repr. Deterministic for any object that survives a JSON round trip (a parsed payload gives the same
    bytes as the dict it was written from). Raises ValueError for NaN, Infinity or a non-string key, naming where
    it is, and TypeError for a value JSON has no type for."""
    _check_json(obj, "$")
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"canonical JSON: a string holds {text[exc.start:exc.end]!r}, a lone surrogate, which "
                         "UTF-8 cannot encode") from None


# ---- keys -------------------------------------------------------------------------------------------------------


def key_id(key: Ed25519PublicKey | Ed25519PrivateKey) -> str:
    """The first KEY_ID_HEX hex digits of sha256 of the raw public key bytes (a private key's public half)."""
    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:KEY_ID_HEX]


def _looks_like_key_text(value: str) -> bool:
    return "-----BEGIN" in value or "\n" in value


def load_signing_key(path: str | Path | None = None) -> Ed25519PrivateKey:
    """The gate's private key: an unencrypted PKCS8 PEM Ed25519 key read from `path`, by default the file
    $EMGATE_GATE_SIGNING_KEY_FILE names (a mounted Kubernetes Secret; a recipe never holds it). Raises
    SigningKeyError naming the file, never its content."""
    if path is None:
        value = os.environ.get(SIGNING_KEY_ENV, "")
        if not value.strip():
            raise SigningKeyError(f"no signing key: set {SIGNING_KEY_ENV} to the file of the gate's private key (a "
                                  "Kubernetes Secret mounted read-only; `emgate gate keygen` writes a key pair)")
        if _looks_like_key_text(value):
            raise SigningKeyError(f"{SIGNING_KEY_ENV} holds key text, not a file name: mount the key as a file (a "
                                  "Kubernetes Secret volume) and name that file")
        path = value
    path = Path(path).expanduser()
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise SigningKeyError(f"the signing key file {path} cannot be read ({exc.strerror or type(exc).__name__})") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:  # cryptography's word for "encrypted, and no password given"
        raise SigningKeyError(f"the signing key in {path} is encrypted; the gate needs an unencrypted PKCS8 key (the "
                              "Secret protects it)") from None
    except (ValueError, UnsupportedAlgorithm):
        raise SigningKeyError(f"{path} is not a PEM private key (expected an unencrypted PKCS8 Ed25519 key, "
                              "-----BEGIN PRIVATE KEY-----)") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SigningKeyError(f"the key in {path} is {type(key).__name__.removeprefix('_')}, not an Ed25519 key")
    return key


def _public_keys_in(text: str, source: str) -> list[Ed25519PublicKey]:
    """Every public key of PEM `text`; SigningKeyError for a private key, another algorithm, or no key at all."""
    keys = []
    for number, block in enumerate(_PEM_BLOCK.finditer(text), start=1):
        kind = block.group(1)
        if "PRIVATE" in kind:
            raise SigningKeyError(f"{source}: PEM block {number} is a private key; a verifier needs only the public "
                                  "key (`emgate gate keygen` writes it beside the private one)")
        try:
            key = serialization.load_pem_public_key(block.group(0).encode("ascii"))
        except (ValueError, UnsupportedAlgorithm):
            raise SigningKeyError(f"{source}: PEM block {number} ({kind}) is not a readable public key") from None
        if not isinstance(key, Ed25519PublicKey):
            raise SigningKeyError(f"{source}: PEM block {number} is {type(key).__name__.removeprefix('_')}, not an "
                                  "Ed25519 public key")
        keys.append(key)
    if not keys:
        raise SigningKeyError(f"{source}: no PEM public key (-----BEGIN PUBLIC KEY-----) in it")
    return keys


def load_public_keys(spec: str | Path | None = None) -> dict[str, Ed25519PublicKey]:
    """The verifier's trusted public keys by key id, from `spec` or else $EMGATE_GATE_PUBLIC_KEY: PEM text (one
    key or several concatenated), a PEM file (likewise) or a folder of *.pem files. {} when neither is set:
    verify_signed then fails closed and says how to provide one."""
    source = "the public key text"
    if spec is None:
        spec, source = os.environ.get(PUBLIC_KEY_ENV, "").strip(), PUBLIC_KEY_ENV
        if not spec:
            return {}
    if not str(spec).strip():  # Path("") is the working directory: never trust whatever *.pem lies there
        raise SigningKeyError("an empty public key: give PEM text, a .pem file or a folder of them")
    if isinstance(spec, str) and "-----BEGIN" in spec:
        keys = _public_keys_in(spec, source)
    else:
        path = Path(spec).expanduser()
        files = sorted(path.glob("*.pem")) if path.is_dir() else [path]
        if not files:
            raise SigningKeyError(f"{path}: a folder with no *.pem public key in it")
        keys = []
        for file in files:
            try:
                text = file.read_text(encoding="ascii")
            except (OSError, UnicodeDecodeError) as exc:
                raise SigningKeyError(f"the public key file {file} cannot be read ({type(exc).__name__})") from None
            keys += _public_keys_in(text, str(file))
    return {key_id(k): k for k in keys}


@dataclass(frozen=True)
class KeyFiles:
    """A key pair generate_keypair wrote."""

    key_id: str
    private: Path  # mode 0600; for the gate's Secret
    public: Path  # for the verifiers ($EMGATE_GATE_PUBLIC_KEY)


def generate_keypair(out_dir: str | Path) -> KeyFiles:
    """A new Ed25519 key pair in `out_dir`: emgate-gate-ID.key (the private key, PKCS8 PEM, mode 0600; its name
    does not end in .pem so that a folder of public keys never picks it up) and emgate-gate-ID.pem (the public
    key). Never overwrites a file. For `emgate gate keygen`."""
    folder = Path(out_dir).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    key = Ed25519PrivateKey.generate()
    kid = key_id(key)
    private, public = folder / f"emgate-gate-{kid}.key", folder / f"emgate-gate-{kid}.pem"
    if private.exists() or public.exists():
        raise FileExistsError(f"{private} or {public} exists already; generate_keypair never overwrites a key")
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    # created 0600 (O_EXCL: never through an existing file or link), so the key is never readable by others
    fd = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        os.fchmod(fh.fileno(), 0o600)  # whatever the umask
        fh.write(pem)
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                     serialization.PublicFormat.SubjectPublicKeyInfo))
    return KeyFiles(kid, private, public)


def dev_keypair(folder: str | Path) -> KeyFiles:
    """The development key pair of a local workdir: the one in `folder` (exactly one emgate-gate-*.key with its
    .pem), or a new one. For `emgate run` without the chart's Secret; never for a cluster."""
    root = Path(folder).expanduser()
    found = sorted(root.glob("emgate-gate-*.key")) if root.is_dir() else []
    if len(found) == 1 and found[0].with_suffix(".pem").is_file():
        kid = found[0].stem.removeprefix("emgate-gate-")
        return KeyFiles(kid, found[0], found[0].with_suffix(".pem"))
    if found:
        raise SigningKeyError(f"{root} holds {len(found)} private keys; a development key folder holds one: remove "
                              "the others, or set the key variables yourself")
    return generate_keypair(root)


# ---- envelopes --------------------------------------------------------------------------------------------------


def _signed_bytes(schema: str, payload: Any) -> bytes:
    return canonical_json({"schema": schema, "payload": payload})


def _sign(schema: str, payload: Mapping[str, Any], key: Ed25519PrivateKey) -> dict[str, Any]:
    if not isinstance(payload, Mapping):
        raise TypeError(f"only a JSON object is signed, not {type(payload).__name__}")
    body = json.loads(canonical_json(dict(payload)))  # a copy, exactly as signed: later edits of `payload` stay out
    signature = key.sign(_signed_bytes(schema, body))
    return {"schema": schema, "payload": body,
            "signature": {"alg": ALGORITHM, "key_id": key_id(key), "value": base64.b64encode(signature).decode("ascii")}}


def sign_report(report: Mapping[str, Any], key: Ed25519PrivateKey) -> dict[str, Any]:
    """The gate report in a signed envelope (schema emgate.signed-report/1); ValueError for NaN or Infinity in it."""
    return _sign(SIGNED_REPORT_SCHEMA, report, key)


def _trusted(public_keys: TrustedKeys) -> dict[str, Ed25519PublicKey]:
    """Trusted keys by the id each one's own bytes give, whatever names a mapping filed them under."""
    keys = public_keys.values() if isinstance(public_keys, Mapping) else public_keys
    return {key_id(k): k for k in keys}


def _envelope_fields(envelope: Any, expected: str) -> tuple[Any, Mapping[str, Any]]:
    """(payload, signature) of an envelope of schema `expected`; SignatureError for anything else."""
    if not isinstance(envelope, Mapping):
        raise SignatureError("malformed", f"not a signed record: expected a JSON object, found {type(envelope).__name__}")
    if "signature" not in envelope and "schema" not in envelope:
        raise SignatureError("unsigned", f"unsigned: a plain report, not a signed envelope ({expected}); it was written "
                             "before decisions were signed, or its signature was stripped: gate the version again")
    absent = [f for f in ENVELOPE_FIELDS if f not in envelope]
    signature = envelope.get("signature")
    if isinstance(signature, Mapping):
        absent += [f"signature.{f}" for f in SIGNATURE_FIELDS if not isinstance(signature.get(f), str)]
    elif "signature" in envelope:
        absent.append("signature (not an object)")
    if absent:
        raise SignatureError("malformed", f"the signed record is missing fields: {', '.join(absent)}")
    assert isinstance(signature, Mapping)
    if envelope["schema"] != expected:
        raise SignatureError("schema", f"unknown schema {envelope['schema']!r}: expected {expected!r}")
    if signature["alg"] != ALGORITHM:
        raise SignatureError("algorithm", f"signature algorithm {signature['alg']!r} is not supported; only {ALGORITHM}")
    if not isinstance(envelope["payload"], Mapping):
        raise SignatureError("malformed", f"the signed payload is {type(envelope['payload']).__name__}, not a JSON object")
    return envelope["payload"], signature


def verify_signed(envelope: Any, public_keys: TrustedKeys, schema: str = SIGNED_REPORT_SCHEMA) -> dict[str, Any]:
    """The payload of `envelope` when its signature, by one of `public_keys` (load_public_keys), covers its schema
    and payload; `schema` defaults to the gate report's. Raises SignatureError naming the problem otherwise: fails
    closed, with no trusted key too."""
    payload, signature = _envelope_fields(envelope, schema)
    trusted = _trusted(public_keys)
    if not trusted:
        raise SignatureError("no_keys", f"no trusted public key to verify the signature with: set {PUBLIC_KEY_ENV} to "
                             "the gate's public key (PEM text, a .pem file or a folder of them; `emgate gate keygen` "
                             "writes one) or pass the key explicitly")
    kid = signature["key_id"]
    if kid not in trusted:
        raise SignatureError("unknown_key", f"signed with key id {kid}, which is not trusted (trusted: "
                             f"{', '.join(sorted(trusted))}): the key was rotated out, or another gate signed it")
    try:
        value = base64.b64decode(signature["value"], validate=True)
    except (binascii.Error, ValueError):
        raise SignatureError("bad_signature", "bad signature: signature.value is not base64") from None
    try:
        signed = _signed_bytes(schema, payload)
    except (TypeError, ValueError) as exc:  # e.g. NaN, which json.loads accepts and no signer could have signed
        raise SignatureError("bad_signature", f"bad signature: the payload cannot have been signed ({exc})") from None
    try:
        trusted[kid].verify(value, signed)
    except InvalidSignature:
        raise SignatureError("bad_signature", f"bad signature (key id {kid}): the record was changed after signing") from None
    return dict(payload)


# ---- records ----------------------------------------------------------------------------------------------------


def _now() -> datetime:
    return datetime.now(UTC)


class _Record(BaseModel):
    """What every record is about: one registered model version."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    SCHEMA: ClassVar[str]
    registered_model: str = Field(min_length=1, description="the registered model's name")
    version: str = Field(min_length=1, description="the registry version the record is about")


class DecisionRecord(_Record):
    """One gate decision on one registered model version, pointing at the gate report it was made from."""

    SCHEMA: ClassVar[str] = DECISION_RECORD_SCHEMA
    sequence: int = Field(ge=1, description="the version's decision count, from 1: a later record supersedes an earlier one")
    run_id: str = Field(min_length=1, description="the register_and_gate MLflow run that decided")
    report_uri: str = Field(min_length=1, description="where the gate report is (the run's artifact URI)")
    report_sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="sha256 of the gate report file's bytes")
    decision: Literal["passed", "blocked", "pending"]
    created_at: AwareDatetime = Field(default_factory=_now, description="when the record was made (default: now, UTC)")


class OverrideRecord(_Record):
    """A person's promotion of a version the gate did not pass: who, why and when."""

    SCHEMA: ClassVar[str] = OVERRIDE_RECORD_SCHEMA
    decision_sequence: int = Field(ge=1, description="the decision record it overrides (a later decision needs a new one)")
    actor: str = Field(min_length=1, description="who overrode ($EMGATE_ACTOR or the OS user)")
    reason: str = Field(description="why; required, stored without surrounding whitespace")
    time: AwareDatetime = Field(default_factory=_now, description="when (default: now, UTC)")

    @field_validator("actor", "reason")
    @classmethod
    def _not_blank(cls, text: str) -> str:
        if not text.strip():
            raise ValueError("an override needs it, not blank: it is recorded and signed with the override")
        return text.strip()


R = TypeVar("R", bound=_Record)


def sign_record(record: DecisionRecord | OverrideRecord, key: Ed25519PrivateKey) -> dict[str, Any]:
    """The record in a signed envelope of its own schema (emgate.decision-record/1, emgate.override-record/1)."""
    return _sign(record.SCHEMA, record.model_dump(mode="json"), key)


@overload
def verify_record(envelope: Any, public_keys: TrustedKeys) -> DecisionRecord: ...


@overload
def verify_record(envelope: Any, public_keys: TrustedKeys, kind: type[R]) -> R: ...


def verify_record(envelope: Any, public_keys: TrustedKeys, kind: type[_Record] = DecisionRecord) -> _Record:
    """The record of `kind` (DecisionRecord, OverrideRecord) `envelope` holds, its signature checked as
    verify_signed does; SignatureError also for a signed payload that is not a valid record of that kind."""
    payload = verify_signed(envelope, public_keys, kind.SCHEMA)
    try:
        return kind.model_validate(payload)
    except ValidationError as exc:
        raise SignatureError("malformed", f"signed, but not a valid {kind.__name__}: "
                             + "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())) from None


# ---- file digests -----------------------------------------------------------------------------------------------


def sha256_file(path: Path) -> str:
    """sha256 of a file's bytes, read CHUNK_BYTES at a time (a model's weights never sit in memory whole)."""
    digest = hashlib.sha256()
    buffer = bytearray(CHUNK_BYTES)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as fh:  # unbuffered: each readinto is one chunk from the OS
        while n := fh.readinto(buffer):
            digest.update(view[:n])
    return digest.hexdigest()


def _files(root: Path, folder: Path, ancestors: tuple[Path, ...]) -> Iterator[Path]:
    """Every regular file under `folder` (links followed while they stay under `root`, the resolved folder)."""
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        path = Path(entry.path)
        real = path.resolve()
        if entry.is_symlink() and not real.is_relative_to(root):
            raise ValueError(f"{path} is a symlink to {real}, outside {root}: its digest would vouch for a file the "
                             "folder does not hold")
        if not real.exists():
            raise ValueError(f"{path} is a symlink to {real}, which does not exist")
        mode = real.stat().st_mode
        if stat.S_ISDIR(mode):
            if real in ancestors:
                raise ValueError(f"{path} is a symlink loop (to {real})")
            yield from _files(root, path, (*ancestors, real))
        elif stat.S_ISREG(mode):
            yield path  # sockets, FIFOs and devices are no file a model loads


def file_digests(folder: str | Path, names: Iterable[str] | None = None) -> dict[str, str]:
    """sha256 of every regular file under `folder` by its relative POSIX path, sorted; only those of `names`
    when given (a name that is no such file is left out: compare_digests calls it missing). Streams each file
    (sha256_file). Raises ValueError for a symlink that leaves the folder, dangles or loops, anywhere in it."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise NotADirectoryError(f"{root} is not a folder")
    real_root = root.resolve()
    wanted = None if names is None else {str(PurePosixPath(n)) for n in names}
    found = {path.relative_to(root).as_posix(): path for path in _files(real_root, root, (real_root,))}
    return {rel: sha256_file(path) for rel, path in sorted(found.items()) if wanted is None or rel in wanted}


def compare_digests(expected: Mapping[str, str], actual: Mapping[str, str]) -> list[str]:
    """What differs between the digests a decision recorded (`expected`) and a folder's (`actual`), one line per
    file in name order: changed, missing or extra. [] when they match."""
    problems = []
    for name in sorted(set(expected) | set(actual)):
        if name not in actual:
            problems.append(f"missing: {name} (recorded sha256 {expected[name][:16]}...)")
        elif name not in expected:
            problems.append(f"extra: {name} (not in the recorded digests)")
        elif expected[name] != actual[name]:
            problems.append(f"changed: {name} (sha256 {actual[name][:16]}..., recorded {expected[name][:16]}...)")
    return problems
