"""``leantune combine``: a weighted combination of saved adapters, written as a new adapter.

The inputs are run folders (their ``adapter/``) or adapter folders. The base model is loaded
once, from the first run's recorded model and task (an adapter folder does not say which
labels or task it was trained for, so at least one run is needed); every run must record the
same model, task and labels. Each adapter is loaded under its own name (``in1``, ``in2`` ...),
combined with :func:`leantune.adapters.combine`, and the result is saved in peft's format to ``--out``
the way ``merge`` writes its folder: built beside it and renamed into place, with
``.leantune-merge.json`` listing the files; ``--overwrite`` replaces only such a folder.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from leantune.adapters.combine import COMBINATIONS, combination
from leantune.cli.common import app, fail
from leantune.core.errors import LeantuneError


def _weights(text: str, count: int) -> list[float]:
    try:
        values = [float(w) for w in text.split(",")]
    except ValueError:
        raise LeantuneError(f"--weights {text!r}: give numbers separated by commas") from None
    if len(values) != count:
        raise LeantuneError(f"--weights gives {len(values)} weights for {count} adapters")
    if not all(math.isfinite(w) for w in values):
        raise LeantuneError(f"--weights {text!r}: every weight must be a finite number")
    return values


def _inputs(paths: list[Path]) -> tuple[list[Path], list[Path]]:
    """Each input's adapter folder, and the run folders among the inputs."""
    from leantune.adapters.config import METHODS
    from leantune.adapters.formats import CONFIG_NAME
    from leantune.tune.config import make_config, read_config

    adapters, runs = [], []
    for path in paths:
        if (path / "config.yaml").is_file():
            if not (path / "summary.json").is_file():
                raise LeantuneError(
                    f"{path} has not finished; finish it with leantune tune --resume"
                )
            method = make_config(read_config(path / "config.yaml")).method
            if method not in METHODS:
                raise LeantuneError(
                    f"{path} trained --method {method}; it has no adapter to combine"
                )
            adapters.append(path / "adapter")
            runs.append(path)
        elif (path / CONFIG_NAME).is_file():
            adapters.append(path)
        else:
            raise LeantuneError(f"{path} is neither a leantune run folder nor an adapter folder")
    if not runs:
        raise LeantuneError(
            "give at least one run folder: it records the base model and task the adapters "
            "are loaded on"
        )
    return adapters, runs


def _base(runs: list[Path]) -> tuple[Any, Path, list[str]]:
    """The first run's config, its base model folder and labels; the other runs must agree."""
    from leantune.models.loading import model_dir
    from leantune.tune.config import make_config, read_config

    seen = []
    for run in runs:
        config = make_config(read_config(run / "config.yaml"))
        labels = (
            json.loads((run / "labels.json").read_text()) if (run / "labels.json").exists() else []
        )
        seen.append((config, model_dir(config.model, config.task).resolve(), labels))
    first = seen[0]
    for run, (config, folder, labels) in zip(runs, seen, strict=True):
        if (folder, config.task, labels) != (first[1], first[0].task, first[2]):
            raise LeantuneError(
                f"{run} was trained on {folder} ({config.task}, {len(labels)} labels), "
                f"{runs[0]} on {first[1]} ({first[0].task}, {len(first[2])} labels); combine "
                "adapters of one base model, task and label set"
            )
    return first


def combine_folders(
    paths: list[Path], weights: list[float], out: Path, overwrite: bool, **options: Any
) -> Path:
    """Combine the adapters of ``paths`` (runs or adapter folders) into the adapter folder
    ``out``. Everything is checked before the model loads; ``options`` go to ``combine``."""
    import torch

    from leantune.adapters.combine import combine
    from leantune.adapters.formats import load_adapter, save_adapter
    from leantune.models.loading import load_model, load_tokenizer
    from leantune.tune.outputs import check_merge_out, write_merged_folder

    adapters, runs = _inputs(paths)
    config, folder, labels = _base(runs)
    head = options.pop("head")
    if head is not None and not 1 <= head <= len(paths):
        raise LeantuneError(f"--head {head}: give the position of an input, 1 to {len(paths)}")
    how = {k: options[k] for k in ("density", "majority_sign_method", "svd_rank", "seed")}
    combination(options["method"], **how)  # refused here, before the model loads
    for source in adapters:
        check_merge_out(out, overwrite, source, folder)
    tok = load_tokenizer(folder)
    torch.manual_seed(config.seed)
    model = load_model(folder, config.task, labels, tok.pad_token_id, config.pooling)
    names = [f"in{i}" for i in range(1, len(adapters) + 1)]
    for name, source in zip(names, adapters, strict=True):
        load_adapter(model, source, name)
    combine(
        model,
        dict(zip(names, weights, strict=True)),
        options["method"],
        "combined",
        head=None if head is None else names[head - 1],
        **how,
    )

    def fill(tmp: Path) -> None:
        save_adapter(model, tmp, "combined")

    return write_merged_folder(
        out,
        fill,
        command="combine",
        inputs=[str(p.resolve()) for p in paths],
        weights=weights,
        **options,
    )


@app.command("combine")
def combine_(
    inputs: Annotated[
        list[Path],
        typer.Argument(help="Run folders or adapter folders (at least one run, for the model)."),
    ],
    weights: Annotated[str, typer.Option(help="One weight per input, by commas: 0.7,0.3")],
    out: Annotated[Path, typer.Option(help="Folder for the combined adapter (peft's format).")],
    method: Annotated[str, typer.Option(help=f"One of {', '.join(COMBINATIONS)}.")] = "linear",
    density: Annotated[
        Optional[float],  # noqa: UP045
        typer.Option(help="Share of entries kept, in (0, 1] (ties, dare_*, magnitude_prune)."),
    ] = None,
    majority_sign_method: Annotated[
        str, typer.Option(help="total or frequency: how ties elects the sign.")
    ] = "total",
    svd_rank: Annotated[
        Optional[int],  # noqa: UP045
        typer.Option(help="Rank of the *svd results (default: the largest input rank)."),
    ] = None,
    seed: Annotated[
        Optional[int],  # noqa: UP045
        typer.Option(help="Seed for DARE's random masks."),
    ] = None,
    head: Annotated[
        Optional[int],  # noqa: UP045
        typer.Option(help="Keep the trained head of this input (1 = the first)."),
    ] = None,
    overwrite: Annotated[
        bool,
        typer.Option("--overwrite", help="Replace an --out folder an earlier combine wrote."),
    ] = False,
) -> None:
    """Combine saved adapters with weights (linear, cat, svd, ties, DARE ...) into one."""
    try:
        folder = combine_folders(
            list(inputs),
            _weights(weights, len(inputs)),
            out,
            overwrite,
            method=method,
            density=density,
            majority_sign_method=majority_sign_method,
            svd_rank=svd_rank,
            seed=seed,
            head=head,
        )
    except LeantuneError as e:
        fail(str(e))
    typer.echo(f"combined adapter written to {folder}")
