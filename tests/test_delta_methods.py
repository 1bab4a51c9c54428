"""BitFit, LayerNorm tuning, sparse masks and mixed adapters keep the same contract as LoRA."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from torch import nn

import leantune as lt
from helpers import TARGETS, build, inputs, logits
from leantune.adapters.config import MixedConfig
from leantune.adapters.formats import CONFIG_NAME, WEIGHTS_NAME
from leantune.adapters.inject import adapter_layers
from leantune.adapters.methods.bitfit import BitFitConfig
from leantune.adapters.methods.layernorm import LayerNormConfig
from leantune.adapters.methods.sparse import SparseConfig
from leantune.adapters.targets import match_targets
from leantune.core.errors import AdapterFileError, TargetError

GOLDEN = Path(__file__).parent / "golden" / "adapter_keys.json"
METHODS = ["bitfit", "layernorm", "sparse", "mixed"]
# BitFit needs biases: the tiny Llama has none (and its RMSNorms have no shift).
CASES = [
    (m, k) for k in ("bert", "gpt2", "llama") for m in METHODS if (m, k) != ("bitfit", "llama")
]
NORMS = {"bert": "LayerNorm", "gpt2": r".*ln_\d", "llama": r".*layernorm"}


def random_masks(model: nn.Module, names: list[str], k: int = 6) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    out = {}
    for name in names:
        size = model.get_submodule(name).weight.numel()
        out[name] = torch.randperm(size, generator=g)[:k]
    return out


def config(method: str, kind: str, model: nn.Module) -> lt.AdapterConfig:
    linear = TARGETS[kind][1]
    if method == "bitfit":
        return BitFitConfig()
    if method == "layernorm":
        return LayerNormConfig()
    names = match_targets(model, SparseConfig(targets=linear), skip=["classifier"])
    if method == "sparse":
        return SparseConfig(targets=linear, masks=random_masks(model, names))
    norms = [n for n, m in model.named_modules() if type(m).__name__.endswith("Norm")][:2]
    lora = lt.LoraConfig(targets=names[:1], r=2, alpha=4)
    sparse = SparseConfig(targets=names[1:3], masks=random_masks(model, names[1:3]))
    parts: list[lt.AdapterConfig] = [lora, sparse, LayerNormConfig(targets=norms)]
    if kind != "llama":
        parts.append(BitFitConfig(targets=names[3:5]))
    return MixedConfig(parts=parts)


def adapted(method: str, kind: str) -> nn.Module:
    model = build(kind)
    lt.inject(model, config(method, kind, model))
    return model


def randomize(model: nn.Module, seed: int = 3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lt.adapter_parameters(model).values():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)


def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize(("method", "kind"), CASES)
def test_init_output_equals_base(method: str, kind: str) -> None:
    x = inputs(kind)
    torch.testing.assert_close(logits(adapted(method, kind), x), logits(build(kind), x))


@pytest.mark.parametrize(("method", "kind"), CASES)
def test_merged_equals_unmerged_and_unmerge_restores(method: str, kind: str) -> None:
    model = adapted(method, kind)
    randomize(model)
    x = inputs(kind)
    before = weights(model)
    unmerged = logits(model, x)
    assert not torch.allclose(unmerged, logits(build(kind), x), atol=1e-4), "adapter has no effect"
    lt.merge(model)
    torch.testing.assert_close(logits(model, x), unmerged, atol=1e-5, rtol=1e-5)
    lt.unmerge(model)
    after = weights(model)
    for key in before:
        torch.testing.assert_close(after[key], before[key], atol=1e-6, rtol=1e-5, msg=key)
    plain = lt.unload(model, merge_active=True)
    assert not list(adapter_layers(plain))
    torch.testing.assert_close(logits(plain, x), unmerged, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("method", "kind"), CASES)
def test_only_the_delta_gets_gradients(method: str, kind: str) -> None:
    model = adapted(method, kind).train()
    randomize(model)
    logits(model, inputs(kind)).pow(2).mean().backward()
    expected = set(lt.adapter_parameters(model))
    if kind == "bert":
        expected |= {"classifier.weight", "classifier.bias"}
    got = {n for n, p in model.named_parameters() if p.grad is not None}
    assert got == expected
    assert {n for n, p in model.named_parameters() if p.requires_grad} == expected


@pytest.mark.parametrize(("method", "kind"), CASES)
def test_save_load_reproduces_outputs_and_keys_are_pinned(
    method: str, kind: str, tmp_path: Path
) -> None:
    model = adapted(method, kind)
    randomize(model)
    x = inputs(kind)
    expected = logits(model, x)
    lt.save_adapter(model, tmp_path / "a")
    saved = json.loads((tmp_path / "a" / CONFIG_NAME).read_text())
    assert saved["peft_type"] == "LEANTUNE"
    fresh = build(kind)
    lt.load_adapter(fresh, tmp_path / "a")
    torch.testing.assert_close(logits(fresh, x), expected)
    found = {k: list(v.shape) for k, v in sorted(lt.adapter_state_dict(model).items())}
    golden = json.loads(GOLDEN.read_text())
    case = f"{kind}/{method}"
    if os.environ.get("LEANTUNE_UPDATE_GOLDEN"):
        golden[case] = found
        GOLDEN.write_text(json.dumps(golden, indent=1, sort_keys=True) + "\n")
    assert found == golden[case]


@pytest.mark.parametrize("method", ["bitfit", "layernorm", "sparse"])
def test_mixed_batch_rows_match_their_adapter(method: str) -> None:
    model = build("bert")
    cfg = config(method, "bert", model)
    lt.inject(model, cfg, "one")
    randomize(model, 1)
    lt.inject(model, cfg, "two")
    randomize(model, 2)
    x = inputs("bert", batch=3)
    lt.set_active(model, "one")
    one = logits(model, x)
    lt.set_active(model, "two")
    two = logits(model, x)
    with lt.disable(model):
        base = logits(model, x)
    with lt.mixed_batch(model, ["one", lt.BASE, "two"]):
        mixed = logits(model, x)
    torch.testing.assert_close(mixed, torch.stack([one[0], base[1], two[2]]))


def test_sparse_changes_only_the_masked_entries_when_merged() -> None:
    model = adapted("sparse", "bert")
    randomize(model)
    before = weights(build("bert"))
    lt.unload(model, merge_active=True)
    after = model.state_dict()
    layer = "bert.encoder.layer.0.attention.self.query.weight"
    changed = (after[layer] != before[layer]).flatten().nonzero().flatten()
    mask = config("sparse", "bert", build("bert")).masks[
        "bert.encoder.layer.0.attention.self.query"
    ]  # type: ignore[attr-defined]
    assert sorted(changed.tolist()) == sorted(mask.tolist())


def test_bad_masks_and_targets_are_refused() -> None:
    model = build("bert")
    q = "bert.encoder.layer.0.attention.self.query"
    with pytest.raises(TargetError, match="no mask"):
        lt.inject(model, SparseConfig(targets=[q]))
    with pytest.raises(TargetError, match="outside"):
        lt.inject(model, SparseConfig(targets=[q], masks={q: torch.tensor([0, 32 * 32])}))
    with pytest.raises(TargetError, match="repeats"):
        lt.inject(model, SparseConfig(targets=[q], masks={q: torch.tensor([3, 3])}))
    with pytest.raises(TargetError, match="match no module"):
        lt.inject(build("llama"), BitFitConfig())  # no biases anywhere
    lt.inject(model, BitFitConfig(targets=[q]), "b")
    with pytest.raises(TargetError, match="one method on a module"):
        lt.inject(model, lt.LoraConfig(targets=[q]), "l")
    with pytest.raises(lt.LeantuneError, match="two parts"):
        MixedConfig(parts=[BitFitConfig(targets=[q]), LayerNormConfig(targets=[q])])


class GemmaRMSNorm(nn.Module):
    """(1 + γ) ⊙ n(x): not the γ ⊙ n(x) + β form LayerNorm tuning assumes."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d))
        self.eps = 1e-6

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * (1 + self.weight)


class WithGemmaNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = GemmaRMSNorm(8)
        self.out = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.norm(x))


def test_layernorm_tuning_refuses_a_norm_of_another_form() -> None:
    model = WithGemmaNorm()
    with pytest.raises(TargetError, match="weight \\* normalize"):
        lt.inject(model, LayerNormConfig(targets=["norm"]))
    assert type(model.norm) is GemmaRMSNorm  # left as it was


def test_damaged_leantune_config_is_refused(tmp_path: Path) -> None:
    model = adapted("bitfit", "bert")
    lt.save_adapter(model, tmp_path / "a")
    path = tmp_path / "a" / CONFIG_NAME
    cfg = json.loads(path.read_text())
    first = next(iter(cfg["modules"]))
    cfg["modules"][first]["method"] = "magic"
    path.write_text(json.dumps(cfg))
    with pytest.raises(AdapterFileError, match="magic"):
        lt.load_adapter(build("bert"), tmp_path / "a")
    assert (tmp_path / "a" / WEIGHTS_NAME).exists()


def test_info_describes_a_leantune_adapter(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from leantune.cli import app

    model = adapted("mixed", "bert")
    lt.save_adapter(model, tmp_path / "a")
    res = CliRunner().invoke(app, ["info", str(tmp_path / "a")])
    assert res.exit_code == 0, res.stderr
    assert "LEANTUNE" in res.stdout
    assert "1 lora" in res.stdout and "2 sparse" in res.stdout and "2 bitfit" in res.stdout


class T5LayerNorm(nn.Module):
    """Named LayerNorm, computes an RMSNorm (no mean subtracted), as T5's does."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.rand(d) + 0.5)
        self.variance_epsilon = 1e-6

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        var = x.float().pow(2).mean(-1, keepdim=True)
        return self.weight * (x.float() * torch.rsqrt(var + self.variance_epsilon)).to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layernorm_tuning_measures_the_norm_form_in_any_dtype(dtype: torch.dtype) -> None:
    model = nn.Sequential(T5LayerNorm(8), nn.LayerNorm(8)).to(dtype)
    lt.inject(model, LayerNormConfig(targets=["0", "1"]))
    assert model[0].rms and not model[1].rms
    x = torch.randn(2, 8).to(dtype)
    base = model(x)
    with torch.no_grad():
        for p in lt.adapter_parameters(model).values():
            p.add_(0.25)
    changed = model(x)
    lt.merge(model)
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(model(x), changed, atol=tol, rtol=tol)
    assert not torch.allclose(changed.float(), base.float())
