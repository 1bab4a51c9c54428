"""Task data: the embedded BBC News default or the user's CSV / JSONL / ``save_to_disk`` folder,
split stratified, and batched by length so padding stays small.

Step 1 of the tune job (issue 3). Loading uses ``datasets``; batching is plain PyTorch.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from leantune.errors import LeantuneError


@dataclass(frozen=True)
class TextTable:
    """Texts and their raw labels (strings or ints as found in the file)."""

    texts: list[str]
    labels: list[str]


def load_table(
    path: str | Path, text_column: str = "text", label_column: str | None = "label"
) -> TextTable:
    """Read a CSV, JSON Lines file or a ``datasets`` folder saved with ``save_to_disk``."""
    import datasets

    path = Path(path)
    if not path.exists():
        raise LeantuneError(f"data file {path} does not exist")
    datasets.disable_progress_bars()
    try:
        if path.is_dir():
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                split = "train" if "train" in ds else next(iter(ds))
                ds = ds[split]
        elif path.suffix.lower() == ".csv":
            ds = datasets.Dataset.from_csv(str(path), keep_in_memory=True)
        elif path.suffix.lower() in (".jsonl", ".json"):
            ds = datasets.Dataset.from_json(str(path), keep_in_memory=True)
        else:
            raise LeantuneError(
                f"{path}: use a .csv, .jsonl file or a datasets save_to_disk folder"
            )
    except LeantuneError:
        raise
    except Exception as e:  # datasets raises many types for unreadable files
        if "no data" in str(e) or (path.is_file() and path.stat().st_size == 0):
            raise LeantuneError(f"{path} holds no rows") from None
        raise LeantuneError(
            f"could not read {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
        ) from None
    columns = list(ds.column_names)
    for column in (text_column, label_column):
        if column is not None and column not in columns:
            raise LeantuneError(
                f"{path} has no column {column!r}; its columns are {columns}. "
                "Name the right ones with --text-column / --label-column"
            )
    if len(ds) == 0:
        raise LeantuneError(f"{path} holds no rows")
    texts = ["" if t is None else str(t) for t in ds[text_column]]
    labels = [str(v) for v in ds[label_column]] if label_column is not None else []
    return TextTable(texts, labels)


def label_names(train_labels: Sequence[str]) -> list[str]:
    """Sorted label names; numeric labels sort as numbers."""
    names = set(train_labels)
    try:
        return sorted(names, key=float)
    except ValueError:
        return sorted(names)


def encode_labels(labels: Sequence[str], names: Sequence[str], where: str) -> list[int]:
    index = {n: i for i, n in enumerate(names)}
    unseen = sorted(set(labels) - set(index))
    if unseen:
        raise LeantuneError(
            f"{where} has label {unseen[0]!r} never seen in training (known: {list(names)[:10]}); "
            "add examples of it to the training data or drop those rows"
        )
    return [index[label] for label in labels]


def stratified_split(
    labels: Sequence[int], fractions: tuple[float, float, float] = (0.7, 0.1, 0.2), seed: int = 0
) -> tuple[list[int], list[int], list[int]]:
    """Indices of train / validation / test, each class split in the same proportions."""
    if abs(sum(fractions) - 1.0) > 1e-9 or min(fractions) < 0:
        raise LeantuneError(f"split fractions {fractions} must be non-negative and sum to 1")
    rng = random.Random(seed)
    by_class: dict[int, list[int]] = {}
    for i, y in enumerate(labels):
        by_class.setdefault(y, []).append(i)
    parts: tuple[list[int], list[int], list[int]] = ([], [], [])
    for y in sorted(by_class):
        idx = by_class[y]
        rng.shuffle(idx)
        n_train = round(len(idx) * fractions[0])
        n_val = round(len(idx) * fractions[1])
        parts[0].extend(idx[:n_train])
        parts[1].extend(idx[n_train : n_train + n_val])
        parts[2].extend(idx[n_train + n_val :])
    for part in parts:
        part.sort()
    return parts


def length_buckets(
    lengths: Sequence[int], batch_size: int, seed: int | None, pool: int = 50
) -> list[list[int]]:
    """Batches of similar length: shuffle, sort within pools of ``pool`` batches, shuffle batches.

    With ``seed=None`` (evaluation) examples are sorted by length over the whole set.
    """
    if batch_size <= 0:
        raise LeantuneError(f"batch size must be positive, got {batch_size}")
    order = list(range(len(lengths)))
    if seed is None:
        order.sort(key=lambda i: lengths[i])
        return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    rng = random.Random(seed)
    rng.shuffle(order)
    batches = []
    span = batch_size * pool
    for start in range(0, len(order), span):
        chunk = sorted(order[start : start + span], key=lambda i: lengths[i])
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def pad_batch(ids: Sequence[Sequence[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Pad to the longest sequence in this batch only (dynamic padding)."""
    width = max(len(seq) for seq in ids)
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for row, seq in enumerate(ids):
        input_ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[row, : len(seq)] = 1
    return {"input_ids": input_ids, "attention_mask": mask}
