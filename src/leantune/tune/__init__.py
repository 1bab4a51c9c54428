"""The tune job: config → model and data → method → the one loop → test metrics → run folder.

Everything that can be wrong with the input (files, columns, labels, model folder, run folder)
is checked before anything is written, so bad input never touches the disk.

Run folder ``runs/<name>/``: config.yaml (re-runs the job), labels.json, metrics.jsonl (one
line per validation), adapter/ (an adapter method, in peft's format where peft has the method) or trained/
(full / head / probe tensors),
history.json, report.html with PNG plots, summary.json (written last) and the marker
.leantune-run.json. While it trains the run lives in ``runs/.<name>.partial/`` with its
checkpoint/ (see :mod:`leantune.tune.runfolder`).

One module per job: :mod:`~leantune.tune.config` (the options), :mod:`~leantune.tune.prepare`
(model, tokenizer, splits, token ids), :mod:`~leantune.tune.strategy` (what trains: a method or a
plan), :mod:`~leantune.tune.run` (the run in named phases) and :mod:`~leantune.tune.finished`
(commands on a finished run).
"""

from leantune.tune.config import (
    TuneConfig,
    check_option_types,
    default_lr,
    field_docs,
    make_config,
    option_docs,
    parse_targets,
    read_config,
    run_methods,
    write_config,
)
from leantune.tune.finished import (
    SavedRun,
    check_run_folder,
    evaluate_run,
    generate_run,
    load_run,
    merge_run,
    predict_run,
    run_select,
    save_trained,
    side_by_side,
    write_run_report,
)
from leantune.tune.prepare import Prepared, Splits, encode, load_splits, pick_device, prepare
from leantune.tune.run import TuneRecipe, run_tune
from leantune.tune.strategy import (
    apply_method,
    apply_plan,
    head_modules,
    make_penalty,
    make_plan,
    parse_layers,
    scoring_batches,
)

__all__ = [
    "Prepared",
    "SavedRun",
    "Splits",
    "TuneConfig",
    "TuneRecipe",
    "apply_method",
    "apply_plan",
    "check_option_types",
    "check_run_folder",
    "default_lr",
    "encode",
    "evaluate_run",
    "field_docs",
    "generate_run",
    "head_modules",
    "load_run",
    "load_splits",
    "make_config",
    "make_penalty",
    "make_plan",
    "merge_run",
    "option_docs",
    "parse_layers",
    "parse_targets",
    "pick_device",
    "predict_run",
    "prepare",
    "read_config",
    "run_methods",
    "run_select",
    "run_tune",
    "save_trained",
    "scoring_batches",
    "side_by_side",
    "write_config",
    "write_run_report",
]
