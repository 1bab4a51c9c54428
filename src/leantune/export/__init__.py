"""From a finished run to where models are served: ``leantune export RUN --to hf|gguf|ollama|vllm``.

- ``hf`` (:mod:`~leantune.export.hf`): the merged model as a transformers folder in ``--dtype``,
  with the tokenizer, the run's chat template and the stop ids in ``generation_config.json``
  (``leantune merge`` is this target at fp32);
- ``gguf`` (:mod:`~leantune.export.gguf_file`, :mod:`~leantune.export.gguf_vocab`): one GGUF
  file in ``--quant`` f16, bf16 or q8_0, for llama.cpp;
- ``ollama`` (:mod:`~leantune.export.ollama`): that file and a Modelfile;
- ``vllm`` (:mod:`~leantune.export.vllm`): the LoRA adapter checked against vLLM's loader, and
  the ``vllm serve`` line.

Every export is a folder at ``--out``, built beside it and renamed into place, with
``.leantune-merge.json`` listing its files; ``--overwrite`` replaces only such a folder.
"""

from __future__ import annotations

from pathlib import Path

from leantune.export.common import DTYPES, QUANTS, TARGETS, Request, check_request, stop_ids


def export_run(
    run: Path,
    to: str,
    out: Path,
    *,
    dtype: str | None = None,
    quant: str | None = None,
    overwrite: bool = False,
) -> tuple[Path, list[str]]:
    """Export ``run`` to ``out``; returns the folder and the commands that serve it (empty for
    hf and gguf). Bad input raises ``LeantuneError`` before anything is written."""
    request = check_request(run, to, out, dtype=dtype, quant=quant, overwrite=overwrite)
    if to == "hf":
        from leantune.export.hf import export_hf

        return export_hf(request), []
    if to == "gguf":
        from leantune.export.gguf_file import export_gguf

        return export_gguf(request), []
    if to == "ollama":
        from leantune.export.ollama import export_ollama

        return export_ollama(request)
    from leantune.export.vllm import export_vllm

    folder, line = export_vllm(request)
    return folder, [line]


__all__ = ["DTYPES", "QUANTS", "TARGETS", "Request", "check_request", "export_run", "stop_ids"]
