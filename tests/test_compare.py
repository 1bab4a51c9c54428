"""leantune compare on a tiny saved BERT: run folders, table, Pareto plots, report, resume,
and bad input."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from typer.testing import CliRunner

from helpers import topic_rows, write_rows
from leantune.cli import app
from leantune.core.errors import LeantuneError
from leantune.search.compare import run_compare
from leantune.search.strategies import (
    builtin_strategy,
    load_strategies,
    pareto,
    parse_strategies,
    recommend,
)
from leantune.tune import make_config, run_tune
from leantune.tune.runfolder import RunFolder


def common(bert_dir: Path, data_file: Path) -> dict[str, Any]:
    return {
        "model": str(bert_dir),
        "data": str(data_file),
        "batch_size": 8,
        "epochs": 2,
        "reference_examples": 0,
    }


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    res = CliRunner().invoke(app, list(args))
    return subprocess.CompletedProcess(list(args), res.exit_code, res.stdout, res.stderr)


def images_of(html: str) -> list[str]:
    return re.findall(r'<img src="([^"]+)"', html)


def test_compare_writes_runs_table_plots_and_resumes(
    tmp_path: Path, bert_dir: Path, data_file: Path
) -> None:
    strategies = parse_strategies(
        ["head", "bitfit", {"name": "lora-r2", "use": "lora-qv", "r": 2, "lr": 5e-3}]
    )
    calls: list[tuple[str, bool]] = []

    def runner(cfg: Any, **kw: Any) -> dict[str, Any]:
        calls.append((cfg.name, kw["resume"]))
        return run_tune(cfg, **kw)

    out = tmp_path / "cmp"
    result = run_compare(strategies, common(bert_dir, data_file), out, runner=runner)
    assert calls == [("head", False), ("bitfit", False), ("lora-r2", False)]
    names = [r["strategy"] for r in result["rows"]]
    assert names == ["head", "bitfit", "lora-r2"]
    for r in result["rows"]:
        summary = json.loads((out / r["strategy"] / "summary.json").read_text())
        assert r["test_accuracy"] == summary["test_accuracy"]
        assert r["trainable_params"] == summary["trainable_params"]
    # head-only trains the fewest parameters, so nothing can dominate it on that axis.
    params = {r["strategy"]: r["trainable_params"] for r in result["rows"]}
    assert min(params, key=params.__getitem__) == "head"
    assert "head" in result["pareto"]["trainable_params"]
    md = (out / "comparison.md").read_text()
    assert all(f"| {n} |" in md for n in names)
    html = (out / "report.html").read_text()
    shown = images_of(html)
    assert set(shown) == {"pareto_params.png", "pareto_time.png"}
    for name in shown:
        with Image.open(out / name) as im:
            im.load()
            assert im.size[0] > 100
    for n in names:  # each strategy's own report is linked
        assert f'href="{n}/report.html"' in html

    # Again with one more strategy: the three finished runs are read back, only the new one runs.
    calls.clear()
    more = [*strategies, builtin_strategy("lora-all")]
    again = run_compare(more, common(bert_dir, data_file), out, runner=runner)
    assert calls == [("lora-all", False)]
    assert again["rows"][:3] == result["rows"]


def test_unfinished_run_is_resumed_not_restarted(
    tmp_path: Path, bert_dir: Path, data_file: Path
) -> None:
    out = tmp_path / "cmp"
    seen: list[bool] = []

    def runner(cfg: Any, **kw: Any) -> dict[str, Any]:
        seen.append(kw["resume"])
        unit = out / ".head.partial" / "checkpoint" / "step-0000001"  # as a checkpointed run leaves
        unit.mkdir(parents=True, exist_ok=True)
        (unit / "state.json").write_text("{}")
        (unit.parent / "latest.json").write_text('{"folder": "step-0000001", "step": 1}')
        return {"interrupted": True, "step": 1, "run": str(out / "head")}

    for _ in range(2):
        result = run_compare(
            parse_strategies(["head"]), common(bert_dir, data_file), out, runner=runner
        )
    assert seen == [False, True]
    assert result["interrupted"] and result["strategy"] == "head"
    assert not (out / "comparison.json").exists()


def test_folder_made_for_other_data_is_refused(
    tmp_path: Path, bert_dir: Path, data_file: Path
) -> None:
    out = tmp_path / "cmp"
    data = write_rows(tmp_path / "mine.jsonl", topic_rows(60))

    def runner(cfg: Any, **kw: Any) -> dict[str, Any]:
        return {"interrupted": True, "step": 0, "run": ""}

    run_compare(parse_strategies(["head"]), common(bert_dir, data), out, runner=runner)
    with pytest.raises(LeantuneError, match=r"made for another comparison \(epochs differ\)"):
        run_compare(
            parse_strategies(["head"]), common(bert_dir, data) | {"epochs": 3}, out, runner=runner
        )
    write_rows(data, topic_rows(60, seed=5))  # same file name, other rows
    with pytest.raises(LeantuneError, match=r"another comparison \(data_sha256 differ\)"):
        run_compare(parse_strategies(["head"]), common(bert_dir, data), out, runner=runner)


def test_pareto_front_and_recommendation() -> None:
    rows = [
        {"strategy": "full", "trainable_params": 1000, "test_accuracy": 0.95, "train_seconds": 9},
        {"strategy": "lora", "trainable_params": 50, "test_accuracy": 0.948, "train_seconds": 5},
        {"strategy": "worse", "trainable_params": 60, "test_accuracy": 0.90, "train_seconds": 4},
        {"strategy": "head", "trainable_params": 5, "test_accuracy": 0.70, "train_seconds": 3},
    ]
    assert pareto(rows, "trainable_params", "test_accuracy", True) == ["full", "lora", "head"]
    assert pareto(rows, "train_seconds", "test_accuracy", True) == [
        "full",
        "lora",
        "worse",
        "head",
    ]
    assert recommend(rows, "accuracy", True, 0.005).startswith("lora: accuracy 0.9480, within")
    assert recommend(rows, "accuracy", True, 0.0).startswith("full: best accuracy")
    # A probe within the slack of the best: said plainly, adapters add nothing over it.
    probe = {"strategy": "probe", "method": "probe", "trainable_params": 5, "test_accuracy": 0.947}
    said = recommend([*rows, probe], "accuracy", True, 0.005)
    assert said.startswith("probe: the frozen model already separates these classes")
    assert recommend([*rows, probe], "accuracy", True, 0.001).startswith("full: best")
    # Lower is better for perplexity: the front flips.
    ppl = [{**r, "test_perplexity": 1 / r["test_accuracy"]} for r in rows]
    assert pareto(ppl, "trainable_params", "test_perplexity", False) == ["full", "lora", "head"]


def test_the_methods_preset_builds_a_config_for_every_registered_family() -> None:
    from leantune.adapters.config import METHODS
    from leantune.tune import make_config

    strategies, common_opts = load_strategies("methods")
    methods = {make_config(common_opts | s.options).method for s in strategies}
    families = {"ia3", "vera", "prompt", "prefix", "bottleneck", "bitfit", "sparse", "full"}
    assert families <= methods and {"lora", "probe"} <= methods
    assert families - {"full"} <= set(METHODS)  # each one registered, so a run can build it


def test_strategy_lists_and_bad_input(tmp_path: Path) -> None:
    assert builtin_strategy("auto-0.3%").options == {"select": "auto", "budget": "0.3%"}
    strategies, common_opts = load_strategies("default")
    assert [s.name for s in strategies][:3] == ["probe", "full", "head"]
    causal, _ = load_strategies("default", "causal-lm")  # no classifier to fit a probe on
    assert [s.name for s in causal][:2] == ["full", "head"]
    assert "train_examples" in common_opts
    with pytest.raises(LeantuneError, match="unknown strategy 'lora-xyz'"):
        parse_strategies(["lora-xyz"])
    with pytest.raises(LeantuneError, match="unknown option 'rank'"):
        parse_strategies([{"name": "x", "rank": 4}])
    with pytest.raises(LeantuneError, match="appears twice"):
        parse_strategies(["head", "head"])
    with pytest.raises(LeantuneError, match="plain folder name"):
        parse_strategies([{"name": "../x", "method": "head"}])
    spec = tmp_path / "s.yaml"
    spec.write_text("strategies: [head, {name: small, use: lora-qv, r: 2}]\ncommon: {epochs: 1}\n")
    strategies, common_opts = load_strategies(str(spec))
    assert strategies[1].options == {"targets": "query,value", "layers": "all", "r": 2}
    assert common_opts == {"epochs": 1}


def test_the_documented_example_parses() -> None:
    root = Path(__file__).parent.parent
    strategies, common_opts = load_strategies(str(root / "docs/examples/strategies.yaml"))
    assert len(strategies) == 8 and common_opts["epochs"] == 2
    for s in strategies:  # each one is a valid tune configuration
        make_config(common_opts | s.options).resolved()


def test_cli_unknown_strategy_is_one_line(tmp_path: Path) -> None:
    spec = tmp_path / "s.yaml"
    spec.write_text("[head, lora-xyz]\n")
    res = cli("compare", "--strategies", str(spec), "--out", str(tmp_path / "c"))
    assert res.returncode == 2
    assert res.stderr.startswith("leantune: unknown strategy 'lora-xyz'")
    assert res.stderr.count("\n") == 1
    assert not (tmp_path / "c").exists()
    res = cli("compare", "--strategies", "nope", "--out", str(tmp_path / "c"))
    assert res.returncode == 2 and "neither a preset" in res.stderr
    res = cli("compare", "--name", "x", "--out", str(tmp_path / "c"))
    assert res.returncode == 2 and "drop --name" in res.stderr


def test_a_failing_strategy_is_recorded_and_the_others_still_run(
    tmp_path: Path, bert_dir: Path, data_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "cmp"
    calls: list[tuple[str, bool, bool]] = []
    broken = {"bitfit"}

    def runner(cfg: Any, **kw: Any) -> dict[str, Any]:
        calls.append((cfg.name, kw["resume"], kw["overwrite"]))
        if cfg.name in broken:
            partial = RunFolder(out, cfg.name).begin(resume=False)  # failed after starting
            (partial / "config.yaml").write_text("method: bitfit\n")
            raise RuntimeError("out of memory\nlong details")
        return run_tune(cfg, **kw)

    strategies = parse_strategies(["bitfit", "head"])
    result = run_compare(strategies, common(bert_dir, data_file), out, runner=runner)
    assert calls == [("bitfit", False, False), ("head", False, False)]
    assert result["failed"] == {"bitfit": "RuntimeError: out of memory"}
    rows = {r["strategy"]: r for r in result["rows"]}
    assert rows["bitfit"]["test_accuracy"] is None and rows["head"]["test_accuracy"] is not None
    assert result["recommendation"].startswith("head")
    assert "| bitfit | failed: RuntimeError: out of memory |" in (out / "comparison.md").read_text()
    html = (out / "report.html").read_text()
    assert 'href="head/report.html"' in html and 'href="bitfit/report.html"' not in html

    # Run again once fixed: the failed folder (no checkpoint) is started over, head is read back.
    calls.clear()
    broken.clear()
    again = run_compare(strategies, common(bert_dir, data_file), out, runner=runner)
    assert calls == [("bitfit", False, False)]
    assert again["failed"] == {} and all(r["test_accuracy"] is not None for r in again["rows"])

    # The command line: the table, then one line naming the failure, exit non-zero.
    def fails(cfg: Any, **kw: Any) -> dict[str, Any]:
        raise LeantuneError("no room for the adapter")

    monkeypatch.setattr("leantune.tune.run_tune", fails)
    spec = tmp_path / "s.yaml"
    spec.write_text("[layernorm]\n")
    args = ["--model", str(bert_dir), "--data", str(data_file), "--epochs", "1", "--quiet"]
    res = cli("compare", "--strategies", str(spec), "--out", str(tmp_path / "c2"), *args)
    assert res.returncode == 2
    assert "| layernorm | failed: no room for the adapter |" in res.stdout
    assert res.stderr.startswith("leantune: 1 of 1 strategies failed (layernorm;")
    assert res.stderr.count("\n") == 1
