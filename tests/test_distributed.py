"""Several processes under torchrun (gloo, CPU) on a tiny BERT: the same run as one process.

Tolerance: 2 processes with --batch-size 4 against 1 process with --batch-size 8 (the same
global batch): every logged step loss within 1e-5 relative, every adapter tensor within 1e-5
relative (Frobenius norm of the difference over the norm; fp32, the summation order of the
matmuls differs), validation and test accuracy exactly equal; the logged penalty terms within
1e-5 relative + 1e-7 (the keep loss is 1 − cos with cos near 1). The runs use the defaults:
warm head, keep loss and knowledge kept on. Each launch costs ~10 s of
process start-up (two processes import torch and transformers on 2 cores).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from helpers import tiny_model_folder, topic_rows, write_rows
from test_keep import reference_file

WORKER = Path(__file__).with_name("dist_worker.py")
TOL = 1e-5


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("dist")
    model = tiny_model_folder(root / "bert")
    config = json.loads((model / "config.json").read_text())  # dropout masks differ per rank
    config |= {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
    (model / "config.json").write_text(json.dumps(config))
    data = write_rows(root / "data.csv", topic_rows(90))
    # The defaults: warm head, keep loss (on every 2nd batch here, --keep-every 0's pick from
    # the global batch) and knowledge kept on reference text in the tiny tokenizer's words.
    options = {
        "model": str(model),
        "data": str(data),
        "epochs": 2,
        "lr": 1e-2,
        "reference_text": str(reference_file(root / "ref.txt")),
        "reference_examples": 12,
        "keep_examples": 20,
        "eval_batch_size": 5,
    }
    return {"root": root, "options": options}


def launch(
    root: Path, name: str, options: dict[str, Any], procs: int, timeout: float = 240, **spec: Any
) -> tuple[subprocess.CompletedProcess[str], dict[str, dict[str, Any]]]:
    """Run the worker under torchrun with ``procs`` processes (0: plain python, no launcher)."""
    where = root / f"spec-{name}"
    shutil.rmtree(where, ignore_errors=True)
    where.mkdir()
    (where / "spec.json").write_text(json.dumps({"options": options} | spec))
    env = os.environ | {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    if procs:
        head = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        cmd = [*head, f"--nproc-per-node={procs}", str(WORKER), str(where / "spec.json")]
    else:
        cmd = [sys.executable, str(WORKER), str(where / "spec.json")]
    done = subprocess.run(
        cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    outs = {f.stem[4:]: json.loads(f.read_text()) for f in where.glob("out-*.json")}
    return done, outs


def curve(run: Path) -> list[tuple[int, float]]:
    return [(int(s), float(v)) for s, v in json.loads((run / "history.json").read_text())["curve"]]


def assert_same_run(a: Path, b: Path) -> None:
    """Step losses, validation rows, test metrics and the adapter of runs ``a`` and ``b``."""
    ca, cb = curve(a), curve(b)
    assert [s for s, _ in ca] == [s for s, _ in cb]
    for (_, x), (_, y) in zip(ca, cb, strict=True):
        assert abs(x - y) <= TOL * abs(x), (x, y)
    rows_a = [json.loads(line) for line in (a / "metrics.jsonl").read_text().splitlines()]
    rows_b = [json.loads(line) for line in (b / "metrics.jsonl").read_text().splitlines()]
    assert [r["val_accuracy"] for r in rows_a] == [r["val_accuracy"] for r in rows_b]
    for ra, rb in zip(rows_a, rows_b, strict=True):
        assert abs(ra["val_loss"] - rb["val_loss"]) <= TOL * ra["val_loss"]
        # The logged terms (the keep loss among them) are the whole batch's, not a rank's.
        terms = [k for k in ra if k.startswith("train_") and k != "train_seconds"]
        assert set(terms) == {k for k in rb if k.startswith("train_") and k != "train_seconds"}
        for key in terms:
            # + 1e-7: the keep term is 1 − cos with cos ≈ 1, float32's resolution of cos.
            assert abs(ra[key] - rb[key]) <= TOL * abs(ra[key]) + 1e-7, (key, ra[key], rb[key])
    sa = json.loads((a / "summary.json").read_text())
    sb = json.loads((b / "summary.json").read_text())
    assert sa["test_accuracy"] == sb["test_accuracy"] and sa["steps"] == sb["steps"]
    for key in ("knowledge_cosine", "probe_test_accuracy", "probe_val_accuracy"):
        assert abs(sa[key] - sb[key]) <= TOL * abs(sa[key]), (key, sa[key], sb[key])
    assert sa["train_examples"] == sb["train_examples"]
    ta = load_file(str(a / "adapter" / "adapter_model.safetensors"))
    tb = load_file(str(b / "adapter" / "adapter_model.safetensors"))
    assert set(ta) == set(tb) and ta
    for key in ta:
        assert torch.norm(ta[key] - tb[key]) <= TOL * torch.norm(ta[key]), key


@pytest.fixture(scope="module")
def reference(setup: dict[str, Any]) -> Path:
    """One process, --batch-size 8: the run every distributed run must reproduce."""
    root = setup["root"]
    options = setup["options"] | {"name": "single", "batch_size": 8, "runs_dir": "runs"}
    done, _ = launch(root, "single", options, 0)
    assert done.returncode == 0, done.stderr[-2000:]
    run = root / "runs" / "single"
    tensors = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    moved = [t for k, t in tensors.items() if "lora_B" in k]
    assert moved and all(float(t.norm()) > 1e-4 for t in moved)  # LoRA B starts at zero
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(r["train_keep"] > 0 for r in rows)  # the defaults under test: the keep loss
    summary = json.loads((run / "summary.json").read_text())
    assert "probe_val_accuracy" in summary  # and the warm head
    return run


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp"])
def test_two_processes_equal_one_and_only_rank_0_writes(
    setup: dict[str, Any], reference: Path, fsdp: bool
) -> None:
    root, name = setup["root"], f"two-{'fsdp' if fsdp else 'ddp'}"
    options = setup["options"] | {"name": name, "batch_size": 4, "fsdp": fsdp}
    other = root / f"rank1-{name}"
    done, outs = launch(
        root, name, options | {"runs_dir": "runs"}, 2, runs_dir_of={"1": str(other)}
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert not other.exists()  # rank 1 was told another runs_dir and wrote nothing there
    assert_same_run(reference, root / "runs" / name)
    assert outs["0"]["test_accuracy"] == outs["1"]["test_accuracy"]  # metrics reduced exactly
    assert outs["0"]["steps"] == 16


def test_ranks_that_disagree_stop_before_training(setup: dict[str, Any]) -> None:
    root = setup["root"]
    options = setup["options"] | {"name": "disagree", "batch_size": 4, "runs_dir": "runs"}
    done, outs = launch(root, "disagree", options, 2, options_of={"1": {"lr": 5e-3}})
    assert done.returncode != 0
    assert "disagree on the data or the options" in outs["0"]["error"]
    assert not (root / "runs" / "disagree").exists()
    assert not (root / "runs" / ".disagree.partial").exists()


def no_torn_files(partial: Path) -> None:
    """Only whole checkpoint units; no temporary files left behind."""
    assert not list(partial.rglob("*.tmp"))
    state = partial / "checkpoint"
    latest = json.loads((state / "latest.json").read_text())
    assert (state / latest["folder"] / "state.json").is_file()
    assert [p.name for p in state.iterdir() if p.is_dir()] == [latest["folder"]]


def test_ctrl_c_then_resume_with_two_and_with_one_process(
    setup: dict[str, Any], reference: Path
) -> None:
    root = setup["root"]
    options = setup["options"] | {"name": "stopped", "batch_size": 4, "runs_dir": "runs"}
    done, outs = launch(root, "stop", options, 2, stop_at=5)
    assert done.returncode == 0, done.stderr[-3000:]
    assert outs["0"]["interrupted"] and outs["1"]["interrupted"]
    assert outs["0"]["step"] == outs["1"]["step"] == 6  # agreed at the next step
    partial = root / "runs" / ".stopped.partial"
    no_torn_files(partial)
    # The same folder twice: resumed by 2 processes, and (a copy) by 1 with the same options.
    shutil.copytree(partial, root / "runs" / ".stopped1.partial")
    done, _ = launch(root, "resume2", options, 2, resume=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_run(reference, root / "runs" / "stopped")
    done, _ = launch(root, "resume1", options | {"name": "stopped1"}, 1, resume=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_run(reference, root / "runs" / "stopped1")


def test_a_killed_rank_stops_the_other_with_one_line(
    setup: dict[str, Any], reference: Path
) -> None:
    root = setup["root"]
    options = setup["options"] | {
        "name": "killed",
        "batch_size": 4,
        "runs_dir": "runs",
        "eval_every": 3,
        "dist_timeout": 60,
    }
    start = time.monotonic()
    done, outs = launch(root, "kill", options, 2, die_at=7)
    assert done.returncode != 0
    assert time.monotonic() - start < 120
    assert "1" not in outs  # rank 1 died without a word
    if "0" in outs:  # rank 0 saw the collective fail before torchrun stopped it
        assert "another process of this run stopped" in outs["0"]["error"]
    assert not (root / "runs" / "killed").exists()
    partial = root / "runs" / ".killed.partial"
    no_torn_files(partial)
    step = json.loads((partial / "checkpoint" / "latest.json").read_text())["step"]
    assert step == 6  # the evaluation at step 6 was checkpointed; step 7 was not
    done, _ = launch(root, "kill-resume", options, 2, resume=True)
    assert done.returncode == 0, done.stderr[-3000:]
    run = root / "runs" / "killed"
    ref, got = curve(reference), curve(run)
    for (_, x), (_, y) in zip(ref, got, strict=True):
        assert abs(x - y) <= TOL * abs(x)


def test_the_cli_under_torchrun_prints_once(setup: dict[str, Any]) -> None:
    """The ordinary command under torchrun: rank 0 prints the summary, rank 1 stays quiet."""
    root = setup["root"]
    flags = [
        (f"--{k}" if v else f"--no-{k}") if isinstance(v, bool) else f"--{k}={v}"
        for k, v in ((k.replace("_", "-"), v) for k, v in setup["options"].items())
    ]
    env = os.environ | {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    head = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    cmd = [*head, "-m", "leantune.cli", "tune", "--name", "cli", "--batch-size", "4", *flags]
    done = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("test accuracy") == 1
    assert "2 process(es): 8 rows per step, 4 each" in done.stderr
    assert (root / "runs" / "cli" / "summary.json").is_file()


@pytest.fixture(scope="module")
def instruct(setup: dict[str, Any]) -> dict[str, Any]:
    """The instruct task on its defaults (a tiny chat Llama, no dropout): one process first."""
    from helpers import chat_model_folder
    from test_instruct_tune import rows

    root = setup["root"]
    corpus = [f"{r['prompt']} {r['response']}" for r in rows(30)]
    model = chat_model_folder(root / "chat", extra=corpus)
    data = root / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows(48)))
    options = {
        "task": "instruct",
        "model": str(model),
        "data": str(data),
        "epochs": 2,
        "lr": 1e-2,
        "runs_dir": "runs",
        "reference_text": setup["options"]["reference_text"],
        "reference_examples": 12,
        "gen_examples": 4,
        "max_new_tokens": 3,
        "eval_batch_size": 5,
    }
    done, _ = launch(root, "chat-single", options | {"name": "chat-single", "batch_size": 8}, 0)
    assert done.returncode == 0, done.stderr[-2000:]
    return options


CHAT_TOL = 1e-4


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp"])
def test_an_instruct_run_on_two_processes_equals_one(
    setup: dict[str, Any], instruct: dict[str, Any], fsdp: bool
) -> None:
    root, name = setup["root"], f"chat-{'fsdp' if fsdp else 'ddp'}"
    options = instruct | {"name": name, "batch_size": 4, "fsdp": fsdp}
    done, outs = launch(root, name, options, 2)
    assert done.returncode == 0, done.stderr[-3000:]
    a, b = root / "runs" / "chat-single", root / "runs" / name
    ca, cb = curve(a), curve(b)
    assert [s for s, _ in ca] == [s for s, _ in cb] and len(ca) >= 8
    # The first update is the same to float32 (step 2's loss within 1e-6); later steps drift
    # by ~3e-5 relative and do not grow: Adam divides near-zero gradients, whose float noise
    # (another matmul blocking for 4 rows than for 8) it scales up. A weighting error would
    # show in step 2 already.
    assert abs(ca[1][1] - cb[1][1]) <= 1e-6 * ca[1][1]
    for (_, x), (_, y) in zip(ca, cb, strict=True):
        assert abs(x - y) <= CHAT_TOL * abs(x), (x, y)
    sa = json.loads((a / "summary.json").read_text())
    sb = json.loads((b / "summary.json").read_text())
    for key in ("test_perplexity", "test_perplexity_before", "reference_perplexity_after"):
        assert abs(sa[key] - sb[key]) <= CHAT_TOL * abs(sa[key]), (key, sa[key], sb[key])
    assert sa["test_exact_match"] == sb["test_exact_match"]
    assert outs["0"]["test_perplexity"] == outs["1"]["test_perplexity"]
