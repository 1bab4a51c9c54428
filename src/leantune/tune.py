"""The tune job: config → model and data → method → the one loop → test metrics → run folder.

Everything that can be wrong with the input (files, columns, labels, model folder, run folder)
is checked before anything is written, so bad input never touches the disk.

Run folder ``runs/<name>/``: config.yaml (re-runs the job), labels.json, metrics.jsonl (one
line per validation), adapter/ (LoRA, peft format) or trained/ (full / head-only tensors),
summary.json, report.html with PNG plots; checkpoint/ while the run is unfinished.
"""

from __future__ import annotations

import ast
import contextlib
import inspect
import itertools
import json
import math
import os
import random
import re
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file, save_file
from torch import nn

from leantune import runfolder
from leantune.data import (
    TextTable,
    encode_labels,
    label_names,
    length_buckets,
    load_table,
    stratified_split,
)
from leantune.errors import LeantuneError
from leantune.evaluate import Encoded, Evaluation, evaluate, make_batch
from leantune.formats import save_adapter
from leantune.inject import (
    adapter_layers,
    inject,
    name_matches,
    output_head_names,
    parameter_report,
)
from leantune.knowledge import (
    cache_root,
    folder_fingerprint,
    knowledge_kept,
    prepare_reference,
    reference_texts,
)
from leantune.memory import peak_memory_mb, reset_peak_memory
from leantune.methods.bitfit import BitFitConfig
from leantune.methods.layernorm import LayerNormConfig
from leantune.methods.lora import LoraConfig
from leantune.models import TASKS, load_model, load_tokenizer, max_positions, model_dir, num_layers
from leantune.plan import Plan, allocate, parse_budget, parse_methods
from leantune.runfolder import RunFolder
from leantune.select import SPARSE_CHUNK, Scores, score
from leantune.track import Tracker, check_backends, parse_track
from leantune.train.adapt import RankPruner
from leantune.train.loop import (
    Diverged,
    Progress,
    TrainConfig,
    checkpoint_meta,
    latest_checkpoint,
    train,
    trainable_parameters,
)
from leantune.train.prefix import PrefixCache
from leantune.train.regularize import Penalty, find_changes, fisher_diagonal
from leantune.train.schedule import SCHEDULES, Unfreezer, lr_scales

METHODS = ("lora", "bitfit", "layernorm", "sparse", "full", "head")
ADAPTER_METHODS = ("lora", "bitfit", "layernorm", "sparse")
"""Methods whose run saves an adapter/ folder (the others save trained/)."""
DEFAULT_LR = {
    "lora": 2e-3,
    "bitfit": 2e-3,
    "layernorm": 2e-3,
    "sparse": 2e-3,  # its values train at SparseConfig.lr_scale (0.05) of it
    "full": 5e-5,
    "head": 5e-3,
}
DEFAULT_LORA_L2 = 1e-3
CLASSIFY_METRICS = ("accuracy", "macro_f1", "loss")
STATE = runfolder.STATE


@dataclass
class TuneConfig:
    """Everything a tune run needs; saved as config.yaml in the run folder."""

    name: str | None = None
    """Run folder name under runs_dir (default: <model>-<data>-<method>)."""
    runs_dir: str = "runs"
    """Folder that holds the run folders."""
    model: str | None = None
    """Local transformers model folder (default: the embedded MiniLM-L6)."""
    task: str = "classify"
    """classify (sequence classification) or causal-lm (language modelling; metric perplexity)."""
    data: str | None = None
    """Training data: .csv, .jsonl or a datasets save_to_disk folder (default: BBC News)."""
    eval_data: str | None = None
    """Validation data file; default: a split of --data."""
    test_data: str | None = None
    """Test data file; default: a split of --data."""
    text_column: str = "text"
    """Column holding the text."""
    label_column: str = "label"
    """Column holding the label (classification)."""
    split: str = "0.7,0.1,0.2"
    """Train,validation,test fractions of --data, stratified by label."""
    train_examples: int | None = None
    """Train on a stratified sample of this many training examples (the validation and test
    splits stay the same): a small-data run."""
    max_length: int = 128
    """Truncate texts to this many tokens (capped at the model's positions)."""
    batch_size: int = 16
    """Training batch size; batches group texts of similar length."""
    eval_batch_size: int = 64
    """Batch size for validation, test and predict."""
    method: str = "lora"
    """lora; bitfit (biases) or layernorm (norm scales and shifts) within --layers; sparse (the
    top-Fisher weight entries within --budget and --layers, a FISH mask); full (every
    parameter) or head (the task head only)."""
    # LoRA's own options: their help is LoraConfig's field docstrings (see option_docs).
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    rslora: bool = False
    dora: bool = False
    init: str = "standard"
    targets: str = "all-linear"
    """LoRA targets: all-linear, a comma list of module names, or a regex."""
    layers: str = "upper-half"
    """Layers adapted (and where --select auto may spend): upper-half, all, a range 3-5 or a
    list 3,4,5."""
    select: str | None = None
    """auto: score the parameters on a few training batches and spend --budget on the ones that
    matter (per module: a method from --plan-methods and its size, + the head) within --layers;
    replaces --targets and --r."""
    budget: str = "0.5%"
    """Trainable parameters for --select auto and --method sparse: a count (68000) or a share of
    the model (0.5%)."""
    plan_methods: str = "lora"
    """Methods --select auto may spend the budget on: a comma list of lora, bitfit, layernorm,
    sparse (one method per module; the best gain per parameter wins)."""
    plan: str | None = None
    """A plan.json (from leantune select or --select auto, maybe edited) to tune by."""
    score_examples: int = 64
    """Training examples --select auto scores the parameters on."""
    reference_text: str | None = None
    """General (not task) text to measure knowledge kept on: entries separated by % lines,
    blank lines or newlines (default: the fortunes of fortunes-min when installed, else skip)."""
    reference_examples: int = 256
    """Reference texts used to measure knowledge kept (0 turns the measurement off)."""
    cache_prefix: bool = False
    """Run the frozen bottom layers without dropout and reuse their outputs after the first
    epoch: later epochs skip them (faster; holds their outputs in memory)."""
    epochs: int = 2
    """Passes over the training data."""
    lr: float | None = None
    """Peak learning rate (default per method: lora 2e-3, full 5e-5, head 5e-3)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    warmup_ratio: float = 0.06
    """Fraction of steps warming up before the decay (slanted: the rise)."""
    schedule: str = "linear"
    """Learning-rate shape after warmup: linear, cosine, constant or slanted (slanted
    triangular: short rise, long fall to 1/32)."""
    layer_decay: float = 1.0
    """Layer-wise rate decay: layer l of L trains at decay^(L-1-l) of the rate (1: off)."""
    unfreeze_every: int | None = None
    """Gradual unfreezing: the head and top layer train first, one more layer every N
    optimizer steps (default: everything from the start)."""
    loraplus_ratio: float = 1.0
    """LoRA+: the B matrices train at this multiple of A's rate (1: off; the paper uses 16)."""
    l2: float | None = None
    """Weight of the L2 penalty on the learned change (LoRA: |s·B·A|²; in-place tuning: L2-SP,
    |θ - θ₀|²; task heads are not penalized). Default: 1e-3 for LoRA (not DoRA/PiSSA), else 0."""
    l1: float = 0.0
    """Weight of the L1 penalty on the learned change."""
    ewc: float = 0.0
    """Weight of EWC: Σ F·change², F the Fisher diagonal of the pretrained weights on
    --score-examples training examples."""
    grad_accum: int = 1
    """Batches per optimizer step."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm (0 turns clipping off)."""
    eval_every: int | None = None
    """Also validate every N optimizer steps (default: once per epoch)."""
    patience: int | None = None
    """Stop after N validations without improvement (default: never)."""
    metric: str | None = None
    """Validation metric for the best checkpoint (default: accuracy, or perplexity)."""
    max_steps: int | None = None
    """Stop after N optimizer steps (a quick look; the schedule still spans all epochs)."""
    seed: int = 0
    """Seed for the split, initialisation, batches and dropout."""
    device: str = "auto"
    """auto (CUDA when present), cpu, cuda or cuda:N."""
    adapt: float = 1.0
    """Adaptive budget (AdaLoRA-style): LoRA starts at this multiple of its ranks and prunes
    rank components by smoothed |w·grad| importance, cubically from the end of warmup to 70%
    of the steps, down to the parameter count it started from; the adapter is saved at that
    size with uneven ranks (1: off)."""
    track: str | None = None
    """Experiment tracking, off by default: tensorboard (<run>/tensorboard), mlflow (local
    SQLite store <runs_dir>/mlflow.db) or tensorboard,mlflow; each an optional extra of leantune."""

    def __post_init__(self) -> None:
        choices = {"task": TASKS, "method": METHODS, "init": ("standard", "gaussian", "pissa")}
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise LeantuneError(
                    f"--{key} {getattr(self, key)!r} is unknown; use one of {allowed}"
                )
        for key in ("max_length", "batch_size", "eval_batch_size", "r", "epochs", "grad_accum"):
            if getattr(self, key) <= 0:
                raise LeantuneError(f"--{key.replace('_', '-')} must be positive")
        if self.name is not None and (
            not self.name or Path(self.name).name != self.name or self.name.startswith(".")
        ):
            raise LeantuneError(
                f"--name {self.name!r} must be a plain folder name (not starting with a dot)"
            )
        if self.lr is not None and not (math.isfinite(self.lr) and self.lr > 0):
            raise LeantuneError(f"--lr must be a finite positive number, got {self.lr}")
        for key in ("eval_every", "patience", "max_steps"):
            value = getattr(self, key)
            if value is not None and value <= 0:
                flag = key.replace("_", "-")
                raise LeantuneError(
                    f"--{flag} must be a positive number (or left out), got {value}"
                )
        if not 0 <= self.warmup_ratio < 1:
            raise LeantuneError(f"--warmup-ratio must be in [0, 1), got {self.warmup_ratio}")
        if not (math.isfinite(self.max_grad_norm) and self.max_grad_norm >= 0):
            raise LeantuneError(
                f"--max-grad-norm must be 0 (off) or a positive number, got {self.max_grad_norm}"
            )
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise LeantuneError(f"--weight-decay must be 0 or more, got {self.weight_decay}")
        allowed_metrics = ("perplexity", "loss") if self.task == "causal-lm" else CLASSIFY_METRICS
        if self.metric is not None and self.metric not in allowed_metrics:
            raise LeantuneError(
                f"--metric {self.metric!r} is not a {self.task} metric; use one of {allowed_metrics}"
            )
        self.fractions()  # validates
        if self.select not in (None, "auto"):
            raise LeantuneError(f"--select {self.select!r}: the one selector is auto")
        if self.select and self.plan:
            raise LeantuneError("--select auto makes a plan and --plan gives one; pick one")
        if (self.select or self.plan) and self.method not in ("lora", "sparse"):
            raise LeantuneError("--select / --plan choose their own methods; drop --method")
        parse_methods(self.plan_methods)
        if self.score_examples <= 0:
            raise LeantuneError("--score-examples must be positive")
        if self.schedule not in SCHEDULES:
            raise LeantuneError(f"--schedule {self.schedule!r} is unknown; use one of {SCHEDULES}")
        for key in ("l2", "l1", "ewc"):
            if (getattr(self, key) or 0) < 0:
                raise LeantuneError(f"--{key} must be 0 or more, got {getattr(self, key)}")
        if not 0 < self.layer_decay <= 1:
            raise LeantuneError(f"--layer-decay must be in (0, 1], got {self.layer_decay}")
        if not self.loraplus_ratio >= 1:
            raise LeantuneError("--loraplus-ratio must be 1 (off) or more")
        if self.unfreeze_every is not None and self.unfreeze_every <= 0:
            raise LeantuneError("--unfreeze-every must be a positive number of steps")
        if (self.l2 or self.l1 or self.ewc) and (self.init == "pissa" or self.dora):
            raise LeantuneError(
                "--l2/--l1/--ewc penalize the LoRA update s·B·A, which is not the change from the "
                "pretrained weights under PiSSA or DoRA; drop one of the two"
            )
        if self.train_examples is not None and self.train_examples <= 0:
            raise LeantuneError("--train-examples must be positive")
        if self.reference_examples < 0:
            raise LeantuneError("--reference-examples must be 0 (off) or more")
        parse_track(self.track)
        if self.adapt < 1:
            raise LeantuneError(f"--adapt must be 1 (off) or more, got {self.adapt}")
        if self.adapt > 1 and (self.method != "lora" or self.dora or self.init == "pissa"):
            raise LeantuneError("--adapt prunes plain LoRA ranks; use it with --method lora")
        if self.adapt > 1 and "lora" not in parse_methods(self.plan_methods) and self.select:
            raise LeantuneError("--adapt prunes LoRA ranks; --plan-methods must include lora")

    def fractions(self) -> tuple[float, float, float]:
        try:
            parts = tuple(float(x) for x in self.split.split(","))
        except ValueError:
            parts = ()
        if len(parts) != 3 or min(parts) < 0 or abs(sum(parts) - 1) > 1e-6:
            raise LeantuneError(
                f"--split {self.split!r} must be three fractions summing to 1, like 0.7,0.1,0.2"
            )
        return parts[0], parts[1], parts[2]

    @property
    def causal(self) -> bool:
        return self.task == "causal-lm"

    def resolved(self) -> TuneConfig:
        """Defaults that depend on other fields filled in, as saved in config.yaml."""
        values = asdict(self)
        if self.lr is None:
            values["lr"] = DEFAULT_LR[self.method]
        if self.l2 is None:
            # Measured (docs/BENCHMARKS.md, gradual tuning): on a full pass over the data L2 1e-3
            # on the LoRA update keeps more of the original model at no cost in accuracy.
            plain_lora = self.method == "lora" and not self.dora and self.init != "pissa"
            values["l2"] = DEFAULT_LORA_L2 if plain_lora else 0.0
        if self.metric is None:
            values["metric"] = "perplexity" if self.causal else "accuracy"
        if self.name is None:
            model = Path(self.model).name if self.model else "minilm"
            data = Path(self.data).stem if self.data else "bbc"
            values["name"] = f"{model}-{data}-{self.method}"
        return TuneConfig(**values)


def field_docs(cls: type) -> dict[str, str]:
    """Field docstrings (the string right after each field): CLI help and YAML comments."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for node, nxt in itertools.pairwise(body):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
        ):
            docs[node.target.id] = " ".join(str(nxt.value.value).split())
    return docs


def option_docs() -> dict[str, str]:
    """Help for every TuneConfig field; the LoRA ones come from LoraConfig."""
    lora = {k: f"LoRA: {v}" for k, v in field_docs(LoraConfig).items()}
    return lora | field_docs(TuneConfig)


def read_yaml(path: Path, what: str) -> Any:
    """A YAML file's contents; unreadable or invalid files are one clear error."""
    try:
        return yaml.safe_load(Path(path).read_text())
    except OSError as e:
        raise LeantuneError(f"cannot read {what} {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise LeantuneError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from None


def read_config(path: Path) -> dict[str, Any]:
    """A YAML mapping of TuneConfig fields; unknown keys are refused by name."""
    values = read_yaml(path, "config")
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise LeantuneError(f"{path} must hold a mapping of option: value")
    known = {f.name for f in fields(TuneConfig)}
    unknown = sorted(str(k) for k in values if k not in known)
    if unknown:
        raise LeantuneError(f"{path}: unknown option {unknown[0]!r}; options are {sorted(known)}")
    return check_option_types(values, str(path))


def write_config(config: TuneConfig, path: Path) -> None:
    docs = option_docs()
    lines = ["# leantune tune --config this-file   (command-line options override it)"]
    for key, value in asdict(config).items():
        lines.append(f"# {docs.get(key, '')}")
        lines.append(yaml.safe_dump({key: value}, default_flow_style=False, width=1000).strip())
    atomic_write(path, "\n".join(lines) + "\n")


def make_config(values: Mapping[str, Any], where: str | None = None) -> TuneConfig:
    """A TuneConfig from option values (a YAML file's, the command line's, a sweep trial's);
    values of the wrong type are one clear error naming ``where`` they came from."""
    try:
        return TuneConfig(**check_option_types(values, where))
    except TypeError as e:
        raise LeantuneError(f"bad option: {e}") from None


_EXAMPLES = {"lr": "2e-3", "l2": "1e-3"}
"""Examples for error messages where the field's default (None) cannot serve."""


def check_option_types(values: Mapping[str, Any], where: str | None = None) -> dict[str, Any]:
    """``values`` with each TuneConfig field's value checked against its annotation.

    Whole numbers for int fields (3.0 becomes 3; a bool is not a number), numbers for float
    fields (an int, or text YAML reads as a number such as ``1e-3``, becomes a float), finite
    floats, true/false for flags, text for text fields (a number becomes its text: ``budget:
    68000``), None only where the field allows it. Unknown names are left to TuneConfig.
    """
    import typing

    hints = typing.get_type_hints(TuneConfig)
    defaults = {f.name: f.default for f in fields(TuneConfig)}
    prefix = f"{where}: " if where else ""
    out = dict(values)
    for key, value in values.items():
        if key not in hints:
            continue
        kinds = typing.get_args(hints[key]) or (hints[key],)
        kind = next(k for k in kinds if k is not type(None))
        default = defaults[key]
        example = _EXAMPLES.get(key, repr(default) if isinstance(default, kind) else None)
        if value is None:
            if type(None) in kinds:
                continue
            problem = "has no value"
        elif kind is bool:
            if isinstance(value, bool):
                continue
            problem, example = f"{value!r} is not true or false", "true"
        elif kind is str:
            if isinstance(value, str):
                continue
            if isinstance(value, int | float) and not isinstance(value, bool):
                out[key] = str(value)
                continue
            problem = f"{value!r} is not text"
        elif kind is int:
            if isinstance(value, int) and not isinstance(value, bool):
                continue
            if isinstance(value, float) and value.is_integer():
                out[key] = int(value)
                continue
            problem, example = f"{value!r} is not a whole number", example or "10"
        else:  # float
            number = value
            if isinstance(value, str):  # YAML reads 1e-3 (no dot) as text
                with contextlib.suppress(ValueError):
                    number = float(value)
            if isinstance(number, int | float) and not isinstance(number, bool):
                if math.isfinite(number):
                    out[key] = float(number)
                    continue
                problem = f"{value!r} is not a finite number"
            else:
                problem = f"{value!r} is not a number"
            example = example or "1.0"
        give = {bool: "true or false", str: "text", int: "a whole number"}.get(kind, "a number")
        raise LeantuneError(
            f"{prefix}{key}: {problem}; give {give}"
            + (f" like {example}" if example and kind is not bool else "")
            + (" (or leave it out)" if type(None) in kinds else "")
        )
    return out


# ---------------------------------------------------------------------------- files


def atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def unique_tensors(named: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Tied tensors once (safetensors refuses shared memory), detached, on the CPU."""
    seen: set[int] = set()
    out = {}
    for name, t in named.items():
        if id(t) not in seen:
            seen.add(id(t))
            out[name] = t.detach().cpu().contiguous()
    return out


def save_tensors(tensors: Mapping[str, torch.Tensor], path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(dict(tensors), str(tmp), metadata={"format": "pt"})
    os.replace(tmp, path)


def load_into(model: nn.Module, tensors: Mapping[str, torch.Tensor], where: Path) -> None:
    params = dict(model.named_parameters(remove_duplicate=False))
    missing = [n for n in tensors if n not in params]
    if missing:
        raise LeantuneError(f"{where} holds {missing[0]!r}, which the model does not have")
    with torch.no_grad():
        for name, t in tensors.items():
            if params[name].shape != t.shape:
                raise LeantuneError(
                    f"{where}: {name} has shape {tuple(t.shape)}, the model "
                    f"{tuple(params[name].shape)}"
                )
            params[name].copy_(t)


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


# ---------------------------------------------------------------------------- data


@dataclass
class Splits:
    train: TextTable
    val: TextTable
    test: TextTable
    label_names: list[str]


def _subset(table: TextTable, rows: list[int]) -> TextTable:
    labels = [table.labels[i] for i in rows] if table.labels else []
    return TextTable([table.texts[i] for i in rows], labels)


def load_splits(config: TuneConfig) -> Splits:
    label_column = None if config.causal else config.label_column
    if config.data is None:
        from leantune.defaults import bbc_news

        bbc = bbc_news()
        labels = [] if config.causal else [bbc.label_names[y] for y in bbc.labels]
        data = TextTable(bbc.texts, labels)
    else:
        data = load_table(config.data, config.text_column, label_column)

    def side(path: str | None) -> TextTable | None:
        return None if path is None else load_table(path, config.text_column, label_column)

    val, test = side(config.eval_data), side(config.test_data)
    train_f, val_f, test_f = config.fractions()
    val_f, test_f = (0.0 if val else val_f), (0.0 if test else test_f)
    total = train_f + val_f + test_f
    if total <= 0:
        raise LeantuneError("--split leaves no training data")
    strata = data.labels or ["_"] * len(data.texts)
    index = {n: i for i, n in enumerate(sorted(set(strata)))}
    parts = stratified_split(
        [index[s] for s in strata], (train_f / total, val_f / total, test_f / total), config.seed
    )
    train_part = _subset(data, parts[0])
    if config.train_examples is not None and config.train_examples < len(train_part.texts):
        keep = config.train_examples / len(train_part.texts)
        inner = train_part.labels or ["_"] * len(train_part.texts)
        ids = {n: i for i, n in enumerate(sorted(set(inner)))}
        sample = stratified_split([ids[s] for s in inner], (keep, 1 - keep, 0.0), config.seed)[0]
        train_part = _subset(train_part, sample)
    val = val or _subset(data, parts[1])
    test = test or _subset(data, parts[2])
    for what, table in (("training", train_part), ("validation", val), ("test", test)):
        if not table.texts:
            from leantune.data import PARTS, too_few_rows

            fractions = (train_f / total, val_f / total, test_f / total)
            where = config.data or "the data"
            cause = too_few_rows(data.labels, fractions, PARTS.index(what), where)
            if cause:  # labels with too few rows, not too few rows in all
                raise LeantuneError(cause)
            raise LeantuneError(
                f"the {what} split is empty: {config.data or 'the data'} has {len(data.texts)} "
                "rows; give more rows, a separate file, or other --split fractions"
            )
    names = [] if config.causal else label_names(train_part.labels)
    if not config.causal and len(names) < 2:
        raise LeantuneError(
            f"the training data has {len(names)} label value(s) in column "
            f"{config.label_column!r}; classification needs at least 2"
        )
    return Splits(train_part, val, test, names)


def encode(tok: Any, table: TextTable, names: list[str], max_length: int, where: str) -> Encoded:
    # Texts are cut to 100 characters per token of max_length before tokenizing, so one huge
    # text costs no more than a normal one. Natural text averages about 4 characters a token
    # and tokens beyond 20 are rare, so max_length tokens end far before the cut and the ids
    # are those of the whole text. A cut text that does not fill max_length (a long run of
    # spaces, a giant unknown word) may have lost tokens, so it is tokenized again whole.
    bound = max_length * 100
    texts = [t[:bound] for t in table.texts]
    ids = tok(texts, truncation=True, max_length=max_length)["input_ids"]
    again = [i for i, t in enumerate(table.texts) if len(t) > bound and len(ids[i]) < max_length]
    if again:
        whole = tok([table.texts[i] for i in again], truncation=True, max_length=max_length)
        for i, seq in zip(again, whole["input_ids"], strict=True):
            ids[i] = seq
    labels = encode_labels(table.labels, names, where) if names else []
    return Encoded(ids, labels)


# ---------------------------------------------------------------------------- methods


def parse_targets(spec: str) -> str | list[str]:
    if spec == "all-linear":
        return spec
    if "," in spec or re.fullmatch(r"[\w.]+", spec):
        return [t.strip() for t in spec.split(",") if t.strip()]
    return spec  # a regex


def parse_layers(spec: str, n: int | None) -> list[int] | None:
    if spec == "all":
        return None
    if n is None:
        raise LeantuneError(
            f"--layers {spec!r} needs the model's layer count, which its config does not give; "
            "use --layers all"
        )
    if spec == "upper-half":
        return list(range(n // 2, n))
    try:
        if re.fullmatch(r"\d+-\d+", spec):
            lo, hi = (int(x) for x in spec.split("-"))
            layers = list(range(lo, hi + 1))
        else:
            layers = [int(x) for x in spec.split(",")]
    except ValueError:
        raise LeantuneError(
            f"--layers {spec!r}: use upper-half, all, a range like 3-5 or a list like 3,4,5"
        ) from None
    bad = [i for i in layers if not 0 <= i < n]
    if bad or not layers:
        raise LeantuneError(f"--layers {spec!r}: the model has layers 0-{n - 1}")
    return layers


def head_modules(model: nn.Module, causal: bool) -> list[str]:
    if causal:
        return sorted(output_head_names(model))
    names = [n for n, _ in model.named_modules() if n and name_matches(n, ["classifier", "score"])]
    return [n for n in names if not any(n.startswith(o + ".") for o in names)]


def apply_method(model: nn.Module, config: TuneConfig) -> None:
    """Make the parameters of ``config.method`` trainable (LoRA: inject adapters)."""
    if config.method == "lora":
        lora = LoraConfig(
            r=config.r,
            alpha=config.alpha,
            dropout=config.dropout,
            rslora=config.rslora,
            dora=config.dora,
            init=config.init,
            targets=parse_targets(config.targets),
            layers=parse_layers(config.layers, num_layers(model)),
        )
        inject(model, lora)
        return
    if config.method in ("bitfit", "layernorm"):
        cls = BitFitConfig if config.method == "bitfit" else LayerNormConfig
        inject(model, cls(targets="all", layers=parse_layers(config.layers, num_layers(model))))
        return
    if config.method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return
    heads = head_modules(model, config.causal)
    if not heads:
        raise LeantuneError("--method head: the model has no classifier/score/output head")
    for p in model.parameters():
        p.requires_grad_(False)
    modules = dict(model.named_modules())
    for name in heads:
        for p in modules[name].parameters():
            p.requires_grad_(True)


def save_trained(model: nn.Module, run: Path, config: TuneConfig) -> Path:
    """adapter/ for LoRA (peft format) and the other adapter methods (leantune format);
    trained/ (safetensors + JSON) for full and head."""
    if config.method in ADAPTER_METHODS:
        return save_adapter(model, run / "adapter")
    final = run / "trained"
    tmp = Path(tempfile.mkdtemp(prefix=".trained-", dir=run))
    tensors = unique_tensors(trainable_parameters(model))
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    meta = {
        "method": config.method,
        "base_model": str(model_dir(config.model)),
        "tensors": len(tensors),
    }
    (tmp / "leantune.json").write_text(json.dumps(meta, indent=2) + "\n")
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


# ---------------------------------------------------------------------------- the run


@dataclass
class Prepared:
    """A model and tokenized data, ready to train or evaluate."""

    config: TuneConfig
    model: nn.Module
    tok: Any
    splits: Splits
    train: Encoded
    val: Encoded
    test: Encoded
    device: torch.device
    plan: Plan | None = None
    scores: Scores | None = None
    _cache: dict[int, list[dict[str, torch.Tensor]]] = field(default_factory=dict)

    def evaluate(self, enc: Encoded) -> Evaluation:
        return evaluate(
            self.model,
            enc,
            causal=self.config.causal,
            num_labels=len(self.splits.label_names),
            pad_id=self.tok.pad_token_id,
            batch_size=self.config.eval_batch_size,
        )

    def batches(self, epoch: int) -> list[dict[str, torch.Tensor]]:
        """This epoch's training batches: similar lengths together, padded per batch."""
        if epoch in self._cache:
            return self._cache[epoch]
        rows = length_buckets(
            [len(x) for x in self.train.ids],
            self.config.batch_size,
            seed=self.config.seed * 100_003 + epoch,
        )
        pad = self.tok.pad_token_id
        rows_too = self.config.cache_prefix
        self._cache = {
            epoch: [make_batch(self.train, r, pad, self.config.causal, rows_too) for r in rows]
        }
        return self._cache[epoch]


def pick_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise LeantuneError(f"--device {spec!r} is not a device; use auto, cpu or cuda") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LeantuneError("--device cuda: no CUDA device is available here; use --device auto")
    return device


def prepare(config: TuneConfig, with_method: bool = True) -> Prepared:
    """Load and check everything; writes nothing."""
    device = pick_device(config.device)
    folder = model_dir(config.model)
    splits = load_splits(config)
    tok = load_tokenizer(folder)
    random.seed(config.seed)
    torch.manual_seed(config.seed)
    model = load_model(folder, config.task, splits.label_names, tok.pad_token_id)
    length = min(config.max_length, max_positions(model) or config.max_length)
    names = splits.label_names
    train_enc = encode(tok, splits.train, names, length, "the training data")
    val_enc = encode(tok, splits.val, names, length, config.eval_data or "the validation split")
    test_enc = encode(tok, splits.test, names, length, config.test_data or "the test split")
    if config.causal:
        for enc in (train_enc, val_enc, test_enc):  # a 1-token text predicts nothing
            enc.ids = [x for x in enc.ids if len(x) > 1]
        if not train_enc.ids or not val_enc.ids or not test_enc.ids:
            raise LeantuneError("causal-lm needs texts of at least 2 tokens in every split")
    model.to(device)
    plan, scores = None, None
    if with_method and (config.select or config.plan or config.method == "sparse"):
        plan, scores = make_plan(model, config, train_enc, tok.pad_token_id)
        apply_plan(model, plan)
    elif with_method:
        apply_method(model, config)
    model.to(device)
    return Prepared(config, model, tok, splits, train_enc, val_enc, test_enc, device, plan, scores)


def scoring_batches(
    config: TuneConfig, train: Encoded, pad_id: int
) -> list[dict[str, torch.Tensor]]:
    """--score-examples training examples (seeded sample) in batches: what selection scores and
    EWC measures its Fisher on."""
    rows = list(range(len(train)))
    random.Random(config.seed).shuffle(rows)
    rows = rows[: config.score_examples]
    return [
        make_batch(train, rows[i : i + config.batch_size], pad_id, config.causal)
        for i in range(0, len(rows), config.batch_size)
    ]


def make_plan(
    model: nn.Module, config: TuneConfig, train: Encoded, pad_id: int
) -> tuple[Plan, Scores | None]:
    """The run's Plan: read from --plan, or scored on a few training batches and allocated."""
    modules = dict(model.named_modules())
    heads = [
        (n, sum(p.numel() for p in modules[n].parameters()))
        for n in head_modules(model, config.causal)
    ]
    if config.plan:
        plan = Plan.load(config.plan)
        plan.check(model)
        return plan, None
    base = sum(p.numel() for p in model.parameters())
    budget = parse_budget(config.budget, base)
    batches = scoring_batches(config, train, pad_id)
    methods = ("sparse",) if config.method == "sparse" else parse_methods(config.plan_methods)
    # Rank enough entries per module for sparse units to be able to take the whole budget.
    entries = max(16 * SPARSE_CHUNK, budget) if "sparse" in methods else 0
    scores = score(model, batches, skip=[h for h, _ in heads], max_entries=entries)
    # --layers bounds where the plan may go (default: the upper half, so backward stays short
    # and the frozen bottom can be cached); modules outside the layer stack stay candidates.
    allowed = parse_layers(config.layers, num_layers(model))
    candidates = Scores(
        [m for m in scores.modules if allowed is None or m.layer is None or m.layer in allowed],
        scores.examples,
        scores.seconds,
        # The embeddings' norm sits below every layer: tuning it would run backward to the bottom.
        [
            m
            for m in scores.norms
            if allowed is None or m.layer in allowed or (m.layer is None and "embed" not in m.name)
        ],
    )
    return allocate(candidates, budget, base, heads, methods=methods), scores


def apply_plan(model: nn.Module, plan: Plan) -> None:
    """The plan's methods and sizes on its modules, its heads trained in full, the rest frozen."""
    adapter = plan.adapter_config()
    if adapter is None:
        raise LeantuneError(
            f"the plan trains only the task head ({plan.params:,} parameters): the budget "
            "buys nothing else. Raise --budget, or use --method head"
        )
    inject(model, adapter)


def check_run_folder(run: Path, resume: bool, overwrite: bool) -> None:
    """Refuse a start that would lose or clash with something in ``run``; touches nothing."""
    RunFolder(run.parent, run.name).check(resume, overwrite)


def run_tune(
    config: TuneConfig,
    *,
    resume: bool = False,
    overwrite: bool = False,
    log: Callable[[str], None] | None = None,
    on_step: Callable[[Progress, int], None] | None = None,
    on_validation: Callable[[dict[str, float]], None] | None = None,
) -> dict[str, Any]:
    """Run the tune job; returns the summary (``{"interrupted": True, ...}`` after Ctrl-C).

    Everything is checked before anything is written; the run is built in its partial folder
    and replaces ``runs/<name>`` only once finished (see :mod:`leantune.runfolder`).
    ``on_validation`` sees each validation row (step, epoch, val_<metric>...) once it is saved;
    an exception it raises (a sweep's pruning) ends the run there, checkpoint kept."""
    config = config.resolved()
    folder = RunFolder(config.runs_dir, str(config.name))
    if folder.root.is_dir():  # finish what a killed process left half-way
        with folder.lock():
            folder.recover()
    folder.check(resume, overwrite)  # fails fast; checked again under the lock
    with contextlib.ExitStack() as stack:
        return _run(config, folder, resume, overwrite, stack, log, on_step, on_validation)


def _run(
    config: TuneConfig,
    folder: RunFolder,
    resume: bool,
    overwrite: bool,
    stack: contextlib.ExitStack,
    log: Callable[[str], None] | None,
    on_step: Callable[[Progress, int], None] | None,
    on_validation: Callable[[dict[str, float]], None] | None,
) -> dict[str, Any]:
    from leantune.compare import data_fingerprint
    from leantune.report import write_heatmap

    wall = time.perf_counter()
    reset_peak_memory(pick_device(config.device))  # this run's peak, not an earlier run's
    say = log or (lambda s: None)
    train_config = TrainConfig(
        epochs=config.epochs,
        lr=float(config.lr or 0),
        weight_decay=config.weight_decay,
        warmup_ratio=config.warmup_ratio,
        schedule=config.schedule,
        grad_accum=config.grad_accum,
        max_grad_norm=config.max_grad_norm or None,
        eval_every=config.eval_every,
        patience=config.patience,
        metric=str(config.metric),
        higher_is_better=config.metric != "perplexity" and config.metric != "loss",
        max_steps=config.max_steps,
        seed=config.seed,
    )
    plan_file = folder.work / "plan.json"
    if resume and plan_file.exists():  # the plan the run started with, not a new one
        prep = prepare(replace(config, select=None, plan=str(plan_file)))
        prep.config = config
    else:
        prep = prepare(config)
    fingerprint = data_fingerprint(config)
    state = folder.work / STATE
    if resume:
        # The run continues only on the data and options it started with.
        started = checkpoint_meta(state)
        if started.get("data_sha256", fingerprint) != fingerprint:
            changed = [k for k, v in fingerprint.items() if started["data_sha256"].get(k) != v]
            raise LeantuneError(
                f"the data changed since {folder.final} started ({', '.join(changed)}: "
                f"{getattr(config, changed[0])}); resume with the same data, or start over "
                "with --overwrite"
            )
        saved_config = {k: v for k, v in asdict(config).items() if k not in ("name", "runs_dir")}
        if started.get("config", saved_config) != json.loads(json.dumps(saved_config)):
            raise LeantuneError(
                f"{folder.work / 'config.yaml'} changed since the run started; put it back, or "
                "start over with --overwrite"
            )
    model = prep.model
    total_steps = math.ceil(len(prep.batches(0)) / config.grad_accum) * config.epochs
    pruner = None
    if config.adapt > 1:
        pruner = RankPruner(
            model,
            config.adapt,
            total_steps,
            start=round(total_steps * config.warmup_ratio),
            end=round(total_steps * 0.7),
        )
        say(
            f"adaptive budget: LoRA grown to {pruner.initial:,} parameters, pruned to "
            f"{pruner.target:,} by step {pruner.end}"
        )
    texts, source = (
        reference_texts(config.reference_text, config.reference_examples, config.seed)
        if config.reference_examples
        else ([], "")
    )
    report = parameter_report(model)
    say(
        f"{config.method} on {config.model or 'the embedded MiniLM-L6'}: {report.trainable:,} of "
        f"{report.total:,} parameters trainable ({report.percent:.2f}%); "
        f"{len(prep.train)} train / {len(prep.val)} validation / {len(prep.test)} test texts"
    )
    # Gradual schedules and penalties: checked (and the Fisher measured) before anything is written.
    named = trainable_parameters(model)
    n_layers = num_layers(model) or 0
    scales = lr_scales(
        named,
        n_layers=n_layers,
        layer_decay=config.layer_decay,
        loraplus_ratio=config.loraplus_ratio,
    )
    unfreezer = (
        Unfreezer(named, n_layers, config.unfreeze_every, total_steps)
        if config.unfreeze_every
        else None
    )
    penalty = make_penalty(model, config, prep)
    check_backends(config.track)
    # Everything is checked: from here on, under the run's lock, the partial folder is written.
    stack.enter_context(folder.lock())
    folder.recover()
    folder.check(resume, overwrite)
    run = folder.begin(resume, data_sha256=fingerprint)
    if not resume:
        write_config(config, run / "config.yaml")
        atomic_write(run / "labels.json", json.dumps(prep.splits.label_names, indent=1) + "\n")
        if prep.plan is not None:
            prep.plan.save(run / "plan.json")
    if prep.scores is not None:
        write_heatmap(run / "importance.png", prep.scores.by_layer_and_kind("fisher"), "Fisher")
        counts = Counter(e.method for e in prep.plan.entries) if prep.plan else Counter()
        say(
            "selected " + ", ".join(f"{n} {m}" for m, n in counts.items()) + " module(s) in "
            f"{prep.scores.seconds:.1f} s on {prep.scores.examples} examples"
        )
    tracker = Tracker(config.track, run, asdict(config), name=folder.name)

    # The best weights travel inside the checkpoint unit, so they always match its progress.
    best_weights: dict[str, torch.Tensor] | None = None
    pending: dict[str, dict[str, torch.Tensor]] = {}
    saved_best: dict[str, float] = {}
    if resume:
        best_file = latest_checkpoint(state)
        if best_file is not None and (best_file / BEST).is_file():
            best_weights = load_file(str(best_file / BEST))

    def on_best(m: nn.Module, row: dict[str, float]) -> None:
        nonlocal best_weights
        if pruner is not None and not pruner.done:
            return  # a best checkpoint must be at the target size
        # Copies: on the CPU .cpu() and .contiguous() return the live parameters themselves.
        best_weights = {k: t.clone() for k, t in unique_tensors(named).items()}
        pending[BEST] = best_weights
        saved_best.clear()
        saved_best.update(row)

    def extra_files() -> dict[str, dict[str, torch.Tensor]]:
        files = dict(pending)
        pending.clear()
        return files

    def on_eval(row: dict[str, float], history: list[dict[str, float]]) -> None:
        shown = {k: round(v, 4) for k, v in row.items() if k.startswith("val_")}
        say(f"step {int(row['step'])} (epoch {row['epoch']:g}): {shown}")
        # Rewritten whole from the loop's history, so a resumed run's file stays complete.
        atomic_write(run / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in history))
        tracker.log(row, int(row["step"]))
        if on_validation is not None:
            on_validation(row)

    # The original model's behaviour, before any step (adapters start as the identity).
    ref = None
    if texts:
        length = min(64, max_positions(model) or 64)
        ref = prepare_reference(
            model,
            prep.tok,
            texts,
            source,
            causal=config.causal,
            max_length=length,
            fingerprint=folder_fingerprint(model_dir(config.model)),
        )
        if ref.cached:
            say(f"knowledge kept: the original model's side read from {cache_root()}")
    elif config.reference_examples:
        say("knowledge kept: no reference text (install fortunes-min or give --reference-text)")
    task_before = prep.evaluate(prep.test).metrics
    prefix = None
    if config.cache_prefix:
        prefix = PrefixCache(model, [len(x) for x in prep.train.ids])
        say(
            f"frozen prefix: layers below {prefix.start} are cached after the first epoch"
            if prefix.active
            else "frozen prefix: nothing to cache (the lowest layer or embeddings are trained)"
        )
    started_with = {k: v for k, v in asdict(config).items() if k not in ("name", "runs_dir")}
    try:
        result = train(
            model,
            prep.batches,
            lambda m: prep.evaluate(prep.val).metrics,
            train_config,
            on_best=on_best,
            log=on_eval,
            on_step=on_step,
            checkpoint=state,
            resume=resume,
            forward=prefix.forward if prefix is not None else None,
            lr_scales=scales,
            unfreeze=unfreezer.apply if unfreezer is not None else None,
            penalty=penalty if penalty else None,
            on_grads=pruner.observe if pruner is not None else None,
            after_step=pruner.after_step if pruner is not None else None,
            checkpoint_extra=extra_files,
            checkpoint_meta={"data_sha256": fingerprint, "config": started_with},
        )
    except Diverged as e:
        tracker.close("FAILED")
        last = (
            f"the last good checkpoint (step {folder.checkpoint_step()}) is kept in {run}; "
            if folder.resumable()
            else ""
        )
        raise LeantuneError(
            f"{e}. Nothing was saved as the run's result; {last}start over with --overwrite"
        ) from None
    except BaseException:
        tracker.close("FAILED")
        raise
    finally:
        if unfreezer is not None:
            unfreezer.release()
    if result.interrupted:
        tracker.close("KILLED")
        return {"interrupted": True, "step": result.steps, "run": str(folder.final)}
    best = result.best or {}
    if pruner is not None:
        if not saved_best:  # no validation after pruning ended: the final weights
            best_weights = unique_tensors(named)
            saved_best.update(result.history[-1] if result.history else {})
        best = saved_best
    if best_weights is not None:
        load_into(model, best_weights, state / BEST)
    adapt_info: dict[str, Any] = {}
    if pruner is not None:
        ranks = pruner.finalize()
        adapt_info = {
            "adapt_start_params": report.trainable,
            "adapt_ranks": ranks,
        }
        report = parameter_report(model)
    saved = save_trained(model, run, config)
    test = prep.evaluate(prep.test)
    final = folder.final
    summary: dict[str, Any] = {
        "run": str(final),
        "model": str(model_dir(config.model)),
        "task": config.task,
        "method": config.method,
        **{f"test_{k}": v for k, v in test.metrics.items()},
        **report.as_dict(),
        "adapter_bytes": folder_bytes(saved),
        "adapter_path": str(final / saved.relative_to(run)),
        "peak_memory_mb": round(peak_memory_mb(prep.device), 1),
        "train_seconds": round(result.train_seconds, 2),
        "examples_per_s": round(result.examples_per_s, 2),
        "steps": result.steps,
        "stopped_early": result.stopped_early,
        "best_step": int(best.get("step", 0)),
        f"best_val_{config.metric}": best.get(f"val_{config.metric}"),
        "train_examples": len(prep.train),
        "val_examples": len(prep.val),
        "test_examples": len(prep.test),
        "device": str(prep.device),
        **adapt_info,
    }
    key = "perplexity" if config.causal else "accuracy"
    summary[f"test_{key}_before"] = task_before[key]
    summary["task_gain"] = test.metrics[key] - task_before[key]
    if ref is not None:
        kept = knowledge_kept(model, ref)
        summary |= kept | {"reference_source": ref.source}
        summary["knowledge_share_of_wall"] = round(
            kept["knowledge_seconds"] / (time.perf_counter() - wall), 4
        )
    say(side_by_side(summary, key))
    if prep.scores is not None:
        summary["select_seconds"] = round(prep.scores.seconds, 2)
        summary["select_share_of_wall"] = round(
            prep.scores.seconds / (time.perf_counter() - wall), 4
        )
    atomic_write(
        run / HISTORY,
        json.dumps({"curve": result.curve, "confusion": test.confusion}) + "\n",
    )
    tracker.log({f"final/{k}": v for k, v in summary.items()}, result.steps)
    tracker.close()
    write_run_report(run, summary)
    # summary.json last: a folder with it is a finished run; then the switch into place.
    atomic_write(run / "summary.json", json.dumps(summary, indent=2) + "\n")
    folder.commit()
    return summary


HISTORY = "history.json"
"""The per-step loss curve and the test confusion matrix: what rebuilds the report."""
BEST = "best.safetensors"


def write_run_report(run: Path, summary: Mapping[str, Any] | None = None) -> Path:
    """report.html and its plots, from the files in the run folder (``summary`` given while
    the run finishes, read from summary.json after)."""
    from leantune.report import write_report

    run = Path(run)
    if summary is None:
        if not (run / "summary.json").is_file():
            raise LeantuneError(
                f"{run} is not a finished leantune run (no summary.json); finish it with "
                "leantune tune --resume"
            )
        summary = json.loads((run / "summary.json").read_text())
    try:
        config = read_config(run / "config.yaml")
        history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        extra = json.loads((run / HISTORY).read_text())
        names = json.loads((run / "labels.json").read_text())
    except (OSError, ValueError) as e:
        raise LeantuneError(f"{run}: cannot rebuild the report ({e})") from None
    plan = Plan.load(run / "plan.json") if (run / "plan.json").is_file() else None
    return write_report(
        run,
        summary,
        history,
        [(int(s), float(v)) for s, v in extra.get("curve", [])],
        extra.get("confusion"),
        names or None,
        config,
        selection=(
            ("importance.png", [asdict(e) for e in plan.entries])
            if plan is not None and (run / "importance.png").exists()
            else None
        ),
    )


def make_penalty(model: nn.Module, config: TuneConfig, prep: Prepared) -> Penalty | None:
    """The run's regularizers (None when every weight is 0); EWC measures its Fisher here."""
    if not (config.l2 or config.l1 or config.ewc):
        return None
    heads = head_modules(model, config.causal)
    fisher = None
    if config.ewc:
        changes = find_changes(model, heads)
        names = [
            f"{n}.{k}"
            for n, layer in adapter_layers(model)
            if isinstance(layer, nn.Module)
            for k, _ in layer.named_parameters(recurse=False)
        ]
        names += list(changes.anchors)
        batches = scoring_batches(config, prep.train, prep.tok.pad_token_id)
        fisher = fisher_diagonal(model, batches, names)
    return Penalty(
        model, l2=config.l2 or 0.0, l1=config.l1, ewc=config.ewc, fisher=fisher, skip=heads
    )


def side_by_side(summary: dict[str, Any], key: str) -> str:
    """One line: what the task gained and what the model kept."""
    before, after = summary[f"test_{key}_before"], summary[f"test_{key}"]
    task = f"task: test {key} {before:.4g} -> {after:.4g} ({after - before:+.4g})"
    if "knowledge_cosine" in summary:
        kept = (
            f"knowledge kept: embedding cosine {summary['knowledge_cosine']:.3f}, 10-NN overlap "
            f"{summary['knowledge_knn_overlap']:.3f} on {int(summary['reference_texts'])} texts"
        )
    elif "reference_perplexity_after" in summary:
        kept = (
            f"knowledge kept: reference perplexity {summary['reference_perplexity_before']:.4g}"
            f" -> {summary['reference_perplexity_after']:.4g}"
        )
    else:
        kept = "knowledge kept: not measured (no reference text)"
    return f"{task} | {kept}"


# ---------------------------------------------------------------------------- saved runs


@dataclass
class SavedRun:
    config: TuneConfig
    model: nn.Module
    tok: Any
    label_names: list[str]
    max_length: int


def load_run(run: Path) -> SavedRun:
    """The base model with the run's trained weights (adapter/ or trained/) put back."""
    from leantune.formats import load_adapter

    run = Path(run)
    if not (run / "config.yaml").is_file():
        partial = RunFolder(run.parent, run.name)
        if partial.resumable():
            raise LeantuneError(
                f"{run} has not finished (checkpoint at step {partial.checkpoint_step()}); finish "
                f"it with leantune tune --name {run.name} --runs-dir {run.parent} --resume"
            )
        raise LeantuneError(f"{run} is not a leantune run folder (no config.yaml)")
    config = make_config(read_config(run / "config.yaml"))
    if not (run / "summary.json").is_file():
        raise LeantuneError(f"{run} has not finished; finish it with leantune tune --resume")
    names = json.loads((run / "labels.json").read_text()) if (run / "labels.json").exists() else []
    folder = model_dir(config.model)
    tok = load_tokenizer(folder)
    torch.manual_seed(config.seed)
    model = load_model(folder, config.task, names, tok.pad_token_id)
    if config.method in ADAPTER_METHODS:
        load_adapter(model, run / "adapter")
    else:
        weights = run / "trained" / "model.safetensors"
        if not weights.is_file():
            raise LeantuneError(f"{weights} is missing; the run folder is incomplete")
        load_into(model, load_file(str(weights)), weights)
    model.eval().to(pick_device(config.device))
    length = min(config.max_length, max_positions(model) or config.max_length)
    return SavedRun(config, model, tok, names, length)


def evaluate_run(run: Path, data: Path | None = None, split: str = "test") -> dict[str, Any]:
    """Metrics of a saved run on its own test (or val) split, or on another labelled file."""
    if split not in ("test", "val"):
        raise LeantuneError(f"--split {split!r}: use test or val")
    saved = load_run(run)
    cfg = saved.config
    if data is not None:
        table = load_table(data, cfg.text_column, None if cfg.causal else cfg.label_column)
        where = str(data)
    else:
        splits = load_splits(cfg)
        table = splits.test if split == "test" else splits.val
        where = f"the {split} split"
    enc = encode(saved.tok, table, saved.label_names, saved.max_length, where)
    if cfg.causal:
        enc.ids = [x for x in enc.ids if len(x) > 1]
    result = evaluate(
        saved.model,
        enc,
        causal=cfg.causal,
        num_labels=len(saved.label_names),
        pad_id=saved.tok.pad_token_id,
        batch_size=cfg.eval_batch_size,
    )
    out: dict[str, Any] = {"data": where, "examples": len(enc), **result.metrics}
    if result.confusion is not None:
        out["confusion"] = result.confusion
        out["label_names"] = saved.label_names
    return out


def predict_run(
    run: Path, texts: list[str], input_file: Path | None = None
) -> list[dict[str, Any]]:
    """Label and probability for each text, in the order given; a run whose scores are not
    finite (broken weights) is refused."""
    from leantune.outputs import check_finite_scores

    saved = load_run(run)
    if saved.config.causal:
        raise LeantuneError(f"{run} is a causal-lm run; predict classifies texts")
    if input_file is not None:
        texts = texts + load_table(input_file, saved.config.text_column, None).texts
    if not texts:
        raise LeantuneError("no texts to predict")
    enc = Encoded(saved.tok(texts, truncation=True, max_length=saved.max_length)["input_ids"])
    result = evaluate(
        saved.model,
        enc,
        causal=False,
        num_labels=len(saved.label_names),
        pad_id=saved.tok.pad_token_id,
        batch_size=saved.config.eval_batch_size,
    )
    rows = [
        {"text": t, "label": saved.label_names[p], "score": round(s, 6)}
        for t, p, s in zip(texts, result.predictions, result.probabilities, strict=True)
    ]
    check_finite_scores(rows, run)
    return rows


def merge_run(run: Path, out: Path, overwrite: bool = False) -> Path:
    """Write the run's model, adapter merged in, as a plain transformers folder.

    ``out`` may not be the run or its base model (nor inside or around them); an existing
    folder is replaced (with ``overwrite``) only when merge wrote it and it holds nothing else.
    """
    from leantune.inject import unload
    from leantune.outputs import check_merge_out, write_merged_folder

    run, out = Path(run), Path(out)
    if out.exists() and not out.is_dir():
        raise LeantuneError(f"--out {out} is a file; give a folder for the merged model")
    if not (run / "config.yaml").is_file():
        raise LeantuneError(f"{run} is not a leantune run folder (no config.yaml)")
    config = make_config(read_config(run / "config.yaml"))
    check_merge_out(out, overwrite, run, model_dir(config.model))
    saved = load_run(run)
    model = unload(saved.model, merge_active=True).cpu()

    def fill(folder: Path) -> None:
        model.save_pretrained(folder)  # type: ignore[operator]
        saved.tok.save_pretrained(folder)

    return write_merged_folder(out, fill, run=str(run.resolve()))


def run_select(
    config: TuneConfig, out: str | os.PathLike[str], overwrite: bool = False
) -> tuple[Plan, Scores]:
    """Score and allocate without training: writes the plan and its heatmap beside it. An
    existing plan (maybe edited by hand) is replaced only with ``overwrite``."""
    from leantune.outputs import check_parent
    from leantune.report import write_heatmap

    out = Path(out)
    if out.exists() and not out.is_file():
        raise LeantuneError(f"{out} is not a file; give a path for plan.json")
    if out.suffix.lower() == ".png":
        raise LeantuneError(f"--out {out}: the heatmap goes beside the plan as .png; name a .json")
    if out.exists() and not overwrite:
        raise LeantuneError(f"{out} exists; pass --overwrite to replace it, or give another --out")
    check_parent(out)
    prep = prepare(replace(config.resolved(), select="auto", plan=None, method="lora"), False)
    plan, scores = make_plan(prep.model, prep.config, prep.train, prep.tok.pad_token_id)
    assert scores is not None
    out.parent.mkdir(parents=True, exist_ok=True)  # as tune makes its runs folder
    plan.save(out)
    write_heatmap(out.with_suffix(".png"), scores.by_layer_and_kind("fisher"), "Fisher")
    return plan, scores
