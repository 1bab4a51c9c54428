"""Issue 14: a method defined here, in the test file only, goes through the whole of leantune.

``ToyConfig`` scales each output of a linear layer by (1 + s), s learned and starting at zero
(IA3's idea on the output side). It is registered by name, then injected, trained under
``run_tune`` with an L2 penalty, saved, loaded, merged and bought by the planner, with no edit
to any file under ``src/``: the core reaches it only through the hooks of ``adapters.base`` and ``adapters.config``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, cast

import pytest
import torch
from torch import nn

import leantune as lt
from helpers import build, inputs, logits, tiny_model_folder, topic_rows, write_rows
from leantune.adapters.base import AdapterLayer, Change
from leantune.adapters.config import AdapterConfig, PlanSize, register, unregister
from leantune.adapters.formats import load_adapter
from leantune.adapters.inject import adapter_layers
from leantune.adapters.planning import Scores
from leantune.analysis.plan import Plan, allocate
from leantune.analysis.select import score
from leantune.models.loading import load_model
from leantune.train.regularize import Penalty
from leantune.tune import TuneConfig, run_tune


class Scale(nn.Module):
    def __init__(self, size: int, dtype: torch.dtype):
        super().__init__()
        self.s = nn.Parameter(torch.zeros(size, dtype=dtype))


class ToyLayer(AdapterLayer):
    method: ClassVar[str] = "toy"
    store: ClassVar[str] = "toy"
    toy: nn.ModuleDict
    bias: nn.Parameter | None

    def scale(self, name: str) -> torch.Tensor:
        return cast(Scale, self.toy[name]).s

    def apply_adapter(self, name: str, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return out * (1 + self.scale(name))

    def merge_adapter(self, name: str) -> None:
        self._fold(1 + self.scale(name))

    def unmerge_adapter(self, name: str) -> None:
        self._fold(1 / (1 + self.scale(name)))

    def _fold(self, factor: torch.Tensor) -> None:
        self.weight.mul_(factor[:, None])
        if self.bias is not None:
            self.bias.mul_(factor)

    def file_tensors(self, name: str) -> dict[str, torch.Tensor]:
        return {"leantune_toy.s": self.scale(name).detach()}

    def file_targets(self, name: str) -> dict[str, torch.Tensor]:
        return {"leantune_toy.s": self.scale(name)}

    def change_entries(self, name: str) -> list[Change]:
        s = self.scale(name)
        bias = [Change("bias", s * self.bias)] if self.bias is not None else []
        return [Change("weight", s[:, None] * self.weight), *bias]


@dataclass
class ToyConfig(AdapterConfig):
    method: ClassVar[str] = "toy"

    def supported_types(self) -> tuple[type[nn.Module], ...]:
        return (nn.Linear,)

    def adapt(self, module: nn.Module, adapter_name: str, module_name: str) -> nn.Module:
        layer = ToyLayer.wrap(module, module_name)
        layer.toy[adapter_name] = Scale(layer.weight.shape[0], layer.weight.dtype)
        return layer

    # One unit per layer: all its output scales, priced by its gradient energy.
    @classmethod
    def plan_modules(cls, scores: Scores) -> Iterable[str]:
        return [m.name for m in scores.modules]

    @classmethod
    def plan_unit(
        cls, scores: Scores, module: str, i: int, max_rank: int
    ) -> tuple[float, int] | None:
        m = scores.module(module)
        return (m.grad_norm**2, m.shape[0]) if i == 0 else None

    @classmethod
    def plan_size(cls, scores: Scores, module: str, n: int) -> PlanSize:
        out = scores.module(module).shape[0]
        return PlanSize(out, out)


@pytest.fixture(autouse=True)
def toy_method() -> Iterator[None]:
    register("toy", ToyConfig)
    yield
    unregister("toy")


def randomize(model: nn.Module) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".toy." in name:
                p.normal_(std=0.1)


def test_toy_injects_at_identity_and_merges_like_unmerged() -> None:
    model = build("bert")
    x = inputs("bert")
    base = logits(model, x)
    lt.inject(model, ToyConfig(targets=["query", "value"]))
    torch.testing.assert_close(logits(model, x), base)  # s = 0: the base model
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".toy." in n or n.startswith("classifier") for n in trainable)
    randomize(model)
    unmerged = logits(model, x)
    assert not torch.allclose(unmerged, base)
    lt.merge(model)
    torch.testing.assert_close(logits(model, x), unmerged, atol=1e-5, rtol=1e-5)
    lt.unmerge(model)
    torch.testing.assert_close(logits(model, x), unmerged, atol=1e-5, rtol=1e-5)


def test_toy_l2_is_the_change_of_its_weights() -> None:
    model = build("bert")
    lt.inject(model, ToyConfig(targets=["query"]))
    randomize(model)
    want = 0.0
    for _, layer in adapter_layers(model):
        s = cast(ToyLayer, layer).scale("default").detach()
        w, b = layer.weight.detach(), layer.bias.detach()  # type: ignore[union-attr]
        want += float((s[:, None] * w).pow(2).sum() + (s * b).pow(2).sum())
    terms = Penalty(model, l2=2.0, skip=["classifier"]).terms(model)
    assert float(terms["l2"].detach()) == pytest.approx(2 * want, rel=1e-5)


def test_toy_trains_under_tune_with_l2_saves_loads_and_merges(tmp_path: Path) -> None:
    folder = tiny_model_folder(tmp_path / "model")
    data = write_rows(tmp_path / "data.csv", topic_rows(80))
    summary = run_tune(
        TuneConfig(
            method="toy",
            model=str(folder),
            data=str(data),
            runs_dir=str(tmp_path / "runs"),
            name="toy",
            epochs=1,
            batch_size=8,
            l2=0.01,
            reference_examples=0,
        )
    )
    run = tmp_path / "runs" / "toy"
    config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert {m["method"] for m in config["modules"].values()} == {"toy"}
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert lines and all('"train_l2"' in line for line in lines)
    assert summary["trainable_params"] > 0
    # Load the saved adapter onto a fresh base: trained scales, merge = unmerged.
    labels = json.loads((run / "labels.json").read_text())
    model = load_model(folder, "classify", labels, 0)
    x = {"input_ids": torch.randint(4, 12, (2, 8))}
    base = model(**x).logits.detach()
    load_adapter(model, run / "adapter")
    tuned = model(**x).logits.detach()
    assert not torch.allclose(tuned, base)
    lt.merge(model)
    torch.testing.assert_close(model(**x).logits.detach(), tuned, atol=1e-5, rtol=1e-5)


def test_toy_is_bought_by_the_planner_and_its_plan_injects(tmp_path: Path) -> None:
    model = build("bert")
    batch = {**inputs("bert", batch=4), "labels": torch.tensor([0, 1, 0, 1])}
    scores = score(model, [batch], skip=["classifier"])
    base = sum(p.numel() for p in model.parameters())
    plan = allocate(scores, 200, base, methods=["lora", "toy"])
    assert plan.of("toy"), [(e.module, e.method) for e in plan.entries]
    path = plan.save(tmp_path / "plan.json")
    again = Plan.load(path)
    assert [(e.module, e.method) for e in again.entries] == [
        (e.module, e.method) for e in plan.entries
    ]
    lt.inject(model, again.adapter_config())
    toy = [n for n, layer in adapter_layers(model) if isinstance(layer, ToyLayer)]
    assert sorted(toy) == sorted(e.module for e in plan.of("toy"))
