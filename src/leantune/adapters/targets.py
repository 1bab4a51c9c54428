"""Which modules an adapter goes on: target matching, the output head, the task type, and
which modules share a weight (tied embeddings).

peft's rules: a list of targets matches exact module names or dotted suffixes, one string is a
regex that must match a whole name, "all-linear" is every linear layer except the output head,
"all" every layer the method can adapt. Modules trained in full (``modules_to_save``) are never
adapted. A target that matches nothing is refused with the closest module names.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence
from typing import Any

from torch import nn

from leantune.adapters.base import LINEAR_TYPES, module_copies
from leantune.adapters.config import AdapterConfig, name_matches
from leantune.core.errors import TargetError

_DEFAULT_LAYER_LISTS = ("layers", "layer", "h", "blocks", "block")


def layer_index(module_name: str, layers_pattern: str | None = None) -> int | None:
    """The transformer-block index a module sits in, or None."""
    names = [layers_pattern] if layers_pattern else list(_DEFAULT_LAYER_LISTS)
    pattern = r"(?:^|\.)(?:" + "|".join(names) + r")\.(\d+)(?:\.|$)"
    m = re.search(pattern, module_name)
    return int(m.group(1)) if m else None


def output_head_names(model: nn.Module) -> set[str]:
    """Names of the model's output layer: its output embeddings, else its last linear layer."""
    get_out = getattr(model, "get_output_embeddings", None)
    head = get_out() if callable(get_out) else None
    if head is not None:
        return {n for n, m in model.named_modules() if m is head}
    linears = [n for n, m in model.named_modules() if isinstance(m, LINEAR_TYPES)]
    if not callable(get_out) and linears:
        return {linears[-1]}
    return set()


def infer_task_type(model: nn.Module) -> str | None:
    cls = type(model).__name__
    for suffix, task in (
        ("ForSequenceClassification", "SEQ_CLS"),
        ("ForCausalLM", "CAUSAL_LM"),
        ("LMHeadModel", "CAUSAL_LM"),
        ("ForTokenClassification", "TOKEN_CLS"),
        ("ForQuestionAnswering", "QUESTION_ANS"),
        ("ForSeq2SeqLM", "SEQ_2_SEQ_LM"),
    ):
        if cls.endswith(suffix):
            return task
    return None


def resolve_modules_to_save(
    model: nn.Module, config: AdapterConfig, task_type: str | None
) -> list[str]:
    names = dict(model.named_modules())
    if config.modules_to_save is None:
        wanted = ["classifier", "score"] if task_type == "SEQ_CLS" else []
        strict = False
    else:
        wanted, strict = list(config.modules_to_save), True
    found = [n for n in names if n and name_matches(n, wanted)]
    # A module inside another saved module is saved with it.
    found = [n for n in found if not any(n.startswith(o + ".") for o in found)]
    missing = [w for w in wanted if not any(name_matches(n, [w]) for n in found)]
    if strict and missing:
        raise TargetError(
            f"modules_to_save {missing} match no module; {_closest(missing[0], names)}"
        )
    return found


def _closest(target: str, names: Sequence[str] | dict[str, Any]) -> str:
    full = [n for n in names if n]
    leaves = sorted({n.rsplit(".", 1)[-1] for n in full})
    close = difflib.get_close_matches(target, leaves + full, n=5, cutoff=0.4)
    if close:
        return "closest module names: " + ", ".join(close)
    return "module names here include: " + ", ".join(leaves[:12])


def match_targets(model: nn.Module, config: AdapterConfig, skip: Sequence[str] = ()) -> list[str]:
    """Names of the modules ``config`` adapts, or a TargetError saying why there are none."""
    supported = config.supported_types()
    modules = dict(model.named_modules())
    skip = [*skip, *module_copies(model)]  # modules trained in full are never adapted (as in peft)
    head = output_head_names(model) | set(skip)
    inside_head = tuple(h + "." for h in skip)
    chosen: list[str] = []
    unsupported: list[str] = []
    for name, module in modules.items():
        if not name or name in skip or name.startswith(inside_head):
            continue
        if config.targets == "all-linear":
            # Adapter layers subclass the layers they adapt, so they are found again here.
            if not isinstance(module, LINEAR_TYPES) or name in head:
                continue
        elif config.targets == "all":
            if name in head or not config.includes(module):
                continue
        elif not name_matches(name, config.targets):
            continue
        if config.exclude and name_matches(name, config.exclude):
            continue
        if (
            config.layers is not None
            and layer_index(name, config.layers_pattern) not in config.layers
        ):
            continue
        if not isinstance(module, supported):
            unsupported.append(f"{name} ({type(module).__name__})")
            continue
        chosen.append(name)
    if chosen:
        return chosen
    if unsupported:
        kinds = ", ".join(t.__name__ for t in supported)
        raise TargetError(
            f"targets {config.targets!r} match only layers {config.method} cannot adapt: "
            f"{', '.join(unsupported[:5])}; it adapts {kinds}"
        )
    where = "" if config.layers is None else f" in layers {config.layers}"
    first = config.targets if isinstance(config.targets, str) else config.targets[0]
    raise TargetError(
        f"targets {config.targets!r} match no module{where}; {_closest(first, modules)}"
    )


def tied_modules(model: nn.Module) -> dict[str, list[str]]:
    """Modules whose weight is shared with other modules (tied embeddings), with those others."""
    owners: dict[int, list[str]] = {}
    for mod_name, module in model.named_modules(remove_duplicate=False):
        weight = module._parameters.get("weight")
        if weight is not None:
            owners.setdefault(id(weight), []).append(mod_name)
    return {
        n: [o for o in group if o != n]
        for group in owners.values()
        if len(group) > 1
        for n in group
    }
