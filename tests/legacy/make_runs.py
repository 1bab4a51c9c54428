"""Writes tests/legacy/: run folders made by leantune as it was before the re-packaging of
issue 27 (commit the output, never regenerate it with newer code): a tiny BERT model folder,
its data and reference text, a finished run and an interrupted one (Ctrl-C after step 5, its
checkpoint left in the partial folder). Paths in them are relative to tests/legacy/.

    cd tests/legacy && python make_runs.py
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from helpers import tiny_model_folder, topic_rows, write_rows  # noqa: E402
from leantune.tune import make_config, run_tune  # noqa: E402
from test_keep import reference_file  # noqa: E402

OPTIONS: dict[str, Any] = {
    "model": "model",
    "data": "data.csv",
    "runs_dir": "runs",
    "reference_text": "ref.txt",
    "reference_examples": 12,
    "keep_examples": 20,
    "epochs": 2,
    "batch_size": 8,
    "lr": 1e-2,
    "seed": 0,
}
STOP_AT = 5


def main() -> None:
    os.chdir(HERE)
    for name in ("model", "runs", "data.csv", "ref.txt"):
        path = HERE / name
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    tiny_model_folder(Path("model"))
    write_rows(Path("data.csv"), topic_rows(60))
    reference_file(Path("ref.txt"))
    run_tune(make_config(OPTIONS | {"name": "finished"}))

    def stop(progress: Any, limit: int) -> None:
        if progress.step == STOP_AT:
            os.kill(os.getpid(), signal.SIGINT)

    run_tune(make_config(OPTIONS | {"name": "stopped"}), on_step=stop)
    assert (HERE / "runs" / ".stopped.partial" / "checkpoint").is_dir()
    print(json.dumps(sorted(str(p.relative_to(HERE)) for p in HERE.rglob("*") if p.is_file())))


if __name__ == "__main__":
    main()
