"""The tune job's options: :class:`TuneConfig`, its field docstrings (the CLI help and the
YAML comments), and reading, writing and type-checking config.yaml files."""

from __future__ import annotations

import contextlib
import math
import re
import typing
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, is_dataclass
from pathlib import Path
from typing import Any

import yaml

from leantune.adapters.config import METHODS
from leantune.analysis.plan import parse_methods
from leantune.core.errors import LeantuneError
from leantune.core.files import atomic_write, read_yaml
from leantune.models.loading import CAUSAL_TASKS, TASKS
from leantune.models.precision import PRECISIONS, QUANTIZE_KINDS, fast_bf16
from leantune.train.interface import TrainConfig
from leantune.train.schedule import check_layer_decay, check_schedule
from leantune.tune.options import (
    CLASSIFY_METRICS,
    DEFAULT_MODEL_NAMES,
    INSTRUCT_EVAL_EXAMPLES,
    INSTRUCT_TRAIN_EXAMPLES,
    OWN_PARAMETERS,
    PREFERENCE_METRICS,
    BottleneckOptions,
    DataOptions,
    EvalOptions,
    KnowledgeOptions,
    LoraOptions,
    MethodOptions,
    OptimOptions,
    PlacementOptions,
    PrecisionOptions,
    PreferenceOptions,
    RunOptions,
    VirtualTokenOptions,
    check_new_options,
    field_docs,
)
from leantune.tune.track import parse_track


def parse_targets(spec: str) -> str | list[str]:
    """--targets: all-linear, a comma list of module names (or one name), or a regex."""
    if spec == "all-linear":
        return spec
    if "," in spec or re.fullmatch(r"[\w.]+", spec):
        return [t.strip() for t in spec.split(",") if t.strip()]
    return spec  # a regex


def run_methods() -> tuple[str, ...]:
    """What --method takes: every registered adapter method, then full and head."""
    return (*METHODS, *OWN_PARAMETERS)


def default_lr(method: str) -> float:
    cls = METHODS.get(method)
    return cls.default_lr if cls is not None else OWN_PARAMETERS[method].lr


@dataclass
class TuneConfig(
    PreferenceOptions,
    PrecisionOptions,
    KnowledgeOptions,
    EvalOptions,
    OptimOptions,
    PlacementOptions,
    BottleneckOptions,
    VirtualTokenOptions,
    LoraOptions,
    MethodOptions,
    DataOptions,
    RunOptions,
):
    """Everything a tune run needs; saved as config.yaml in the run folder. The fields come in
    groups (``tune/options.py``), run options first."""

    def __post_init__(self) -> None:
        choices = {"task": TASKS, "method": run_methods(), "score_head": ("random", "warm")}
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise LeantuneError(
                    f"--{key} {getattr(self, key)!r} is unknown; use one of {allowed}"
                )
        positive = ("max_length", "batch_size", "eval_batch_size", "epochs", "grad_accum")
        for key in (*positive, "max_new_tokens"):
            if getattr(self, key) <= 0:
                raise LeantuneError(f"--{key.replace('_', '-')} must be positive")
        self._check_precision()
        if self.packing and not self.instruct:
            raise LeantuneError("--packing packs conversations; use it with --task instruct")
        if self.packing and self.cache_prefix:
            raise LeantuneError("--packing and --cache-prefix do not go together; drop one")
        if self.gen_examples < 0:
            raise LeantuneError(f"--gen-examples must be 0 (none) or more, got {self.gen_examples}")
        if self.name is not None and (
            not self.name or Path(self.name).name != self.name or self.name.startswith(".")
        ):
            raise LeantuneError(
                f"--name {self.name!r} must be a plain folder name (not starting with a dot)"
            )
        if self.lr is not None and not (math.isfinite(self.lr) and self.lr > 0):
            raise LeantuneError(f"--lr must be a finite positive number, got {self.lr}")
        for key in ("eval_every", "patience", "max_steps", "eval_examples"):
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
        allowed_metrics = self.task_metrics()
        if self.metric is not None and self.metric not in allowed_metrics:
            raise LeantuneError(
                f"--metric {self.metric!r} is not a {self.task} metric; use one of {allowed_metrics}"
            )
        self.fractions()  # validates
        if self.select == "none":  # hand placement, said out loud
            self.select = None
        if self.select not in (None, "auto"):
            raise LeantuneError(f"--select {self.select!r} is unknown; use auto or none")
        if self.init_adapter is not None:
            self._check_init_adapter()
        if self.select and self.plan:
            raise LeantuneError("--select auto makes a plan and --plan gives one; pick one")
        self._check_method()
        if self.score_examples <= 0:
            raise LeantuneError("--score-examples must be positive")
        check_schedule(self.schedule)
        for key in ("l2", "l1", "ewc"):
            if (getattr(self, key) or 0) < 0:
                raise LeantuneError(f"--{key} must be 0 or more, got {getattr(self, key)}")
        check_layer_decay(self.layer_decay)
        if not self.loraplus_ratio >= 1:
            raise LeantuneError("--loraplus-ratio must be 1 (off) or more")
        if self.unfreeze_every is not None and self.unfreeze_every <= 0:
            raise LeantuneError("--unfreeze-every must be a positive number of steps")
        if self.train_examples is not None and self.train_examples <= 0:
            raise LeantuneError("--train-examples must be positive")
        if self.reference_examples < 0:
            raise LeantuneError("--reference-examples must be 0 (off) or more")
        parse_track(self.track)

    def _check_init_adapter(self) -> None:
        """--init-adapter: an adapter folder, without options that place another adapter."""
        path = Path(self.init_adapter or "")
        if not (path / "adapter_config.json").is_file():
            raise LeantuneError(
                f"--init-adapter {path}: no adapter_config.json there; give an adapter folder "
                "(a run's adapter/, or peft's save_pretrained folder)"
            )
        if self.select or self.plan or self.method in OWN_PARAMETERS:
            raise LeantuneError(
                "--init-adapter gives the adapter to start from; drop --select / --plan / "
                f"--method {self.method}"
            )

    def _check_precision(self) -> None:
        for key, allowed in (
            ("precision", ("auto", *PRECISIONS)),
            ("base_dtype", (None, *PRECISIONS)),
            ("quantize", (None, *QUANTIZE_KINDS)),
        ):
            if getattr(self, key) not in allowed:
                flag = key.replace("_", "-")
                raise LeantuneError(f"--{flag} {getattr(self, key)!r} is unknown; use {allowed}")
        base = self.base_dtype
        if base not in (None, "fp32") and self.precision not in ("auto", "fp32", base):
            raise LeantuneError(
                f"--base-dtype {base} runs under autocast to {base}; drop --precision "
                f"{self.precision} or make it {base}"
            )
        own = OWN_PARAMETERS.get(self.method)
        if self.quantize and own is not None and not own.quantizable:
            raise LeantuneError(
                f"--quantize {self.quantize} freezes the base in {self.quantize}; --method "
                f"{self.method} trains {own.what}: use an adapter method"
            )
        check_new_options(self)
        if self.quantize and (self.select or self.plan):
            raise LeantuneError(
                "--quantize with --select/--plan is not supported: selection scores the full "
                "precision weights; tune a plan's LoRA without --quantize, or drop the plan"
            )

    def _check_method(self) -> None:
        """The method's own refusals (``run_refusal``), and --select/--plan/--adapt against
        the method: checked by what the registered methods say, not by their names."""
        cls = METHODS.get(self.method)
        placed = cls is not None and cls.placed_by_plan
        if (self.select or self.plan) and self.method != TuneConfig.method and not placed:
            raise LeantuneError("--select / --plan choose their own methods; drop --method")
        planned = parse_methods(self.plan_methods)
        if cls is not None:
            # The method checks its own options (LoRA: r, alpha, dropout, init, --targets).
            cls.from_options(
                {
                    **asdict(self),
                    "init": self.lora_init(),
                    "targets": parse_targets(self.targets),
                    "layers": None,
                }
            )
            refusal = cls.run_refusal(asdict(self))
            if refusal:
                raise LeantuneError(refusal)
        if self.adapt < 1:
            raise LeantuneError(f"--adapt must be 1 (off) or more, got {self.adapt}")
        ranked = [m for m, c in METHODS.items() if c.adapts_rank]
        if self.adapt > 1 and not (cls is not None and cls.adapts_rank):
            raise LeantuneError(
                f"--adapt prunes the ranks of plain LoRA-style adapters; use it with --method "
                f"{' or '.join(ranked)}"
            )
        if self.adapt > 1 and self.select and not set(planned) & set(ranked):
            raise LeantuneError(
                f"--adapt prunes rank components; --plan-methods must include {' or '.join(ranked)}"
            )

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
        """A causal LM task: causal-lm, or instruct (a causal LM trained on its answers)."""
        return self.task in CAUSAL_TASKS

    @property
    def instruct(self) -> bool:
        return self.task == "instruct"

    @property
    def preference(self) -> bool:
        return self.task == "preference"

    def task_metrics(self) -> tuple[str, ...]:
        """The validation metrics of the run's task, the default first."""
        if self.preference:
            return PREFERENCE_METRICS
        return ("perplexity", "loss") if self.causal else CLASSIFY_METRICS

    def lora_init(self) -> str:
        """--init auto (the default): grad under --select auto, whose scoring measures the
        gradient directions anyway (issue 28's table: +1.7 points at 0.1 %), standard for hand
        placement."""
        if self.init != "auto":
            return self.init
        return "grad" if self.select == "auto" else "standard"

    def resolved(self) -> TuneConfig:
        """Defaults that depend on other fields filled in, as saved in config.yaml."""
        values = asdict(self)
        values["init"] = self.lora_init()
        if self.lr is None:
            values["lr"] = default_lr(self.method)
        if self.l2 is None:
            # The method's own default (LoRA: 1e-3 on the update, not under DoRA or PiSSA); a
            # run whose plan says otherwise re-resolves it from the adapter it builds.
            cls = METHODS.get(self.method)
            options = {**values, "targets": "all-linear", "layers": None}
            values["l2"] = cls.from_options(options).default_l2() if cls is not None else 0.0
        if self.metric is None:
            values["metric"] = self.task_metrics()[0]
        if self.base_dtype not in (None, "fp32") and self.precision in ("auto", "fp32"):
            values["precision"] = self.base_dtype  # a half-precision base runs under autocast
        elif self.precision == "auto":
            chat = self.instruct or self.preference
            values["precision"] = "bf16" if chat and fast_bf16(self.device) else "fp32"
        if (self.instruct or self.preference) and self.data is None:  # sized for a CPU
            if self.train_examples is None:
                values["train_examples"] = INSTRUCT_TRAIN_EXAMPLES
            if self.eval_examples is None:
                values["eval_examples"] = INSTRUCT_EVAL_EXAMPLES
        if self.name is None:
            model = Path(self.model).name if self.model else DEFAULT_MODEL_NAMES[self.task]
            data = Path(self.data).stem if self.data else "bbc"
            values["name"] = f"{model}-{data}-{self.method}"
        return TuneConfig(**values)


def option_groups() -> dict[str, str]:
    """Each TuneConfig field's group: the first line of its group class's docstring."""
    groups: dict[str, str] = {}
    for klass in reversed(TuneConfig.__mro__[1:]):
        if is_dataclass(klass):
            title = (klass.__doc__ or klass.__name__).split(".")[0]
            groups |= dict.fromkeys(klass.__annotations__, title)
    return groups


def option_docs() -> dict[str, str]:
    """Help for every TuneConfig field: a method's own options (LoRA's r, alpha ...) from its
    config's field docs, the rest from TuneConfig's."""
    methods: dict[str, str] = {}
    for cls in reversed(METHODS.values()):  # the first registered wins a shared name
        own = field_docs(cls, inherited=False)
        methods |= {k: f"{cls.title or cls.method}: {v}" for k, v in own.items()}
    return methods | field_docs(TuneConfig)


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
    docs, groups = option_docs(), option_groups()
    lines = ["# leantune tune --config this-file   (command-line options override it)"]
    group = None
    for key, value in asdict(config).items():
        if groups.get(key) != group:
            group = groups.get(key)
            lines.append(f"\n# ---- {group}")
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


def train_config(config: TuneConfig) -> TrainConfig:
    """The loop's options from the run's (resolved) config."""
    return TrainConfig(
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
        precision=config.precision,
    )


def started_with(config: TuneConfig) -> dict[str, Any]:
    """The options a checkpoint records: a resumed run must match them."""
    return {k: v for k, v in asdict(config).items() if k not in ("name", "runs_dir")}
