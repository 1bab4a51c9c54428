"""Task data: the embedded BBC News default or the user's CSV / JSONL / Parquet file or
``save_to_disk`` folder, split stratified, and batched by length so padding stays small.

The first step of ``leantune tune``. CSV and JSON Lines are read here, cells as found (no type
guessing), so every error can name the file and line; ``save_to_disk`` folders load with
``datasets``. Batching is plain PyTorch.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import math
import random
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from leantune.core.errors import LeantuneError


@dataclass(frozen=True)
class TextTable:
    """Texts and their labels: stripped strings, numbers written as found in the file."""

    texts: list[str]
    labels: list[str]


@dataclass
class _Rows:
    """Raw rows of a file and where each one is in it (``unit`` ``positions[i]``)."""

    columns: list[str]
    rows: list[dict[str, Any]]
    unit: str  # "line" for CSV / JSON Lines, "row" for a JSON list or a datasets folder
    positions: list[int]


def load_table(
    path: str | Path, text_column: str = "text", label_column: str | None = "label"
) -> TextTable:
    """Read a CSV, JSON Lines file or a ``datasets`` folder saved with ``save_to_disk``.

    Cells are read as found (CSV cells stay strings: no type guessing, "NA" stays "NA").
    Labels are stripped; a row without one (empty, null, NaN) is an error that says where.
    """
    path = Path(path)
    raw = read_rows(path, {text_column, label_column})
    for column in (text_column, label_column):
        if column is not None and column not in raw.columns:
            raise LeantuneError(
                f"{path} has no column {column!r}; its columns are {raw.columns}. "
                "Name the right ones with --text-column / --label-column"
            )
    texts = [
        _text(row.get(text_column), path, text_column, f"{raw.unit} {at}")
        for row, at in zip(raw.rows, raw.positions, strict=True)
    ]
    if label_column is None:
        return TextTable(texts, [])
    labels: list[str] = []
    missing: list[int] = []
    for row, at in zip(raw.rows, raw.positions, strict=True):
        label = _label(row.get(label_column), path, label_column, f"{raw.unit} {at}")
        if label is None:
            missing.append(at)
        else:
            labels.append(label)
    if missing:
        n = len(missing)
        shown = ", ".join(str(m) for m in missing[:5]) + (", ..." if n > 5 else "")
        raise LeantuneError(
            f"{path}: {n} {'row has' if n == 1 else 'rows have'} no label in column "
            f"{label_column!r} ({raw.unit}{'' if n == 1 else 's'} {shown}); "
            f"fill in {'its label or remove that row' if n == 1 else 'their labels or remove those rows'}"
        )
    return TextTable(texts, labels)


def read_rows(path: Path, wanted: Collection[str | None]) -> _Rows:
    """The rows of a .csv, .jsonl or save_to_disk folder (``wanted``: the columns a folder
    needs), each with where it is in the file; a missing, unknown or empty file is refused."""
    if not path.exists():
        raise LeantuneError(f"data file {path} does not exist")
    if path.is_dir():
        raw = _saved_rows(path, set(wanted))
    elif path.suffix.lower() == ".csv":
        raw = _csv_rows(path)
    elif path.suffix.lower() in (".jsonl", ".json"):
        raw = _json_rows(path)
    elif path.suffix.lower() == ".parquet":
        raw = _parquet_rows(path, set(wanted))
    else:
        raise LeantuneError(
            f"{path}: use a .csv, .jsonl or .parquet file or a datasets save_to_disk folder"
        )
    if not raw.rows:
        raise LeantuneError(f"{path} holds no rows")
    return raw


def _kind(value: Any) -> str:
    if isinstance(value, dict):
        return "JSON object"
    return "list" if isinstance(value, list) else type(value).__name__


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _text(value: Any, path: Path, column: str, where: str) -> str:
    if _missing(value):
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, (bool, int, float)):
        return str(value)
    raise LeantuneError(
        f"{path} {where}: column {column!r} holds a {_kind(value)}, not text; "
        "give each row its text as a string"
    )


def _label(value: Any, path: Path, column: str, where: str) -> str | None:
    """The label as a stripped string; None when the row has none."""
    if _missing(value):
        return None
    if isinstance(value, str):
        return value.strip() or None
    if isinstance(value, (bool, int, float)):
        return str(value)
    raise LeantuneError(
        f"{path} {where}: the label in column {column!r} is a {_kind(value)}; "
        "labels must be strings or numbers"
    )


def _read_text(path: Path) -> str:
    """The file as text; anything but UTF-8 is an error that says where and what to do."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise LeantuneError(f"could not read {path}: {e.strerror or e}") from None
    for bom, name in (
        (codecs.BOM_UTF32_LE, "UTF-32"),
        (codecs.BOM_UTF32_BE, "UTF-32"),
        (codecs.BOM_UTF16_LE, "UTF-16"),
        (codecs.BOM_UTF16_BE, "UTF-16"),
    ):
        if data.startswith(bom):
            raise LeantuneError(
                f"{path} is {name} (it starts with a byte-order mark); re-save it as UTF-8"
            )
    head = data[:4096]
    if head.count(0) > len(head) // 4:
        raise LeantuneError(f"{path} is mostly NUL bytes, as UTF-16 text is; re-save it as UTF-8")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise LeantuneError(
            f"{path} is not UTF-8 (byte 0x{data[e.start]:02x} at offset {e.start}, line {line}); "
            "re-save it as UTF-8 (from Latin-1: iconv -f latin1 -t utf-8)"
        ) from None
    return text.removeprefix("\ufeff")


def _csv_rows(path: Path) -> _Rows:
    text = _read_text(path)
    csv.field_size_limit(max(csv.field_size_limit(), 2**31 - 1))  # one long text is fine
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader, None)
        if header is None:
            return _Rows([], [], "line", [])
        twice = sorted({c for c in header if header.count(c) > 1})
        if twice:
            raise LeantuneError(
                f"{path}: the header names column {twice[0]!r} twice; give each column its own name"
            )
        rows, positions = [], []
        line = reader.line_num
        for record in reader:
            start, line = line + 1, reader.line_num
            if not record:  # a blank line
                continue
            if len(record) > len(header):
                raise LeantuneError(
                    f"{path} line {start} has {len(record)} fields but the header names "
                    f"{len(header)}; quote fields that hold commas"
                )
            rows.append(dict(zip(header, record, strict=False)))
            positions.append(start)
    except csv.Error as e:
        raise LeantuneError(
            f"{path} line {reader.line_num} is not valid CSV ({e}); fix or remove it"
        ) from None
    return _Rows(header, rows, "line", positions)


def _json_rows(path: Path) -> _Rows:
    """JSON Lines (one object per line), or a .json file holding a list of objects."""
    text = _read_text(path)
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except (ValueError, RecursionError) as e:
            where = f" line {e.lineno}" if isinstance(e, json.JSONDecodeError) else ""
            raise LeantuneError(
                f"{path}{where} is not valid JSON ({getattr(e, 'msg', e)}); fix it"
            ) from None
        for i, item in enumerate(items, 1):
            if not isinstance(item, dict):
                raise LeantuneError(
                    f"{path}: item {i} of the list is not a JSON object; give one object "
                    'per row, like {"text": ..., "label": ...}'
                )
        return _Rows(_columns(items), items, "row", list(range(1, len(items) + 1)))
    rows, positions = [], []
    for n, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (ValueError, RecursionError) as e:
            if n == 1 and _one_object(text):
                raise LeantuneError(
                    f"{path} holds one JSON object over several lines; write one object per "
                    'row on its own line (JSON Lines), like {"text": ..., "label": ...}'
                ) from None
            why = f"{e.msg} at column {e.colno}" if isinstance(e, json.JSONDecodeError) else e
            raise LeantuneError(
                f"{path} line {n} is not valid JSON ({why}); fix or remove that line"
            ) from None
        if not isinstance(row, dict):
            raise LeantuneError(
                f"{path} line {n} is not a JSON object (it holds a {_kind(row)}); write one "
                'object per line, like {"text": ..., "label": ...}'
            )
        rows.append(row)
        positions.append(n)
    return _Rows(_columns(rows), rows, "line", positions)


def _one_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except (ValueError, RecursionError):
        return False


def _columns(rows: list[dict[str, Any]]) -> list[str]:
    """Keys of all rows, in order of first appearance."""
    seen: dict[str, None] = {}
    for row in rows:
        seen.update(dict.fromkeys(row))
    return list(seen)


def _parquet_rows(path: Path, wanted: set[str | None]) -> _Rows:
    """A Parquet file's rows (pyarrow, which datasets brings), only the wanted columns read."""
    import pyarrow.parquet as pq

    try:
        columns = list(pq.read_schema(path).names)
        table = pq.read_table(path, columns=[c for c in columns if c in wanted])
    except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise LeantuneError(f"could not read {path} as Parquet: {first}") from None
    rows = table.to_pylist()
    return _Rows(columns, rows, "row", list(range(1, len(rows) + 1)))


def _saved_rows(path: Path, wanted: set[str | None]) -> _Rows:
    import datasets

    datasets.disable_progress_bars()
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:  # datasets raises many types for folders it cannot read
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise LeantuneError(
            f"could not read {path} as a datasets save_to_disk folder: {first}"
        ) from None
    if isinstance(ds, datasets.DatasetDict):
        split = "train" if "train" in ds else next(iter(ds))
        ds = ds[split]
    columns = list(ds.column_names)
    values = {c: ds[c] for c in columns if c in wanted}  # only the columns read
    rows = [{c: v[i] for c, v in values.items()} for i in range(len(ds))]
    return _Rows(columns, rows, "row", list(range(1, len(rows) + 1)))


def label_names(train_labels: Sequence[str]) -> list[str]:
    """Sorted label names; numeric labels sort as numbers (ties, like 1 and 1.0, by text)."""
    names = set(train_labels)
    try:
        keys = {n: float(n) for n in names}
    except ValueError:
        return sorted(names)
    if not all(math.isfinite(k) for k in keys.values()):  # nan does not sort
        return sorted(names)
    return sorted(names, key=lambda n: (keys[n], n))


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
        n_train, n_val, _ = split_sizes(len(idx), fractions)
        parts[0].extend(idx[:n_train])
        parts[1].extend(idx[n_train : n_train + n_val])
        parts[2].extend(idx[n_train + n_val :])
    for part in parts:
        part.sort()
    return parts


def split_sizes(n: int, fractions: tuple[float, float, float]) -> tuple[int, int, int]:
    """How many of a label's ``n`` rows go to train / validation / test."""
    n_train = round(n * fractions[0])
    n_val = round(n * fractions[1])
    return n_train, n_val, n - n_train - n_val


PARTS = ("training", "validation", "test")


def too_few_rows(
    labels: Sequence[str], fractions: tuple[float, float, float], part: int, source: str
) -> str | None:
    """Why split ``part`` of a stratified split came out empty when labels have too few rows:
    the labels, their row counts and the count a label needs; None if that is not the cause."""
    counts: dict[str, int] = {}
    for label in labels:
        counts[label] = counts.get(label, 0) + 1
    if len(counts) < 2:
        return None  # one stratum: the row count is the cause
    need = next((n for n in range(1, 10_001) if split_sizes(n, fractions)[part] > 0), None)
    if need is None:
        return None
    short = sorted((name, c) for name, c in counts.items() if c < need)
    if len(short) < len(counts):
        return None
    shown = ", ".join(f"{name!r} {c}" for name, c in short[:5])
    more = f" and {len(short) - 5} more" if len(short) > 5 else ""
    what = PARTS[part]
    spread = ",".join(f"{f:g}" for f in fractions)
    own_file = {1: "pass --eval-data, ", 2: "pass --test-data, "}.get(part, "")
    return (
        f"the {what} split is empty: {source} has {len(counts)} labels, each with fewer than "
        f"{need} rows ({shown}{more}), and a stratified {spread} split gives a label {what} "
        f"rows only from {need} rows on; give labels at least {need} rows each, {own_file}"
        "or change --split"
    )


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
