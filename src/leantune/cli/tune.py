"""``leantune tune`` and ``leantune select``: their options are generated from TuneConfig."""

from __future__ import annotations

import inspect
from collections import Counter
from pathlib import Path
from typing import Annotated, Any

import typer

from leantune.adapters.planning import Scores
from leantune.adapters.targets import layer_index
from leantune.analysis.plan import HEAD, Plan, entry_label, uniform_plan
from leantune.cli.common import app, config_options, fail, flag, with_signature
from leantune.core.errors import LeantuneError


def _tune(config: Path | None, resume: bool, overwrite: bool, quiet: bool, **options: Any) -> None:
    from leantune.core.distributed import leave, speaks
    from leantune.tune import TuneConfig, make_config, read_config
    from leantune.tune.runfolder import RunFolder

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
        summary = run_with_progress(cfg, resume, overwrite, quiet or not speaks())
    except LeantuneError as e:
        leave(together=False)
        if not speaks(e):
            raise typer.Exit(2) from None  # rank 0 says it
        fail(str(e))
    leave()
    if not speaks():
        return
    if summary.get("interrupted"):
        typer.echo(
            f"leantune: interrupted after step {summary['step']}; checkpoint saved. Continue with: "
            f"leantune tune --name {Path(summary['run']).name} --resume",
            err=True,
        )
        raise typer.Exit(130)
    _print_summary(summary)


def run_with_progress(
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
        ("peak memory", _peak_line(summary)),
        (
            "training",
            f"{summary['train_seconds']:.1f} s, {summary['steps']} steps, "
            f"{summary['examples_per_s']:.1f} examples/s",
        ),
        ("whole run", _time_line(summary)),
        ("report", str(Path(summary["run"]) / "report.html")),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        typer.echo(f"{key:<{width}}  {value}")


def _peak_line(summary: dict[str, Any]) -> str:
    """The whole run's peak: the GPU's and the host's on CUDA; the largest rank's under
    torchrun."""
    line = f"{summary['peak_memory_mb']:,.0f} MB ({summary['device']}"
    if "host_peak_memory_mb" in summary:
        line += f"; host {summary['host_peak_memory_mb']:,.0f} MB"
    if "peak_memory_mb_by_rank" in summary:
        line += f"; the largest of {len(summary['peak_memory_mb_by_rank'])} ranks"
    return line + ", whole run)"


def _time_line(summary: dict[str, Any]) -> str:
    """The run's wall time, where it went, and the process's (imports included)."""
    phases = summary.get("phase_seconds") or {}
    top = sorted(phases.items(), key=lambda kv: -kv[1])[:3]
    line = f"{summary.get('wall_seconds', 0.0):.1f} s"
    if top:
        line += " (" + ", ".join(f"{k} {v:.1f} s" for k, v in top) + ")"
    if "process_seconds" in summary:
        line += f"; the process {summary['process_seconds']:.1f} s since it started"
    return line


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


def uniform_line(plan: Plan, scores: Scores) -> str:
    """The hand-placed LoRA recipe of the plan's size (the one it is expected to beat)."""
    heads = [(e.module, e.params) for e in plan.entries if e.method == HEAD]
    try:
        uniform = uniform_plan(scores.modules, plan.budget, plan.base_params, heads)
    except LeantuneError as e:
        return f"to beat: no uniform LoRA recipe of this size ({e})"
    entries = uniform.of("lora")
    ranks = sorted({e.size for e in entries})
    layers = sorted({layer_index(e.module) for e in entries}, key=lambda i: i or 0)
    return (
        f"to beat: uniform LoRA of the same size: rank {'/'.join(map(str, ranks))} on all "
        f"{len(entries)} linear modules of layer(s) {', '.join(map(str, layers))} "
        f"({uniform.params:,} parameters with the head); about: leantune tune --layers "
        f"{','.join(map(str, layers))} --r {ranks[0]}"
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
        plan, scores, probe = run_select(cfg, out, overwrite=overwrite)
    except LeantuneError as e:
        fail(str(e))
    planned = {e.module: entry_label(e) for e in plan.entries}
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
    typer.echo(uniform_line(plan, scores))
    if probe:
        typer.echo(
            "probe (the frozen model with a fitted head; the score to beat): validation "
            + ", ".join(f"{k} {v:.4f}" for k, v in probe.items())
        )
    typer.echo(f"wrote {out} and {Path(out).with_suffix('.png')}")


app.command("tune")(
    with_signature(
        tune,
        config_options(
            [
                flag("resume", "Continue the run folder's last checkpoint."),
                flag("overwrite", "Replace an existing run folder."),
                flag("quiet", "No progress bar or per-eval lines."),
            ]
        ),
    )
)
app.command("select")(
    with_signature(
        select,
        config_options(
            [
                inspect.Parameter(
                    "out",
                    inspect.Parameter.KEYWORD_ONLY,
                    default=Path("plan.json"),
                    annotation=Annotated[Path, typer.Option(help="Where to write the plan.")],
                ),
                flag("overwrite", "Replace an existing plan file (and its heatmap)."),
            ]
        ),
    )
)
