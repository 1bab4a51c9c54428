"""Issue 13, data and model loading: nothing lost, nothing silently wrong.

Rows without a label, labels with stray spaces, files that are not UTF-8 or do not parse,
encoders asked to be causal LMs, pickled weights, huge texts and too few rows per label.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from helpers import build, tiny_model_folder, topic_rows, write_rows
from leantune.cli import app
from leantune.core.errors import LeantuneError
from leantune.models.data import TextTable, load_table
from leantune.models.loading import load_model, load_tokenizer, model_dir
from leantune.tune import TuneConfig, encode, load_splits


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    res = CliRunner().invoke(app, list(args))
    return subprocess.CompletedProcess(list(args), res.exit_code, res.stdout, res.stderr)


def one_line_error(res: subprocess.CompletedProcess[str], expected: str) -> None:
    assert res.returncode == 2, res.stdout + res.stderr
    assert res.stderr.startswith("leantune: ") and res.stderr.count("\n") == 1, res.stderr
    assert expected in res.stderr, res.stderr


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("models")
    tiny_model_folder(root / "bert")
    tiny_model_folder(root / "llama", "llama")
    return root


# ------------------------------------------------------------------------------------ item 7


def test_item07_rows_without_label_are_an_error_naming_count_file_and_lines(
    tmp_path: Path,
) -> None:
    rows = topic_rows(12)
    csv_file = tmp_path / "d.csv"
    body = "text,label\n" + "".join(f"{r['text']},{r['label']}\n" for r in rows)
    body += "goal team,\nbank shares,   \n"  # lines 14 and 15: empty and blank labels
    csv_file.write_text(body)
    with pytest.raises(LeantuneError) as e:
        load_table(csv_file)
    msg = str(e.value)
    assert "2 rows" in msg and "d.csv" in msg and "lines 14, 15" in msg, msg
    assert "None" not in msg and "\n" not in msg
    assert "fill in" in msg and "remove" in msg

    jsonl = tmp_path / "d.jsonl"
    lines = [json.dumps(r) for r in rows[:3]]
    lines += ['{"text": "a", "label": null}', '{"text": "b", "label": NaN}']
    lines += ['{"text": "c", "label": ""}', '{"text": "d"}', '{"text": "e", "label": " tech "}']
    jsonl.write_text("\n".join(lines) + "\n")
    with pytest.raises(LeantuneError, match=r"d\.jsonl: 4 rows .*lines 4, 5, 6, 7"):
        load_table(jsonl)


def test_item07_labels_are_stripped_and_kept_as_found(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text("text,label\na, sport\nb,sport \nc,007\nd,1.0\ne,NA\n")
    table = load_table(path)
    assert table.labels == ["sport", "sport", "007", "1.0", "NA"]
    assert table.texts == ["a", "b", "c", "d", "e"]


def test_item07_missing_labels_through_the_cli(models: Path, tmp_path: Path) -> None:
    rows: list[dict[str, Any]] = [dict(r) for r in topic_rows(30)]
    rows[7]["label"] = None
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    res = cli(
        *["tune", "--model", str(models / "bert"), "--data", str(data)],
        *["--runs-dir", str(tmp_path / "runs"), "--epochs", "1"],
    )
    one_line_error(res, "1 row")
    assert "line 8" in res.stderr
    assert not (tmp_path / "runs").exists()


# ------------------------------------------------------------------------------------ item 8


def test_item08_causal_lm_refuses_an_encoder_and_loads_decoders(
    models: Path, tmp_path: Path
) -> None:
    with pytest.raises(LeantuneError, match="not a decoder") as e:
        load_model(models / "bert", "causal-lm")
    assert "bidirectional" in str(e.value) and "\n" not in str(e.value)
    rows = topic_rows(30)
    data = write_rows(tmp_path / "d.jsonl", rows)
    res = cli(
        *["tune", "--model", str(models / "bert"), "--data", str(data)],
        *["--task", "causal-lm", "--runs-dir", str(tmp_path / "runs"), "--epochs", "1"],
    )
    one_line_error(res, "not a decoder")
    # Decoders still load.
    gpt2 = tmp_path / "gpt2"
    build("gpt2").save_pretrained(gpt2)  # type: ignore[operator]
    for folder in (models / "llama", gpt2):
        model = load_model(folder, "causal-lm")
        assert type(model).__name__.endswith(("ForCausalLM", "LMHeadModel"))
    # BERT configured as a decoder (causal attention) is a decoder.
    bert_dec = tmp_path / "bert-decoder"
    cfg = json.loads((models / "bert" / "config.json").read_text())
    for name in ("config.json", "model.safetensors"):
        (bert_dec / name).parent.mkdir(exist_ok=True)
        (bert_dec / name).write_bytes((models / "bert" / name).read_bytes())
    (bert_dec / "config.json").write_text(json.dumps({**cfg, "is_decoder": True}))
    assert load_model(bert_dec, "causal-lm").config.is_decoder


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_item08_transformers_warnings_are_not_silenced_only_known_noise(
    models: Path, tmp_path: Path
) -> None:
    from safetensors.torch import load_file, save_file
    from transformers.utils import logging as hf_logging

    before = hf_logging.get_verbosity()
    hf_logging.set_verbosity_warning()
    records = Records()
    root = logging.getLogger("transformers")
    root.addHandler(records)
    try:
        # A new classification head is expected: no report about it.
        load_model(models / "bert", "classify", ["a", "b", "c", "d"])
        load_model(models / "llama", "classify", ["a", "b"], 0)
        assert hf_logging.get_verbosity() == logging.WARNING
        assert not any("LOAD REPORT" in m or "num_labels" in m for m in records.messages), (
            records.messages
        )
        # A causal LM whose checkpoint lacks its LM head would train from a random head: shown.
        broken = tmp_path / "llama-no-head"
        for name in ("config.json", "model.safetensors"):
            (broken / name).parent.mkdir(exist_ok=True)
            (broken / name).write_bytes((models / "llama" / name).read_bytes())
        weights = load_file(broken / "model.safetensors")
        assert "lm_head.weight" in weights
        del weights["lm_head.weight"]
        save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
        load_model(broken, "causal-lm")
        assert any("lm_head" in m and "MISSING" in m for m in records.messages), records.messages
    finally:
        root.removeHandler(records)
        hf_logging.set_verbosity(before)


# ----------------------------------------------------------------------------------- item 16


class Recording:
    """A tokenizer wrapper that records the lengths of the texts it is given."""

    def __init__(self, tok: Any) -> None:
        self.tok = tok
        self.lengths: list[int] = []

    def __call__(self, texts: list[str], **kw: Any) -> Any:
        self.lengths += [len(t) for t in texts]
        return self.tok(texts, **kw)


def test_item16_huge_text_is_cut_before_tokenizing_same_ids(models: Path) -> None:
    tok = load_tokenizer(models / "bert")
    huge = "goal team bank " * 300_000  # 4.5 million characters
    wrapped = Recording(tok)
    enc = encode(wrapped, TextTable([huge, "goal"], ["sport", "sport"]), ["sport"], 16, "data")
    assert max(wrapped.lengths) <= 16 * 100, max(wrapped.lengths)
    assert enc.ids == tok([huge[:5000], "goal"], truncation=True, max_length=16)["input_ids"]
    # The ids are those of the whole texts.
    tok = load_tokenizer(models / "llama")
    rows = topic_rows(40)
    texts = [r["text"] for r in rows]
    texts += [" ".join(texts) * 20]  # longer than the cut, ordinary words
    texts += [" " * 20_000 + "goal team bank"]  # whitespace run: few tokens past the cut
    texts += ["x" * 50_000 + " goal"]  # one huge unknown word, then a real one
    labels = [r["label"] for r in rows] + ["sport"] * 3
    names = sorted(set(labels))
    for max_length in (4, 16, 128):
        enc = encode(tok, TextTable(texts, labels), names, max_length, "data")
        assert enc.ids == tok(texts, truncation=True, max_length=max_length)["input_ids"]
        assert enc.labels == [names.index(x) for x in labels]


def test_item16_too_few_rows_per_label_names_the_labels(tmp_path: Path) -> None:
    rows = [{"text": f"text {i}", "label": f"L{i % 500:03d}"} for i in range(600)]
    data = write_rows(tmp_path / "many.csv", rows)
    with pytest.raises(LeantuneError) as e:
        load_splits(TuneConfig(data=str(data)))
    msg = str(e.value)
    assert "validation split is empty" in msg and "\n" not in msg
    assert "500 labels" in msg and "'L000' 2" in msg and "6 rows" in msg, msg
    assert "--eval-data" in msg


def test_item16_latin1_files_name_byte_offset_and_encoding(tmp_path: Path) -> None:
    for name, body in (
        ("l1.csv", "text,label\ncaf\u00e9 au lait,food\nok,food\n"),
        ("l1.jsonl", '{"text": "ok", "label": "a"}\n{"text": "caf\u00e9", "label": "b"}\n'),
    ):
        path = tmp_path / name
        path.write_bytes(body.encode("latin-1"))
        with pytest.raises(LeantuneError) as e:
            load_table(path)
        msg = str(e.value)
        assert name in msg and "not UTF-8" in msg and "0xe9" in msg and "line 2" in msg, msg
        assert "re-save it as UTF-8" in msg and "generating the dataset" not in msg
    utf16 = tmp_path / "u16.csv"
    utf16.write_bytes("text,label\nhello,a\n".encode("utf-16"))
    with pytest.raises(LeantuneError, match=r"u16\.csv is UTF-16.*re-save it as UTF-8"):
        load_table(utf16)


def test_item16_broken_jsonl_line_is_named(tmp_path: Path) -> None:
    path = tmp_path / "broken.jsonl"
    good = [json.dumps(r) for r in topic_rows(5)]
    path.write_text("\n".join([*good[:3], '{"text": "goal", "label": sport}', *good[3:]]) + "\n")
    with pytest.raises(LeantuneError) as e:
        load_table(path)
    msg = str(e.value)
    assert "broken.jsonl" in msg and "line 4" in msg and "not valid JSON" in msg, msg
    assert "generating the dataset" not in msg
    not_object = tmp_path / "list.jsonl"
    not_object.write_text(good[0] + "\n[1, 2]\n")
    with pytest.raises(LeantuneError, match=r"list\.jsonl line 2 is not a JSON object"):
        load_table(not_object)


def test_item16_pickled_model_is_refused_and_never_unpickled(models: Path, tmp_path: Path) -> None:
    import pickle

    marker = tmp_path / "unpickled"

    class Evil:
        def __reduce__(self) -> tuple[Any, ...]:
            return (open, (str(marker), "w"))

    folder = tmp_path / "pickled"
    folder.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (folder / name).write_bytes((models / "bert" / name).read_bytes())
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps({"w": Evil()}))
    for call in (lambda: model_dir(folder), lambda: load_model(folder, "classify", ["a", "b"])):
        with pytest.raises(LeantuneError) as e:
            call()
        msg = str(e.value)
        assert "pickled weights (pytorch_model.bin)" in msg and "never unpickles" in msg, msg
        assert "model.safetensors" in msg and "weights_only" not in msg
    assert not marker.exists()
    data = write_rows(tmp_path / "d.jsonl", topic_rows(30))
    res = cli("tune", "--model", str(folder), "--data", str(data), "--runs-dir", str(tmp_path))
    one_line_error(res, "never unpickles")
    assert not marker.exists()


# -------------------------------------------------------------------------------- fuzz (7, 16)

SCALARS = (
    st.text(max_size=30)
    | st.integers(-(10**20), 10**20)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.booleans()
    | st.none()
)
JSON_CELLS = (
    SCALARS
    | st.lists(st.integers(), max_size=3)
    | st.dictionaries(st.text(max_size=3), st.integers(), max_size=2)
)
WORDS = st.text(st.characters(codec="utf-8"), min_size=1, max_size=12)
HUGE = st.sampled_from(["", " ", "x" * 200_000, "word " * 30_000])


def expected_label(value: Any) -> str | None:
    """What a correct table holds for a label cell (None: the row must be refused)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, str):
        return value.strip() or None
    return str(value)


@settings(
    max_examples=int(os.environ.get("FUZZ_EXAMPLES", "50")),
    derandomize="FUZZ_EXAMPLES" not in os.environ,  # the same examples in CI; a search on request
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    kind=st.sampled_from(["csv", "jsonl", "json"]),
    rows=st.lists(
        st.fixed_dictionaries(
            {"text": WORDS | JSON_CELLS | HUGE, "label": WORDS | JSON_CELLS},
            optional={"extra": SCALARS},
        ),
        min_size=0,
        max_size=8,
    ),
    drop=st.sampled_from([None, "text", "label"]),
    drop_all=st.booleans(),
    encoding=st.sampled_from(["utf-8", "utf-8-sig", "latin-1", "utf-16", "random"]),
    ascii_json=st.booleans(),
    noise=st.binary(max_size=40),
)
def test_item16_fuzz_tables_load_correctly_or_refuse(
    tmp_path_factory: pytest.TempPathFactory,
    kind: str,
    rows: list[dict[str, Any]],
    drop: str | None,
    drop_all: bool,
    encoding: str,
    ascii_json: bool,
    noise: bytes,
) -> None:
    path = tmp_path_factory.mktemp("fuzz") / f"data.{kind}"
    if drop:  # a column missing from every row, or from every other row
        rows = [
            {k: v for k, v in r.items() if k != drop or (not drop_all and i % 2)}
            for i, r in enumerate(rows)
        ]
    if kind == "csv":
        columns = sorted({k for r in rows for k in r}) or ["text", "label"]
        out = io.StringIO()
        # Every cell quoted: csv leaves a lone \r unquoted, which any reader takes as a line end.
        writer = csv.DictWriter(out, fieldnames=columns, lineterminator="\n", quoting=csv.QUOTE_ALL)
        writer.writeheader()
        for r in rows:
            writer.writerow({k: ("" if v is None else v) for k, v in r.items()})
        text = out.getvalue()
    elif kind == "json":  # a list of objects
        text = json.dumps(rows, ensure_ascii=ascii_json, indent=1)
    else:
        text = "".join(json.dumps(r, ensure_ascii=ascii_json) + "\n" for r in rows)
    if encoding == "random":
        data = noise + text.encode("utf-8", "replace")
    else:
        data = text.encode(encoding, "replace")
    path.write_bytes(data)
    try:
        table = load_table(path)
    except LeantuneError as e:
        assert str(e) and "\n" not in str(e) and "Traceback" not in str(e)
        shape = re.sub(r"0x..|\d+", "#", str(e).replace(str(path), "F"))
        event(f"refused: {shape[:30]}")
        return
    event(f"loaded {kind} {encoding}")
    # Loaded: well formed, and for UTF-8 exactly what was written.
    assert len(table.texts) == len(table.labels) > 0
    assert all(isinstance(t, str) for t in table.texts)
    for label in table.labels:
        assert isinstance(label, str) and label == label.strip() and label
    if encoding == "random":
        return
    assert len(table.texts) == len(rows)
    if encoding not in ("utf-8", "utf-8-sig"):
        return
    for r, t, y in zip(rows, table.texts, table.labels, strict=True):
        if kind == "csv":
            assert y == ("" if r["label"] is None else str(r["label"])).strip()
            if isinstance(r.get("text"), str):
                assert t == r["text"]
        else:
            assert not isinstance(r["label"], (list, dict)), "a list or object as a label"
            assert not isinstance(r.get("text"), (list, dict)), "a list or object as a text"
            assert y == expected_label(r["label"])
            if isinstance(r.get("text"), str):
                assert t == r["text"]
