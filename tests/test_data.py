"""Task data: loaders for CSV, JSONL and datasets folders, splitting, length buckets."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import datasets
import pytest
from hypothesis import given
from hypothesis import strategies as st

from leantune.core.errors import LeantuneError
from leantune.models.data import (
    encode_labels,
    label_names,
    length_buckets,
    load_table,
    pad_batch,
    stratified_split,
)

ROWS = [{"body": f"text number {i}", "topic": ["sport", "tech", "arts"][i % 3]} for i in range(12)]


def write_all(tmp_path: Path) -> list[Path]:
    csv = tmp_path / "d.csv"
    csv.write_text("body,topic\n" + "".join(f'"{r["body"]}",{r["topic"]}\n' for r in ROWS))
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    folder = tmp_path / "saved"
    datasets.Dataset.from_list(ROWS).save_to_disk(str(folder))
    return [csv, jsonl, folder]


def test_csv_jsonl_and_saved_folder_read_the_same(tmp_path: Path) -> None:
    tables = [load_table(p, "body", "topic") for p in write_all(tmp_path)]
    for table in tables:
        assert table.texts == [r["body"] for r in ROWS]
        assert table.labels == [r["topic"] for r in ROWS]


def test_bad_data_messages(tmp_path: Path) -> None:
    csv = write_all(tmp_path)[0]
    with pytest.raises(LeantuneError, match="does not exist"):
        load_table(tmp_path / "nope.csv")
    with pytest.raises(
        LeantuneError, match=r"no column 'text'; its columns are \['body', 'topic'\]"
    ):
        load_table(csv, "text", "topic")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(LeantuneError, match="holds no rows"):
        load_table(empty, "body", "topic")
    headers_only = tmp_path / "h.csv"
    headers_only.write_text("body,topic\n")
    with pytest.raises(LeantuneError, match="holds no rows"):
        load_table(headers_only, "body", "topic")
    with pytest.raises(LeantuneError, match="never seen in training"):
        encode_labels(["sport", "weather"], ["sport", "tech"], "eval file")


def test_label_names_sort_numbers_as_numbers() -> None:
    assert label_names(["10", "2", "1"]) == ["1", "2", "10"]
    assert label_names(["b", "a", "b"]) == ["a", "b"]


def test_stratified_split_keeps_proportions_and_is_seeded() -> None:
    labels = [i % 5 for i in range(1000)]
    train, val, test = stratified_split(labels, seed=0)
    assert sorted(train + val + test) == list(range(1000))
    assert (len(train), len(val), len(test)) == (700, 100, 200)
    assert Counter(labels[i] for i in val) == dict.fromkeys(range(5), 20)
    assert stratified_split(labels, seed=0) == (train, val, test)
    assert stratified_split(labels, seed=1) != (train, val, test)


@given(
    st.lists(st.integers(1, 300), min_size=1, max_size=400), st.integers(1, 32), st.integers(0, 5)
)
def test_length_buckets_cover_every_example_once(lengths: list[int], batch: int, seed: int) -> None:
    batches = length_buckets(lengths, batch, seed)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(len(lengths)))
    assert all(0 < len(b) <= batch for b in batches)


def test_length_buckets_cut_padding() -> None:
    import random

    rng = random.Random(0)
    lengths = [rng.randint(5, 500) for _ in range(2000)]

    def padded(batches: list[list[int]]) -> int:
        return sum(max(lengths[i] for i in b) * len(b) for b in batches)

    plain = [list(range(i, min(i + 16, 2000))) for i in range(0, 2000, 16)]
    assert padded(length_buckets(lengths, 16, seed=0)) < 0.6 * padded(plain)


def test_pad_batch_pads_to_longest_in_batch() -> None:
    out = pad_batch([[5, 6, 7], [8]], pad_id=0)
    assert out["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
