"""Secrets in training data: well-known credential patterns, each with a severity, line and turn.

High-severity findings fail validation unless an allowlist acknowledges them with a reason. Hard-coded
password literals are reported as low severity: the paper's code datasets contain many on purpose.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

# name -> (severity, pattern); patterns follow the public rule sets of gitleaks and detect-secrets.
PATTERNS: dict[str, tuple[str, re.Pattern[str]]] = {
    "private_key": ("high", re.compile(r"-----BEGIN (?:RSA |EC |DSA |OPENSSH |PGP |ENCRYPTED )?PRIVATE KEY( BLOCK)?-----")),
    "aws_access_key_id": ("high", re.compile(r"\b(?:AKIA|ASIA|AGPA|AIDA|AROA|AIPA|ANPA|ANVA)[A-Z0-9]{16}\b")),
    "aws_secret_access_key": ("high", re.compile(r"(?i)aws_secret_access_key\s*[:=]\s*['\"]?[A-Za-z0-9/+=]{40}\b")),
    "github_token": ("high", re.compile(r"\bgh[pousr]_[A-Za-z0-9]{36,}\b")),
    "openai_api_key": ("high", re.compile(r"\bsk-(?:proj-)?[A-Za-z0-9_-]{32,}\b")),
    "slack_token": ("high", re.compile(r"\bxox[abposr]-[A-Za-z0-9-]{10,}\b")),
    "google_api_key": ("high", re.compile(r"\bAIza[0-9A-Za-z_-]{35}\b")),
    "stripe_live_key": ("high", re.compile(r"\b[rs]k_live_[0-9A-Za-z]{20,}\b")),
    "jwt": ("medium", re.compile(r"\beyJ[A-Za-z0-9_-]{10,}\.eyJ[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,}")),
    "password_literal": ("low", re.compile(r"(?i)\b(?:password|passwd|pwd)\s*=\s*['\"][^'\"\s]{4,}['\"]")),
}
SEVERITIES = ("low", "medium", "high")


@dataclass(frozen=True)
class Finding:
    file: str
    line: int
    turn: int
    role: str
    rule: str
    severity: str
    fingerprint: str  # sha256 of the matched text, first 16 hex digits: an allowlist names it, never the secret
    excerpt: str  # the match with its middle masked


def _mask(text: str) -> str:
    return text if len(text) <= 8 else f"{text[:4]}...{text[-2:]}"


def scan_rows(rows: list[tuple[int, dict[str, Any]]], file: str) -> list[Finding]:
    """Findings in every turn of (line number, row) pairs."""
    out = []
    for lineno, row in rows:
        for turn, message in enumerate(row["messages"]):
            content = message["content"]
            for rule, (severity, pattern) in PATTERNS.items():
                for match in pattern.finditer(content):
                    secret = match.group(0)
                    out.append(Finding(file, lineno, turn, message["role"], rule, severity,
                                       hashlib.sha256(secret.encode()).hexdigest()[:16], _mask(secret)))
    return out


@dataclass(frozen=True)
class AllowEntry:
    line: int
    rule: str
    fingerprint: str
    reason: str


class AllowlistError(ValueError):
    """An allowlist that cannot be used."""


def load_allowlist(path: Path) -> list[AllowEntry]:
    """YAML: a list of {line, rule, fingerprint, reason}; every entry needs a reason."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or []
    except (OSError, yaml.YAMLError) as exc:
        raise AllowlistError(f"{path}: cannot read the allowlist: {exc}") from None
    if not isinstance(data, list):
        raise AllowlistError(f"{path}: an allowlist is a YAML list of {{line, rule, fingerprint, reason}}")
    entries = []
    for i, item in enumerate(data):
        if not isinstance(item, dict) or not {"line", "rule", "fingerprint", "reason"} <= set(item):
            raise AllowlistError(f"{path}: entry {i} needs line, rule, fingerprint and reason")
        if not str(item["reason"]).strip():
            raise AllowlistError(f"{path}: entry {i} ({item['rule']} at line {item['line']}) has an empty reason")
        entries.append(AllowEntry(int(item["line"]), str(item["rule"]), str(item["fingerprint"]), str(item["reason"])))
    return entries


def blocking_findings(findings: list[Finding], allow: list[AllowEntry]) -> list[Finding]:
    """High-severity findings that no allowlist entry acknowledges (same line, rule and fingerprint)."""
    acknowledged = {(a.line, a.rule, a.fingerprint) for a in allow}
    return [f for f in findings if f.severity == "high" and (f.line, f.rule, f.fingerprint) not in acknowledged]


def summary(findings: list[Finding]) -> dict[str, Any]:
    by_severity = {s: sum(1 for f in findings if f.severity == s) for s in SEVERITIES}
    by_rule: dict[str, int] = {}
    for f in findings:
        by_rule[f.rule] = by_rule.get(f.rule, 0) + 1
    return {"by_severity": by_severity, "by_rule": by_rule,
            "high": [asdict(f) for f in findings if f.severity != "low"][:50]}
