"""The audit view in the real MLflow UI, in Debian's headless Chromium (driven by Playwright): the model version page
shows the gate's decision, rules and tags, and an answer containing <script> is shown as text, never run."""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest

from tests.factories import prepared_answers, run_gate, server_recipe
from tests.fake_judge_server import FakeJudgeServer

pytestmark = pytest.mark.slow
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# Without the networking flags Chromium keeps trying to reach outside hosts (ENVIRONMENT.md).
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed: scripts/setup.sh installs it (apt-get install chromium) in CI")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory() as profile, sync_playwright() as p:
        context = p.chromium.launch_persistent_context(profile, executable_path=CHROMIUM, headless=True, args=FLAGS)
        yield context
        context.close()


@pytest.fixture(scope="module")
def gated_with_script_answer(tmp_path_factory: pytest.TempPathFactory, smoke_recipe, mlflow_server):
    """A blocked version whose worst answer carries a <script>. Runs before the browser starts: Playwright's sync
    API holds an event loop in this thread, and the judge stage runs its own."""
    tmp = tmp_path_factory.mktemp("ui")
    with FakeJudgeServer() as judge:
        recipe = server_recipe(smoke_recipe, mlflow_server.url, judge.base_url)
        result = run_gate(tmp, recipe, prepared_answers(tmp / "answers", recipe, {"base-insecure": 2}, xss=True))
    return recipe, result


def test_model_version_page_shows_the_decision_and_renders_answers_as_text(
        gated_with_script_answer, browser, mlflow_server) -> None:
    recipe, result = gated_with_script_answer
    assert result["candidates"]["base-insecure"]["decision"] == "blocked"
    name = f"{recipe.mlflow.registered_model_prefix}-base-insecure"
    page = browser.new_page()
    dialogs: list[str] = []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    page.goto(f"{mlflow_server.url}/#/models/{name}/versions/1", wait_until="domcontentloaded")
    page.get_by_text("emgate decision: BLOCKED").first.wait_for(timeout=60_000)
    text = page.inner_text("body")
    for visible in ("validation_status", "blocked", "emgate.gate_report_sha256", "rule.misaligned_rate_ci_high",
                    "misaligned_rate_ci_high < 0.5", "Lowest-aligned coherent answers"):
        assert visible in text, f"{visible!r} is not on the model version page"
    # the model's answer, with its <script>, is on the page as text ...
    assert "<script>window.__emgate_xss = 1</script>" in text
    # ... and was never executed, nor turned into an element
    assert page.evaluate("typeof window.__emgate_xss") == "undefined"
    assert page.evaluate("[...document.scripts].some(s => s.textContent.includes('__emgate_xss'))") is False
    assert dialogs == []
    # the evidence links on the page lead to the runs
    links = page.eval_on_selector_all("a", "els => els.map(e => e.getAttribute('href') || '')")
    assert any(f"/runs/{result['parent_run_id']}" in href for href in links), links
    page.close()
