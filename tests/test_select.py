"""Importance scores, budget allocation into a Plan, and tuning by a Plan (issue 4, part one)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import leantune as lt
from helpers import build, tiny_model_folder, topic_rows, write_rows
from leantune.adapters.planning import PlanEntry
from leantune.adapters.targets import layer_index
from leantune.analysis.plan import Plan, allocate, parse_budget
from leantune.analysis.select import score
from leantune.core.errors import LeantuneError
from leantune.tune import TuneConfig, make_config, run_tune


def batches(n: int = 4, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        {
            "input_ids": torch.randint(1, 64, (4, 9), generator=g),
            "labels": torch.tensor([0, 1, 2, 1]),
        }
        for _ in range(n)
    ]


def test_scores_are_deterministic_and_leave_flags_alone() -> None:
    model = build("bert")
    model.classifier.weight.requires_grad_(False)
    first = score(model, batches(), skip=["classifier"])
    second = score(build("bert"), batches(), skip=["classifier"])
    assert [m.name for m in first.modules] == [m.name for m in second.modules]
    assert [m.fisher for m in first.modules] == [m.fisher for m in second.modules]
    assert [m.spectrum for m in first.modules] == [m.spectrum for m in second.modules]
    assert not model.classifier.weight.requires_grad  # restored
    assert all(p.grad is None for p in model.parameters())
    assert first.examples == 16 and "classifier" not in {m.name for m in first.modules}
    query = next(m for m in first.modules if m.name.endswith("layer.0.attention.self.query"))
    assert query.kind == "attention.self.query" and query.layer == 0 and query.shape == (32, 32)
    # Σσ² of the mean gradient is its squared Frobenius norm.
    assert sum(query.spectrum) == pytest.approx(query.grad_norm**2, rel=1e-4)


def test_a_module_with_zero_gradient_gets_nothing() -> None:
    model = build("bert")
    # The last layer's attention value is multiplied by zero: no gradient reaches it.
    value = model.bert.encoder.layer[2].attention.self.value
    value.register_forward_hook(lambda m, i, o: o * 0)
    scores = score(model, batches(), skip=["classifier"])
    dead = next(m for m in scores.modules if m.name.endswith("layer.2.attention.self.value"))
    assert dead.grad_norm == 0 and dead.spectrum == []
    plan = allocate(scores, 50_000, 60_000, heads=[("classifier", 99)])
    assert dead.name not in {e.module for e in plan.entries}
    assert plan.of("lora")  # others do get ranks


@pytest.mark.parametrize("budget", [200, 700, 3_000, 20_000])
def test_plan_never_exceeds_the_budget(budget: int) -> None:
    scores = score(build("bert"), batches(), skip=["classifier"])
    plan = allocate(scores, budget, 60_000, heads=[("classifier", 99)])
    assert plan.params <= budget
    assert plan.heads() == ["classifier"]
    # Greedy spends what it can: what is left is less than the cheapest rank unit.
    cheapest = min(m.rank_cost for m in scores.modules if m.spectrum)
    assert budget - plan.params < cheapest or all(
        e.size == len(next(m for m in scores.modules if m.name == e.module).spectrum)
        for e in plan.of("lora")
    )


def test_plan_json_round_trips_and_builds_lora(tmp_path: Path) -> None:
    scores = score(build("bert"), batches(), skip=["classifier"])
    plan = allocate(scores, 3_000, 60_000, heads=[("classifier", 99)])
    loaded = Plan.load(plan.save(tmp_path / "plan.json"))
    assert loaded == plan
    model = build("bert")
    loaded.check(model)
    lt.inject(model, loaded.adapter_config())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == plan.params  # LoRA ranks and the head, exactly as planned


def test_plan_and_budget_bad_input(tmp_path: Path) -> None:
    for spec in ("0", "-3", "0%", "lots"):
        with pytest.raises(lt.LeantuneError, match="budget"):
            parse_budget(spec, 1000)
    with pytest.raises(lt.LeantuneError, match="exceeds the model"):
        parse_budget("2000", 1000)
    assert parse_budget("0.5%", 20_000) == 100 and parse_budget("1,500", 20_000) == 1500
    plan = Plan(100, 1000, [PlanEntry("bert.encoder.layer.9.output.dense", "lora", 2, 10)])
    with pytest.raises(lt.LeantuneError, match=r"lacks, first 'bert\.encoder\.layer\.9"):
        plan.check(build("bert"))
    with pytest.raises(lt.LeantuneError, match="no examples"):
        score(build("bert"), [])
    with pytest.raises(lt.LeantuneError, match="smaller than the task head"):
        allocate(score(build("bert"), batches(1)), 50, 1000, heads=[("classifier", 99)])
    (tmp_path / "p.json").write_text(json.dumps({"budget": 1}))
    with pytest.raises(lt.LeantuneError, match="plan layout"):
        Plan.load(tmp_path / "p.json")


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")  # what we show: no input grads
def test_backward_stops_at_the_first_trainable_layer() -> None:
    """With adapters only in layer 2, autograd computes nothing for layers 0 and 1."""
    model = build("bert")
    lt.inject(model, lt.LoraConfig(r=2, targets="all-linear", layers=[2]))
    reached: list[int] = []
    for i, layer in enumerate(model.bert.encoder.layer):
        layer.register_full_backward_hook(lambda m, gi, go, i=i: reached.append(i))
    model.train()
    model(**batches(1)[0]).loss.backward()
    assert reached == [2]


def test_tune_with_select_auto_and_with_a_plan(tmp_path: Path) -> None:
    model = tiny_model_folder(tmp_path / "tiny-bert")
    data = write_rows(tmp_path / "topics.jsonl", topic_rows(60))
    common = {"model": str(model), "data": str(data), "runs_dir": str(tmp_path / "runs")}
    summary = run_tune(
        TuneConfig(**common, name="auto", select="auto", budget="3000", epochs=1, batch_size=8)
    )
    run = tmp_path / "runs" / "auto"
    plan = Plan.load(run / "plan.json")
    assert summary["trainable_params"] == plan.params <= 3000
    # --layers (default upper-half: 1-2 of 3) bounds where the plan goes.
    assert {layer_index(e.module) for e in plan.of("lora")} <= {1, 2, None}
    assert (run / "importance.png").read_bytes()[:4] == b"\x89PNG"
    assert "importance.png" in (run / "report.html").read_text()
    assert 0 < summary["select_share_of_wall"] < 1
    again = run_tune(
        TuneConfig(**common, name="again", plan=str(run / "plan.json"), epochs=1, batch_size=8)
    )
    assert again["test_accuracy"] == summary["test_accuracy"]


def test_select_command_prints_the_ranking_and_writes_the_plan(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from leantune.cli import app

    model = tiny_model_folder(tmp_path / "tiny-bert")
    data = write_rows(tmp_path / "topics.jsonl", topic_rows(60))
    out = tmp_path / "plan.json"
    args = ["select", "--model", str(model), "--data", str(data), "--budget", "0.5%"]
    res = CliRunner().invoke(app, [*args, "--out", str(out)])
    assert res.exit_code == 0, res.stderr
    plan = Plan.load(out)
    assert plan.params <= plan.budget == int(0.005 * plan.base_params)
    assert res.stdout.splitlines()[0].split() == [
        "module",
        "fisher",
        "taylor",
        "grad",
        "norm",
        "plan",
    ]
    assert f"{plan.params:,} of {plan.budget:,} budgeted" in res.stdout
    # The probe's validation score stands beside the plan: the bar its adapters must clear.
    line = next(x for x in res.stdout.splitlines() if x.startswith("probe ("))
    assert 0.0 <= float(line.split(" accuracy ")[1].split(",")[0]) <= 1.0
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    before = out.read_bytes()
    res = CliRunner().invoke(app, [*args[:-1], "0", "--out", str(out), "--overwrite"])
    assert res.exit_code == 2 and res.stderr.count("\n") == 1 and "budget" in res.stderr
    assert out.read_bytes() == before  # a failed select leaves the old plan alone


ALL_METHODS = ("lora", "bitfit", "layernorm", "sparse")


@pytest.mark.parametrize("budget", [300, 2_000, 12_000])
def test_mixed_plan_keeps_the_budget_one_method_a_module_and_round_trips(
    budget: int, tmp_path: Path
) -> None:
    scores = score(build("bert"), batches(), skip=["classifier"])
    plan = allocate(scores, budget, 60_000, heads=[("classifier", 99)], methods=ALL_METHODS)
    assert plan.params <= budget
    modules = [e.module for e in plan.entries]
    assert len(modules) == len(set(modules))
    assert {e.method for e in plan.entries} <= {*ALL_METHODS, "head"}
    loaded = Plan.load(plan.save(tmp_path / "plan.json"))
    assert loaded == plan
    assert loaded.masks.keys() == plan.masks.keys()
    for name, mask in plan.masks.items():
        assert torch.equal(loaded.masks[name], mask)
    model = build("bert")
    lt.inject(model, loaded.adapter_config())
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == plan.params


def test_cheap_methods_win_when_their_gain_per_parameter_is_best() -> None:
    scores = score(build("bert"), batches(), skip=["classifier"])
    plan = allocate(scores, 2_000, 60_000, heads=[("classifier", 99)], methods=ALL_METHODS)
    # On the tiny model a bias or a norm carries more gradient energy per parameter than a rank
    # unit of its weight, so the mixed plan buys some, and more gain than LoRA alone.
    assert {"bitfit", "layernorm"} & {e.method for e in plan.entries}
    lora_only = allocate(scores, 2_000, 60_000, heads=[("classifier", 99)])
    assert sum(e.gain for e in plan.entries) > sum(e.gain for e in lora_only.entries)


def test_sparse_masks_are_the_top_fisher_entries() -> None:
    model = build("bert")
    scores = score(model, batches(), skip=["classifier"])
    plan = allocate(scores, 700, 60_000, heads=[("classifier", 99)], methods=["sparse"])
    assert plan.of("sparse")
    # Recompute the per-entry empirical Fisher of one chosen module by hand.
    name = plan.of("sparse")[0].module
    weight = model.get_submodule(name).weight
    fisher = torch.zeros_like(weight)
    for b in batches():
        model.zero_grad()
        model(**b).loss.backward()
        fisher += weight.grad.pow(2)  # type: ignore[union-attr]
    mask = set(plan.masks[name].tolist())
    # The mask is whole chunks of the Fisher ranking (256 entries each; 4 in a 32x32 weight).
    ranking = fisher.flatten().argsort(descending=True).tolist()
    chunks = [set(ranking[k : k + 256]) for k in range(0, len(ranking), 256)]
    assert mask == set().union(*[c for c in chunks if c <= mask])
    assert len(mask) % 256 == 0


def test_a_zero_gradient_module_gets_nothing_from_any_method() -> None:
    model = build("bert")
    value = model.bert.encoder.layer[2].attention.self.value
    value.register_forward_hook(lambda m, i, o: o * 0)
    scores = score(model, batches(), skip=["classifier"])
    plan = allocate(scores, 50_000, 60_000, heads=[("classifier", 99)], methods=ALL_METHODS)
    assert "bert.encoder.layer.2.attention.self.value" not in {e.module for e in plan.entries}


def test_a_sparse_plan_without_its_masks_or_with_an_edited_size_is_refused(tmp_path: Path) -> None:
    scores = score(build("bert"), batches(), skip=["classifier"])
    plan = allocate(scores, 900, 60_000, heads=[("classifier", 99)], methods=["sparse"])
    path = plan.save(tmp_path / "plan.json")
    raw = json.loads(path.read_text())
    next(e for e in raw["entries"] if e["method"] == "sparse")["size"] += 1
    path.write_text(json.dumps(raw))
    with pytest.raises(lt.LeantuneError, match="cannot be edited by hand"):
        Plan.load(path)
    (tmp_path / "plan.masks.safetensors").unlink()
    with pytest.raises(lt.LeantuneError, match="masks file"):
        Plan.load(path)
    with pytest.raises(lt.LeantuneError, match="plan methods"):
        allocate(scores, 900, 60_000, methods=["lora", "magic"])


@pytest.mark.parametrize(
    "options",
    [
        {"method": "bitfit"},
        {"method": "layernorm"},
        {"method": "sparse", "budget": "2000"},
        {"select": "auto", "budget": "4000", "plan_methods": "lora,bitfit,layernorm,sparse"},
    ],
    ids=["bitfit", "layernorm", "sparse", "mixed-plan"],
)
def test_tune_saves_and_reloads_every_adapter_method(options: dict, tmp_path: Path) -> None:
    from leantune.tune import evaluate_run

    model = tiny_model_folder(tmp_path / "tiny-bert")
    data = write_rows(tmp_path / "topics.jsonl", topic_rows(60))
    summary = run_tune(
        TuneConfig(
            model=str(model),
            data=str(data),
            runs_dir=str(tmp_path / "runs"),
            name="r",
            epochs=1,
            batch_size=8,
            **options,
        )
    )
    run = tmp_path / "runs" / "r"
    assert (run / "adapter" / "adapter_config.json").exists()
    assert json.loads((run / "adapter" / "adapter_config.json").read_text())["peft_type"] in (
        "LEANTUNE",
        "LORA",
    )
    again = evaluate_run(run)
    assert again["accuracy"] == pytest.approx(summary["test_accuracy"])
    if "budget" in options:
        assert summary["trainable_params"] <= int(options["budget"])


def test_a_plan_that_buys_only_the_head_is_refused_before_training(tmp_path: Path) -> None:
    model = tiny_model_folder(tmp_path / "tiny-bert")
    data = write_rows(tmp_path / "topics.jsonl", topic_rows(60))
    config = TuneConfig(
        model=str(model),
        data=str(data),
        runs_dir=str(tmp_path / "runs"),
        method="sparse",
        budget="150",  # the head (99) fits; a 256-entry chunk does not
    )
    with pytest.raises(lt.LeantuneError, match="only the task head"):
        run_tune(config)
    assert not (tmp_path / "runs").exists()


def test_select_and_plan_honour_the_lora_options(tmp_path: Path) -> None:
    """Issue 14 item 4: --dora, --dropout, --rslora and --alpha reach the adapter under --select
    auto and --plan (they used to be dropped for a plain LoRA); a plan that says otherwise than
    the command line is refused."""
    model = tiny_model_folder(tmp_path / "tiny-bert")
    data = write_rows(tmp_path / "topics.jsonl", topic_rows(60))
    common = {"model": str(model), "data": str(data), "runs_dir": str(tmp_path / "runs")}
    common |= {"epochs": 1, "batch_size": 8, "reference_examples": 0, "budget": "3000"}
    options = {"dora": True, "dropout": 0.1, "rslora": True, "alpha": 24.0, "r": 8}
    summary = run_tune(TuneConfig(**common, name="auto", select="auto", **options))
    run = tmp_path / "runs" / "auto"
    saved = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert saved["use_dora"] and saved["use_rslora"] and saved["lora_dropout"] == 0.1
    assert saved["lora_alpha"] == 3.0 * saved["r"]  # alpha / r = 24 / 8 at every rank
    plan = Plan.load(run / "plan.json")
    assert all(e.options["dora"] for e in plan.of("lora"))
    assert summary["steps"] > 0
    # The plan file carries the options: a plain --plan run gets DoRA again.
    run_tune(TuneConfig(**common, name="again", plan=str(run / "plan.json")))
    again = json.loads(
        (tmp_path / "runs" / "again" / "adapter" / "adapter_config.json").read_text()
    )
    assert again["use_dora"] and again["lora_dropout"] == 0.1
    # A command line that contradicts the plan is refused.
    with pytest.raises(LeantuneError, match=r"the plan.s LoRA entries say dropout 0\.1"):
        run_tune(TuneConfig(**common, name="third", plan=str(run / "plan.json"), dropout=0.2))


def test_warm_head_scoring_scores_through_the_probes_head(
    tmp_path: Path, bert_dir: Path, data_file: Path
) -> None:
    """--score-head warm fits the probe's head before scoring: the scores (and so the plan's
    gains) differ from scoring through the random head, and each is the same twice."""
    from leantune.tune.prepare import prepare

    def scored(head: str) -> list[float]:
        options = {"model": str(bert_dir), "data": str(data_file), "select": "auto"}
        prep = prepare(make_config(options | {"budget": "2%", "score_head": head}))
        assert prep.scores is not None
        return [m.fisher for m in prep.scores.modules]

    random_head, warm = scored("random"), scored("warm")
    assert warm == scored("warm") and random_head == scored("random")
    assert max(abs(a - b) / max(a, b, 1e-12) for a, b in zip(warm, random_head, strict=True)) > 0.05
    with pytest.raises(LeantuneError, match="score_head"):
        make_config({"score_head": "probe"})
