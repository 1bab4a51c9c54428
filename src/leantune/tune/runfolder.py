"""A run folder's life: locked, built beside the old one, switched in whole, deleted only by list.

``runs/<name>/`` is the finished run the user sees. While a run trains, everything is written
into ``runs/.<name>.partial/`` (config, metrics, the checkpoint, then the adapter, the report and
``summary.json`` last); only a finished run replaces ``runs/<name>/``, by renames. So a run that
fails or is killed, at any moment, leaves the previous run of that name whole, and its own
partial folder resumable (``--resume``) or, without a checkpoint, simply started over.

Every folder leantune builds holds ``.leantune-run.json``: the run's name and, once finished,
the list of files it wrote. Replacing a finished run deletes those files only, and refuses a
folder that holds anything else (the user's own files) or has no such marker. The hidden
partial folder is leantune's alone: a stale one (no checkpoint, or ``--overwrite``) is removed
whole, provided it holds the marker.

``runs/.<name>.lock`` holds the pid of the process working on the run; a second process is
refused while that pid lives, and a lock left by a killed process is taken over.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from leantune.core.errors import LeantuneError

MARKER = ".leantune-run.json"
STATE = "checkpoint"
SUMMARY = "summary.json"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def pid_lock(path: Path, what: str) -> Iterator[None]:
    """Hold ``path`` (it holds this pid) for the block; refuse while another live process holds
    it, take it over from a dead one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pid = str(os.getpid())
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        try:
            holder = int(path.read_text().strip() or 0)
        except (OSError, ValueError):
            holder = 0
        if holder and holder != os.getpid() and _alive(holder):
            raise LeantuneError(
                f"another leantune process (pid {holder}) is working on {what}; wait for it "
                f"to end (or remove {path} if that process is not leantune)"
            ) from None
        tmp = path.with_name(f"{path.name}.{pid}")
        tmp.write_text(pid)
        os.replace(tmp, path)  # the dead holder's lock, taken over
    else:
        with os.fdopen(fd, "w") as f:
            f.write(pid)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            if path.read_text().strip() == pid:
                path.unlink()


def listing(folder: Path) -> list[str]:
    """Every file under ``folder`` (relative, posix), the marker excepted."""
    return sorted(
        p.relative_to(folder).as_posix()
        for p in folder.rglob("*")
        if (p.is_file() or p.is_symlink()) and p.name != MARKER
    )


def read_marker(folder: Path) -> dict[str, Any] | None:
    try:
        marker = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) and isinstance(marker.get("files"), list) else None


def write_marker(folder: Path, name: str, **extra: Any) -> None:
    """Record the files leantune wrote in ``folder`` (all of them, at this moment)."""
    old = read_marker(folder) or {}
    marker = {"leantune": "run", "name": name} | {
        k: v for k, v in old.items() if k not in ("files", "leantune", "name")
    }
    marker |= extra | {"files": listing(folder)}
    tmp = folder / f".{MARKER}.tmp"
    tmp.write_text(json.dumps(marker, indent=1) + "\n")
    os.replace(tmp, folder / MARKER)


LEGACY = re.compile(
    r"(config\.yaml|labels\.json|metrics\.jsonl|summary\.json|report\.html|plan\.json"
    r"|(loss|metric|confusion|importance)\.png"
    r"|adapter/(adapter_config\.json|adapter_model\.safetensors)"
    r"|trained/(model\.safetensors|leantune\.json)|checkpoint/[^/]+|tensorboard/.+)"
)
"""The files a run folder held before the marker existed (leantune 0.1 up to issue 13)."""


def legacy_marker(folder: Path) -> dict[str, Any] | None:
    """A marker for a finished run folder written before markers existed: it has config.yaml
    and summary.json and every file in it is one such a run writes (anything else: None)."""
    files = listing(folder)
    if not {"config.yaml", "summary.json"} <= set(files):
        return None
    if not all(LEGACY.fullmatch(f) for f in files):
        return None
    return {"leantune": "run", "name": folder.name, "files": files}


def foreign_files(folder: Path) -> list[str]:
    """Files in ``folder`` that leantune did not write (everything, without a marker)."""
    marker = read_marker(folder) or legacy_marker(folder)
    files = listing(folder)
    if marker is None:
        return files or ["(no " + MARKER + ")"]
    known = set(map(str, marker["files"]))
    # Files a run writes while it trains are not listed until it finishes.
    return [f for f in files if f not in known and not f.startswith(f"{STATE}/")]


def remove_run_files(folder: Path) -> list[str]:
    """Delete the files the marker lists, then the marker and empty folders; return what is
    left (files leantune did not write stay where they are)."""
    marker = read_marker(folder) or legacy_marker(folder)
    if marker is None:
        return listing(folder)
    for rel in marker["files"]:
        target = folder / str(rel)
        if ".." not in Path(str(rel)).parts and (target.is_file() or target.is_symlink()):
            target.unlink()
    if (folder / STATE).is_dir():  # a checkpoint is the run's own, listed or not
        shutil.rmtree(folder / STATE)
    (folder / MARKER).unlink(missing_ok=True)
    for d in sorted((p for p in folder.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
        with contextlib.suppress(OSError):
            d.rmdir()
    left = listing(folder)
    if not left:
        with contextlib.suppress(OSError):
            folder.rmdir()
    return left


class RunFolder:
    """The paths of run ``name`` under ``runs_dir`` and the moves between them."""

    def __init__(self, runs_dir: str | os.PathLike[str], name: str) -> None:
        self.root = Path(runs_dir)
        self.name = name
        self.final = self.root / name
        self.work = self.root / f".{name}.partial"
        self.old = self.root / f".{name}.replaced"
        self.lock_path = self.root / f".{name}.lock"

    def lock(self) -> contextlib.AbstractContextManager[None]:
        return pid_lock(self.lock_path, f"run {self.final}")

    # -------------------------------------------------------------- states

    def finished(self) -> bool:
        return (self.final / SUMMARY).is_file()

    def resumable(self) -> bool:
        from leantune.train.checkpoint import latest_checkpoint

        try:
            return latest_checkpoint(self.work / STATE) is not None
        except LeantuneError:
            return False

    def checkpoint_step(self) -> int | None:
        from leantune.train.checkpoint import LATEST

        try:
            return int(json.loads((self.work / STATE / LATEST).read_text())["step"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    # -------------------------------------------------------------- moves

    def recover(self) -> None:
        """Finish what a killed process left half-way: a finished partial run not yet switched
        in, or a switch cut between its renames."""
        if (self.work / SUMMARY).is_file():
            self.commit()
        if self.old.exists():
            if self.final.exists():
                self._drop_old()
            else:  # cut after the old run moved aside and before the new one moved in
                os.replace(self.old, self.final)

    def check(self, resume: bool, overwrite: bool) -> None:
        """Refuse a start that would lose or clash with something; touches nothing."""
        if resume and overwrite:
            raise LeantuneError("--resume and --overwrite contradict each other; pick one")
        if resume:
            if self.resumable():
                return
            if self.finished():
                raise LeantuneError(
                    f"{self.final} has finished (summary.json is there); nothing to resume"
                )
            raise LeantuneError(
                f"{self.final} has no checkpoint to resume; start it again without --resume"
            )
        if self.resumable() and not overwrite:
            raise LeantuneError(
                f"{self.final} has an unfinished run (checkpoint at step "
                f"{self.checkpoint_step()} in {self.work}); continue it with --resume, or start "
                "over with --overwrite"
            )
        if self.work.exists() and not self._partial_is_ours():
            raise LeantuneError(
                f"{self.work} was not made by leantune; move it away, or use another --name"
            )
        if not (self.final.exists() and any(self.final.iterdir())):
            if self.final.exists() and not self.final.is_dir():
                raise LeantuneError(f"{self.final} is a file; use another --name")
            return
        if not overwrite:
            raise LeantuneError(
                f"run folder {self.final} exists; pass --overwrite to replace it, or --name "
                "for a new run"
            )
        if read_marker(self.final) is None and legacy_marker(self.final) is None:
            raise LeantuneError(
                f"{self.final} is not a leantune run folder (no {MARKER}); not deleting it. "
                "Move it away or use another --name"
            )
        foreign = foreign_files(self.final)
        if foreign:
            raise LeantuneError(
                f"{self.final} holds {foreign[0]!r}, which leantune did not write; not deleting "
                f"it. Move {'it' if len(foreign) == 1 else f'those {len(foreign)} files'} out, "
                "or use another --name"
            )

    def _partial_is_ours(self) -> bool:
        """The partial folder holds the marker, or nothing but a marker being written (a kill
        right after leantune made it)."""
        return read_marker(self.work) is not None or all(
            p.name.startswith(f".{MARKER}") for p in self.work.iterdir()
        )

    def begin(self, resume: bool, **marker: Any) -> Path:
        """The folder to write into: the partial run (kept on resume, else made anew)."""
        if not resume:
            if self.work.exists():  # leantune's own (check() saw the marker): a stale start
                shutil.rmtree(self.work)
            self.work.mkdir(parents=True)
            write_marker(self.work, self.name, **marker)
        return self.work

    def commit(self) -> Path:
        """Switch the finished partial run in place of ``final``; the old run's files go."""
        shutil.rmtree(self.work / STATE, ignore_errors=True)
        write_marker(self.work, self.name, finished=True)
        if self.final.exists():
            if self.old.exists():
                self._drop_old()
            os.replace(self.final, self.old)
        os.replace(self.work, self.final)
        if self.old.exists():
            self._drop_old()
        return self.final

    def _drop_old(self) -> None:
        left = remove_run_files(self.old)
        if left:
            raise LeantuneError(
                f"the replaced run was kept in {self.old}: it holds {left[0]!r}, which leantune "
                "did not write"
            )

    def discard(self) -> None:
        """Delete the partial run (a pruned sweep trial)."""
        if self.work.exists() and self._partial_is_ours():
            shutil.rmtree(self.work)
