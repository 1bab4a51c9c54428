"""Saved runs: the trained weights a run writes (:func:`save_trained`) and the commands on a
finished run folder: load, evaluate, predict, merge, rebuild its report; and ``select``."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from leantune.adapters.config import METHODS
from leantune.adapters.formats import save_adapter
from leantune.adapters.planning import Scores
from leantune.analysis.evaluate import Encoded, evaluate
from leantune.analysis.generate import Sampling, evaluate_by_generation, generate, sample_examples
from leantune.analysis.knowledge import folder_fingerprint
from leantune.analysis.plan import Plan
from leantune.core.errors import LeantuneError
from leantune.core.files import load_into, read_tensors, unique_tensors
from leantune.models.chat import load_chats, load_prompts, use_template
from leantune.models.data import load_table
from leantune.models.loading import load_model, load_tokenizer, max_positions, model_dir
from leantune.models.pooling import copy_pooling_files, native_pooling
from leantune.models.precision import autocast
from leantune.train.checkpoint import checkpoint_meta, trainable_parameters
from leantune.tune import preference, runfolder
from leantune.tune.config import TuneConfig, make_config, read_config, started_with
from leantune.tune.prepare import (
    encode,
    encode_chats,
    load_chat_splits,
    load_splits,
    pick_device,
    prepare,
)
from leantune.tune.runfolder import RunFolder
from leantune.tune.strategy import make_plan, warm_start

HISTORY = "history.json"
"""The per-step loss curve and the test confusion matrix: what rebuilds the report."""
BEST = "best.safetensors"


def save_trained(model: nn.Module, run: Path, config: TuneConfig) -> Path:
    """adapter/ for LoRA (peft format) and the other adapter methods (leantune format);
    trained/ (safetensors + JSON) for full and head."""
    if config.method in METHODS:
        return save_adapter(model, run / "adapter")
    final = run / "trained"
    tmp = Path(tempfile.mkdtemp(prefix=".trained-", dir=run))
    tensors = unique_tensors(trainable_parameters(model))
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    meta = {
        "method": config.method,
        "base_model": str(model_dir(config.model, config.task)),
        "tensors": len(tensors),
    }
    (tmp / "leantune.json").write_text(json.dumps(meta, indent=2) + "\n")
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def write_run_report(
    run: Path, summary: Mapping[str, Any] | None = None, figures: bool = True
) -> Path:
    """report.html and its plots, from the files in the run folder (``summary`` given while
    the run finishes, read from summary.json after); ``figures=False``: the page alone."""
    from leantune.tune.report import write_report

    run = Path(run)
    if summary is None:
        if not (run / "summary.json").is_file():
            raise LeantuneError(
                f"{run} is not a finished leantune run (no summary.json); finish it with "
                "leantune tune --resume"
            )
        summary = json.loads((run / "summary.json").read_text())
    try:
        config = read_config(run / "config.yaml")
        history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        extra = json.loads((run / HISTORY).read_text())
        names = json.loads((run / "labels.json").read_text())
    except (OSError, ValueError) as e:
        raise LeantuneError(f"{run}: cannot rebuild the report ({e})") from None
    plan = Plan.load(run / "plan.json") if (run / "plan.json").is_file() else None
    return write_report(
        run,
        summary,
        history,
        [(int(s), float(v)) for s, v in extra.get("curve", [])],
        extra.get("confusion"),
        names or None,
        config,
        samples=extra.get("samples"),
        general=extra.get("general"),
        figures=figures,
        selection=(
            ("importance.png", [asdict(e) for e in plan.entries])
            if plan is not None and (run / "importance.png").exists()
            else None
        ),
    )


@dataclass
class SavedRun:
    config: TuneConfig
    model: nn.Module
    tok: Any
    label_names: list[str]
    max_length: int


def check_run_folder(run: Path, resume: bool, overwrite: bool) -> None:
    """Refuse a start that would lose or clash with something in ``run``; touches nothing."""
    RunFolder(run.parent, run.name).check(resume, overwrite)


def load_run(run: Path) -> SavedRun:
    """The base model with the run's trained weights (adapter/ or trained/) put back."""
    from leantune.adapters.formats import load_adapter

    run = Path(run)
    if not (run / "config.yaml").is_file():
        partial = RunFolder(run.parent, run.name)
        if partial.resumable():
            raise LeantuneError(
                f"{run} has not finished (checkpoint at step {partial.checkpoint_step()}); finish "
                f"it with leantune tune --name {run.name} --runs-dir {run.parent} --resume"
            )
        raise LeantuneError(f"{run} is not a leantune run folder (no config.yaml)")
    config = make_config(read_config(run / "config.yaml"))
    if not (run / "summary.json").is_file():
        raise LeantuneError(f"{run} has not finished; finish it with leantune tune --resume")
    names = json.loads((run / "labels.json").read_text()) if (run / "labels.json").exists() else []
    folder = model_dir(config.model, config.task)
    tok = load_tokenizer(folder)
    if config.instruct:
        use_template(tok, config.template)
    torch.manual_seed(config.seed)
    model = load_model(folder, config.task, names, tok.pad_token_id, config.pooling)
    if config.method in METHODS:
        load_adapter(model, run / "adapter")
    else:
        weights = run / "trained" / "model.safetensors"
        if not weights.is_file():
            raise LeantuneError(f"{weights} is missing; the run folder is incomplete")
        load_into(model, read_tensors(weights), weights)
    model.eval().to(pick_device(config.device))
    length = min(config.max_length, max_positions(model) or config.max_length)
    return SavedRun(config, model, tok, names, length)


def evaluate_run(run: Path, data: Path | None = None, split: str = "test") -> dict[str, Any]:
    """Metrics of a saved run on its own test (or val) split, or on another labelled file."""
    if split not in ("test", "val"):
        raise LeantuneError(f"--split {split!r}: use test or val")
    saved = load_run(run)
    cfg = saved.config
    if cfg.instruct or cfg.preference:
        return (evaluate_chats if cfg.instruct else preference.evaluate_saved)(saved, data, split)
    if data is not None:
        table = load_table(data, cfg.text_column, None if cfg.causal else cfg.label_column)
        where = str(data)
    else:
        splits = load_splits(cfg)
        table = splits.test if split == "test" else splits.val
        where = f"the {split} split"
    enc = encode(saved.tok, table, saved.label_names, saved.max_length, where)
    if cfg.causal:
        enc.ids = [x for x in enc.ids if len(x) > 1]
    with autocast(cfg.precision, run_device(saved)):  # as the run measured its test split
        result = evaluate(
            saved.model,
            enc,
            causal=cfg.causal,
            num_labels=len(saved.label_names),
            pad_id=saved.tok.pad_token_id,
            batch_size=cfg.eval_batch_size,
        )
    out: dict[str, Any] = {"data": where, "examples": len(enc), **result.metrics}
    if result.confusion is not None:
        out["confusion"] = result.confusion
        out["label_names"] = saved.label_names
    return out


def evaluate_chats(saved: SavedRun, data: Path | None, split: str) -> dict[str, Any]:
    """An instruct run on its test (or val) split or on another conversations file: the loss
    on the answers, and the generation metrics on --gen-examples of them."""
    cfg = saved.config
    if data is not None:
        examples = load_chats(
            data, cfg.prompt_column, cfg.response_column, cfg.system_column, cfg.messages_column
        )
        where = str(data)
    else:
        chats = load_chat_splits(cfg).chats
        assert chats is not None
        examples = chats.test if split == "test" else chats.validation
        where = f"the {split} split"
    enc = encode_chats(saved.tok, examples, saved.max_length, [], where)
    with autocast(cfg.precision, run_device(saved)):  # as the run measured its test split
        result = evaluate(
            saved.model,
            enc,
            causal=True,
            pad_id=saved.tok.pad_token_id,
            batch_size=cfg.eval_batch_size,
        )
        out: dict[str, Any] = {"data": where, "examples": len(enc), **result.metrics}
        if cfg.gen_examples:
            picked = sample_examples(examples, cfg.gen_examples, cfg.seed)
            sampling = Sampling(max_new_tokens=cfg.max_new_tokens)
            metrics, _ = evaluate_by_generation(
                saved.model, saved.tok, picked, sampling, batch_size=cfg.eval_batch_size
            )
            out |= metrics | {"generated": len(picked)}
    return out


def run_device(saved: SavedRun) -> torch.device:
    """The device a loaded run's model is on."""
    return next(saved.model.parameters()).device


def generate_run(
    run: Path,
    prompts: list[str],
    input_file: Path | None,
    sampling: Sampling,
    system: str | None = None,
    streamer: Any = None,
) -> list[dict[str, str]]:
    """Answers of a saved instruct (or causal-lm chat) run to ``prompts`` and to the prompts
    or conversations of ``input_file`` (read like --data), in that order."""
    saved = load_run(run)
    if not saved.config.causal:
        raise LeantuneError(f"{run} is a classification run; generate needs a causal LM run")
    head = [{"role": "system", "content": system}] if system else []
    convs = [[*head, {"role": "user", "content": p}] for p in prompts]
    if input_file is not None:
        cfg = saved.config
        convs += load_prompts(input_file, cfg.prompt_column, cfg.system_column, cfg.messages_column)
    if not convs:
        raise LeantuneError("no prompts: give --prompt or --input")
    # ``streamer`` is made from the tokenizer once it is loaded (the CLI's terminal printer).
    stream = streamer(saved.tok) if callable(streamer) else streamer
    answers = generate(saved.model, saved.tok, convs, sampling, streamer=stream)
    return [{"prompt": c[-1]["content"], "answer": a} for c, a in zip(convs, answers, strict=True)]


def predict_run(
    run: Path, texts: list[str], input_file: Path | None = None
) -> list[dict[str, Any]]:
    """Label and probability for each text, in the order given; a run whose scores are not
    finite (broken weights) is refused."""
    from leantune.tune.outputs import check_finite_scores

    saved = load_run(run)
    if saved.config.causal:
        raise LeantuneError(f"{run} is a causal-lm run; predict classifies texts")
    if input_file is not None:
        texts = texts + load_table(input_file, saved.config.text_column, None).texts
    if not texts:
        raise LeantuneError("no texts to predict")
    enc = Encoded(saved.tok(texts, truncation=True, max_length=saved.max_length)["input_ids"])
    result = evaluate(
        saved.model,
        enc,
        causal=False,
        num_labels=len(saved.label_names),
        pad_id=saved.tok.pad_token_id,
        batch_size=saved.config.eval_batch_size,
    )
    rows = [
        {"text": t, "label": saved.label_names[p], "score": round(s, 6)}
        for t, p, s in zip(texts, result.predictions, result.probabilities, strict=True)
    ]
    check_finite_scores(rows, run)
    return rows


def merge_run(run: Path, out: Path, overwrite: bool = False) -> Path:
    """Write the run's model, adapter merged in, as a plain transformers folder.

    ``out`` may not be the run or its base model (nor inside or around them); an existing
    folder is replaced (with ``overwrite``) only when merge wrote it and it holds nothing else.
    """
    from leantune.adapters.inject import unload
    from leantune.tune.outputs import check_merge_out, write_merged_folder

    run, out = Path(run), Path(out)
    if out.exists() and not out.is_dir():
        raise LeantuneError(f"--out {out} is a file; give a folder for the merged model")
    if not (run / "config.yaml").is_file():
        raise LeantuneError(f"{run} is not a leantune run folder (no config.yaml)")
    config = make_config(read_config(run / "config.yaml"))
    base = model_dir(config.model, config.task)
    check_merge_out(out, overwrite, run, base)
    saved = load_run(run)
    model = unload(saved.model, merge_active=True).cpu()

    def fill(folder: Path) -> None:
        model.save_pretrained(folder)  # type: ignore[operator]
        saved.tok.save_pretrained(folder)
        if native_pooling(base) is not None and config.pooling == "auto":
            copy_pooling_files(base, folder)  # leantune and sentence-transformers pool alike

    return write_merged_folder(out, fill, run=str(run.resolve()))


def run_select(
    config: TuneConfig, out: str | os.PathLike[str], overwrite: bool = False
) -> tuple[Plan, Scores, dict[str, float] | None]:
    """Score and allocate without training: writes the plan and its heatmap beside it. An
    existing plan (maybe edited by hand) is replaced only with ``overwrite``. The third item
    is the probe's validation metrics (classification with a probe-able head; else None): the
    score a plan's adapters must beat."""
    from leantune.tune.figures import write_heatmap
    from leantune.tune.outputs import check_parent

    out = Path(out)
    if out.exists() and not out.is_file():
        raise LeantuneError(f"{out} is not a file; give a path for plan.json")
    if out.suffix.lower() == ".png":
        raise LeantuneError(f"--out {out}: the heatmap goes beside the plan as .png; name a .json")
    if out.exists() and not overwrite:
        raise LeantuneError(f"{out} exists; pass --overwrite to replace it, or give another --out")
    check_parent(out)
    # The plan chooses its methods (--plan-methods): --method back to its default.
    prep = prepare(
        replace(config.resolved(), select="auto", plan=None, method=TuneConfig.method), False
    )
    plan, scores = make_plan(prep.model, prep.config, prep.train, prep.tok.pad_token_id)
    assert scores is not None
    probe = warm_start(replace(prep, config=replace(prep.config, warm_head=None)))
    out.parent.mkdir(parents=True, exist_ok=True)  # as tune makes its runs folder
    plan.save(out)
    write_heatmap(out.with_suffix(".png"), scores.by_layer_and_kind("fisher"), "Fisher")
    return plan, scores, None if probe is None else probe.val


def check_same_start(config: TuneConfig, folder: RunFolder, fingerprint: dict[str, Any]) -> None:
    """A resumed run continues only on the data and options it started with."""
    started = checkpoint_meta(folder.work / runfolder.STATE)
    if started.get("data_sha256", fingerprint) != fingerprint:
        changed = [k for k, v in fingerprint.items() if started["data_sha256"].get(k) != v]
        raise LeantuneError(
            f"the data changed since {folder.final} started ({', '.join(changed)}: "
            f"{getattr(config, changed[0])}); resume with the same data, or start over "
            "with --overwrite"
        )
    now, defaults = (json.loads(json.dumps(started_with(c))) for c in (config, TuneConfig()))
    recorded = started.get("config", now)  # an option newer than the run: at its default
    changed = sorted(k for k in {*recorded, *now} if recorded.get(k, defaults.get(k)) != now.get(k))
    if changed:
        raise LeantuneError(
            f"{folder.work / 'config.yaml'} changed since the run started ({', '.join(changed)}); "
            "put it back, or start over with --overwrite"
        )


def validation_line(row: dict[str, float]) -> str:
    """``step 98 (epoch 1)  val loss 0.1135  val accuracy 0.9507``: one line per validation."""
    pairs = "  ".join(
        f"{k.replace('_', ' ')} {round(v, 4)}" for k, v in row.items() if k.startswith("val_")
    )
    return f"step {int(row['step'])} (epoch {row['epoch']:g})  {pairs}"


def reference_fingerprint(config: TuneConfig) -> str:
    """What the cached original side of knowledge kept depends on: the model folder, and the
    base's precision (a bf16 or int8 base) when it is not the default."""
    how = [config.precision, config.base_dtype, config.quantize]
    folder = folder_fingerprint(model_dir(config.model, config.task))
    return folder + ("" if how == ["fp32", None, None] else "|" + "|".join(map(str, how)))


def task_key(config: TuneConfig, metrics: dict[str, float]) -> str:
    """The metric the run's one line reports: accuracy, perplexity, or for instruct the
    generation score (ROUGE-L, else exact match) when the test split was answered."""
    if config.instruct:
        return next((k for k in ("rouge_l", "exact_match") if k in metrics), "perplexity")
    if config.preference:
        return "reward_accuracy"
    return "perplexity" if config.causal else "accuracy"


def paired(before: list[dict[str, str]], after: list[dict[str, str]]) -> list[dict[str, str]]:
    """Each test conversation's reference with the base model's and the tuned answer."""
    return [a | {"base_answer": b["answer"]} for b, a in zip(before, after, strict=True)]


PROBE_MARGIN = 0.005
"""Validation gain over the probe below which the run says the probe is enough (half a point)."""


def probe_verdict(summary: dict[str, Any], metric: str) -> str | None:
    """One line when a run started from the probe's head (--warm-head) did not beat the probe
    on validation by PROBE_MARGIN; None otherwise."""
    probe, tuned = summary.get(f"probe_val_{metric}"), summary.get(f"best_val_{metric}")
    if probe is None or tuned is None or tuned - probe >= PROBE_MARGIN:
        return None
    return (
        f"the adapters gained less than half a point over the probe (validation {metric} "
        f"{tuned:.4f} vs {probe:.4f}): the frozen model already separates these classes "
        "nearly as well; --method probe gives its score in seconds"
    )


def side_by_side(summary: dict[str, Any], key: str) -> str:
    """One line: what the task gained and what the model kept."""
    keys = [key] + [k for k in ("exact_match",) if k != key and f"test_{k}_before" in summary]
    probe = " (the probe)" if f"probe_test_{key}" in summary else ""
    task = "task: " + ", ".join(
        f"test {k}{probe if k == key else ''} {summary[f'test_{k}_before']:.4g} -> "
        f"{summary[f'test_{k}']:.4g} "
        f"({summary[f'test_{k}'] - summary[f'test_{k}_before']:+.4g})"
        for k in keys
    )
    if "knowledge_cosine" in summary:
        kept = (
            f"knowledge kept: embedding cosine {summary['knowledge_cosine']:.3f}, 10-NN overlap "
            f"{summary['knowledge_knn_overlap']:.3f} on {int(summary['reference_texts'])} texts"
        )
        if "paraphrase_top1" in summary:
            kept += (
                f", paraphrase retrieval {summary['paraphrase_top1_before']:.3f}"
                f" -> {summary['paraphrase_top1']:.3f}"
            )
    elif "reference_perplexity_after" in summary:
        kept = (
            f"knowledge kept: reference perplexity {summary['reference_perplexity_before']:.4g}"
            f" -> {summary['reference_perplexity_after']:.4g}"
        )
    else:
        kept = "knowledge kept: not measured (no reference text)"
    return f"{task} | {kept}"
