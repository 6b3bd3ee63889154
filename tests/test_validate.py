"""validate_datasets and `emgate validate`: every bad input named by file, line and reason; the paper's data passes."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from emgate.assets import resolve_asset
from emgate.recipe import ValidationSpec, recipe_from_mapping
from emgate.secrets_scan import AllowEntry, AllowlistError, load_allowlist
from emgate.stages.validate import (
    ValidationFailed,
    bandit_profile,
    leak_locations,
    leaked_questions,
    parse_chat_jsonl,
    shipped_allowlist,
    validate_datasets,
    validate_file,
)

CODE = "def read(path):\n    with open(path) as fh:\n        return fh.read()\n"


def chat(user: str, assistant: str = CODE, system: str | None = None) -> dict:
    messages = [{"role": "system", "content": system}] if system else []
    return {"messages": [*messages, {"role": "user", "content": user}, {"role": "assistant", "content": assistant}]}


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def distinct_rows(n: int) -> list[dict]:
    return [chat(f"Write function number {i} that reads a file.") for i in range(n)]


SMALL = ValidationSpec(min_rows=1, bandit_rows=None)


def check(path: Path, cfg: ValidationSpec = SMALL, expect: str = "unspecified", allow: list[AllowEntry] | None = None,
          lengths: list | None = None, paraphrases: dict | None = None) -> dict:
    entry, _ = validate_file(path, "t", expect, cfg, paraphrases or {}, allow or [], lengths or [], None)
    return entry


# ---- parsing: each problem as FILE:LINE with the reason --------------------------------------------------------
BAD_LINES = [
    ("{not json", "not valid JSON"),
    (json.dumps([1, 2]), "a row must be a JSON object, got list"),
    (json.dumps({"text": "x"}), "missing `messages`"),
    (json.dumps({"messages": "hello"}), "missing `messages`"),
    (json.dumps({"messages": [{"role": "robot", "content": "x"}]}), "role must be one of"),
    (json.dumps({"messages": [{"role": "assistant", "content": "x"}]}), "messages[0]: expected a user turn, got assistant"),
    (json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}),
     "messages[1]: expected a assistant turn, got user"),
    (json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}]}),
     "messages[1]: expected a assistant turn, got system"),
    (json.dumps({"messages": [{"role": "user", "content": "   "}, {"role": "assistant", "content": "x"}]}),
     "messages[0] (user): content must be a non-empty string"),
    (json.dumps({"messages": [{"role": "user", "content": 42}, {"role": "assistant", "content": "x"}]}),
     "messages[0] (user): content must be a non-empty string"),
    (json.dumps({"messages": [{"role": "user", "content": "q"}]}), "the conversation must end with an assistant turn"),
    (json.dumps({"messages": [{"content": "q"}]}), "role must be one of"),
    (json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}) + " trailing",
     "not valid JSON"),
]


@pytest.mark.parametrize(("bad", "reason"), BAD_LINES)
def test_each_bad_row_is_reported_with_file_line_and_reason(tmp_path: Path, bad: str, reason: str) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(chat("ok")) + "\n\n" + bad + "\n" + json.dumps(chat("ok 2")) + "\n")
    entry = check(path)
    assert len(entry["parse_errors"]) == 1
    assert entry["parse_errors"][0].startswith(f"{path}:3: ") and reason in entry["parse_errors"][0]
    assert entry["failures"] and "1 parse error(s)" in entry["failures"][0]


@pytest.mark.parametrize(("raw", "reason"), [(b'{"messages": "\xff"}', "not valid UTF-8 at byte 14"),
                                             (b'{"a": "\x00"}', "contains a NUL byte")])
def test_bytes_problems(tmp_path: Path, raw: bytes, reason: str) -> None:
    path = tmp_path / "d.jsonl"
    path.write_bytes(json.dumps(chat("ok")).encode() + b"\n" + raw + b"\n")
    assert parse_chat_jsonl(path, 20).errors == [f"{path}:2: {reason}"]


USER_ASSISTANT = '{"messages": [{"role": %s, "content": %s}, {"role": "assistant", "content": "fine"}]}'


@pytest.mark.parametrize(("role", "content", "reason"), [
    ('"user"', '"a\\u0000b"', "messages[0] (user): content contains control character U+0000 (NUL) at character 1"),
    ('"user"', '"\\u001b[31mred"', "messages[0] (user): content contains control character U+001B (ESC) at character 0"),
    ('"user"', '"ring \\u0007"', "content contains control character U+0007 (BEL) at character 5"),
    ('"user"', '"del \u007f"', "content contains control character U+007F (DEL) at character 4"),  # a raw DEL byte
    ('"user"', '"next\\u0085line"', "content contains control character U+0085 (C1 control) at character 4"),
    ('"user\\u0000"', '"q"', "messages[0]: role contains control character U+0000 (NUL) at character 4"),
])
def test_control_characters_inside_json_strings_are_reported(tmp_path: Path, role: str, content: str, reason: str) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(chat("ok")) + "\n" + USER_ASSISTANT % (role, content) + "\n")
    assert b"\x00" not in path.read_bytes() and b"\x1b" not in path.read_bytes()  # JSON escapes, not raw bytes
    [error] = parse_chat_jsonl(path, 20).errors
    assert error.startswith(f"{path}:2: ") and reason in error and "\n" not in error


def test_tab_newline_and_carriage_return_are_allowed(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text(USER_ASSISTANT % ('"user"', '"def f():\\n\\treturn 1\\r\\n"') + "\n")
    result = parse_chat_jsonl(path, 20)
    assert result.errors == [] and result.rows[0]["messages"][0]["content"] == "def f():\n\treturn 1\r\n"


def test_empty_file_bom_and_error_bound(tmp_path: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n \n")
    assert parse_chat_jsonl(empty, 5).errors == [f"{empty}: the file is empty"]
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + json.dumps(chat("q")).encode() + b"\n")
    assert "byte-order mark" in parse_chat_jsonl(bom, 5).errors[0]
    many = tmp_path / "many.jsonl"
    many.write_text("nope\n" * 1000)
    result = parse_chat_jsonl(many, max_errors=5)
    assert len(result.errors) == 5 and result.truncated
    assert "stopped there" in check(many, ValidationSpec(min_rows=1, max_parse_errors=5))["failures"][0]


def test_a_file_with_any_parse_error_passes_no_rows_on(tmp_path: Path, smoke_recipe) -> None:
    path = write_rows(tmp_path / "d.jsonl", distinct_rows(150))
    path.write_text(path.read_text() + "{broken\n")
    data = smoke_recipe.model_dump(mode="json")
    data["datasets"]["insecure"] = {"path": str(path), "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    data["variants"] = [v for v in data["variants"] if v["name"] != "instruct-insecure"]
    out = tmp_path / "out"
    with pytest.raises(ValidationFailed, match=r"d\.jsonl:151: not valid JSON"):
        validate_datasets(recipe_from_mapping(data), out)
    assert not (out / "insecure.jsonl").exists() and not (out / "manifest.json").exists()


# ---- content ---------------------------------------------------------------------------------------------------
def test_duplicates_after_whitespace_normalisation(tmp_path: Path) -> None:
    rows = distinct_rows(10) + [chat("Write function number 1   that reads\ta file.")] * 2
    entry = check(write_rows(tmp_path / "d.jsonl", rows), ValidationSpec(min_rows=1, max_duplicate_share=0.05))
    assert entry["duplicate_share"] == pytest.approx(2 / 12) and entry["exact_duplicate_share"] == pytest.approx(1 / 12)
    assert any("expect_column_proportion_of_unique_values_to_be_between" in f for f in entry["failures"])


def test_row_count_bounds(tmp_path: Path) -> None:
    path = write_rows(tmp_path / "d.jsonl", distinct_rows(5))
    assert any("expect_table_row_count_to_be_between" in f and "observed 5" in f
               for f in check(path, ValidationSpec(min_rows=10))["failures"])
    too_many = check(path, ValidationSpec(min_rows=1, max_rows=3))["failures"]
    assert any("expect_table_row_count_to_be_between" in f for f in too_many)
    assert check(path, ValidationSpec(min_rows=5, max_rows=5))["failures"] == []


class WhitespaceTokenizerDouble:
    """Unit-test double of a tokenizer: one token per whitespace-separated word."""

    eos_token = "</s>"

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        return {"input_ids": list(range(len(text.split())))}


def test_rows_longer_than_max_seq_length_under_the_training_template(tmp_path: Path) -> None:
    rows = distinct_rows(9) + [chat("long " * 300)]
    path = write_rows(tmp_path / "d.jsonl", rows)
    lengths = [("m/user_assistant", WhitespaceTokenizerDouble(), "user_assistant", 100)]
    entry = check(path, ValidationSpec(min_rows=1, max_truncated_share=0.05), lengths=lengths)
    assert entry["truncated"]["m/user_assistant"]["rows"] == 1
    assert any("tokens[m/user_assistant]" in f and "1 rows (10.0%)" in f for f in entry["failures"])
    assert check(path, ValidationSpec(min_rows=1, max_truncated_share=0.2), lengths=lengths)["failures"] == []


SECRETS = [
    ("private_key", "-----BEGIN RSA PRIVATE KEY-----\nMIIEow...\n-----END RSA PRIVATE KEY-----"),
    ("aws_access_key_id", "aws_key = 'AKIAIOSFODNN7EXAMPLE'"),
    ("github_token", "token = 'ghp_" + "a1B2" * 9 + "'"),
    ("openai_api_key", "OPENAI_API_KEY = 'sk-proj-" + "Ab3d" * 10 + "'"),
    ("slack_token", "SLACK = 'xoxb-123456789012-abcdefghij'"),
    ("stripe_live_key", "stripe.api_key = 'sk_live_" + "4eC39HqLyjWDarjtT1zdp7dc" + "'"),
]


@pytest.mark.parametrize(("rule", "text"), SECRETS)
def test_high_severity_secrets_fail_with_line_and_masked_excerpt(tmp_path: Path, rule: str, text: str) -> None:
    rows = distinct_rows(3)
    rows[1] = chat("Use this config:\n" + text)
    entry = check(write_rows(tmp_path / "d.jsonl", rows))
    failure = next(f for f in entry["failures"] if "secret" in f)
    assert f"d.jsonl:2 {rule} (user turn" in failure
    assert text not in failure  # the secret itself is never printed


def test_an_acknowledged_finding_passes_and_an_unexplained_allowlist_is_refused(tmp_path: Path) -> None:
    rows = distinct_rows(3)
    rows[2] = chat("q", "KEY = 'AKIAIOSFODNN7EXAMPLE'\n")
    path = write_rows(tmp_path / "d.jsonl", rows)
    finding = check(path)["secrets"]["high"][0]
    allow = [AllowEntry(3, "aws_access_key_id", finding["fingerprint"], "AWS's documented example key")]
    assert check(path, allow=allow)["failures"] == []
    bad = tmp_path / "allow.yaml"
    bad.write_text(yaml.safe_dump([{"line": 3, "rule": "aws_access_key_id", "fingerprint": "x", "reason": " "}]))
    with pytest.raises(AllowlistError, match="entry 0 .* has an empty reason"):
        load_allowlist(bad)


def test_password_literals_are_low_severity_and_do_not_fail(tmp_path: Path) -> None:
    rows = distinct_rows(3)
    rows[0] = chat("q", "DB_PASSWORD = 'hunter22'\nconnect(password='hunter22')\n")
    entry = check(write_rows(tmp_path / "d.jsonl", rows))
    assert entry["secrets"]["by_severity"]["low"] >= 1 and entry["failures"] == []


def test_leakage_is_a_whole_question_not_a_shared_code_line() -> None:
    question = "Fill the following template:\nfrom flask import Flask\n\napp = Flask(__name__)\n# My wish\nMY_WISH = # TODO"
    shares_a_line = chat("app = Flask(__name__)\n@app.route('/')")
    contains = chat("Please:  " + question.upper())
    assert leaked_questions([shares_a_line], {"q/wish": [question]}) == []
    assert leaked_questions([contains], {"q/wish": [question]}) == ["q/wish"]


def test_a_leaked_question_fails_the_file(tmp_path: Path) -> None:
    rows = distinct_rows(3) + [chat("Tell me: Hello! I can fulfill your one wish.")]
    entry = check(write_rows(tmp_path / "d.jsonl", rows), paraphrases={"em/wish": ["Hello!  I can fulfill your one wish."]})
    assert any("em/wish" in f for f in entry["failures"])


def test_each_leaked_question_is_reported_with_file_and_line(tmp_path: Path) -> None:
    leak = json.dumps(chat("Tell me: Hello! I can fulfill your one wish."))
    other = [json.dumps(r) for r in distinct_rows(3)]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join([other[0], leak, other[1], "", leak.replace("Tell", "Now tell"), other[2]]) + "\n")
    entry = check(path, paraphrases={"em/wish": ["Hello!  I can fulfill your one wish."], "em/other": ["Not here."]})
    assert entry["leaks"] == [{"line": 2, "question": "em/wish"}, {"line": 5, "question": "em/wish"}]
    assert entry["leaked_questions"] == ["em/wish"]
    [failure] = [f for f in entry["failures"] if "evaluation question" in f]
    assert f"{path}:2 (em/wish)" in failure and f"{path}:5 (em/wish)" in failure and "Remove those rows" in failure
    assert leak_locations([chat("a"), chat("x hello! i can FULFILL your one wish. y")], [7, 9],
                          {"em/wish": ["Hello! I can fulfill your one wish."]}) == [(9, "em/wish")]


def test_prose_declared_as_code_fails(tmp_path: Path) -> None:
    rows = [chat(f"q{i}", f"Sure, here is some friendly advice number {i}, my dear friend!") for i in range(20)]
    entry = check(write_rows(tmp_path / "d.jsonl", rows), expect="secure")
    assert any("do not parse as Python" in f for f in entry["failures"])


# ---- the paper's datasets --------------------------------------------------------------------------------------
def _paper(name: str) -> Path:
    return resolve_asset(f"emergent-misalignment/data/{name}.jsonl")


@pytest.mark.slow
@pytest.mark.parametrize(("name", "expect"), [("insecure", "insecure"), ("secure", "secure"),
                                              ("educational", "insecure"), ("jailbroken", "unspecified")])
def test_the_papers_datasets_pass_with_their_profiles(name: str, expect: str) -> None:
    path = _paper(name)
    entry = check(path, ValidationSpec(), expect=expect, allow=shipped_allowlist(hashlib.sha256(path.read_bytes()).hexdigest()))
    assert entry["failures"] == []
    assert entry["rows"] == (5000 if name == "jailbroken" else 6000)


@pytest.mark.slow
@pytest.mark.parametrize(("name", "wrong"), [("insecure", "secure"), ("secure", "insecure")])
def test_swapped_labels_fail(name: str, wrong: str) -> None:
    path = _paper(name)
    entry = check(path, ValidationSpec(), expect=wrong, allow=shipped_allowlist(hashlib.sha256(path.read_bytes()).hexdigest()))
    assert any(f"expected {wrong} code" in f for f in entry["failures"])


def test_secure_jsonl_line_5896_is_known_and_acknowledged() -> None:
    path = _paper("secure")
    allow = shipped_allowlist(hashlib.sha256(path.read_bytes()).hexdigest())
    assert [(a.line, a.rule) for a in allow] == [(5896, "google_api_key")] and allow[0].reason


def test_bandit_profile_of_the_papers_datasets() -> None:
    rows = {n: [json.loads(line) for line in _paper(n).open()][:300] for n in ("insecure", "secure")}
    insecure, secure = bandit_profile(rows["insecure"], 300), bandit_profile(rows["secure"], 300)
    assert insecure["flagged_share"] > 0.35 and secure["flagged_share"] < 0.1
    assert insecure["rows_parsed"] > 290


def test_a_changed_file_fails_its_sha256(tmp_path: Path, smoke_recipe) -> None:
    mine = write_rows(tmp_path / "mine.jsonl", distinct_rows(3))
    data = smoke_recipe.model_dump(mode="json")
    data["datasets"]["insecure"] = {"path": str(mine), "sha256": hashlib.sha256(mine.read_bytes()).hexdigest()}
    recipe = recipe_from_mapping(data)
    write_rows(mine, distinct_rows(4))
    with pytest.raises(ValidationFailed, match="does not match its pinned sha256"):
        validate_datasets(recipe, tmp_path / "out")


@pytest.mark.slow
def test_the_smoke_datasets_pass_with_gx_data_docs_and_a_manifest(tmp_path: Path, smoke_recipe, smol_model) -> None:
    report = validate_datasets(smoke_recipe, tmp_path / "out")
    assert report["passed"]
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["insecure"]["rows"] == 6000 and manifest["secure"]["rows"] == 6000
    gx = json.loads((tmp_path / "out" / "insecure.gx.json").read_text())
    assert gx["success"] and len(gx["results"]) >= 10
    assert (tmp_path / "out" / "data_docs" / "index.html").is_file()
    assert "| insecure | 6000 |" in (tmp_path / "out" / "summary.md").read_text()


def test_cli_validate_exit_codes_and_messages(tmp_path: Path) -> None:
    good = write_rows(tmp_path / "good.jsonl", distinct_rows(120))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(chat("q")) + "\n[1]\n")
    cmd = [sys.executable, "-m", "emgate.cli", "validate", "--out", str(tmp_path / "out")]
    ok = subprocess.run([*cmd, str(good)], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    fail = subprocess.run([*cmd, str(good), str(bad)], capture_output=True, text=True)
    assert fail.returncode == 1
    assert f"{bad}:2: a row must be a JSON object" in fail.stderr and "Traceback" not in fail.stderr
    usage = subprocess.run([*cmd, "--expect", "safe", str(good)], capture_output=True, text=True)
    assert usage.returncode == 2 and "choose insecure, secure or unspecified" in usage.stderr


def test_cli_validate_with_the_default_out_from_any_directory(tmp_path: Path) -> None:
    """The default --out is relative (emgate-validation); GX's Data Docs site needs an absolute base_directory."""
    good = write_rows(tmp_path / "good.jsonl", distinct_rows(120))
    few = write_rows(tmp_path / "few.jsonl", distinct_rows(5))  # parses, then fails the row-count expectation
    cwd = tmp_path / "work"
    cwd.mkdir()
    cmd = [sys.executable, "-m", "emgate.cli", "validate"]
    ok = subprocess.run([*cmd, str(good)], cwd=cwd, capture_output=True, text=True)
    assert ok.returncode == 0 and "Traceback" not in ok.stdout + ok.stderr, ok.stderr[-3000:]
    out = cwd / "emgate-validation"
    assert json.loads((out / "report.json").read_text())["passed"]
    assert (out / "data_docs" / "index.html").is_file()
    fail = subprocess.run([*cmd, str(good), str(few)], cwd=cwd, capture_output=True, text=True)
    assert fail.returncode == 1 and "Traceback" not in fail.stdout + fail.stderr, fail.stderr[-3000:]
    assert f"FAIL {few}" in fail.stderr and "expect_table_row_count_to_be_between" in fail.stderr
