"""LoRA started on given directions (``--init grad``): each adapter's A takes the top right
singular vectors of its layer's task gradient, B stays zero, so the model starts unchanged and
the first steps move B along the gradient's top directions (LoRA-GA's argument, with B zero and
the base weight untouched, so the saved adapter is a plain LoRA in peft's format)."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import nn

from leantune.adapters.inject import adapter_layers
from leantune.adapters.methods.lora.layers import LoraLayer

ROW_NORM = 1 / math.sqrt(3)
"""Row norm of A when started on directions: the expected row norm of the standard
(Kaiming-uniform, a=√5) init, so only the direction changes."""


def lora_layers(model: nn.Module) -> list[str]:
    """Names of the model's LoRA layers."""
    return [name for name, layer in adapter_layers(model) if isinstance(layer, LoraLayer)]


def start_on_directions(model: nn.Module, directions: Mapping[str, torch.Tensor]) -> int:
    """Every LoRA adapter made with init "grad" on a layer of ``directions`` ((k, in) rows,
    largest first): its A's first min(r, k) rows become them at ``ROW_NORM`` (later rows keep
    the standard init). Returns the adapters set."""
    done = 0
    for name, layer in adapter_layers(model):
        vh = directions.get(name)
        if not isinstance(layer, LoraLayer) or vh is None:
            continue
        for adapter_name in layer.adapter_names():
            adapter = layer.adapter(adapter_name)
            if adapter.init != "grad" or adapter.A.shape[1] != vh.shape[1]:
                continue
            k = min(adapter.r, vh.shape[0])
            with torch.no_grad():
                adapter.A[:k].copy_(vh[:k].to(adapter.A) * ROW_NORM)
            done += 1
    return done
