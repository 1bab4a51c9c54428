"""Files and folders that ``predict --out``, ``merge --out`` and ``select --out`` write.

Each target is checked before any work is done: never an input, never inside the run or its
base model, never an existing file or folder unless ``--overwrite``, and a folder only when
leantune wrote it. Files are written beside the target and renamed over it, so a failure leaves
the old one whole; missing parent folders are created.

A merged model folder holds ``.leantune-merge.json``, the list of the files merge wrote.
``merge --overwrite`` replaces a folder only when it holds that marker and nothing but the
listed files; the user's own files are never deleted.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from leantune.core.errors import LeantuneError

MERGE_MARKER = ".leantune-merge.json"
PREDICTION_FORMATS = (".jsonl", ".csv")
PREDICTION_COLUMNS = ("text", "label", "score")


def same_or_inside(path: Path, folder: Path) -> bool:
    """Whether ``path`` is ``folder`` or lies inside it, symlinks and ``..`` resolved."""
    return Path(path).resolve().is_relative_to(Path(folder).resolve())


def check_parent(path: Path) -> None:
    """Refuse a path whose folder cannot be made: a file stands where a folder must go."""
    for parent in Path(path).absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise LeantuneError(f"{parent} is a file; {path} cannot be made inside it")
            return


def write_text(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path``, then rename it over ``path``."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise LeantuneError(f"cannot write {path}: {e.strerror}") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise LeantuneError(f"cannot write {path}: {e.strerror}") from None
        raise


# ---------------------------------------------------------------------------- predictions


def check_predictions_out(
    out: Path, overwrite: bool, inputs: Iterable[Path] = (), protected: Iterable[Path] = ()
) -> None:
    """Refuse an ``--out`` predict must not write: a wrong extension, a folder, one of
    ``inputs`` (even with --overwrite), a path inside a ``protected`` folder, or an existing
    file without --overwrite."""
    out = Path(out)
    check_parent(out)
    if out.suffix.lower() not in PREDICTION_FORMATS:
        raise LeantuneError(
            f"--out {out}: name a .jsonl (JSON Lines) or .csv file; the extension sets the format"
        )
    if out.is_dir():
        raise LeantuneError(f"--out {out} is a folder; give a .jsonl or .csv file path")
    for source in inputs:
        if same_or_inside(out, source):
            raise LeantuneError(
                f"--out {out} is the --input {source}; write the predictions to another file"
            )
    for folder in protected:
        if same_or_inside(out, folder):
            raise LeantuneError(
                f"--out {out} is inside the run folder {folder}; write the predictions elsewhere"
            )
    if out.exists() and not overwrite:
        raise LeantuneError(f"{out} exists; pass --overwrite to replace it")


def check_finite_scores(rows: Sequence[Mapping[str, Any]], run: Path) -> None:
    bad = sum(not math.isfinite(float(r["score"])) for r in rows)
    if bad:
        raise LeantuneError(
            f"{run} gives non-finite scores (NaN or inf) for {bad} of {len(rows)} texts: the "
            "run's or its base model's weights are broken; retrain the run"
        )


def format_predictions(rows: Sequence[Mapping[str, Any]], suffix: str = ".jsonl") -> str:
    """JSON Lines (valid JSON: no NaN) or, for ``.csv``, CSV with a header."""
    try:
        if suffix.lower() == ".csv":
            buffer = io.StringIO()
            writer = csv.DictWriter(
                buffer, fieldnames=PREDICTION_COLUMNS, lineterminator="\n", extrasaction="ignore"
            )
            writer.writeheader()
            for row in rows:
                if not math.isfinite(float(row["score"])):
                    raise ValueError("non-finite score")
                writer.writerow(row)
            return buffer.getvalue()
        return "".join(json.dumps(r, ensure_ascii=False, allow_nan=False) + "\n" for r in rows)
    except ValueError:
        raise LeantuneError(
            "a prediction's score is not a finite number; the run's weights are broken"
        ) from None


# ---------------------------------------------------------------------------- merged folders


def check_merge_out(out: Path, overwrite: bool, run: Path, model: Path) -> None:
    """Refuse an ``--out`` merge must not write: a file, the run or its base model (or a folder
    inside or around either), a folder with files unless --overwrite, and with --overwrite a
    folder merge did not write or that holds files merge did not write."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise LeantuneError(f"--out {out} is a file; give a folder for the merged model")
    check_parent(out)
    for folder, what in ((model, "the run's base model"), (run, "the run")):
        if same_or_inside(out, folder):
            raise LeantuneError(
                f"--out {out} is {what} {folder} or inside it; give a new folder for the merged "
                "model"
            )
        if same_or_inside(folder, out):
            raise LeantuneError(
                f"--out {out} holds {what} {folder}; give a new folder for the merged model"
            )
    if out.is_symlink():
        raise LeantuneError(f"--out {out} is a symbolic link; give the folder itself")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not overwrite:
        raise LeantuneError(f"{out} exists and is not empty; pass --overwrite to replace it")
    listed = merge_files(out)
    if listed is None:
        raise LeantuneError(
            f"{out} was not written by leantune merge (no {MERGE_MARKER}); not deleting it: "
            "give a new --out folder"
        )
    foreign = sorted(set(_listing(out)) - set(listed))
    if foreign:
        shown = ", ".join(foreign[:3]) + (" ..." if len(foreign) > 3 else "")
        raise LeantuneError(
            f"{out} holds files leantune merge did not write ({shown}); not deleting them: move "
            "them or give a new --out folder"
        )


def merge_files(folder: Path) -> list[str] | None:
    """The files a merged folder's marker lists; None when there is no readable marker."""
    try:
        marker = json.loads((Path(folder) / MERGE_MARKER).read_text())
    except (OSError, ValueError):
        return None
    files = marker.get("files") if isinstance(marker, dict) else None
    if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
        return None
    return files


def _listing(folder: Path) -> list[str]:
    return sorted(
        p.relative_to(folder).as_posix()
        for p in folder.rglob("*")
        if (p.is_file() or p.is_symlink()) and p.name != MERGE_MARKER
    )


def write_merged_folder(out: Path, fill: Callable[[Path], None], **about: Any) -> Path:
    """Build the folder with ``fill(tmp)`` beside ``out``, add the marker, then switch it in;
    the old folder (checked by :func:`check_merge_out`) loses only the files merge wrote."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        fill(tmp)
        marker = {"leantune": "merge", **about, "files": _listing(tmp)}
        (tmp / MERGE_MARKER).write_text(json.dumps(marker, indent=1) + "\n")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old: Path | None = None
    if out.exists():
        with contextlib.suppress(OSError):
            out.rmdir()  # an empty folder
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
        os.replace(out, old)  # replaces the empty folder mkdtemp made
    os.replace(tmp, out)
    if old is not None:
        _remove_listed(old, merge_files(old) or [])
    return out


def _remove_listed(folder: Path, files: Iterable[str]) -> None:
    """Delete the listed files and the marker, then the folders left empty; anything else (a
    file that appeared since the check) stays where it is."""
    for name in [*files, MERGE_MARKER]:
        if Path(name).is_absolute() or ".." in Path(name).parts:
            continue  # not a name merge writes
        path = folder / name
        if path.is_file() or path.is_symlink():
            path.unlink()
    for sub in sorted((p for p in folder.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
        with contextlib.suppress(OSError):
            sub.rmdir()
    with contextlib.suppress(OSError):
        folder.rmdir()
