"""Alpaca and ShareGPT rows read as the same conversations as leantune's own columns; Parquet
files read like JSON Lines; a bad row still names the file and row."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from leantune.core.errors import LeantuneError
from leantune.models.chat import load_chats
from leantune.models.data import load_table
from leantune.models.preference import load_preferences

ROWS = [("Name the topic.", "The dollar gains on the euro.", "business"), ("Say hi.", "", "hi")]


def jsonl(path: Path, rows: list[dict[str, object]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_alpaca_and_sharegpt_read_as_prompt_and_response(tmp_path: Path) -> None:
    own = jsonl(
        tmp_path / "own.jsonl",
        [{"prompt": f"{i}\n\n{x}" if x else i, "response": o} for i, x, o in ROWS],
    )
    alpaca = jsonl(
        tmp_path / "alpaca.jsonl",
        [{"instruction": i, "input": x, "output": o} for i, x, o in ROWS],
    )
    sharegpt = jsonl(
        tmp_path / "sharegpt.jsonl",
        [
            {
                "conversations": [
                    {"from": "human", "value": i + (f"\n\n{x}" if x else "")},
                    {"from": "gpt", "value": o},
                ]
            }
            for i, x, o in ROWS
        ],
    )
    want = load_chats(own)
    assert load_chats(alpaca) == want and load_chats(sharegpt) == want
    assert want[0].messages[0]["content"] == "Name the topic.\n\nThe dollar gains on the euro."


def test_a_bad_sharegpt_row_names_the_file_and_row(tmp_path: Path) -> None:
    bad = jsonl(
        tmp_path / "bad.jsonl",
        [{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]},
         {"conversations": [{"from": "human", "value": "hi"}, {"from": "robot", "value": "x"}]}],
    )  # fmt: skip
    with pytest.raises(
        LeantuneError, match=r"bad.jsonl line 2: message 2 has unknown role 'robot'"
    ):
        load_chats(bad)
    empty = jsonl(tmp_path / "e.jsonl", [{"instruction": "Say hi.", "output": ""}])
    with pytest.raises(LeantuneError, match=r"e.jsonl line 1: message 2 \(assistant\) has empty"):
        load_chats(empty)


def test_parquet_reads_like_json_lines(tmp_path: Path) -> None:
    rows = [{"text": "the match was won", "label": "sport"}, {"text": "shares fell", "label": "x"}]
    path = tmp_path / "t.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    assert load_table(path) == load_table(jsonl(tmp_path / "t.jsonl", rows))
    pairs = [{"prompt": "Which topic?", "chosen": "sport", "rejected": "tech"}]
    pq.write_table(pa.Table.from_pylist(pairs), tmp_path / "p.parquet")
    assert load_preferences(tmp_path / "p.parquet") == load_preferences(
        jsonl(tmp_path / "p.jsonl", pairs)
    )
    (tmp_path / "broken.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(LeantuneError, match=r"could not read .*broken.parquet as Parquet"):
        load_table(tmp_path / "broken.parquet")
