"""Adapter arithmetic: ``leantune.adapters.combine`` against peft's ``add_weighted_adapter`` on the same
adapter files, its refusals, and ``leantune combine`` on two tiny runs."""

from __future__ import annotations

import json
from pathlib import Path

import peft.tuners.lora.model as peft_lora_model
import pytest
import torch
from peft import PeftModel
from torch import nn

import leantune as lt
from helpers import TARGETS, build, inputs, logits
from leantune.adapters.base import records
from leantune.adapters.combine import COMBINATIONS
from leantune.adapters.inject import adapter_layers, module_copy
from leantune.adapters.methods.bitfit import BitFitConfig
from test_tune import cli, config

WEIGHTS = {"a": 0.7, "b": -0.4}  # a negative weight: peft puts its sign on A only
SEED = 7


def two_adapters(kind: str, tmp_path: Path, ranks: tuple[int, int] = (4, 4)) -> nn.Module:
    """Adapters a and b (different ranks/alphas allowed) with random factors, each saved to
    tmp_path/<name> for peft; no heads, so peft accepts both."""
    model = build(kind)
    for (name, r), alpha, seed in zip(zip("ab", ranks, strict=True), (8, 3), (3, 4), strict=True):
        cfg = lt.LoraConfig(r=r, alpha=alpha, targets=TARGETS[kind][0], modules_to_save=[])
        lt.inject(model, cfg, name)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in lt.adapter_parameters(model, name).values():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        lt.save_adapter(model, tmp_path / name, name)
        path = tmp_path / name / "adapter_config.json"
        raw = json.loads(path.read_text())
        raw["task_type"] = None  # a plain PeftModel: no classifier wrapped per adapter
        path.write_text(json.dumps(raw))
    return model


def peft_combined(
    kind: str, tmp_path: Path, method: str, monkeypatch: pytest.MonkeyPatch, **options: object
) -> nn.Module:
    pm = PeftModel.from_pretrained(build(kind), tmp_path / "a", adapter_name="a")
    pm.load_adapter(tmp_path / "b", adapter_name="b")
    freeze = peft_lora_model._freeze_adapter

    def freeze_then_seed(model: nn.Module, name: str) -> None:
        # peft draws the new adapter's init from the global generator before its DARE masks;
        # reseed after that draw so both libraries start their masks from SEED.
        freeze(model, name)
        torch.manual_seed(SEED)

    monkeypatch.setattr(peft_lora_model, "_freeze_adapter", freeze_then_seed)
    pm.add_weighted_adapter(list(WEIGHTS), list(WEIGHTS.values()), "c", method, **options)
    pm.set_adapter("c")
    return pm.eval()


def pruning(method: str) -> dict[str, object]:
    return (
        {"density": 0.5}
        if method.removesuffix("_svd") in ("ties", "dare_linear", "dare_ties", "magnitude_prune")
        else {}
    )


CASES = [(k, m) for k in ("bert", "llama") for m in COMBINATIONS] + [
    ("gpt2", "ties"),  # Conv1D stores its weight (in, out): orientation of the task tensors
    ("gpt2", "dare_ties_svd"),
]


@pytest.mark.parametrize(("kind", "method"), CASES)
def test_combine_equals_peft_add_weighted_adapter(
    kind: str, method: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = two_adapters(kind, tmp_path)
    options = pruning(method)
    pm = peft_combined(kind, tmp_path, method, monkeypatch, **options)
    lt.combine(model, WEIGHTS, method, "c", seed=SEED, **options)  # type: ignore[arg-type]
    assert lt.active_adapter(model) == "b"  # the new adapter is not made active
    checked = 0
    for name, layer in adapter_layers(model):
        ours = layer.change_entries("c")[0].values
        theirs = pm.base_model.model.get_submodule(name).get_delta_weight("c")
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5, msg=name)
        checked += 1
    assert checked == len(records(model)["a"].modules) > 0
    lt.set_active(model, "c")
    x = inputs(kind)
    torch.testing.assert_close(logits(model, x), logits(pm, x), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(logits(model, x), logits(build(kind), x), atol=1e-4)


@pytest.mark.parametrize("method", ["cat", "svd", "ties_svd"])
def test_unequal_ranks_combine_by_cat_and_svd(
    method: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = two_adapters("llama", tmp_path, ranks=(4, 6))
    options = {**pruning(method), "svd_rank": 5} if method != "cat" else {}
    pm = peft_combined("llama", tmp_path, method, monkeypatch, **options)
    lt.combine(model, WEIGHTS, method, "c", **options)  # type: ignore[arg-type]
    x = inputs("llama")
    lt.set_active(model, "c")
    torch.testing.assert_close(logits(model, x), logits(pm, x), atol=1e-5, rtol=1e-5)
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.lora["c"].r == (10 if method == "cat" else 5)


def test_svd_clamp_and_frequency_sign_equal_peft(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = two_adapters("bert", tmp_path)
    options = {"density": 0.3, "majority_sign_method": "frequency", "svd_clamp": 0.9, "svd_rank": 3}
    pm = peft_combined("bert", tmp_path, "ties_svd", monkeypatch, **options)
    lt.combine(model, WEIGHTS, "ties_svd", "c", **options)  # type: ignore[arg-type]
    lt.set_active(model, "c")
    x = inputs("bert")
    torch.testing.assert_close(logits(model, x), logits(pm, x), atol=1e-5, rtol=1e-5)


def test_combined_adapter_saves_reloads_and_loads_in_peft(tmp_path: Path) -> None:
    model = two_adapters("llama", tmp_path, ranks=(4, 6))
    lt.combine(model, WEIGHTS, "cat", "c")
    lt.set_active(model, "c")
    x = inputs("llama")
    expected = logits(model, x)
    lt.save_adapter(model, tmp_path / "c", "c")
    fresh = build("llama")
    lt.load_adapter(fresh, tmp_path / "c")
    torch.testing.assert_close(logits(fresh, x), expected, atol=1e-5, rtol=1e-5)
    pm = PeftModel.from_pretrained(build("llama"), tmp_path / "c").eval()
    torch.testing.assert_close(logits(pm, x), expected, atol=1e-5, rtol=1e-5)


def test_heads_come_from_the_chosen_adapter() -> None:
    model = build("bert")
    for name, shift in (("a", 1.0), ("b", 2.0)):
        lt.inject(model, lt.LoraConfig(r=2, targets=["query"]), name)
        with torch.no_grad():
            module_copy(model, "classifier", name).weight.add_(shift)
    with pytest.raises(lt.LeantuneError, match="head=") as e:
        lt.combine(model, {"a": 0.5, "b": 0.5})
    assert "\n" not in str(e.value) and "combined" not in records(model)
    lt.combine(model, {"a": 0.5, "b": 0.5}, head="b")
    lt.set_active(model, "combined")
    head_b = module_copy(model, "classifier", "b").weight
    torch.testing.assert_close(model.classifier.weight, head_b, atol=0, rtol=0)
    assert model.classifier.weight.data_ptr() != head_b.data_ptr()  # its own copy


def refusal_cases(model: nn.Module) -> list[tuple[dict[str, object], str]]:
    return [
        ({"weights": {"a": 1.0, "zz": 1.0}}, "no adapter 'zz'"),
        ({"weights": {"a": 1.0, "bf": 1.0}}, "different methods"),
        ({"weights": {"bf": 1.0}}, "no rule for"),
        ({"method": "ties"}, "density"),
        ({"method": "ties", "density": 0.0}, r"density must be in \(0, 1\]"),
        ({"method": "dare_linear", "density": 1.5}, r"density must be in \(0, 1\]"),
        ({"method": "svd", "svd_rank": 0}, "svd_rank"),
        ({"method": "mean"}, "unknown"),
        ({"weights": {"a": float("nan"), "b": 1.0}}, "finite"),
        ({"name": "a"}, "already in this model"),
        ({"weights": {"a": 1.0, "r6": 1.0}}, "equal ranks"),
        ({"weights": {"a": 1.0, "dora": 1.0}}, "DoRA"),
    ]


def test_refusals_are_one_line_and_change_nothing() -> None:
    model = build("bert")
    targets = ["query", "value"]
    for name, cfg in (
        ("a", lt.LoraConfig(r=4, targets=targets, modules_to_save=[])),
        ("b", lt.LoraConfig(r=4, targets=targets, modules_to_save=[])),
        ("r6", lt.LoraConfig(r=6, targets=targets, modules_to_save=[])),
        ("dora", lt.LoraConfig(r=4, targets=targets, dora=True, modules_to_save=[])),
        ("bf", BitFitConfig(targets=["key"], modules_to_save=[])),
    ):
        lt.inject(model, cfg, name)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for kwargs, message in refusal_cases(model):
        args = {"weights": {"a": 0.5, "b": 0.5}, "method": "linear", "name": "c"} | kwargs
        with pytest.raises(lt.LeantuneError, match=message) as e:
            lt.combine(model, **args)  # type: ignore[arg-type]
        assert "\n" not in str(e.value), kwargs
        assert "c" not in records(model)
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_cli_combines_two_runs(tmp_path: Path, bert_dir: Path, data_file: Path) -> None:
    from leantune.tune import run_tune

    for name, seed in (("r1", 0), ("r2", 1)):
        run_tune(config(tmp_path, bert_dir, data_file, name=name, seed=seed, epochs=1))
    runs = [str(tmp_path / "runs" / n) for n in ("r1", "r2")]
    out = tmp_path / "combined"
    args = [*runs, "--weights", "0.6,0.4", "--method", "ties", "--density", "0.5"]
    res = cli("combine", *args, "--out", str(out))
    assert res.returncode == 2 and "--head" in res.stderr and len(res.stderr.splitlines()) == 1
    assert not out.exists()  # refused before anything was written
    res = cli("combine", *args, "--head", "2", "--out", str(out))
    assert res.returncode == 0, res.stderr
    assert sorted(p.name for p in out.iterdir()) == [
        ".leantune-merge.json",
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    # The same combination in-process, from the same adapters on the same base model.
    from leantune.tune.finished import load_run

    model = load_run(Path(runs[0])).model
    lt.load_adapter(model, Path(runs[1]) / "adapter", "other")
    lt.combine(model, {"default": 0.6, "other": 0.4}, "ties", density=0.5, head="other")
    lt.set_active(model, "combined")
    x = inputs("bert")
    expected = logits(model, x)
    lt.load_adapter(model, out, "from_cli")
    torch.testing.assert_close(logits(model, x), expected, atol=1e-6, rtol=1e-5)

    res = cli("combine", *args, "--head", "2", "--out", str(out))
    assert res.returncode == 2 and "--overwrite" in res.stderr
    (out / "notes.txt").write_text("mine")
    res = cli("combine", *args, "--head", "2", "--out", str(out), "--overwrite")
    assert res.returncode == 2 and "notes.txt" in res.stderr
    assert (out / "notes.txt").read_text() == "mine"
    (out / "notes.txt").unlink()
    res = cli("combine", *args, "--head", "2", "--out", str(out), "--overwrite")
    assert res.returncode == 0, res.stderr
    for bad, message in (
        (["--weights", "0.6"], "1 weights for 2 adapters"),
        (["--weights", "0.6,0.4", "--method", "ties"], "density"),
        (["--weights", "0.6,nan"], "finite"),
    ):
        res = cli("combine", *runs, *bad, "--out", str(tmp_path / "x"))
        assert res.returncode == 2 and message in res.stderr, res.stderr
        assert len(res.stderr.splitlines()) == 1
    res = cli("combine", str(out), "--weights", "1", "--out", str(tmp_path / "x"))
    assert res.returncode == 2 and "at least one run folder" in res.stderr
