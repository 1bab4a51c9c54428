"""Hotswap: a compiled model serves adapter a, then b, then a again, each time equal to the eager
model with that adapter, and is never compiled again after its first compile."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import leantune as lt
from helpers import TARGETS, build, inputs, logits
from leantune.adapters.methods.bitfit import BitFitConfig

MAX_RANK = 8


def saved_adapter(kind: str, path: Path, r: int, alpha: float, seed: int) -> Path:
    """A LoRA adapter with random factors (and, on BERT, a trained head) saved to ``path``."""
    model = build(kind)
    lt.inject(model, lt.LoraConfig(r=r, alpha=alpha, targets=TARGETS[kind][0]))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lt.adapter_parameters(model).values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        if kind == "bert":
            model.classifier.weight.add_(float(seed))
    lt.save_adapter(model, path)
    return path


def eager(kind: str, folder: Path, x: dict[str, torch.Tensor]) -> torch.Tensor:
    model = build(kind)
    lt.load_adapter(model, folder)
    with torch.no_grad():
        return logits(model, x)


def counting_backend() -> tuple[Callable[..., Any], list[int]]:
    """A torch.compile backend that runs the graph eagerly and counts each compile."""
    compiles = [0]

    def backend(gm: torch.fx.GraphModule, example_inputs: list[torch.Tensor]) -> Any:
        compiles[0] += 1
        return gm.forward

    return backend, compiles


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_compiled_model_swaps_adapters_without_recompiling(kind: str, tmp_path: Path) -> None:
    a = saved_adapter(kind, tmp_path / "a", r=4, alpha=8, seed=1)
    b = saved_adapter(kind, tmp_path / "b", r=MAX_RANK, alpha=3, seed=2)  # other rank and scaling
    x = inputs(kind)
    expected = {"a": eager(kind, a, x), "b": eager(kind, b, x)}
    assert not torch.allclose(expected["a"], expected["b"], atol=1e-3)

    model = build(kind)
    lt.load_adapter(model, a, "served")
    lt.prepare_hotswap(model, MAX_RANK)
    torch._dynamo.reset()
    backend, compiles = counting_backend()
    compiled = torch.compile(model, backend=backend)
    with torch.no_grad():
        torch.testing.assert_close(logits(compiled, x), expected["a"], atol=1e-5, rtol=1e-5)
        first = compiles[0]
        assert first >= 1
        for name, folder in (("b", b), ("a", a), ("b", b)):
            lt.hotswap(compiled, folder)
            torch.testing.assert_close(logits(compiled, x), expected[name], atol=1e-5, rtol=1e-5)
    assert compiles[0] == first, "hotswap made torch.compile recompile"


def test_prepared_adapter_keeps_its_output_and_saves_as_plain_lora(tmp_path: Path) -> None:
    a = saved_adapter("llama", tmp_path / "a", r=4, alpha=8, seed=1)
    b = saved_adapter("llama", tmp_path / "b", r=6, alpha=3, seed=2)
    x = inputs("llama")
    model = build("llama")
    lt.load_adapter(model, a)
    lt.prepare_hotswap(model, MAX_RANK)
    assert model.model.layers[0].self_attn.q_proj.lora["default"].A.shape[0] == MAX_RANK
    torch.testing.assert_close(logits(model, x), eager("llama", a, x), atol=1e-6, rtol=1e-5)
    # An in-memory (config, tensors) pair swaps like a folder; the swapped adapter saves at the
    # padded rank and reloads to the same outputs.
    other = build("llama")
    lt.load_adapter(other, b)
    lt.hotswap(model, (lt.adapter_config(other), lt.adapter_state_dict(other)))
    torch.testing.assert_close(logits(model, x), eager("llama", b, x), atol=1e-5, rtol=1e-5)
    lt.save_adapter(model, tmp_path / "swapped")
    torch.testing.assert_close(
        eager("llama", tmp_path / "swapped", x), eager("llama", b, x), atol=1e-5, rtol=1e-5
    )


def one_line(call: Callable[[], object], match: str) -> None:
    with pytest.raises(lt.LeantuneError, match=match) as e:
        call()
    assert "\n" not in str(e.value)


def test_refusals_are_one_line_and_copy_nothing(tmp_path: Path) -> None:
    a = saved_adapter("bert", tmp_path / "a", r=4, alpha=8, seed=1)
    big = saved_adapter("bert", tmp_path / "big", r=MAX_RANK + 4, alpha=8, seed=2)
    model = build("bert")
    for name, cfg in (
        ("fewer", lt.LoraConfig(r=2, targets=["query"])),
        ("bits", BitFitConfig(targets=["query"])),
    ):
        lt.inject(model, cfg, name)
        lt.save_adapter(model, tmp_path / name)
        lt.remove_adapter(model, name)
    lt.load_adapter(model, a)
    lt.prepare_hotswap(model, MAX_RANK)
    before = {k: v.clone() for k, v in model.state_dict().items()}

    one_line(lambda: lt.hotswap(model, big), f"rank {MAX_RANK + 4}, above the {MAX_RANK}")
    one_line(lambda: lt.hotswap(model, tmp_path / "fewer"), "lacks .*needs the same target")
    one_line(lambda: lt.hotswap(model, tmp_path / "bits"), "same method")
    one_line(lambda: lt.prepare_hotswap(model, 2), "above max_rank 2")
    after = model.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before)

    bits = build("bert")
    lt.inject(bits, BitFitConfig(targets=["query"]))
    one_line(lambda: lt.prepare_hotswap(bits, MAX_RANK), "no rule")
    dora = build("llama")
    lt.inject(dora, lt.LoraConfig(r=2, targets=["q_proj"], dora=True))
    one_line(lambda: lt.prepare_hotswap(dora, MAX_RANK), "DoRA")


def test_wider_targets_are_refused(tmp_path: Path) -> None:
    model: nn.Module = build("llama")
    lt.inject(model, lt.LoraConfig(r=2, targets=["q_proj", "v_proj"]), "wide")
    lt.save_adapter(model, tmp_path / "wide")
    model = build("llama")
    lt.inject(model, lt.LoraConfig(r=2, targets=["q_proj"]))
    one_line(lambda: lt.hotswap(model, tmp_path / "wide"), "v_proj.*does not adapt")
