"""The `forge` command: run, plan, check, status, stages, clean, config, data inspect."""

from __future__ import annotations

import os

# Idle PyTorch threads yield instead of spinning: on a busy 2-core machine spinning made training ~7x slower.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import sys  # noqa: E402
from pathlib import Path
from typing import Annotated

import typer
import yaml
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from forge.config import ConfigError, LoadedConfig, load_config, reference_markdown
from forge.pipeline import Pipeline, PipelineError
from forge.preflight import PreflightError, format_check, preflight_run, run_checks, will_run
from forge.stages import all_stages

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)

ConfigOpt = Annotated[
    Path | None, typer.Option("--config", "-c", help="Config file (default: ./forge.yaml if present).")
]
SetOpt = Annotated[
    list[str] | None, typer.Option("--set", help="Override a config key: --set train.lr=1e-4 (repeatable).")
]


def _fail(message: str, code: int = 1) -> None:
    err_console.print(f"[bold red]forge:[/bold red] {escape(message)}")
    raise typer.Exit(code)


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exception types whose message is a complete one-line explanation for the user."""
    from forge.converters import ConversionError
    from forge.data import DataError
    from forge.eval import EvalError
    from forge.modelfiles import ModelfileError, StopTokenError, TemplateTranslationError
    from forge.models.merge import MergeError
    from forge.models.resolve import BaseModelError

    return (ConfigError, PipelineError, BaseModelError, DataError, MergeError, ConversionError, EvalError,
            ModelfileError, StopTokenError, TemplateTranslationError, PreflightError)


def _pipeline(config: Path | None, overrides: list[str] | None) -> Pipeline:
    try:
        loaded: LoadedConfig = load_config(config, overrides)
    except ConfigError as exc:
        _fail(str(exc))
    return Pipeline(loaded, all_stages(), log=console.print)


@app.command()
def run(
    to: Annotated[str, typer.Option("--to", help="Last stage to run (with everything it needs).")] = "ollama",
    config: ConfigOpt = None,
    set_: SetOpt = None,
    force: Annotated[
        list[str] | None, typer.Option("--force", help="Re-run this stage and what follows.")
    ] = None,
    verify: Annotated[bool, typer.Option("--verify", help="Recheck cached outputs' sha256 digests.")] = False,
    no_gate: Annotated[bool, typer.Option("--no-gate", help="Report eval thresholds but do not stop on them.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="push: list the uploads, send nothing.")] = False,
    no_preflight: Annotated[
        bool, typer.Option("--no-preflight", help="Skip the pre-flight checks (see forge check).")
    ] = False,
    gpus: Annotated[
        int | None, typer.Option("--gpus", min=1, help="Train on N GPUs of this host (train.nproc=N).")
    ] = None,
) -> None:
    """Run the pipeline up to a stage; cached stages are skipped, stale ones re-run."""
    overrides = [*(set_ or []), *(["eval.gate=false"] if no_gate else []), *(["push.dry_run=true"] if dry_run else [])]
    overrides += [f"train.nproc={gpus}"] if gpus else []
    pipe = _pipeline(config, overrides)
    console.print(f"[dim]config: {pipe.loaded.source} · run folder: {pipe.run_dir}[/dim]")
    try:
        forced = set(force or [])
        if no_preflight:
            console.print("[yellow]pre-flight checks skipped: --no-preflight[/yellow]")
        else:
            forced = preflight_run(pipe, to, forced, verify, console.print)
        pipe.run(to, forced, verify)
    except _user_errors() as exc:
        _fail(str(exc))
    except KeyboardInterrupt:
        _fail("interrupted; finished stages are kept and the next run resumes", code=130)
    console.print(f"[bold green]done[/bold green]: {to} is up to date in {pipe.run_dir}")


@app.command()
def status(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    verify: Annotated[
        bool, typer.Option("--verify", help="Recheck sha256 digests of cached outputs.")
    ] = False,
) -> None:
    """Show each stage's state (cached, stale, missing), fingerprint, size and time taken."""
    pipe = _pipeline(config, set_)
    try:
        plans = pipe.plan(verify=verify)
    except _user_errors() as exc:
        _fail(str(exc))
    table = Table(title=f"{pipe.run_dir}", title_justify="left")
    for col in ("stage", "state", "fingerprint", "size", "time", "note"):
        table.add_column(col)
    colours = {"cached": "green", "stale": "yellow", "missing": "dim"}
    for p in plans:
        m = p.manifest or {}
        size = sum(f["size"] for f in m.get("files", [])) if m else 0
        note = p.reason if p.state != "cached" else m.get("summary", {}).get("line", "")
        table.add_row(
            p.stage.name,
            f"[{colours[p.state]}]{p.state}[/{colours[p.state]}]",
            p.fingerprint[:12],
            _human(size) if m else "",
            f"{m['seconds']:.1f}s" if m else "",
            note,
        )
    console.print(table)


@app.command()
def plan(
    to: Annotated[str, typer.Option("--to", help="Last stage (with everything it needs).")] = "ollama",
    config: ConfigOpt = None,
    set_: SetOpt = None,
    force: Annotated[list[str] | None, typer.Option("--force", help="As forge run --force.")] = None,
    verify: Annotated[bool, typer.Option("--verify", help="Recheck cached outputs' sha256 digests.")] = False,
) -> None:
    """What `forge run --to STAGE` would do now, and why each stage runs; changes nothing."""
    pipe = _pipeline(config, set_)
    try:
        plans = pipe.plan(to, verify, set(force or []))
    except _user_errors() as exc:
        _fail(str(exc))
    table = Table(title=f"forge run --to {to} ({pipe.run_dir})", title_justify="left")
    for col in ("stage", "plan", "why"):
        table.add_column(col)
    for p in plans:
        if p.runs:
            why = "; ".join(str(c) for c in p.changes)
            table.add_row(p.stage.name, "[yellow]will run[/yellow]", escape(why))
        else:
            line = (p.manifest or {}).get("summary", {}).get("line", "")
            table.add_row(p.stage.name, "[green]cached[/green]", escape(line))
    console.print(table)
    running = [p.stage.name for p in plans if p.runs]
    console.print(f"{len(running)} of {len(plans)} stages would run" + (f": {', '.join(running)}" if running else ""))


@app.command()
def stages() -> None:
    """List the stages in order with what each needs."""
    table = Table()
    for col in ("#", "stage", "needs", "config keys"):
        table.add_column(col)
    for i, s in enumerate(all_stages(), 1):
        table.add_row(str(i), s.name, ", ".join(s.needs) or "-", ", ".join(s.config_keys) or "-")
    console.print(table)


@app.command()
def clean(
    stage: Annotated[
        str | None, typer.Argument(help="Stage to remove with everything downstream (default: all).")
    ] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Remove a stage's output and everything that depends on it (or the whole run folder)."""
    pipe = _pipeline(config, set_)
    try:
        removed = pipe.clean(stage)
    except _user_errors() as exc:
        _fail(str(exc))
    console.print(f"removed: {', '.join(removed) or 'nothing'}")


@app.command("config")
def config_cmd(
    show: Annotated[bool, typer.Option("--show", help="Print the effective config as YAML.")] = True,
    reference: Annotated[
        bool, typer.Option("--reference", help="Print every key with its default and meaning.")
    ] = False,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Print the effective config (file + defaults + --set overrides), or the reference of all keys."""
    if reference:
        sys.stdout.write(reference_markdown())
        return
    pipe = _pipeline(config, set_)
    if show:
        sys.stdout.write(f"# effective config ({pipe.loaded.source})\n")
        sys.stdout.write(yaml.safe_dump(pipe.loaded.config.model_dump(mode="json"), sort_keys=False))


def _base_model_dir(pipe: Pipeline) -> Path:
    """The base stage's normalized model folder, running the base stage first when it is not cached."""
    if will_run(pipe, "base", set()):
        pipe.run("base")
    return pipe.run_dir / "base" / "model"


@app.command()
def check(
    to: Annotated[str, typer.Option("--to", help="Last stage the run would reach (disk estimate).")] = "ollama",
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Pre-flight checks: converter support, vocabulary, BOS, chat template, disk and merge memory."""
    pipe = _pipeline(config, set_)
    try:
        planned = will_run(pipe, to, set())
        results = run_checks(pipe.loaded, _base_model_dir(pipe), planned, every=True)
    except _user_errors() as exc:
        _fail(str(exc))
    for result in results:
        console.print(format_check(result))
    failed = [r for r in results if not r.ok]
    if failed:
        _fail(f"{len(failed)} pre-flight check{'s' if len(failed) > 1 else ''} failed")
    console.print("[bold green]all pre-flight checks passed[/bold green]")


data_app = typer.Typer(no_args_is_help=True, help="Look at the dataset as the model will see it.")
app.add_typer(data_app, name="data")


@data_app.command("inspect")
def data_inspect(
    n: Annotated[int, typer.Option("--n", min=1, help="How many examples (the first rows).")] = 3,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Show examples after the chat template, trained tokens highlighted, masked ones dim, and the cut."""
    from rich.text import Text
    from transformers import AutoTokenizer

    from forge.data.inspect import inspect_examples
    from forge.data.readers import resolve_dataset

    pipe = _pipeline(config, set_)
    cfg = pipe.loaded.config.data
    try:
        tokenizer = AutoTokenizer.from_pretrained(_base_model_dir(pipe))
        source = resolve_dataset(cfg.path, pipe.loaded.root)
        examples = inspect_examples(source, tokenizer, cfg, n, lambda line: console.print(escape(line)))
    except _user_errors() as exc:
        _fail(str(exc))
    console.print(Text.assemble("legend: ", ("trained", "bold green"), " / ", ("masked (label -100)", "dim")))
    for ex in examples:
        share = ex.trained_tokens / ex.tokens if ex.tokens else 0.0
        head = f"{ex.where}: {ex.tokens} tokens, {ex.trained_tokens} trained ({share:.0%})"
        if ex.truncated_at is not None:
            head += f", cut at token {ex.truncated_at} of {ex.full_tokens} (data.max_seq_len)"
        if ex.dropped:
            head += "; no trained token: the data stage drops it"
        console.print(Text(head, style="bold"))
        body = Text()
        for span in ex.spans:
            body.append(span.text, style="bold green" if span.trained else "dim")
        if ex.truncated_at is not None:
            body.append(f"\n✂ cut here; {ex.full_tokens - ex.tokens} tokens never seen:\n", style="bold red")
            body.append(ex.cut_text, style="dim strike")
        console.print(body)
        console.print()


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def main() -> None:
    app()
