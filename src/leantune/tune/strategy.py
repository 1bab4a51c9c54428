"""Which parameters a run trains: the method of --method (:func:`apply_method`) or a Plan
scored and allocated by --select auto / read from --plan, and the run's penalties.

Adapter methods are found in the registry and built by their own ``from_options``; ``full``
and ``head`` are not adapter methods (they train the model's own parameters)."""

from __future__ import annotations

import hashlib
import math
import random
import re
from collections.abc import Callable
from dataclasses import asdict, replace
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from leantune.adapters.base import records
from leantune.adapters.config import METHODS, AdapterConfig, name_matches
from leantune.adapters.formats import load_adapter
from leantune.adapters.inject import adapter_layers, inject
from leantune.adapters.methods.lora.start import lora_layers, start_on_directions
from leantune.adapters.planning import SPARSE_CHUNK, Scores
from leantune.adapters.targets import output_head_names
from leantune.analysis.evaluate import Encoded, make_batch
from leantune.analysis.plan import Plan, allocate, apply_options, parse_budget, parse_methods
from leantune.analysis.probe import Probe, fit_probe, head_module, probe_fits
from leantune.analysis.select import score
from leantune.core.errors import LeantuneError
from leantune.models.loading import num_layers
from leantune.models.precision import autocast
from leantune.train.adapt import RankPruner
from leantune.train.answer import Forward, answer_forward_for
from leantune.train.interface import TrainResult
from leantune.train.keep import KEEP_BATCH, KeepLoss
from leantune.train.keep_chat import chat_keep_rows
from leantune.train.regularize import Penalty, find_changes, fisher_diagonal
from leantune.tune.config import TuneConfig, parse_targets
from leantune.tune.options import FULL, PROBE

if TYPE_CHECKING:
    from leantune.tune.prepare import Prepared


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


def adapter_method(config: TuneConfig) -> type[AdapterConfig] | None:
    """The registered config class of ``--method``; None for full and head."""
    return METHODS.get(config.method)


def uses_plan(config: TuneConfig) -> bool:
    """Whether the run's adapter comes from a Plan: --select auto, --plan, or a method only a
    plan can place (sparse, whose masks a plan chooses)."""
    cls = adapter_method(config)
    return bool(config.select or config.plan or (cls is not None and cls.placed_by_plan))


def method_options(config: TuneConfig, model: nn.Module | None) -> dict[str, Any]:
    """The run's options as ``AdapterConfig.from_options`` reads them: every option, with
    --targets and --layers parsed (``layers`` needs the model; None without one)."""
    options = asdict(config)
    options["targets"] = parse_targets(config.targets)
    options["layers"] = None if model is None else parse_layers(config.layers, num_layers(model))
    return options


def apply_method(model: nn.Module, config: TuneConfig) -> None:
    """Make the parameters of ``config.method`` trainable (an adapter method: inject it)."""
    cls = adapter_method(config)
    if cls is not None:
        inject(model, cls.from_options(method_options(config, model)))
        return
    if config.method == FULL:
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


def start_from_adapter(model: nn.Module, config: TuneConfig) -> None:
    """--init-adapter: the folder's adapter, trainable, the rest of the model frozen; its
    method must be the run's (--method), which decides the run's defaults and report."""
    for p in model.parameters():
        p.requires_grad_(False)
    load_adapter(model, str(config.init_adapter), trainable=True)
    method = records(model)["default"].config.method
    if method != config.method:
        raise LeantuneError(
            f"--init-adapter {config.init_adapter} holds a {method} adapter; pass --method {method}"
        )


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
    # A classifier's head is new and trained first; a causal LM's output head is pretrained
    # (and large: vocabulary × hidden), so a plan does not buy it.
    heads = [
        (n, sum(p.numel() for p in modules[n].parameters()))
        for n in ([] if config.causal else head_modules(model, False))
    ]
    if config.plan:
        plan = Plan.load(config.plan)
        plan.check(model)
        apply_run_options(plan, config, config.plan)
        return plan, None
    base = sum(p.numel() for p in model.parameters())
    budget = parse_budget(config.budget, base)
    batches = scoring_batches(config, train, pad_id)
    cls = adapter_method(config)
    placed = cls is not None and cls.placed_by_plan
    methods = (config.method,) if placed else parse_methods(config.plan_methods)
    # Rank enough single entries per module for such units to be able to take the whole budget.
    ranks_entries = any(METHODS[m].ranks_entries for m in methods)
    entries = max(16 * SPARSE_CHUNK, budget) if ranks_entries else 0
    if config.score_head == "warm" and not config.causal and probe_fits(model):
        # The probe's head first: scored through a random head, the gradients are mostly its
        # noise. The run's warm start fits the same head again (its features then cached).
        fit_probe(model, train, pad_id, head_module(model).out_features)
    directions = GRAD_DIRECTIONS if config.init == "grad" else 0
    with autocast(config.precision, next(model.parameters()).device):
        scores = score(
            model,
            batches,
            skip=[h for h, _ in heads],
            max_entries=entries,
            directions=directions,
            forward=scoring_forward(model, config, batches),
        )
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
    plan = allocate(candidates, budget, base, heads, methods=methods)
    apply_run_options(plan, config)
    return plan, scores


GRAD_DIRECTIONS = 64
"""Right singular vectors of each layer's mean gradient kept for --init grad (the most rank
a LoRA module starts on them; rows past it keep the standard init)."""


def gradient_scores(model: nn.Module, config: TuneConfig, train: Encoded, pad_id: int) -> Scores:
    """--init grad without --select auto's scores: the scoring pass over the adapted layers
    only (after injection: B is zero, so their weights' gradients are the base model's), on
    the --score-examples batches selection uses."""
    adapted = lora_layers(model)
    if not adapted:
        return Scores([], 0, 0.0)
    batches = scoring_batches(config, train, pad_id)
    with autocast(config.precision, next(model.parameters()).device):
        forward = scoring_forward(model, config, batches)
        return score(
            model, batches, max_entries=0, directions=GRAD_DIRECTIONS, only=adapted, forward=forward
        )


def scoring_forward(
    model: nn.Module, config: TuneConfig, batches: list[dict[str, torch.Tensor]]
) -> Forward | None:
    """The forward scoring runs: for instruct, the training's own (the output head at the
    answer tokens only: the same loss and gradients at a fraction of the cost), else None."""
    return answer_forward_for(model, batches[0]) if config.instruct and batches else None


def start_on_gradient(model: nn.Module, scores: Scores) -> int:
    """--init grad: each LoRA adapter's A starts on its layer's top right singular vectors of
    the task gradient (``lora.start``). Returns the adapters set."""
    directions = {m.name: m.directions for m in scores.modules if m.directions is not None}
    return start_on_directions(model, directions)


def apply_run_options(plan: Plan, config: TuneConfig, where: str = "the plan") -> None:
    """Give the plan's entries the run's options for their methods (``plan_options``: LoRA's
    --alpha, --dropout, --dora ...), refusing a contradiction with options the plan carries."""
    # --init's default depends on --select (auto: grad under --select auto, else standard).
    defaults = replace(TuneConfig(), init=TuneConfig(select=config.select).lora_init())
    for method in plan.methods():
        cls = METHODS[method]
        ours = cls.plan_options(asdict(config))
        if ours:
            apply_options(plan, method, ours, cls.plan_options(asdict(defaults)), where)


def apply_plan(model: nn.Module, plan: Plan) -> None:
    """The plan's methods and sizes on its modules, its heads trained in full, the rest frozen."""
    adapter = plan.adapter_config()
    if adapter is None:
        raise LeantuneError(
            f"the plan trains only the task head ({plan.params:,} parameters): the budget "
            "buys nothing else. Raise --budget, or use --method head"
        )
    inject(model, adapter)


def penalties_for_the_adapter(config: TuneConfig, model: nn.Module, l2_given: bool) -> TuneConfig:
    """The adapter a plan built may differ from what the options said (a plan file with DoRA
    entries): its own L2 default when the user gave none (``l2_given``), and a refusal of
    penalties its change cannot take. Returns the config the run continues with."""
    built = [r.config for r in records(model).values()]
    if not built:
        return config
    refusal = built[0].penalty_refusal()
    if refusal and (config.l1 or config.ewc or (config.l2 and l2_given)):
        raise LeantuneError(refusal)
    if not l2_given and config.l2 != built[0].default_l2():
        return replace(config, l2=built[0].default_l2())
    return config


PenaltyTerms = Callable[[nn.Module, int], dict[str, torch.Tensor]]


def make_penalty(model: nn.Module, config: TuneConfig, prep: Prepared) -> PenaltyTerms | None:
    """The run's regularizers and keep loss (None when every weight is 0)."""
    penalty = make_regularizers(model, config, prep)
    keep = make_keep(model, config, prep)
    if keep is None or penalty is None:
        return keep or penalty
    return lambda m, batch: penalty(m, batch) | keep(m, batch)


def make_keep(model: nn.Module, config: TuneConfig, prep: Prepared) -> KeepLoss | None:
    """--keep: the keep loss on reference texts disjoint from those that measure knowledge
    kept, or for --task instruct on general conversations answered by the original model
    (``chat_keep``); the original's side computed here, before any step. Left out (None): the
    task's default weight (DEFAULT_KEEP), off with a note when there is no reference text."""
    weight = config.keep if config.keep is not None else DEFAULT_KEEP[config.causal]
    if not weight:
        return None
    from leantune.analysis.knowledge import reference_texts
    from leantune.models.loading import max_positions

    masks = None
    if config.instruct:
        ids, masks = chat_keep(model, config, prep)
    else:
        n = config.reference_examples
        texts, _ = reference_texts(config.reference_text, n + config.keep_examples, config.seed)
        texts, length = texts[n:], min(64, max_positions(model) or 64)
        ids = prep.tok(texts, truncation=True, max_length=length)["input_ids"] if texts else []
        ids = [x for x in ids if len(x) > (1 if config.causal else 0)]
    pad = prep.tok.pad_token_id if prep.tok.pad_token_id is not None else 0
    if not ids and config.keep is None:
        prep.notes.append(
            "keep loss: off (no reference text: install fortunes-min or give --reference-text)"
        )
        return None
    # The rows of one optimizer step's batch: under several processes, the global batch.
    rows = prep.batch_rows or config.batch_size
    every = config.keep_every or keep_every(ids, prep.train, rows)
    if not config.keep_every and ids:
        prep.notes.append(
            f"keep loss: on every {every} batch(es) at {every}x the weight (its batches are "
            "longer than the task's; --keep-every 1 for every batch)"
            if every > 1
            else "keep loss: on every batch"
        )
    return KeepLoss(model, ids, pad, weight, config.causal, every=every, masks=masks)


def chat_keep(
    model: nn.Module, config: TuneConfig, prep: Prepared
) -> tuple[list[list[int]], list[list[bool]]]:
    """--task instruct: the keep loss's --keep-examples general conversations, answered by the
    original model (cached per model folder, template and what changes the answers), rendered
    with the chat template and counted on the assistant's tokens (train/keep_chat.py)."""
    from leantune.analysis.knowledge import folder_fingerprint
    from leantune.models.loading import max_positions, model_dir

    template = hashlib.sha256(str(prep.tok.chat_template).encode()).hexdigest()
    folder = folder_fingerprint(model_dir(config.model, config.task))
    setup = [config.base_dtype, config.quantize, config.init_adapter]
    key = [folder, template, prep.device.type, *map(str, setup)]
    length = min(config.max_length, max_positions(model) or config.max_length)
    return chat_keep_rows(model, prep.tok, config.keep_examples, length, key, prep.notes.append)


DEFAULT_KEEP = {False: 1.0, True: 0.0}
"""The keep loss's weight when --keep is left out, for encoders (False) and causal LMs (True):
issue 17's tables in docs/BENCHMARKS.md."""


KEEP_SHARE = 0.25
"""--keep-every 0 (auto): the keep loss's tokens at most this share of the task's, on average."""


def keep_every(keep_ids: list[list[int]], train: Encoded, batch_size: int) -> int:
    """--keep-every 0: the smallest k whose keep batches (every k-th training batch) hold at
    most KEEP_SHARE of the training batches' tokens, on average."""
    if not keep_ids or not train.ids:
        return 1
    keep_tokens = KEEP_BATCH * sum(map(len, keep_ids)) / len(keep_ids)
    task_tokens = batch_size * sum(map(len, train.ids)) / len(train.ids)
    return max(1, math.ceil(keep_tokens / (KEEP_SHARE * task_tokens)))


def make_regularizers(model: nn.Module, config: TuneConfig, prep: Prepared) -> Penalty | None:
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


def warm_start(prep: Any) -> Probe | None:
    """--method probe and --warm-head: the head fitted on the frozen model's features (the
    features cached per model folder, pooling and data). None for other runs."""
    config = prep.config
    auto = config.warm_head is None and config.method != PROBE and not config.causal
    if config.method != PROBE and not (config.warm_head or auto):
        return None
    if auto and not probe_fits(prep.model):
        prep.notes.append(
            "warm head: off (the head is not one linear layer on the pooled features)"
        )
        return None
    from leantune.analysis.knowledge import folder_fingerprint
    from leantune.models.loading import model_dir

    key = f"{folder_fingerprint(model_dir(config.model, config.task))}|{config.pooling}"
    probe = fit_probe(
        prep.model, prep.train, prep.tok.pad_token_id, len(prep.splits.label_names), key
    )
    probe.val = prep.evaluate(prep.val).metrics  # the adapters are still the identity
    return probe


def probe_result(prep: Any, probe: Probe) -> TrainResult:
    """A probe run's "training": no step, one validation of the fitted head."""
    row = {"step": 0.0, "epoch": 0.0, "train_seconds": probe.seconds}
    row |= {f"val_{k}": v for k, v in probe.val.items()}
    return TrainResult(row, 0, False, probe.seconds, len(prep.train), [row], [], False)


def grow_ranks(
    model: nn.Module, config: TuneConfig, total_steps: int, say: Callable[[str], None]
) -> RankPruner:
    """--adapt: LoRA grown now, pruned back to its size from warmup to 70% of the steps."""
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
    return pruner


def apply_min_steps(config: TuneConfig, batches: int, say: Callable[[str], None]) -> TuneConfig:
    """--min-steps: a small training set gets the epochs that make that many optimizer steps
    (the run's config.yaml records them, so a resume agrees)."""
    per_epoch = -(-batches // config.grad_accum)
    if not config.min_steps or per_epoch * config.epochs >= config.min_steps:
        return config
    epochs = -(-config.min_steps // per_epoch)
    say(f"{per_epoch} steps per epoch: {epochs} epochs to reach --min-steps {config.min_steps}")
    return replace(config, epochs=epochs)
