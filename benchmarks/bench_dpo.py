"""DPO on SmolLM2-135M-Instruct: leantune vs TRL's DPOTrainer + peft LoRA (issue 31).

Both sides train the embedded SmolLM2 folder on the same ``--steps × --batch`` embedded
preference pairs (``leantune.models.preference.bbc_preferences``: the article's headline chosen,
another same-topic article's headline rejected; bodies cut to ``BBC_BODY_WORDS``), written once
as TRL's conversational JSON Lines (``prompt`` / ``chosen`` / ``rejected`` message lists) that
both read; one epoch.

- **leantune**: ``prepare`` (``--task preference``; its ``--precompute-reference`` computes the
  reference's log-probs before the loop, timed apart) + the one training loop, LoRA r=8,
  alpha 16, dropout 0 on leantune's default modules (all linear layers of the upper half), no
  L2 and no keep loss (TRL has neither).
- **TRL**: ``DPOTrainer`` (``loss_type="sigmoid"``) + peft ``LoraConfig`` on exactly the modules
  leantune adapted; its defaults bf16 and gradient checkpointing off (both sides fp32, no
  checkpointing); with and without ``precompute_ref_log_probs``.

Same on both: β 0.1, r, alpha, dropout, modules, steps, batch, max length 128, lr 5e-4, linear
schedule, warmup ``round(0.06 · steps)`` steps, AdamW, clipping at 1.0, seed 0, fp32. Each side
runs in its own child process; the rounds alternate ABBA.

Per child: seconds per optimizer step (median after the first 2), the reference precompute's
seconds, peak RSS (VmHWM), and the held-out reward accuracy: on ``--heldout`` test pairs,
tokenized once by leantune's code, the same function for both sides computes the sequence
log-probs with the adapter on and off (peft's ``disable_adapter``, leantune's ``disable``) and
counts the pairs whose reward β(π - ref) ranks the chosen headline first.

Usage:
    nice python benchmarks/bench_dpo.py --steps 3 --rounds 1           # smoke
    nice python benchmarks/bench_dpo.py --json benchmarks/bench_dpo.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from _common import alternate, offline_env, python_command, run_timed, save_json
from bench_sft import machine, peak_rss, step_seconds, versions, warmup_steps

BATCH, MAX_LENGTH, LR, BETA, SEED = 8, 128, 5e-4, 0.1, 0
R, ALPHA = 8, 16
SIDES = ("leantune", "trl", "trl-precompute")


def write_data(work: Path, n_train: int, n_heldout: int) -> None:
    from leantune.models.preference import bbc_preferences
    from leantune.tune.prepare import BBC_BODY_WORDS

    train, _, test = bbc_preferences(SEED, (0.7, 0.1, 0.2), BBC_BODY_WORDS)
    data = work / "data"
    data.mkdir(parents=True, exist_ok=True)
    # "small": leantune's own validation / test sets (4 pairs, not scored: the held-out pairs
    # are scored by the same function for both sides).
    splits = (("train", train[:n_train]), ("heldout", test[:n_heldout]), ("small", test[-4:]))
    for name, rows in splits:
        text = "".join(
            json.dumps(
                {
                    "prompt": ex.prompt,
                    "chosen": [{"role": "assistant", "content": ex.chosen}],
                    "rejected": [{"role": "assistant", "content": ex.rejected}],
                }
            )
            + "\n"
            for ex in rows
        )
        (data / f"{name}.jsonl").write_text(text)


def config(work: Path, steps: int, precompute: bool = True) -> Any:
    from leantune.core.smollm2 import smollm2_dir
    from leantune.tune import TuneConfig

    data = work / "data"
    return TuneConfig(
        task="preference",
        objective="dpo",
        beta=BETA,
        model=str(smollm2_dir()),
        data=str(data / "train.jsonl"),
        eval_data=str(data / "small.jsonl"),
        test_data=str(data / "small.jsonl"),
        split="1,0,0",
        max_length=MAX_LENGTH,
        batch_size=BATCH,
        eval_batch_size=16,
        epochs=1,
        lr=LR,
        r=R,
        alpha=ALPHA,
        dropout=0.0,
        l2=0.0,
        keep=0.0,
        max_steps=steps,
        seed=SEED,
        device="cpu",
        precision="fp32",
        precompute_reference=precompute,
        reference_examples=0,
        general_examples=0,
        runs_dir=str(work / "runs"),
        name="bench",
    ).resolved()


def heldout_accuracy(model: Any, work: Path, off: Any) -> float:
    """Reward accuracy on the held-out pairs; ``off()`` switches the adapter off."""
    import torch

    from leantune.core.smollm2 import smollm2_dir
    from leantune.models.loading import load_tokenizer
    from leantune.models.preference import encode_preferences, load_preferences, preference_batch

    tok = load_tokenizer(smollm2_dir())
    data = encode_preferences(tok, load_preferences(work / "data" / "heldout.jsonl"), MAX_LENGTH)

    def logps(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        logp = out.logits[:, :-1].float().log_softmax(-1)
        target = batch["labels"][:, 1:]
        token = logp.gather(-1, target.clamp(min=0)[..., None]).squeeze(-1)
        return (token * (target != -100)).sum(-1)

    right, rows = 0, list(range(len(data)))
    model.eval()
    with torch.no_grad():
        for k in range(0, len(rows), 16):
            batch = preference_batch(data, rows[k : k + 16], tok.pad_token_id)
            policy = logps(batch)
            with off():
                ref = logps(batch)
            c, r = (BETA * (policy - ref)).chunk(2)
            right += int((c > r).sum())
    return right / len(rows)


def run_leantune(work: Path, steps: int) -> dict[str, Any]:
    from leantune.adapters.inject import disable
    from leantune.train.interface import TrainHooks
    from leantune.train.loop import train
    from leantune.tune.config import train_config
    from leantune.tune.prepare import prepare

    cfg = config(work, steps)
    t0 = time.perf_counter()
    prep = prepare(cfg)  # the reference's log-probs are computed here (--precompute-reference)
    setup = time.perf_counter() - t0
    ends: list[float] = []
    hooks = TrainHooks(on_step=lambda p, n: ends.append(time.perf_counter()), forward=prep.forward)
    start = time.perf_counter()
    result = train(
        prep.model, prep.batches, lambda m: {"reward_accuracy": 0.0}, train_config(cfg), hooks
    )
    memory = peak_rss()
    modules = sum(1 for n, _ in prep.model.named_modules() if n.endswith(".lora"))
    return {
        "side": "leantune",
        "steps": result.steps,
        "step_seconds": step_seconds(ends, start),
        "setup_seconds": setup,
        "peak_rss": memory,
        "trainable_params": sum(p.numel() for p in prep.model.parameters() if p.requires_grad),
        "modules": modules,
        "heldout_reward_accuracy": heldout_accuracy(prep.model, work, lambda: disable(prep.model)),
    }


def run_trl(work: Path, steps: int, precompute: bool) -> dict[str, Any]:
    import torch
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from transformers.utils import logging as hf_logging
    from trl import DPOConfig, DPOTrainer

    from leantune.core.smollm2 import smollm2_dir

    hf_logging.set_verbosity_error()
    folder = smollm2_dir()
    targets = json.loads((work / "targets.json").read_text())
    tok = AutoTokenizer.from_pretrained(folder)
    dataset = load_dataset("json", data_files=str(work / "data" / "train.jsonl"), split="train")
    torch.manual_seed(SEED)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    peft = LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=targets)
    ends: list[float] = []
    marks: dict[str, float] = {}

    class StepTimer(TrainerCallback):
        def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            marks["start"] = time.perf_counter()

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            ends.append(time.perf_counter())

    args = DPOConfig(
        output_dir=str(work / "trl-out"),
        beta=BETA,
        loss_type=["sigmoid"],
        max_steps=steps,
        per_device_train_batch_size=BATCH,
        learning_rate=LR,
        lr_scheduler_type="linear",
        warmup_steps=warmup_steps(steps),
        max_grad_norm=1.0,
        bf16=False,
        gradient_checkpointing=False,
        use_cpu=True,
        max_length=MAX_LENGTH,
        precompute_ref_log_probs=precompute,
        eval_strategy="no",
        save_strategy="no",
        report_to="none",
        seed=SEED,
        disable_tqdm=True,
        logging_steps=1,
    )
    t0 = time.perf_counter()
    trainer = DPOTrainer(
        model=model, args=args, train_dataset=dataset, processing_class=tok,
        peft_config=peft, callbacks=[StepTimer()],
    )  # fmt: skip
    trainer.train()
    total = time.perf_counter() - t0
    memory = peak_rss()
    trained: Any = trainer.model
    return {
        "side": "trl-precompute" if precompute else "trl",
        "steps": trainer.state.global_step,
        "step_seconds": step_seconds(ends, marks["start"]),
        "setup_and_train_seconds": total,
        "peak_rss": memory,
        "trainable_params": sum(p.numel() for p in trained.parameters() if p.requires_grad),
        "modules": sum(1 for n, _ in trained.named_modules() if n.endswith(".lora_A")),
        "heldout_reward_accuracy": heldout_accuracy(trained, work, trained.disable_adapter),
    }


def targets(work: Path, steps: int) -> list[str]:
    from leantune.adapters.inject import adapter_layers
    from leantune.tune.prepare import prepare

    prep = prepare(config(work, steps, precompute=False))
    return [name for name, _ in adapter_layers(prep.model)]


def child(args: argparse.Namespace) -> None:
    work = Path(args.work)
    if args.side == "targets":
        out: dict[str, Any] = {"targets": targets(work, args.steps)}
    elif args.side == "leantune":
        out = run_leantune(work, args.steps)
    else:
        out = run_trl(work, args.steps, args.side == "trl-precompute")
    out["load_average_at_end"] = os.getloadavg()
    save_json(Path(args.out), out)


def spawn(work: Path, tag: str, side: str, steps: int) -> dict[str, Any]:
    out = work / "results" / f"{tag}.json"
    if out.exists():
        return json.loads(out.read_text())
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = python_command(__file__, "--side", side, "--steps", str(steps), "--work", str(work))
    cmd += ["--out", str(out)]
    log = work / "results" / f"{tag}.log"
    proc, seconds = run_timed(cmd, offline_env(HF_DATASETS_OFFLINE="1"), log=log)
    if proc.returncode != 0:
        raise SystemExit(f"[{tag}] failed; see {log}:\n" + log.read_text()[-3000:])
    res = json.loads(out.read_text()) | {"wall_seconds": seconds}
    save_json(out, res)
    return res


def median_step(res: dict[str, Any]) -> float:
    times = res["step_seconds"]
    return statistics.median(times[2:] or times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--heldout", type=int, default=32)
    ap.add_argument("--work", type=Path, default=Path("runs/bench_dpo"))
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--side", choices=("targets", *SIDES), help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.side:
        return child(args)
    work = args.work
    write_data(work, args.steps * BATCH, args.heldout)
    found = spawn(work, "targets", "targets", args.steps)
    (work / "targets.json").write_text(json.dumps(found["targets"]))
    runs: dict[str, list[dict[str, Any]]] = {s: [] for s in SIDES}
    for r, side in alternate(SIDES, args.rounds):
        res = spawn(work, f"{side}-{r}", side, args.steps)
        runs[side].append(res)
        print(
            f"[{side} round {r}] {median_step(res):.2f} s/step, peak "
            f"{res['peak_rss']['vmhwm_mb']:.0f} MB, held-out reward accuracy "
            f"{res['heldout_reward_accuracy']:.3f}",
            flush=True,
        )
    table = {
        side: {
            "step_s": statistics.median(median_step(x) for x in rs),
            "peak_mb": statistics.median(x["peak_rss"]["vmhwm_mb"] for x in rs),
            "heldout_reward_accuracy": rs[0]["heldout_reward_accuracy"],
            "modules": rs[0]["modules"],
            "trainable_params": rs[0]["trainable_params"],
        }
        for side, rs in runs.items()
    }
    for side, row in table.items():
        print(side, json.dumps(row))
    if args.json:
        save_json(
            args.json,
            {"machine": machine(), "versions": versions(), "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
             "table": table, "runs": runs},
        )  # fmt: skip


if __name__ == "__main__":
    main()
