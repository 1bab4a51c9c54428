"""``leantune export``: a finished run to a transformers folder, GGUF, Ollama or vLLM."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from leantune.cli.common import RunArg, app, fail
from leantune.core.errors import LeantuneError


@app.command()
def export(
    run: RunArg,
    to: Annotated[
        str,
        typer.Option(
            "--to",
            help="hf: merged transformers folder; gguf: one GGUF file for llama.cpp; ollama: "
            "the GGUF and a Modelfile; vllm: the LoRA adapter checked against vLLM's loader.",
        ),
    ],
    out: Annotated[Path, typer.Option(help="Folder to write (a new one, or one export wrote).")],
    dtype: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(help="hf, vllm: bf16, fp16 or fp32 (default: hf fp32, vllm bf16)."),
    ] = None,
    quant: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(
            help="gguf, ollama: f16, bf16 or q8_0 (default f16); q4_k_m, q5_k_m, q6_k through "
            "llama.cpp's quantizer (needs llama-cpp-python)."
        ),
    ] = None,
    overwrite: Annotated[
        bool,
        typer.Option("--overwrite", help="Replace an --out folder an earlier export wrote."),
    ] = False,
) -> None:
    """Export a run where models are served: the merged model (hf, gguf, ollama) or the adapter
    (vllm), with the chat template the run trained with and its end-of-turn token as a stop."""
    from leantune.export import export_run

    try:
        folder, commands = export_run(run, to, out, dtype=dtype, quant=quant, overwrite=overwrite)
    except LeantuneError as e:
        fail(str(e))
    typer.echo(f"{to} export written to {folder}")
    for command in commands:
        typer.echo(command)
