"""Commands on a saved run or adapter: eval, predict, generate, merge, info, report."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from leantune.cli.common import RunArg, app, fail, print_rows
from leantune.core.errors import LeantuneError


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
    from leantune.tune import predict_run
    from leantune.tune.outputs import check_predictions_out, format_predictions, write_text

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
    """Export the run as a plain transformers model folder, adapter merged in (fp32).

    The folder holds the tokenizer too and loads with from_pretrained, without leantune or peft.
    It may not be the run or its base model; .leantune-merge.json lists the files merge wrote.
    The same as ``leantune export RUN --to hf --dtype fp32``.
    """
    from leantune.export import export_run

    try:
        folder, _ = export_run(run, "hf", out, dtype="fp32", overwrite=overwrite)
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
    from leantune.adapters.formats import describe
    from leantune.tune.runfolder import RunFolder

    rows: list[tuple[str, str]] = []
    partial = RunFolder(path.parent, path.name)
    if not path.exists() and partial.work.is_dir():  # a run that has not finished
        step = partial.checkpoint_step()
        state = f"checkpoint at step {step}; resume it" if step is not None else "no checkpoint"
        print_rows([("status", f"unfinished ({state})"), ("folder", str(partial.work))])
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
            print_rows([*rows, ("weights", str(path / "trained"))])
            return
        path = path / "adapter"
    try:
        rows += describe(path)
    except LeantuneError as e:
        fail(str(e))
    print_rows(rows)


@app.command()
def report(run: RunArg) -> None:
    """Rebuild report.html and its plots from a finished run's files."""
    from leantune.tune import write_run_report
    from leantune.tune.runfolder import RunFolder, read_marker, write_marker

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


@app.command()
def generate(
    run: RunArg,
    prompt: Annotated[
        Optional[list[str]],  # noqa: UP045
        typer.Option("--prompt", help="A prompt to answer (repeatable)."),
    ] = None,
    input: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option(
            help="A .jsonl/.csv/datasets folder of prompts (the run's --prompt-column, or a "
            "messages column of {role, content} lists) to answer."
        ),
    ] = None,
    out: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option(help="Write the answers here as JSON Lines (prompt, answer)."),
    ] = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace an existing --out file.")
    ] = False,
    system: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(help="A system prompt put before each --prompt."),
    ] = None,
    max_new_tokens: Annotated[int, typer.Option(help="The longest answer, in tokens.")] = 128,
    temperature: Annotated[
        float, typer.Option(help="0 answers greedily; above 0 samples at that temperature.")
    ] = 0.0,
    top_p: Annotated[
        float, typer.Option(help="Nucleus sampling share (with --temperature).")
    ] = 1.0,
    seed: Annotated[int, typer.Option(help="Seed for sampling.")] = 0,
) -> None:
    """Answer prompts with a saved instruct (or causal-lm) run. One --prompt and no --out:
    the answer is streamed to the terminal as it is generated; otherwise one JSON line per
    prompt."""
    import torch

    from leantune.analysis.generate import Sampling
    from leantune.tune import generate_run
    from leantune.tune.outputs import check_predictions_out, write_text

    if not prompt and input is None:
        fail("give prompts with --prompt or a file with --input")
    try:
        sampling = Sampling(max_new_tokens, temperature, top_p)
        if out is not None:  # checked before the model loads
            if out.suffix.lower() != ".jsonl":
                fail(f"--out {out}: answers are written as JSON Lines; name a .jsonl file")
            check_predictions_out(out, overwrite, [input] if input else [], [run])
        torch.manual_seed(seed)
        stream = len(prompt or []) == 1 and input is None and out is None
        streamer = _terminal_streamer() if stream else None
        rows = generate_run(run, list(prompt or []), input, sampling, system, streamer)
        lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        if out is not None:
            write_text(out, lines)
    except LeantuneError as e:
        fail(str(e))
    if stream:
        typer.echo("")
    elif out is None:
        typer.echo(lines, nl=False)
    else:
        typer.echo(f"{len(rows)} answers written to {out}", err=True)


def _terminal_streamer() -> object:
    """Prints the new tokens as they come (transformers' TextStreamer), built once the run's
    tokenizer is loaded: ``generate_run`` calls it with the tokenizer."""
    from transformers import TextStreamer

    return lambda tok: TextStreamer(tok, skip_prompt=True, skip_special_tokens=True)
