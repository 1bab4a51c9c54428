"""Optional experiment tracking: TensorBoard event files and an MLflow local file store.

Off by default; ``--track tensorboard``, ``--track mlflow`` or both. TensorBoard writes to
``<run>/tensorboard`` (``tensorboard --logdir runs``); MLflow to a local SQLite store,
``<runs_dir>/mlflow.db``, experiment "leantune", one MLflow run per leantune run (``mlflow ui
--backend-store-uri sqlite:///runs/mlflow.db``). Not MLflow's ``mlruns`` file store: MLflow 3
refuses it unless an environment variable opts back in (it is in maintenance mode). Logged: the config as parameters, every validation row at its
optimizer step, and the summary's numbers at the end. Each backend is an optional extra
(``pip install 'leantune[tensorboard]'`` / ``'leantune[mlflow]'``).
"""

from __future__ import annotations

import importlib.util
import numbers
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from leantune.core.errors import LeantuneError

BACKENDS = ("tensorboard", "mlflow")
_PACKAGE = {"tensorboard": "tensorboard", "mlflow": "mlflow"}


def parse_track(spec: str | None) -> list[str]:
    names = [s.strip() for s in (spec or "").split(",") if s.strip()]
    for name in names:
        if name not in BACKENDS:
            raise LeantuneError(f"--track {name!r} is unknown; use tensorboard, mlflow or both")
    return names


def check_backends(spec: str | None) -> list[str]:
    """The chosen backends, each checked to be installed."""
    names = parse_track(spec)
    for name in names:
        if importlib.util.find_spec(_PACKAGE[name]) is None:
            raise LeantuneError(
                f"--track {name} needs the {_PACKAGE[name]} package: pip install 'leantune[{name}]'"
            )
    return names


def _numbers(values: Mapping[str, Any]) -> dict[str, float]:
    return {
        k: float(v)
        for k, v in values.items()
        if isinstance(v, numbers.Real) and not isinstance(v, bool)
    }


class Tracker:
    """Fans each record out to the chosen backends; does nothing when none is chosen."""

    def __init__(
        self, spec: str | None, run: Path, config: Mapping[str, Any], name: str | None = None
    ) -> None:
        """Log into the folder ``run`` (the partial folder while the run trains) under the run
        name ``name`` (default: the folder's name)."""
        names = check_backends(spec)
        self.tb: Any = None
        self.mlflow: Any = None
        self.run_id = ""
        params = {k: "" if v is None else str(v) for k, v in config.items()}
        if "tensorboard" in names:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=str(run / "tensorboard"))
            table = "\n".join(f"| {k} | {v} |" for k, v in params.items())
            self.tb.add_text("config", "| option | value |\n|---|---|\n" + table, 0)
        if "mlflow" in names:
            from mlflow.entities import Param
            from mlflow.tracking import MlflowClient

            uri = f"sqlite:///{(run.parent / 'mlflow.db').resolve()}"
            self.mlflow = MlflowClient(tracking_uri=uri)
            exp = self.mlflow.get_experiment_by_name("leantune")
            exp_id = exp.experiment_id if exp else self.mlflow.create_experiment("leantune")
            self.run_id = self.mlflow.create_run(exp_id, run_name=name or run.name).info.run_id
            self.mlflow.log_batch(
                self.run_id, params=[Param(k, v[:6000]) for k, v in params.items()]
            )

    def log(self, values: Mapping[str, Any], step: int) -> None:
        metrics = _numbers(values)
        if self.tb is not None:
            for key, value in metrics.items():
                self.tb.add_scalar(key, value, step)
            self.tb.flush()
        if self.mlflow is not None:
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            self.mlflow.log_batch(
                self.run_id, metrics=[Metric(k, v, now, step) for k, v in metrics.items()]
            )

    def close(self, status: str = "FINISHED") -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None
        if self.mlflow is not None:
            self.mlflow.set_terminated(self.run_id, status=status)
            self.mlflow = None
