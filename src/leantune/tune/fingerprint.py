"""The data a run was made from, as a fingerprint: what a resumed run, a compare folder and a
sweep folder check before they go on (other data, other results)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from leantune.core.defaults import BUILTIN_DATA, builtin_data
from leantune.core.errors import LeantuneError


def data_fingerprint(config: Any) -> dict[str, str]:
    """sha256 of each data file (a folder: its file names and sizes); 'embedded' for BBC."""
    out = {}
    for key in ("data", "eval_data", "test_data"):
        value = getattr(config, key)
        embedded = builtin_data(value) if key == "data" else None
        if embedded is not None:  # "embedded BBC News" as recorded before headlines existed
            out[key] = (
                "embedded BBC News" if embedded == "bbc" else f"embedded {BUILTIN_DATA[embedded]}"
            )
            continue
        if value is None:
            out[key] = "split of data"
            continue
        path = Path(value)
        digest = hashlib.sha256()
        if path.is_dir():
            for f in sorted(p for p in path.rglob("*") if p.is_file()):
                digest.update(f"{f.relative_to(path)}:{f.stat().st_size}\n".encode())
        elif path.is_file():
            with path.open("rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    digest.update(block)
        else:
            raise LeantuneError(f"--{key.replace('_', '-')} {value} does not exist")
        out[key] = digest.hexdigest()
    return out
