"""Experiment tracking on a tiny run: TensorBoard event files and an MLflow file store hold the
validation metrics at their steps and the config; unknown or missing backends are refused."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from helpers import tiny_model_folder, topic_rows, write_rows
from leantune.core.errors import LeantuneError
from leantune.tune import TuneConfig, run_tune

needs = pytest.mark.skipif(
    importlib.util.find_spec("tensorboard") is None or importlib.util.find_spec("mlflow") is None,
    reason="the tensorboard and mlflow extras are not installed",
)


@needs
def test_tensorboard_and_mlflow_get_the_metrics(tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = TuneConfig(
        model=str(tiny_model_folder(tmp_path / "bert")),
        data=str(write_rows(tmp_path / "t.jsonl", topic_rows(60))),
        runs_dir=str(tmp_path / "runs"),
        name="t",
        batch_size=8,
        epochs=2,
        lr=5e-3,
        reference_examples=0,
        track="tensorboard,mlflow",
    )
    summary = run_tune(cfg)
    run = tmp_path / "runs" / "t"
    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [int(r["step"]) for r in history]
    vals = [r["val_accuracy"] for r in history]

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    scalars = events.Scalars("val_accuracy")
    assert [e.step for e in scalars] == steps
    assert [e.value for e in scalars] == pytest.approx(vals)
    assert events.Scalars("final/test_accuracy")[0].value == pytest.approx(summary["test_accuracy"])

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("leantune")
    (found,) = client.search_runs([exp.experiment_id])
    assert found.info.run_name == "t" and found.info.status == "FINISHED"
    assert found.data.params["lr"] == "0.005" and found.data.params["method"] == "lora"
    got = client.get_metric_history(found.info.run_id, "val_accuracy")
    assert [m.step for m in got] == steps
    assert [m.value for m in got] == pytest.approx(vals)


def test_unknown_backend_is_refused() -> None:
    with pytest.raises(LeantuneError, match="--track 'wandb' is unknown"):
        TuneConfig(track="tensorboard,wandb")


def test_missing_package_is_named_before_anything_is_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a)
    )
    cfg = TuneConfig(
        model=str(tiny_model_folder(tmp_path / "bert")),
        data=str(write_rows(tmp_path / "t.jsonl", topic_rows(30))),
        runs_dir=str(tmp_path / "runs"),
        name="t",
        reference_examples=0,
        track="mlflow",
    )
    with pytest.raises(LeantuneError, match=r"pip install 'leantune\[mlflow\]'"):
        run_tune(cfg)
    assert not (tmp_path / "runs" / "t").exists()
