"""The strategies of ``leantune compare`` and their table; the comparison itself is
:mod:`leantune.search.compare`.

``leantune compare``: several strategies on one task, one ordinary run folder each.

A *strategy* is a name and the TuneConfig options that make it (``{"method": "bitfit"}``); the
options every strategy shares (model, data, split, seed, epochs...) are the *common* options. The
compare folder holds ``setup.json`` (the common options and the data's fingerprint), one run
folder per strategy, ``comparison.json``/``comparison.md`` (the table), two Pareto plots and
``report.html``. Finished runs (a ``summary.json``) are read back, not redone; an interrupted run
continues from its checkpoint; a folder made for other common options or data is refused.

Shared studies (``--storage URL [--study NAME]``, any Optuna RDB URL): the strategies are handed
out through one Optuna study (see :mod:`leantune.search.study`), each queued once as a trial with the
parameter ``strategy``; workers, on one machine or many, each with its own ``--out``, take them
one by one, so each strategy runs once; a killed worker's strategy is run again after its
heartbeat stops. Each finished strategy's table row (or its error) is stored in its trial, and
every worker, once all strategies have ended, writes the table and report from the study into
its own ``--out``. ``--workers N`` starts N such workers on this machine (with an SQLite study in
the compare folder when no ``--storage`` is given). A failed strategy stays failed in the
study; to run it again, use another ``--study``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from leantune.core.errors import LeantuneError
from leantune.core.files import atomic_write, read_yaml
from leantune.search.setup import SETUP
from leantune.tune.fingerprint import data_fingerprint

TABLE_JSON = "comparison.json"
TABLE_MD = "comparison.md"

BUILTIN: dict[str, dict[str, Any]] = {
    "probe": {"method": "probe"},
    "full": {"method": "full"},
    "head": {"method": "head"},
    "bitfit": {"method": "bitfit", "layers": "all"},
    "layernorm": {"method": "layernorm", "layers": "all"},
    "lora-qv": {"targets": "query,value", "layers": "all"},
    "lora-all": {"targets": "all-linear", "layers": "all"},
    "dora": {"targets": "all-linear", "layers": "all", "dora": True},
    "ia3": {"method": "ia3", "layers": "all"},
    "vera": {"method": "vera", "layers": "all", "r": 256},
    "prompt": {"method": "prompt"},
    "prefix": {"method": "prefix"},
    "bottleneck": {"method": "bottleneck", "layers": "all"},
    "sparse": {"method": "sparse", "layers": "all"},
}
"""Named strategies; ``auto-<budget>`` (auto-0.3%, auto-68000) is a Plan at that budget."""

PRESETS: dict[str, dict[str, Any]] = {
    "default": {
        "strategies": [
            "probe",
            "full",
            "head",
            "bitfit",
            "lora-qv",
            "lora-all",
            "dora",
            "auto-0.1%",
            "auto-0.3%",
            "auto-1%",
        ],
        # Nine runs in about half an hour on 2 CPU cores: a stratified sample of the training
        # split (validation and test stay whole) and a smaller knowledge-kept sample.
        "common": {"train_examples": 500, "reference_examples": 128},
    },
    "lora": {
        "strategies": ["probe", "lora-qv", "lora-all", "dora", "auto-0.3%", "auto-1%"],
        "common": {},
    },
    # The method families at the defaults each documents (its own rate, its own placement).
    "methods": {
        "strategies": [
            "probe",
            "lora-all",
            "dora",
            "ia3",
            "vera",
            "prompt",
            "prefix",
            "bottleneck",
            "bitfit",
            "sparse",
            "full",
        ],
        "common": {"train_examples": 500, "reference_examples": 128},
    },
}

_AUTO = re.compile(r"auto-(\d+(?:\.\d+)?%?)$")
_RESERVED = {SETUP, TABLE_JSON, TABLE_MD}


@dataclass
class Strategy:
    name: str
    options: dict[str, Any]


def builtin_strategy(name: str) -> Strategy:
    """A named strategy: one of BUILTIN or auto-<budget>."""
    if name in BUILTIN:
        return Strategy(name, dict(BUILTIN[name]))
    match = _AUTO.match(name)
    if match:
        return Strategy(name, {"select": "auto", "budget": match.group(1)})
    known = ", ".join([*BUILTIN, "auto-<budget> (auto-0.3%, auto-68000)"])
    raise LeantuneError(f"unknown strategy {name!r}; use one of {known}, or a mapping with a name")


def parse_strategies(items: Any, where: str = "strategies") -> list[Strategy]:
    """Names and ``{name: ..., <option>: ...}`` mappings (``use: <name>`` starts from a named one)."""
    from leantune.tune import TuneConfig

    if not isinstance(items, list) or not items:
        raise LeantuneError(f"{where}: give a non-empty list of strategies")
    known = {f.name for f in fields(TuneConfig)}
    out: list[Strategy] = []
    for item in items:
        if isinstance(item, str):
            out.append(builtin_strategy(item))
            continue
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise LeantuneError(f"{where}: each strategy is a name or a mapping with a 'name' key")
        options = {k: v for k, v in item.items() if k not in ("name", "use")}
        unknown = sorted(set(options) - known)
        if unknown:
            raise LeantuneError(
                f"{where}: strategy {item['name']!r}: unknown option {unknown[0]!r}"
            )
        base = builtin_strategy(item["use"]).options if "use" in item else {}
        out.append(Strategy(item["name"], base | options))
    names = [s.name for s in out]
    for s in out:
        if not s.name or Path(s.name).name != s.name or s.name in _RESERVED:
            raise LeantuneError(f"{where}: strategy name {s.name!r} must be a plain folder name")
        if names.count(s.name) > 1:
            raise LeantuneError(f"{where}: strategy {s.name!r} appears twice")
    return out


def load_strategies(spec: str, task: str = "classify") -> tuple[list[Strategy], dict[str, Any]]:
    """A preset name or a YAML file: a list of strategies, or {strategies: [...], common: {...}}.
    A preset's probe (the frozen model's features and a fitted head, the baseline every
    comparison shows) is left out for language-model tasks, which have no classifier."""
    if spec in PRESETS:
        preset = PRESETS[spec]
        names = [n for n in preset["strategies"] if task == "classify" or n != "probe"]
        return parse_strategies(names, spec), dict(preset["common"])
    path = Path(spec)
    if not path.exists():
        raise LeantuneError(
            f"--strategies {spec!r} is neither a preset ({', '.join(PRESETS)}) nor a YAML file"
        )
    values = read_yaml(path, "strategies")
    common: dict[str, Any] = {}
    if isinstance(values, dict):
        extra = sorted(set(values) - {"strategies", "common"})
        if extra:
            raise LeantuneError(f"{path}: unknown key {extra[0]!r}; use strategies and common")
        common = values.get("common") or {}
        if not isinstance(common, dict):
            raise LeantuneError(f"{path}: common must be a mapping of option: value")
        values = values.get("strategies")
    return parse_strategies(values, str(path)), common


ROW_KEYS = (
    "trainable_params",
    "trainable_percent",
    "adapter_bytes",
    "train_seconds",
    "peak_memory_mb",
    "knowledge_cosine",
    "knowledge_knn_overlap",
    "paraphrase_top1",
    "general_before",
    "general_after",
)


def table_row(name: str, summary: Mapping[str, Any], metric: str) -> dict[str, Any]:
    row = {"strategy": name, f"test_{metric}": summary.get(f"test_{metric}")}
    return row | {k: summary.get(k) for k in ROW_KEYS} | {"method": summary.get("method")}


def pareto(rows: Sequence[Mapping[str, Any]], cost: str, metric: str, higher: bool) -> list[str]:
    """Names on the front: no other row is at most as costly and strictly better, or cheaper
    and at least as good."""
    sign = 1 if higher else -1
    ok = [r for r in rows if r.get(cost) is not None and r.get(metric) is not None]
    front = []
    for r in ok:
        dominated = any(
            o is not r
            and o[cost] <= r[cost]
            and sign * o[metric] >= sign * r[metric]
            and (o[cost] < r[cost] or sign * o[metric] > sign * r[metric])
            for o in ok
        )
        if not dominated:
            front.append(r["strategy"])
    return front


def recommend(rows: Sequence[Mapping[str, Any]], metric: str, higher: bool, slack: float) -> str:
    """The strategy with the fewest trainable parameters within ``slack`` of the best metric."""
    key = f"test_{metric}"
    ok = [r for r in rows if r.get(key) is not None]
    if not ok:
        return "no strategy finished"
    sign = 1 if higher else -1
    best = max(ok, key=lambda r: sign * r[key])
    near = [r for r in ok if sign * (best[key] - r[key]) <= slack]
    pick = min(near, key=lambda r: (r["trainable_params"], -sign * r[key]))
    if pick.get("method") == "probe":
        return (
            f"{pick['strategy']}: the frozen model already separates these classes — no tuned "
            f"strategy is more than {slack:g} ahead of its {metric} {pick[key]:.4f} (best: "
            f"{best['strategy']}, {best[key]:.4f}); adapters add nothing over it here"
        )
    if pick is best:
        return f"{best['strategy']}: best {metric} ({best[key]:.4f})"
    return (
        f"{pick['strategy']}: {metric} {pick[key]:.4f}, within {slack:g} of the best "
        f"({best['strategy']}, {best[key]:.4f}) with {pick['trainable_params']:,} instead of "
        f"{best['trainable_params']:,} trainable parameters"
    )


def markdown_table(rows: Sequence[Mapping[str, Any]], metric: str) -> str:
    head = (
        f"| strategy | test {metric} | trainable % | adapter MB | train s | peak MB | "
        "knowledge cosine | 10-NN overlap | paraphrase top-1 | general score |"
    )
    lines = [head, "|---|---|---|---|---|---|---|---|---|---|"]

    def num(value: Any, fmt: str) -> str:
        return "-" if value is None else format(value, fmt)

    for r in rows:
        if r.get("error"):
            error = str(r["error"]).replace("|", "/")
            lines.append(f"| {r['strategy']} | failed: {error} |" + " - |" * 8)
            continue
        lines.append(
            f"| {r['strategy']} | {num(r.get(f'test_{metric}'), '.4f')} | "
            f"{num(r.get('trainable_percent'), '.3f')} | "
            f"{num(None if r.get('adapter_bytes') is None else r['adapter_bytes'] / 1e6, '.2f')} | "
            f"{num(r.get('train_seconds'), '.0f')} | {num(r.get('peak_memory_mb'), ',.0f')} | "
            f"{num(r.get('knowledge_cosine'), '.3f')} | {num(r.get('knowledge_knn_overlap'), '.3f')} | "
            f"{num(r.get('paraphrase_top1'), '.3f')} | {_general(r)} |"
        )
    return "\n".join(lines) + "\n"


def _general(row: Mapping[str, Any]) -> str:
    """The general score before -> after (a row from before the measure: -)."""
    before, after = row.get("general_before"), row.get("general_after")
    return "-" if before is None or after is None else f"{before:.3f} → {after:.3f}"


def strategy_configs(
    strategies: Sequence[Strategy], common: Mapping[str, Any], out: Path
) -> tuple[list[Any], dict[str, Any], str]:
    """Each strategy's resolved config (all checked before anything runs), the setup
    (common options and data fingerprint) and the metric."""
    from leantune.tune import make_config

    configs = []
    for s in strategies:
        values = dict(common) | s.options | {"name": s.name, "runs_dir": str(out)}
        try:
            configs.append(make_config(values).resolved())
        except LeantuneError as e:
            raise LeantuneError(f"strategy {s.name!r}: {e}") from None
    base = make_config(dict(common)).resolved()
    setup = {
        "common": {k: v for k, v in asdict(base).items() if k not in ("name", "runs_dir")},
        "data_sha256": data_fingerprint(base),
    }
    return configs, setup, str(base.metric)


def run_strategy(
    label: str,
    cfg: Any,
    out: Path,
    metric: str,
    say: Callable[[str], None],
    run: Callable[..., dict[str, Any]],
) -> dict[str, Any] | None:
    """One strategy's table row (with ``error`` when it failed); None when interrupted."""
    from leantune.tune.runfolder import RunFolder

    name = str(cfg.name)
    done = out / name / "summary.json"
    if done.exists():
        say(f"{label}: finished earlier, read back")
        return table_row(name, json.loads(done.read_text()), metric)
    # A checkpoint is resumed; a run that failed before its first one starts over.
    resume = RunFolder(out, name).resumable()
    say(f"{label}: " + ("resuming" if resume else "running"))
    try:
        summary = run(cfg, resume=resume, overwrite=False)
    except Exception as e:  # one strategy's failure must not cost the others' runs
        message = str(e).splitlines()[0] if str(e) else type(e).__name__
        if not isinstance(e, LeantuneError):
            message = f"{type(e).__name__}: {message}"
        say(f"{label}: failed: {message}")
        return table_row(name, {}, metric) | {"error": message}
    if summary.get("interrupted"):
        return None
    return table_row(name, summary, metric)


def write_table(out: Path, rows: list[dict[str, Any]], metric: str, slack: float) -> dict[str, Any]:
    """comparison.json/.md, the Pareto plots and report.html from the rows; the result."""
    from leantune.search.pages import write_compare_report

    higher = metric not in ("perplexity", "loss")
    fronts = {
        cost: pareto(rows, cost, f"test_{metric}", higher)
        for cost in ("trainable_params", "train_seconds")
    }
    result = {
        "metric": metric,
        "rows": rows,
        "pareto": fronts,
        "recommendation": recommend(rows, metric, higher, slack),
        "failed": {r["strategy"]: r["error"] for r in rows if r.get("error")},
    }
    atomic_write(out / TABLE_JSON, json.dumps(result, indent=1) + "\n")
    atomic_write(out / TABLE_MD, markdown_table(rows, metric))
    write_compare_report(out, result)
    return result
