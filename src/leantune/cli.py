"""The ``leantune`` command. Bad input prints one line to stderr and exits 2, no traceback.

``tune``'s options are generated from :class:`leantune.tune.TuneConfig`: each field's docstring
is its help text, so the config file, the CLI and the docs cannot drift apart.
"""

from __future__ import annotations

import inspect
import json
import sys
import typing
from collections import Counter
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from leantune.errors import LeantuneError

app = typer.Typer(
    help="Parameter-efficient fine-tuning that picks the parameters that matter.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

RunArg = Annotated[Path, typer.Argument(help="A run folder written by leantune tune.")]


@app.callback()
def _root() -> None:
    """Parameter-efficient fine-tuning that picks the parameters that matter."""


def fail(message: str) -> typing.NoReturn:
    typer.echo(f"leantune: {message}", err=True)
    raise typer.Exit(2)


# ---------------------------------------------------------------------------- tune


def _tune(config: Path | None, resume: bool, overwrite: bool, quiet: bool, **options: Any) -> None:
    from leantune.runfolder import RunFolder
    from leantune.tune import TuneConfig, make_config, read_config

    given = {k: v for k, v in options.items() if v is not None}
    try:
        if resume:
            extra = sorted(set(given) - {"name", "runs_dir"})
            if extra or config:
                shown = "--config" if config else "--" + extra[0].replace("_", "-")
                fail(f"--resume continues the run's saved config.yaml; drop {shown}")
            name = str(given.get("name") or make_config(given).resolved().name)
            folder = RunFolder(given.get("runs_dir", "runs"), name)
            if not (folder.work / "config.yaml").is_file():
                folder.check(resume=True, overwrite=False)  # says why there is nothing to resume
            # The folder is where it is now, whatever its config says.
            values = read_config(folder.work / "config.yaml") | {
                "name": name,
                "runs_dir": str(folder.root),
            }
        else:
            values = read_config(config) if config else {}
            values.update(given)
        cfg: TuneConfig = make_config(values)
        summary = _run_with_progress(cfg, resume, overwrite, quiet)
    except LeantuneError as e:
        fail(str(e))
    if summary.get("interrupted"):
        typer.echo(
            f"leantune: interrupted after step {summary['step']}; checkpoint saved. Continue with: "
            f"leantune tune --name {Path(summary['run']).name} --resume",
            err=True,
        )
        raise typer.Exit(130)
    _print_summary(summary)


def _run_with_progress(
    cfg: Any, resume: bool, overwrite: bool, quiet: bool, **hooks: Any
) -> dict[str, Any]:
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from leantune.tune import run_tune

    console = Console(stderr=True)
    if quiet:
        return run_tune(cfg, resume=resume, overwrite=overwrite, **hooks)
    bar = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} steps"),
        TextColumn("loss {task.fields[loss]:.4f}"),
        TextColumn("{task.fields[speed]:.1f} ex/s"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )
    task = bar.add_task("training", total=None, loss=float("nan"), speed=0.0)

    def on_step(progress: Any, total: int) -> None:
        window = progress.curve[-20:]
        loss = sum(v for _, v in window) / len(window)
        speed = progress.examples / progress.seconds if progress.seconds else 0.0
        bar.update(
            task,
            completed=progress.step,
            total=total,
            description=f"epoch {progress.epoch + 1}",
            loss=loss,
            speed=speed,
        )

    # The bar appears with the first step, so bad input never draws one before its message.
    started = False

    def first_step(progress: Any, total: int) -> None:
        nonlocal started
        if not started:
            bar.start()
            started = True
        on_step(progress, total)

    try:
        return run_tune(
            cfg,
            resume=resume,
            overwrite=overwrite,
            log=console.print,
            on_step=first_step,
            **hooks,
        )
    finally:
        if started:
            bar.stop()


def _print_summary(summary: dict[str, Any]) -> None:
    rows: list[tuple[str, str]] = []
    for key in ("test_accuracy", "test_macro_f1", "test_perplexity", "test_loss"):
        if key in summary:
            rows.append((key.replace("_", " "), f"{summary[key]:.4f}"))
    rows += [
        (
            "trainable params",
            f"{summary['trainable_params']:,} of {summary['total_params']:,} "
            f"({summary['trainable_percent']:.2f}%)",
        ),
        ("adapter on disk", f"{summary['adapter_bytes'] / 1e6:.2f} MB  {summary['adapter_path']}"),
        ("peak memory", f"{summary['peak_memory_mb']:,.0f} MB ({summary['device']})"),
        (
            "training",
            f"{summary['train_seconds']:.1f} s, {summary['steps']} steps, "
            f"{summary['examples_per_s']:.1f} examples/s",
        ),
        ("report", str(Path(summary["run"]) / "report.html")),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        typer.echo(f"{key:<{width}}  {value}")


def _config_options(extra: list[inspect.Parameter]) -> list[inspect.Parameter]:
    """``--config`` and ``extra``, then one option per TuneConfig field, all "not given" by
    default so a YAML file's values survive unless the command line names them."""
    from leantune.tune import TuneConfig, option_docs

    hints = typing.get_type_hints(TuneConfig)
    docs = option_docs()
    params = [
        inspect.Parameter(
            "config",
            inspect.Parameter.KEYWORD_ONLY,
            default=None,
            annotation=Annotated[
                Optional[Path],  # noqa: UP045 - typer reads typing.Optional
                typer.Option(help="YAML file of options; options given here override it."),
            ],
        ),
        *extra,
    ]
    for f in fields(TuneConfig):
        base = next(
            a for a in typing.get_args(hints[f.name]) or (hints[f.name],) if a is not type(None)
        )
        flag = "--" + f.name.replace("_", "-")
        default = "" if f.default is MISSING or f.default is None else f" (default: {f.default})"
        decls = [f"{flag}/--no-{flag[2:]}"] if base is bool else [flag]
        option = typer.Option(*decls, help=docs.get(f.name, "") + default, show_default=False)
        params.append(
            inspect.Parameter(
                f.name,
                inspect.Parameter.KEYWORD_ONLY,
                default=None,
                annotation=Annotated[Optional[base], option],  # noqa: UP045
            )
        )
    return params


def _flag(name: str, help: str) -> inspect.Parameter:
    return inspect.Parameter(
        name,
        inspect.Parameter.KEYWORD_ONLY,
        default=False,
        annotation=Annotated[bool, typer.Option(f"--{name}", help=help)],
    )


def _with_signature(func: Any, params: list[inspect.Parameter]) -> Any:
    func.__signature__ = inspect.Signature(params)
    func.__annotations__ = {p.name: p.annotation for p in params} | {"return": None}
    return func


def tune(**kwargs: Any) -> None:
    """Fine-tune a model on a task; writes runs/<name>/ with the adapter, metrics and report.

    With no options: LoRA on the embedded MiniLM-L6 and BBC News (70/10/20 split, seed 0).
    """
    _tune(
        kwargs.pop("config"),
        kwargs.pop("resume"),
        kwargs.pop("overwrite"),
        kwargs.pop("quiet"),
        **kwargs,
    )


def select(**kwargs: Any) -> None:
    """Score which parameters matter for the task and spend --budget on them (a Plan).

    Prints a ranked table, writes plan.json (give it to tune --plan) and a heatmap PNG beside it.
    """
    from leantune.tune import make_config, read_config, run_select

    config, out, overwrite = kwargs.pop("config"), kwargs.pop("out"), kwargs.pop("overwrite")
    given = {k: v for k, v in kwargs.items() if v is not None}
    try:
        cfg = make_config((read_config(config) if config else {}) | given)
        plan, scores = run_select(cfg, out, overwrite=overwrite)
    except LeantuneError as e:
        fail(str(e))
    planned = {
        e.module: f"r={e.size}" if e.method == "lora" else f"{e.method} {e.size:,}"
        for e in plan.entries
    }
    top = sorted(scores.modules, key=lambda m: -sum(m.spectrum[:8]))[:20]
    rows = [("module", "fisher", "taylor", "grad norm", "plan")] + [
        (
            m.name,
            f"{m.fisher:.3g}",
            f"{m.taylor:.3g}",
            f"{m.grad_norm:.3g}",
            planned.get(m.name, "-"),
        )
        for m in top
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    for r in rows:
        typer.echo(
            "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w)
                for i, (c, w) in enumerate(zip(r, widths, strict=True))
            )
        )
    counts = Counter(e.method for e in plan.entries)
    parts = ", ".join(f"{n} {m}" for m, n in counts.items())
    typer.echo(
        f"plan: {parts} module(s), {plan.params:,} of "
        f"{plan.budget:,} budgeted parameters ({100 * plan.params / plan.base_params:.3f}% of "
        f"{plan.base_params:,}); scored {scores.examples} examples in {scores.seconds:.1f} s"
    )
    typer.echo(f"wrote {out} and {Path(out).with_suffix('.png')}")


app.command("tune")(
    _with_signature(
        tune,
        _config_options(
            [
                _flag("resume", "Continue the run folder's last checkpoint."),
                _flag("overwrite", "Replace an existing run folder."),
                _flag("quiet", "No progress bar or per-eval lines."),
            ]
        ),
    )
)
app.command("select")(
    _with_signature(
        select,
        _config_options(
            [
                inspect.Parameter(
                    "out",
                    inspect.Parameter.KEYWORD_ONLY,
                    default=Path("plan.json"),
                    annotation=Annotated[Path, typer.Option(help="Where to write the plan.")],
                ),
                _flag("overwrite", "Replace an existing plan file (and its heatmap)."),
            ]
        ),
    )
)


# ---------------------------------------------------------------------------- compare


def _common(config: Path | None, options: dict[str, Any], command: str) -> dict[str, Any]:
    """Options shared by every run of compare/sweep: --config's YAML, then the command line."""
    from leantune.tune import read_config

    common = (read_config(config) if config else {}) | {
        k: v for k, v in options.items() if v is not None
    }
    for key in ("name", "runs_dir"):
        if key in common:
            fail(f"{command} names its runs itself; drop --{key.replace('_', '-')} (use --out)")
    return common


def compare(**kwargs: Any) -> None:
    """Run several strategies on the same data and split; write a table, Pareto plots and a report.

    Each strategy is an ordinary run folder under --out; finished ones are not redone. The other
    options apply to every strategy unless the strategy sets them.
    """
    from leantune.compare import load_strategies, markdown_table, run_compare

    config, out, spec = kwargs.pop("config"), kwargs.pop("out"), kwargs.pop("strategies")
    quiet = kwargs.pop("quiet")
    try:
        strategies, preset_common = load_strategies(spec)
        common = preset_common | _common(config, kwargs, "compare")
        result = run_compare(
            strategies,
            common,
            out,
            log=None if quiet else (lambda s: typer.echo(s, err=True)),
            runner=lambda cfg, **kw: _run_with_progress(cfg, kw["resume"], kw["overwrite"], quiet),
        )
    except LeantuneError as e:
        fail(str(e))
    if result.get("interrupted"):
        typer.echo(
            f"leantune: interrupted in {result['strategy']}; run the same command to continue",
            err=True,
        )
        raise typer.Exit(130)
    typer.echo(markdown_table(result["rows"], result["metric"]), nl=False)
    typer.echo(f"recommendation: {result['recommendation']}")
    typer.echo(f"report: {Path(out) / 'report.html'}")
    if result["failed"]:
        names = ", ".join(result["failed"])
        fail(
            f"{len(result['failed'])} of {len(result['rows'])} strategies failed ({names}; "
            "their errors are in the table); fix them and run the same command again"
        )


def _option(name: str, annotation: Any, default: Any) -> inspect.Parameter:
    return inspect.Parameter(
        name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation
    )


app.command("compare")(
    _with_signature(
        compare,
        _config_options(
            [
                _option(
                    "strategies",
                    Annotated[
                        str,
                        typer.Option(
                            help="A preset (default, lora) or a YAML file: a list of strategy "
                            "names (full, head, bitfit, layernorm, lora-qv, lora-all, dora, "
                            "auto-<budget>) or {name: ..., use: <name>, <option>: ...} mappings; "
                            "or {strategies: [...], common: {...}}."
                        ),
                    ],
                    "default",
                ),
                _option(
                    "out",
                    Annotated[Path, typer.Option(help="The comparison folder.")],
                    Path("runs/compare"),
                ),
                _flag("quiet", "No progress bars or per-eval lines."),
            ]
        ),
    )
)


# ---------------------------------------------------------------------------- sweep


def sweep(**kwargs: Any) -> None:
    """Search hyperparameters with Optuna (TPE, median pruning after each epoch).

    The study lives in <out>/study.db: run the same command again after an interruption and it
    goes on where it stopped. The best configuration is written to <out>/best.yaml for
    leantune tune --config. The other options are fixed for every trial.
    """
    from leantune.sweep import read_space, run_sweep

    config, out, space, trials = (kwargs.pop(k) for k in ("config", "out", "space", "trials"))
    quiet = kwargs.pop("quiet")
    try:
        common = {"reference_examples": 0} | _common(config, kwargs, "sweep")
        result = run_sweep(
            common,
            read_space(space),
            out,
            trials,
            seed=int(common.get("seed", 0)),
            log=None if quiet else (lambda s: typer.echo(s, err=True)),
            runner=lambda cfg, **kw: _run_with_progress(
                cfg, False, False, quiet, on_validation=kw["on_validation"]
            ),
        )
    except LeantuneError as e:
        fail(str(e))
    if result.get("interrupted"):
        typer.echo("leantune: interrupted; run the same command to continue the sweep", err=True)
        raise typer.Exit(130)
    best = result["best"]
    typer.echo(
        f"{result['finished']} trials finished, {result['pruned']} pruned; "
        + (
            f"best: trial {best['number']}, validation {result['metric']} {best['value']:.4f}, "
            f"{json.dumps(best['params'])}"
            if best
            else "no trial completed"
        )
    )
    if best:
        typer.echo(f"re-run it: leantune tune --config {Path(out) / 'best.yaml'}")
    typer.echo(f"report: {Path(out) / 'report.html'}")


app.command("sweep")(
    _with_signature(
        sweep,
        _config_options(
            [
                _option(
                    "space",
                    Annotated[
                        Optional[Path],  # noqa: UP045
                        typer.Option(
                            help="YAML search space: option: {low, high, log?, step?} or "
                            "option: {choices: [...]} (default: lr, r, schedule, layer_decay, l2)."
                        ),
                    ],
                    None,
                ),
                _option(
                    "trials",
                    Annotated[int, typer.Option(help="Trials to finish (pruned ones count).")],
                    12,
                ),
                _option(
                    "out",
                    Annotated[Path, typer.Option(help="The sweep folder.")],
                    Path("runs/sweep"),
                ),
                _flag("quiet", "No progress bars or per-eval lines."),
            ]
        ),
    )
)


# ---------------------------------------------------------------------------- eval / predict


@app.command("eval")
def eval_(
    run: RunArg,
    data: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option(help="Labelled .csv/.jsonl/datasets folder (default: the run's test split)."),
    ] = None,
    split: Annotated[str, typer.Option(help="test or val, when --data is not given.")] = "test",
) -> None:
    """Evaluate a saved run on its test split or on another labelled file; prints JSON."""
    from leantune.tune import evaluate_run

    try:
        metrics = evaluate_run(run, data, split)
    except LeantuneError as e:
        fail(str(e))
    typer.echo(json.dumps(metrics, indent=2))


@app.command()
def predict(
    run: RunArg,
    text: Annotated[
        Optional[list[str]],  # noqa: UP045
        typer.Option("--text", help="A text to classify (repeatable)."),
    ] = None,
    input: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option(help="A .csv/.jsonl/datasets folder whose text column to classify."),
    ] = None,
    out: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option(
            help="Write the predictions here instead of standard output: a .jsonl file (JSON "
            "Lines) or a .csv file (text,label,score). Missing folders are made."
        ),
    ] = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace an existing --out file.")
    ] = False,
) -> None:
    """Predict labels for texts with a saved classification run: one JSON line per text."""
    from leantune.outputs import check_predictions_out, format_predictions, write_text
    from leantune.tune import predict_run

    if not text and input is None:
        fail("give texts with --text or a file with --input")
    try:
        if out is not None:  # checked before the model loads
            check_predictions_out(out, overwrite, [input] if input else [], [run])
        rows = predict_run(run, list(text or []), input)
        lines = format_predictions(rows, out.suffix if out else ".jsonl")
        if out is not None:
            write_text(out, lines)
    except LeantuneError as e:
        fail(str(e))
    if out is None:
        typer.echo(lines, nl=False)
    else:
        typer.echo(f"{len(rows)} predictions written to {out}", err=True)


@app.command()
def merge(
    run: RunArg,
    out: Annotated[Path, typer.Option(help="Folder for the merged transformers model.")],
    overwrite: Annotated[
        bool,
        typer.Option(
            "--overwrite", help="Replace an --out folder an earlier merge wrote (nothing else)."
        ),
    ] = False,
) -> None:
    """Export the run as a plain transformers model folder, adapter merged in.

    The folder holds the tokenizer too and loads with from_pretrained, without leantune or peft.
    It may not be the run or its base model; .leantune-merge.json lists the files merge wrote.
    """
    from leantune.tune import merge_run

    try:
        folder = merge_run(run, out, overwrite)
    except LeantuneError as e:
        fail(str(e))
    typer.echo(f"merged model written to {folder}")


# ---------------------------------------------------------------------------- info


@app.command()
def info(
    path: Annotated[
        Path,
        typer.Argument(help="An adapter folder (adapter_config.json + safetensors) or a run."),
    ],
) -> None:
    """Show what an adapter or run folder holds: method, targets, ranks, sizes, scores."""
    from leantune.formats import describe
    from leantune.runfolder import RunFolder

    rows: list[tuple[str, str]] = []
    partial = RunFolder(path.parent, path.name)
    if not path.exists() and partial.work.is_dir():  # a run that has not finished
        step = partial.checkpoint_step()
        state = f"checkpoint at step {step}; resume it" if step is not None else "no checkpoint"
        _print_rows([("status", f"unfinished ({state})"), ("folder", str(partial.work))])
        return
    if (path / "config.yaml").is_file():  # a run folder
        summary_file = path / "summary.json"
        if summary_file.is_file():
            summary = json.loads(summary_file.read_text())
            for key in ("method", "task", "model", "test_accuracy", "test_macro_f1"):
                if key in summary:
                    rows.append((key, str(summary[key])))
            for key in ("test_perplexity", "trainable_params", "train_seconds", "steps"):
                if key in summary:
                    rows.append((key, str(summary[key])))
        else:
            state = "checkpoint saved; resume it" if (path / "checkpoint").exists() else "no result"
            rows.append(("status", f"unfinished ({state})"))
        if not (path / "adapter").is_dir():
            _print_rows([*rows, ("weights", str(path / "trained"))])
            return
        path = path / "adapter"
    try:
        rows += describe(path)
    except LeantuneError as e:
        fail(str(e))
    _print_rows(rows)


@app.command()
def report(run: RunArg) -> None:
    """Rebuild report.html and its plots from a finished run's files."""
    from leantune.runfolder import RunFolder, read_marker, write_marker
    from leantune.tune import write_run_report

    try:
        folder = RunFolder(run.parent, run.name)
        with folder.lock():
            folder.recover()
            page = write_run_report(run)
            if read_marker(run) is not None:
                write_marker(run, run.name)  # the plots it wrote are leantune's files
    except LeantuneError as e:
        fail(str(e))
    typer.echo(f"report written to {page}")


def _print_rows(rows: list[tuple[str, str]]) -> None:
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        typer.echo(f"{key:<{width}}  {value}")


def main() -> None:  # pragma: no cover - console entry point
    try:
        app()
    except LeantuneError as e:
        print(f"leantune: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":  # pragma: no cover
    main()
