"""One process of a distributed test run (started by torchrun from test_distributed.py, or
alone as the single-process reference): ``python dist_worker.py SPEC.json``.

SPEC holds the tune options (``options``), ``resume``, and per-rank actions: ``runs_dir_of``
(a runs_dir per rank: other ranks must write nothing into theirs), ``options_of`` (options
that differ on one rank), ``stop_at`` (rank 0 sends itself Ctrl-C after that step) and
``die_at`` (rank 1 kills itself with SIGKILL after that step). Writes ``out-<rank>.json``
beside SPEC: the summary, or the error line.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

from leantune.core.distributed import leave
from leantune.core.errors import LeantuneError
from leantune.tune import make_config, run_tune


def main(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    rank = os.environ.get("RANK", "0")
    options = dict(spec["options"])
    options |= spec.get("options_of", {}).get(rank, {})
    if rank in spec.get("runs_dir_of", {}):
        options["runs_dir"] = spec["runs_dir_of"][rank]

    def on_step(progress: Any, limit: int) -> None:
        if rank == "0" and progress.step == spec.get("stop_at"):
            os.kill(os.getpid(), signal.SIGINT)
        if rank == "1" and progress.step == spec.get("die_at"):
            os.kill(os.getpid(), signal.SIGKILL)

    out = Path(spec_path).with_name(f"out-{rank}.json")
    try:
        summary = run_tune(make_config(options), resume=spec.get("resume", False), on_step=on_step)
    except LeantuneError as e:
        out.write_text(json.dumps({"error": str(e)}))
        leave(together=False)
        return 2
    out.write_text(json.dumps(summary, default=str))
    leave()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
