"""The tune job on a tiny saved BERT / Llama and a few dozen rows: run folder, resume, early
stopping, eval / predict / merge on a saved run, causal LM, config files."""

from __future__ import annotations

import json
import math
import signal
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForSequenceClassification, AutoTokenizer
from typer.testing import CliRunner

import leantune as lt
from helpers import tiny_model_folder, topic_rows, write_rows
from leantune.cli import app
from leantune.train.interface import Progress
from leantune.tune import TuneConfig, read_config, run_tune
from leantune.tune.runfolder import RunFolder


def config(tmp_path: Path, bert_dir: Path, data_file: Path, **kw: object) -> TuneConfig:
    values: dict[str, object] = {
        "model": str(bert_dir),
        "data": str(data_file),
        "runs_dir": str(tmp_path / "runs"),
        "name": "t",
        "batch_size": 8,
        "epochs": 3,
        "lr": 5e-3,
        "layers": "all",
    }
    return TuneConfig(**(values | kw))  # type: ignore[arg-type]


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    res = CliRunner().invoke(app, list(args))
    return subprocess.CompletedProcess(list(args), res.exit_code, res.stdout, res.stderr)


def test_run_folder_holds_everything_promised(
    tmp_path: Path, bert_dir: Path, data_file: Path
) -> None:
    summary = run_tune(config(tmp_path, bert_dir, data_file, eval_every=3))
    run = tmp_path / "runs" / "t"
    for name in ("config.yaml", "labels.json", "metrics.jsonl", "summary.json", "report.html"):
        assert (run / name).is_file(), name
    for png in ("loss.png", "metric.png", "confusion.png"):
        assert (run / png).read_bytes()[:4] == b"\x89PNG"
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    assert not (run / "checkpoint").exists()  # removed once the run has finished
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    # 60 rows → 42 train → 6 batches of 8 per epoch, 3 epochs, eval every 3 steps and per epoch
    assert [r["step"] for r in rows] == [3, 6, 9, 12, 15, 18]
    assert json.loads((run / "summary.json").read_text()) == summary
    assert summary["train_examples"] == 42 and summary["test_examples"] == 12
    assert 0 <= summary["test_accuracy"] <= 1 and 0 <= summary["test_macro_f1"] <= 1
    assert summary["adapter_bytes"] == sum(p.stat().st_size for p in (run / "adapter").iterdir())
    assert 0 < summary["trainable_params"] < summary["total_params"]
    assert summary["peak_memory_mb"] > 0 and summary["train_seconds"] > 0
    assert json.loads((run / "labels.json").read_text()) == ["money", "sport", "tech"]
    # The saved config re-runs the job: every option resolved, lr filled in.
    saved = read_config(run / "config.yaml")
    assert saved["lr"] == 5e-3 and saved["metric"] == "accuracy" and saved["eval_every"] == 3
    assert TuneConfig(**saved) == config(tmp_path, bert_dir, data_file, eval_every=3).resolved()


def test_interrupted_run_resumes_to_the_same_result(
    tmp_path: Path, bert_dir: Path, data_file: Path
) -> None:
    # The keep loss (on by default for classification) cycles through its own reference
    # batches: a resumed run must take the same ones. Every 3rd batch, so the cut is mid-cycle.
    ref = tmp_path / "ref.txt"
    ref.write_text(
        "\n%\n".join(
            f"money sport tech {w} text number {i}"
            for i, w in enumerate("abcdefghijklmnopqrstuvwx")
        )
    )
    base = dict(
        eval_every=4,
        dropout=0.1,
        reference_text=str(ref),
        reference_examples=8,
        keep=0.5,
        keep_every=3,
    )
    straight = run_tune(config(tmp_path, bert_dir, data_file, name="straight", **base))

    def interrupt(progress: Progress, total: int) -> None:
        if progress.step == 7:
            signal.raise_signal(signal.SIGINT)

    cut = run_tune(config(tmp_path, bert_dir, data_file, name="cut", **base), on_step=interrupt)
    assert cut == {"interrupted": True, "step": 7, "run": str(tmp_path / "runs" / "cut")}
    assert RunFolder(tmp_path / "runs", "cut").resumable()
    assert not (tmp_path / "runs" / "cut").exists()  # only a finished run takes the name
    assert not (tmp_path / "runs" / "cut" / "summary.json").exists()
    resumed = run_tune(config(tmp_path, bert_dir, data_file, name="cut", **base), resume=True)
    for key in ("test_accuracy", "test_loss", "test_macro_f1", "steps", "best_step"):
        assert resumed[key] == straight[key], key

    def history(name: str) -> list[dict[str, float]]:
        lines = (tmp_path / "runs" / name / "metrics.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(x).items() if k != "train_seconds"} for x in lines]

    assert history("cut") == history("straight")
    assert any(row.get("train_keep", 0) > 0 for row in history("straight"))


def test_early_stopping_keeps_the_best(tmp_path: Path, bert_dir: Path, data_file: Path) -> None:
    summary = run_tune(
        config(tmp_path, bert_dir, data_file, epochs=30, eval_every=1, patience=2, lr=1e-2)
    )
    rows = (tmp_path / "runs" / "t" / "metrics.jsonl").read_text().splitlines()
    history = [json.loads(r)["val_accuracy"] for r in rows]
    assert summary["stopped_early"] and summary["steps"] < 30 * 6
    best = max(history)
    assert history[-3] == best and max(history[-2:]) <= best  # two evals without improvement
    assert summary["best_val_accuracy"] == best


def test_full_and_head_methods_train_what_they_say(
    tmp_path: Path, bert_dir: Path, data_file: Path
) -> None:
    head = run_tune(config(tmp_path, bert_dir, data_file, name="head", method="head", epochs=1))
    full = run_tune(config(tmp_path, bert_dir, data_file, name="full", method="full", epochs=1))
    assert head["trainable_params"] == 32 * 3 + 3  # classifier weight and bias
    assert full["trainable_params"] == full["total_params"]
    for name in ("head", "full"):
        meta = json.loads((tmp_path / "runs" / name / "trained" / "leantune.json").read_text())
        assert meta["method"] == name


def test_eval_predict_and_merge_on_a_saved_run(
    tmp_path: Path, bert_dir: Path, data_file: Path
) -> None:
    summary = run_tune(config(tmp_path, bert_dir, data_file, epochs=4))
    run = str(tmp_path / "runs" / "t")
    res = cli("eval", run)
    assert res.returncode == 0, res.stderr
    metrics = json.loads(res.stdout)
    assert metrics["accuracy"] == pytest.approx(summary["test_accuracy"])
    assert metrics["loss"] == pytest.approx(summary["test_loss"], rel=1e-5)

    res = cli("info", run)
    assert res.returncode == 0, res.stderr
    shown = [line.split() for line in res.stdout.splitlines()]
    assert ["test_accuracy", str(summary["test_accuracy"])] in shown and ["method", "LORA"] in shown

    texts = ["goal match the team", "bank profit shares today"]
    res = cli("predict", run, "--text", texts[0], "--text", texts[1])
    assert res.returncode == 0, res.stderr
    predicted = [json.loads(line) for line in res.stdout.splitlines()]
    assert [p["text"] for p in predicted] == texts
    assert all(p["label"] in ("money", "sport", "tech") and 0 < p["score"] <= 1 for p in predicted)

    out = tmp_path / "merged"
    res = cli("merge", run, "--out", str(out))
    assert res.returncode == 0, res.stderr
    plain = AutoModelForSequenceClassification.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    with torch.no_grad():
        probs = plain(**tok(texts, padding=True, return_tensors="pt")).logits.softmax(-1)
    labels = [plain.config.id2label[int(i)] for i in probs.argmax(-1)]
    assert labels == [p["label"] for p in predicted]
    assert probs.max(-1).values.tolist() == pytest.approx([p["score"] for p in predicted], abs=1e-5)
    assert not any("lora" in k for k in plain.state_dict())


def test_user_files_with_other_columns_and_separate_eval_test(
    tmp_path: Path, bert_dir: Path
) -> None:
    rows = [{"body": r["text"], "topic": r["label"]} for r in topic_rows(90, seed=1)]
    train = write_rows(tmp_path / "train.csv", rows[:60])
    val = write_rows(tmp_path / "val.jsonl", rows[60:75])
    test = write_rows(tmp_path / "test.csv", rows[75:])
    summary = run_tune(
        TuneConfig(
            model=str(bert_dir),
            data=str(train),
            eval_data=str(val),
            test_data=str(test),
            text_column="body",
            label_column="topic",
            runs_dir=str(tmp_path / "runs"),
            epochs=1,
        )
    )
    assert summary["run"].endswith("tiny-bert-train-lora")
    assert (summary["train_examples"], summary["val_examples"], summary["test_examples"]) == (
        60,
        15,
        15,
    )


def test_causal_lm_on_a_tiny_llama(tmp_path: Path, data_file: Path) -> None:
    llama = tiny_model_folder(tmp_path / "tiny-llama", kind="llama")
    summary = run_tune(
        TuneConfig(
            model=str(llama),
            task="causal-lm",
            data=str(data_file),
            runs_dir=str(tmp_path / "runs"),
            epochs=8,
            batch_size=8,
            lr=3e-2,
            layers="all",
        )
    )
    rows = [
        json.loads(r) for r in (Path(summary["run"]) / "metrics.jsonl").read_text().splitlines()
    ]
    ppl = [r["val_perplexity"] for r in rows]
    # A random tiny Llama is a poor base: LoRA lowers its training loss but barely moves held-out
    # perplexity, which stays below uniform guessing over its 64-token vocabulary.
    assert rows[-1]["train_loss"] < rows[0]["train_loss"] and max(ppl) < 64
    assert math.isfinite(summary["test_perplexity"]) and "test_accuracy" not in summary
    assert summary["best_val_perplexity"] == min(ppl)
    res = cli("eval", summary["run"])
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["perplexity"] == pytest.approx(summary["test_perplexity"])


def test_yaml_config_and_command_line_override(
    tmp_path: Path, bert_dir: Path, data_file: Path
) -> None:
    path = tmp_path / "run.yaml"
    path.write_text(
        yaml.safe_dump(
            {"model": str(bert_dir), "data": str(data_file), "epochs": 1, "lr": 1e-3, "r": 2}
        )
    )
    res = cli("tune", "--config", str(path), "--r", "4", "--runs-dir", str(tmp_path), "--quiet")
    assert res.returncode == 0, res.stderr
    assert "test accuracy" in res.stdout
    saved = read_config(tmp_path / "tiny-bert-topics-lora" / "config.yaml")
    assert (saved["r"], saved["lr"], saved["epochs"]) == (4, 1e-3, 1)
    # The saved config re-runs the job as it was.
    res = cli(
        "tune",
        "--config",
        str(tmp_path / "tiny-bert-topics-lora" / "config.yaml"),
        "--name",
        "again",
        "--quiet",
    )
    assert res.returncode == 0, res.stderr
    assert (
        json.loads((tmp_path / "again" / "summary.json").read_text())["test_accuracy"]
        == (
            json.loads((tmp_path / "tiny-bert-topics-lora" / "summary.json").read_text())[
                "test_accuracy"
            ]
        )
    )


def test_tune_with_the_frozen_prefix_cache(tmp_path: Path, bert_dir: Path, data_file: Path) -> None:
    said: list[str] = []
    summary = run_tune(
        config(tmp_path, bert_dir, data_file, layers="2", cache_prefix=True), log=said.append
    )
    assert "layers below 2 are cached" in " ".join(said)
    assert summary["steps"] == 3 * 6 and 0 <= summary["test_accuracy"] <= 1


def test_train_examples_samples_training_only(tmp_path: Path) -> None:
    from leantune.tune import load_splits

    data = write_rows(tmp_path / "topics.jsonl", topic_rows(90))
    full = load_splits(TuneConfig(data=str(data)))
    small = load_splits(TuneConfig(data=str(data), train_examples=12))
    assert len(small.train.texts) == 12 and set(small.train.texts) <= set(full.train.texts)
    assert sorted(set(small.train.labels)) == sorted(set(full.train.labels))  # stratified
    assert small.val.texts == full.val.texts and small.test.texts == full.test.texts
    with pytest.raises(lt.LeantuneError, match="train-examples"):
        TuneConfig(train_examples=0)
