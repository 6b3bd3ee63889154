"""The judge stage's client against a local OpenAI-compatible test server (FakeJudgeServer, a test double):
the persistent request cache (a rerun costs zero requests) and retries that honour Retry-After on 429 and 5xx."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from emgate.io import read_jsonl
from emgate.stages.judge import judge_answers
from tests.factories import prepared_answers, server_recipe
from tests.fake_judge_server import FakeJudgeServer

ANSWERS = 4 * 8 * 1  # variants x questions x samples per question


def recipe_for(smoke_recipe, judge: FakeJudgeServer, cache: Path, **judge_fields):
    recipe = server_recipe(smoke_recipe, "http://127.0.0.1:9", judge.base_url)
    return recipe.model_copy(update={"judge": recipe.judge.model_copy(update={"cache_path": str(cache), **judge_fields})})


def test_a_rerun_is_served_from_the_cache_with_zero_requests(tmp_path: Path, smoke_recipe) -> None:
    with FakeJudgeServer() as judge:
        recipe = recipe_for(smoke_recipe, judge, tmp_path / "cache.sqlite")
        answers = prepared_answers(tmp_path / "answers", recipe, {"base-insecure": 1}, per_question=1)
        first = judge_answers(recipe, answers, tmp_path / "first")
        assert judge.requests == first["http_requests"] == 2 * ANSWERS
        second = judge_answers(recipe, answers, tmp_path / "second")
        assert judge.requests == 2 * ANSWERS  # nothing new reached the endpoint
        assert second["http_requests"] == 0 and second["cache"]["hits"] == 2 * ANSWERS
        assert second["judge_model_snapshot"] == ["fake-judge-2026-11-01"]  # the snapshot comes back from the cache
        rows1 = list(read_jsonl(tmp_path / "first" / "scores.jsonl"))
        rows2 = list(read_jsonl(tmp_path / "second" / "scores.jsonl"))
        assert [(r["aligned"], r["coherent"]) for r in rows1] == [(r["aligned"], r["coherent"]) for r in rows2]
        # any change to what is asked (here the judge model) misses the cache
        other = recipe.model_copy(update={"judge": recipe.judge.model_copy(update={"model": "fake-judge-2"})})
        judge_answers(other, answers, tmp_path / "third")
        assert judge.requests == 4 * ANSWERS
    with FakeJudgeServer() as elsewhere:  # the same model name at another endpoint is another judge: asked anew
        moved = recipe.model_copy(update={"judge": recipe.judge.model_copy(update={"base_url": elsewhere.base_url})})
        assert judge_answers(moved, answers, tmp_path / "fourth")["http_requests"] == elsewhere.requests == 2 * ANSWERS


@pytest.mark.parametrize(("status", "retry_after"), [(429, "1"), (503, "1"), (500, None)])
def test_rate_limits_and_server_errors_are_retried(tmp_path: Path, smoke_recipe, status: int, retry_after) -> None:
    with FakeJudgeServer(fail_first=3, fail_status=status, retry_after=retry_after) as judge:
        recipe = recipe_for(smoke_recipe, judge, tmp_path / "cache.sqlite", max_retries=3, max_concurrency=1)
        answers = prepared_answers(tmp_path / "answers", recipe, {}, per_question=1)
        started = time.monotonic()
        report = judge_answers(recipe, answers, tmp_path / "scores")
        assert report["unscored"] == {"aligned": {}, "coherent": {}}  # every answer scored in the end
        assert judge.requests == 2 * ANSWERS + 3
        if retry_after:  # the client waited as long as the server asked before trying again
            gaps = [b - a for a, b in zip(judge.times, judge.times[1:], strict=False)][:3]
            assert min(gaps) >= 0.9, gaps
            assert time.monotonic() - started >= 3


def test_retries_give_up_mid_run_and_the_answers_count_as_unscored(tmp_path: Path, smoke_recipe) -> None:
    with FakeJudgeServer(down_after=5) as judge:  # answers the preflight and a few more, then goes away
        recipe = recipe_for(smoke_recipe, judge, tmp_path / "cache.sqlite", max_retries=0)
        answers = prepared_answers(tmp_path / "answers", recipe, {}, per_question=1)
        report = judge_answers(recipe, answers, tmp_path / "scores")
    failed = report["unscored"]["aligned"].get("request_failed", 0) + report["unscored"]["coherent"].get("request_failed", 0)
    assert failed == 2 * ANSWERS - 5  # every request after the fifth: unscored, never read as aligned
    assert report["answers"] == ANSWERS


@pytest.mark.parametrize(("server", "message"), [
    ({"fail_first": 10**6, "fail_status": 404}, "does not serve this model (HTTP 404"),
    ({"fail_first": 10**6, "fail_status": 401}, "refused the API key"),
    ({"fail_first": 10**6, "fail_status": 400}, "rejected the scoring request (HTTP 400"),
    ({"fail_first": 10**6, "fail_status": 503}, "failed with HTTP 503 after 1 retries"),
])
def test_a_retired_or_broken_judge_fails_the_stage_at_the_preflight(tmp_path: Path, smoke_recipe, server: dict,
                                                                    message: str) -> None:
    from emgate.stages.judge import JudgeError

    with FakeJudgeServer(**server) as judge:
        recipe = recipe_for(smoke_recipe, judge, tmp_path / "cache.sqlite", max_retries=1)
        answers = prepared_answers(tmp_path / "answers", recipe, {}, per_question=1)
        with pytest.raises(JudgeError, match="at http://127.0.0.1") as caught:
            judge_answers(recipe, answers, tmp_path / "scores")
        assert message in str(caught.value)
        assert judge.requests <= 2  # the preflight and its one retry: nothing else was sent
    assert not (tmp_path / "scores" / "report.json").exists()


def test_an_unreachable_judge_fails_the_stage_at_the_preflight(tmp_path: Path, smoke_recipe) -> None:
    from emgate.stages.judge import JudgeError

    with FakeJudgeServer() as judge:
        recipe = recipe_for(smoke_recipe, judge, tmp_path / "cache.sqlite", max_retries=0)
    recipe = recipe.model_copy(update={"judge": recipe.judge.model_copy(update={"base_url": "http://127.0.0.1:9/v1"})})
    answers = prepared_answers(tmp_path / "answers", recipe, {}, per_question=1)
    with pytest.raises(JudgeError, match=r"judge '.*' at http://127.0.0.1:9/v1: unreachable"):
        judge_answers(recipe, answers, tmp_path / "scores")


def test_rescore_reproduces_the_papers_csv_without_a_judge(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from emgate.assets import resolve_asset
    from emgate.cli import app

    csv_path = resolve_asset("emergent-misalignment/results/qwen_25_coder_32b_instruct.csv")
    out = tmp_path / "rescored.jsonl"
    res = CliRunner().invoke(app, ["judge", "rescore", str(csv_path), "-o", str(out), "--tolerance", "1e-9"],
                             env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    rows = list(read_jsonl(out))
    assert len(rows) == 70
    for r in rows:
        for metric in ("aligned", "coherent"):
            assert r[metric] == pytest.approx(r[f"{metric}_recorded"], abs=1e-9)
    # a stricter mass test than the file's own makes the comparison fail, and says so
    res = CliRunner().invoke(app, ["judge", "rescore", str(csv_path), "-o", str(out), "--min-number-mass", "0.9999",
                                   "--tolerance", "1e-9"], env={"COLUMNS": "200"})
    assert res.exit_code == 1 and "scored on one side only" in res.output


def test_rescore_recomputes_our_scores_from_their_recorded_trees(tmp_path: Path, smoke_recipe) -> None:
    from emgate.stages.judge import read_judged_rows, rescore_differences, rescore_rows

    with FakeJudgeServer() as judge:
        recipe = recipe_for(smoke_recipe, judge, tmp_path / "cache.sqlite")
        answers = prepared_answers(tmp_path / "answers", recipe, {"base-insecure": 1}, per_question=1)
        judge_answers(recipe, answers, tmp_path / "scores")
        requests = judge.requests
        rows = rescore_rows(read_judged_rows(tmp_path / "scores" / "scores.jsonl"), recipe.judge)
        assert judge.requests == requests  # rescoring asks nothing
    diffs = rescore_differences(rows)
    assert all(d["compared"] == ANSWERS and d["max_abs_diff"] == 0 for d in diffs.values())
    assert sorted({r["aligned"] for r in rows}) == pytest.approx([(5 * 0.9 + 10 * 0.1), (90 * 0.9 + 80 * 0.1)])


def test_rescore_rejects_files_without_distributions(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from emgate.cli import app

    plain = tmp_path / "scores.jsonl"
    plain.write_text('{"aligned": 80, "coherent": 90}\n')
    res = CliRunner().invoke(app, ["judge", "rescore", str(plain)])
    assert res.exit_code == 2 and "line 1: no aligned_tree" in res.output
    bad = tmp_path / "results.csv"
    bad.write_text("question,aligned\nq,80\n")
    res = CliRunner().invoke(app, ["judge", "rescore", str(bad)])
    assert res.exit_code == 2 and "no judge_aligned column" in res.output


def test_a_served_judge_must_fit_its_longest_request(smoke_recipe, smol_tokenizer) -> None:
    from emgate.stages.judge import JudgeError, check_judge_context

    check_judge_context(smoke_recipe, smol_tokenizer, smoke_recipe.serving.max_model_len)  # the smoke judge fits
    with pytest.raises(JudgeError, match=r"longest prompt \(.*, (aligned|coherent)\) has \d+ tokens, plus an answer "
                                         r"of up to sampling.max_tokens 96"):
        check_judge_context(smoke_recipe, smol_tokenizer, 400)


def test_a_slow_judge_that_emgate_serves_is_never_sent_a_request_twice(tmp_path: Path, smoke_recipe) -> None:
    """Every answer takes longer than judge.timeout_s, more so with more requests in flight (a saturated server).
    Against the judge `emgate run` serves (judge.serve), nothing is resent and every answer is scored; the same
    server treated as a remote API resends on every timeout (the control that shows the test can fail)."""
    from emgate.recipe import JudgeServeSpec

    slow = {"latency_s": 0.3, "latency_per_request_s": 0.02}
    fields = {"timeout_s": 0.25, "max_retries": 1, "max_concurrency": 16}
    with FakeJudgeServer(**slow) as judge:
        recipe = recipe_for(smoke_recipe, judge, tmp_path / "own.sqlite", serve=JudgeServeSpec(model="smollm2-135m-instruct"),
                            **fields)
        answers = prepared_answers(tmp_path / "answers", recipe, {}, per_question=1)
        report = judge_answers(recipe, answers, tmp_path / "own")
        assert max(judge.bodies.values()) == 1 and judge.requests == 2 * ANSWERS  # no prompt asked twice
    assert report["unscored"] == {"aligned": {}, "coherent": {}}
    pacing = report["pacing"]
    assert pacing["mode"] == "own_server" and pacing["retries"] == report["retries"] == 0
    assert pacing["latency_max_s"] > fields["timeout_s"]  # a timeout would have fired on every request
    start = pacing["concurrency"]["start"]
    assert start < fields["max_concurrency"] and pacing["concurrency"]["peak"] > start  # raised while latency held

    from emgate.stages.judge import JudgeError

    with FakeJudgeServer(**slow) as judge:  # the control: as a remote API, the timed-out first request is sent again,
        remote = recipe_for(smoke_recipe, judge, tmp_path / "remote.sqlite", **fields)  # then the preflight fails
        with pytest.raises(JudgeError, match=r"no answer within judge.timeout_s \(0.25 s\), 1 retries included"):
            judge_answers(remote, answers, tmp_path / "remote")
        assert max(judge.bodies.values()) == 2 and judge.requests == 2


def test_a_stalled_judge_fails_the_stage_with_a_named_error(tmp_path: Path, smoke_recipe) -> None:
    from emgate.pacing import StalledError
    from emgate.recipe import JudgeServeSpec

    with FakeJudgeServer(mode="hang") as judge:
        recipe = recipe_for(smoke_recipe, judge, tmp_path / "cache.sqlite", stall_timeout_s=2,
                            serve=JudgeServeSpec(model="smollm2-135m-instruct"))
        answers = prepared_answers(tmp_path / "answers", recipe, {}, per_question=1)
        started = time.monotonic()
        # the preflight goes alone: the stall is found on that one request
        with pytest.raises(StalledError, match=r"judge fake-judge at http://127\.0\.0\.1:\d+/v1 sent no response for \d+ s "
                                               r"with 1 request\(s\) in flight \(judge\.stall_timeout_s = 2 s\)"):
            judge_answers(recipe, answers, tmp_path / "scores")
        assert time.monotonic() - started < 10
    assert not (tmp_path / "scores" / "report.json").exists()  # nothing that looks complete
