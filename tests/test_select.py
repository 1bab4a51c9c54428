"""Importance scores, budget allocation into a Plan, and tuning by a Plan (issue 4, part one)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

import leantune as lt
from helpers import build, tiny_model_folder, topic_rows, write_rows
from leantune.adapters.planning import ModuleScore, PlanEntry
from leantune.adapters.targets import layer_index
from leantune.analysis.plan import Plan, allocate, parse_budget, uniform_plan
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
    args = ["select", "--model", str(model), "--data", str(data), "--budget", "5%"]
    res = CliRunner().invoke(app, [*args, "--out", str(out)])
    assert res.exit_code == 0, res.stderr
    plan = Plan.load(out)
    assert plan.params <= plan.budget == int(0.05 * plan.base_params)
    assert res.stdout.splitlines()[0].split() == [
        "module",
        "fisher",
        "taylor",
        "grad",
        "norm",
        "plan",
    ]
    assert f"{plan.params:,} of {plan.budget:,} budgeted" in res.stdout
    # Beside the plan, the hand-placed recipe of the same size it is expected to beat.
    beat = next(x for x in res.stdout.splitlines() if x.startswith("to beat: uniform LoRA"))
    found = re.search(r"\(([\d,]+) parameters with the head\)", beat)
    assert found, beat
    count = int(found.group(1).replace(",", ""))
    assert abs(count - plan.budget) <= 0.1 * plan.budget and "--layers" in beat
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


def _modules(layers: int = 3) -> list[ModuleScore]:
    kinds = {"attention.self.query": (32, 32), "attention.self.value": (32, 32)}
    kinds |= {"intermediate.dense": (64, 32), "output.dense": (32, 64)}
    return [
        ModuleScore(f"enc.layer.{i}.{k}", k, i, shape)
        for i in range(layers)
        for k, shape in kinds.items()
    ]


@pytest.mark.parametrize("budget", [700, 1500, 4000, 20_000])
def test_uniform_plan_spends_the_budget_on_the_top_layers(budget: int) -> None:
    """Issue 28: the recipe a plan is measured against: every linear module of the top layers
    at one rank (a few at one more), as close to the budget as whole ranks allow."""
    modules = _modules()
    plan = uniform_plan(modules, budget, 10**6, heads=[("classifier", 99)])
    lora = plan.of("lora")
    layers = sorted({layer_index(e.module) for e in lora})
    assert layers == list(range(3 - len(layers), 3))  # the top ones, contiguous
    per_layer = {e.module.split(".")[2] for e in lora}
    assert all(sum(1 for e in lora if e.module.split(".")[2] == i) == 4 for i in per_layer)
    ranks = {e.size for e in lora}
    assert max(ranks) - min(ranks) <= 1
    # Whole ranks land within half a module's rank of the budget (above or below it).
    assert abs(plan.params - budget) <= max(m.rank_cost for m in modules) / 2
    if len(layers) < 3:  # another layer at rank 1 would not have fitted
        assert (len(layers) + 1) * 320 > budget - 99
    assert plan.of("head")[0].params == 99
    assert plan == uniform_plan(modules, budget, 10**6, heads=[("classifier", 99)])


def test_uniform_plan_of_some_kinds_takes_every_layer() -> None:
    kinds = ["attention.self.query", "attention.self.value"]
    plan = uniform_plan(_modules(), 3000, 10**6, kinds=kinds)
    assert {
        e.module.rsplit(".", 3)[-2] + "." + e.module.rsplit(".", 1)[-1] for e in plan.of("lora")
    }
    assert {layer_index(e.module) for e in plan.of("lora")} == {0, 1, 2}
    assert all(e.module.endswith(("query", "value")) for e in plan.of("lora"))
    assert plan.params <= 3000 + 64
    with pytest.raises(LeantuneError, match="no layer-stack"):
        uniform_plan(_modules(), 3000, 10**6, kinds=["nothing"])


def test_init_grad_starts_lora_on_the_gradients_top_directions(
    bert_dir: Path, data_file: Path
) -> None:
    """Issue 28: --init grad: each A's rows are the top right singular vectors of its layer's
    mean task gradient (scaled to the standard init's row norm), B is zero so the model starts
    unchanged; the same under --select auto (the plan's own scores) and hand targets."""
    from leantune.adapters.inject import adapter_layers, disable
    from leantune.adapters.methods.lora.start import ROW_NORM as GRAD_ROW_NORM
    from leantune.tune.prepare import prepare
    from leantune.tune.strategy import scoring_batches

    common = {"model": str(bert_dir), "data": str(data_file), "r": 2}
    base = prepare(make_config(common), with_method=False)
    batch = scoring_batches(base.config, base.train, base.tok.pad_token_id)
    heads = ["classifier"]
    reference = score(base.model, batch, skip=heads, max_entries=0, directions=4)
    for options in ({"init": "grad"}, {"init": "grad", "select": "auto", "budget": "3%"}):
        prep = prepare(make_config(common | options))
        layers = dict(adapter_layers(prep.model))
        assert layers
        for name, layer in layers.items():
            a = layer.adapter("default")
            vh = reference.module(name).directions
            assert vh is not None
            k = min(a.r, vh.shape[0])
            # Singular vectors are defined up to sign; the scoring is deterministic, so equal.
            assert torch.allclose(a.A[:k], vh[:k] * GRAD_ROW_NORM, atol=1e-5)
            assert torch.count_nonzero(a.B) == 0
        ids = batch[0]["input_ids"]
        prep.model.eval()
        with torch.no_grad(), disable(prep.model):
            before = prep.model(input_ids=ids).logits
        with torch.no_grad():
            after = prep.model(input_ids=ids).logits
        assert torch.equal(before, after)
    standard = prepare(make_config(common))
    a = next(iter(dict(adapter_layers(standard.model)).values())).adapter("default").A
    assert not torch.allclose(a.norm(dim=1), torch.full((a.shape[0],), GRAD_ROW_NORM))


def test_init_adapter_starts_from_the_folders_weights(
    tmp_path: Path, bert_dir: Path, data_file: Path
) -> None:
    """Issue 28: --init-adapter starts the run from an adapter folder (here one peft made and
    initialised itself), trains it in leantune's loop, and refuses what does not fit."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    from leantune.adapters.inject import adapter_layers
    from leantune.tune.prepare import prepare

    targets = ["bert.encoder.layer.1.attention.self.query", "bert.encoder.layer.1.output.dense"]
    hf = AutoModelForSequenceClassification.from_pretrained(bert_dir, num_labels=3)
    config = LoraConfig(r=3, lora_alpha=6, target_modules=targets, task_type="SEQ_CLS")
    peft_model = get_peft_model(hf, config)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_()  # a start that is not LoRA's default
    folder = tmp_path / "start"
    peft_model.save_pretrained(folder)
    common = {"model": str(bert_dir), "data": str(data_file)}
    prep = prepare(make_config(common | {"init_adapter": str(folder)}))
    layers = dict(adapter_layers(prep.model))
    assert sorted(layers) == sorted(targets)
    saved = dict(peft_model.named_parameters())
    for name, layer in layers.items():
        a = layer.adapter("default")
        assert a.r == 3 and a.A.requires_grad
        key = f"base_model.model.{name}.lora_B.default.weight"
        assert torch.equal(a.B.detach(), saved[key].detach())
    trainable = {n for n, p in prep.model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora." in n or n.startswith("classifier") for n in trainable)
    # peft's EVA writes init_lora_weights "eva": its start leaves the base weight alone.
    saved_config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(
        json.dumps(saved_config | {"init_lora_weights": "eva"})
    )
    summary = run_tune(
        TuneConfig(**common, init_adapter=str(folder), runs_dir=str(tmp_path / "runs"), epochs=1)
    )
    assert summary["steps"] > 0
    with pytest.raises(LeantuneError, match=r"no adapter_config\.json"):
        make_config(common | {"init_adapter": str(tmp_path / "nowhere")})
    with pytest.raises(LeantuneError, match="drop --select"):
        make_config(common | {"init_adapter": str(folder), "select": "auto"})
    with pytest.raises(LeantuneError, match="holds a lora adapter; pass --method lora"):
        prepare(make_config(common | {"init_adapter": str(folder), "method": "ia3"}))


def test_select_none_is_hand_placement() -> None:
    assert make_config({"select": "none"}).select is None
    # --init auto (the default): the gradient's directions under --select auto, else standard.
    assert make_config({"select": "auto"}).resolved().init == "grad"
    assert make_config({"select": "none"}).resolved().init == "standard"
    assert make_config({"select": "auto", "init": "standard"}).resolved().init == "standard"
    with pytest.raises(LeantuneError, match="use auto or none"):
        make_config({"select": "best"})
