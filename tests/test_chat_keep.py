"""The keep loss for chat models (issue 29 part 2): general conversations answered once by the
original model, cached, rendered with the chat template and counted on the assistant's tokens;
never a prompt of the general measure; the same batches on a resume."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from helpers import chat_model_folder
from leantune.analysis.general import normalize
from leantune.analysis.general_set import general_prompts
from leantune.models.chat import IGNORE, ChatExample, tokenize_chats
from leantune.train import keep_chat
from leantune.train.keep import KeepLoss
from leantune.train.keep_chat import chat_keep_rows, keep_instructions
from leantune.tune import TuneConfig, run_tune
from leantune.tune.options import KnowledgeOptions
from leantune.tune.prepare import prepare
from leantune.tune.strategy import make_keep

WORDS = ["match goal team win cup", "phone chip software web data", "shares profit bank sales"]


def rows(n: int) -> list[dict[str, str]]:
    out = []
    for i in range(n):
        words = WORDS[i % 3].split()
        text = " ".join(words[(i + j) % len(words)] for j in range(6))
        out.append(
            {"prompt": f"{text}. Which topic?", "response": ["sport", "tech", "business"][i % 3]}
        )
    return out


@pytest.fixture
def setup(tmp_path: Path) -> tuple[Path, Path]:
    corpus = [f"{r['prompt']} {r['response']}" for r in rows(30)] + keep_instructions(60)
    model = chat_model_folder(tmp_path / "chat", extra=corpus)
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows(60)))
    return model, data


OPTIONS: dict[str, object] = {
    "task": "instruct",
    "epochs": 1,
    "batch_size": 8,
    "lr": 1e-2,
    "layers": "all",
    "reference_examples": 0,
    "gen_examples": 4,
    "general_examples": 0,
    "max_new_tokens": 4,
    "keep": 1.0,
    "keep_examples": 40,
    "keep_every": 1,
    "precision": "fp32",  # bf16 autocast is slow on a CPU
}


def config(model: Path, data: Path, tmp_path: Path, **extra: object) -> TuneConfig:
    values = OPTIONS | {"model": str(model), "data": str(data), "name": "chat"}
    values["runs_dir"] = str(tmp_path / "runs")
    return TuneConfig(**(values | extra))


def test_the_keep_set_never_shares_a_prompt_with_the_general_measure() -> None:
    instructions = keep_instructions()
    assert len(instructions) == len(set(instructions)) >= KnowledgeOptions().keep_examples
    assert keep_instructions(40) == instructions[:40]  # fixed: a prefix of one order
    general = [normalize(p) for p in general_prompts()]
    assert len(general) >= 200
    ours = [normalize(k) for k in instructions]
    clashes = [(k, g) for k in ours for g in general if g in k or k in g]  # or equal
    assert not clashes, clashes[:5]


def test_keep_batches_render_with_the_template_and_count_the_assistant_tokens(
    setup: tuple[Path, Path], tmp_path: Path
) -> None:
    model_dir, data = setup
    cfg = config(model_dir, data, tmp_path)
    prep = prepare(cfg)
    keep = make_keep(prep.model, prep.config, prep)
    assert isinstance(keep, KeepLoss)
    assert any("40 general conversations" in n and "generated" in n for n in prep.notes)
    instructions = keep_instructions(40)
    answers, _ = keep_chat.base_answers(prep.model, prep.tok, instructions, ["x"])
    # The instruct task's own encoding of [user: instruction, assistant: answer].
    examples = [
        ChatExample([{"role": "user", "content": p}, {"role": "assistant", "content": a}])
        for p, a in zip(instructions, answers, strict=True)
    ]
    task = tokenize_chats(prep.tok, examples, cfg.max_length)
    ids = [row.tolist() for b in keep.batches for row in b["input_ids"]]
    lengths = [int(n) for b in keep.batches for n in b["attention_mask"].sum(1)]
    counted = [row for c in keep.counted for row in c]
    assert len(ids) == 40
    for r, (want, labels) in enumerate(zip(task.input_ids, task.labels, strict=True)):
        assert ids[r][: lengths[r]] == want
        text = prep.tok.decode(want)
        assert text.startswith(
            "<|im_start|>system\nYou are a tiny model.<|im_end|>\n<|im_start|>user\n"
        )
        # Position t counts exactly when token t + 1 is the assistant's (labelled by the task).
        marks = [y != IGNORE for y in labels]
        assert counted[r].tolist() == (marks[1:] + [False] * len(counted[r]))[: len(counted[r])]
        said = [want[t] for t, m in enumerate(marks) if m]
        assert prep.tok.decode(said) == answers[r] + "<|im_end|>"


def test_the_base_answers_are_cached_and_read_back_without_generating(
    setup: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model_dir, data = setup
    prep = prepare(config(model_dir, data, tmp_path))
    calls: list[int] = []
    real = keep_chat.generate

    def counting(*args: Any, **kw: Any) -> list[str]:
        calls.append(len(args[2]))
        return real(*args, **kw)

    monkeypatch.setattr(keep_chat, "generate", counting)
    key = ["model", "template"]
    first = chat_keep_rows(prep.model, prep.tok, 40, 128, key)
    assert calls == [32, 32]  # whole blocks in the set's order
    files = list((tmp_path / "leantune-cache" / "keep-chat").glob("*.json"))
    assert len(files) == 1 and len(json.loads(files[0].read_text())["answers"]) == 64

    def refuse(*args: Any, **kw: Any) -> list[str]:
        raise AssertionError("generated again")

    monkeypatch.setattr(keep_chat, "generate", refuse)
    said: list[str] = []
    assert chat_keep_rows(prep.model, prep.tok, 40, 128, key, say=said.append) == first
    assert said == [
        "keep loss: 40 general conversations (the base model's answers read from the cache)"
    ]
    assert chat_keep_rows(prep.model, prep.tok, 64, 128, key)[0][:40] == first[0]
    # More than was cached: only the new block is generated, the cached answers are kept.
    monkeypatch.setattr(keep_chat, "generate", counting)
    more = chat_keep_rows(prep.model, prep.tok, 70, 128, key)
    assert calls == [32, 32, 32] and more[0][:40] == first[0]
    # Another key (another model, template or setup) does not read these answers.
    chat_keep_rows(prep.model, prep.tok, 10, 128, ["another model", "template"])
    assert calls == [32, 32, 32, 32]


def test_a_resume_takes_the_same_keep_batches(
    setup: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model_dir, data = setup
    cfg = config(model_dir, data, tmp_path, keep_every=2)
    prep = prepare(cfg)
    first = make_keep(prep.model, prep.config, prep)
    monkeypatch.setattr(keep_chat, "generate", None)  # the resume reads the cache
    again = prepare(cfg)
    resumed = make_keep(again.model, again.config, again)
    assert isinstance(first, KeepLoss) and isinstance(resumed, KeepLoss)
    assert len(first.batches) == len(resumed.batches) == 5
    for a, b, ca, cb in zip(
        first.batches, resumed.batches, first.counted, resumed.counted, strict=True
    ):
        assert all(torch.equal(a[k], b[k]) for k in a) and torch.equal(ca, cb)
    with torch.no_grad():
        for p in prep.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    prep.model.eval()
    run = [first(prep.model) for _ in range(14)]  # an interrupted run's batches 0..13
    assert [bool(t) for t in run] == [i % 2 == 0 for i in range(14)]
    for index in (6, 10, 12):  # the resumed run, told the batch index
        term = resumed(prep.model, index)["keep"]
        assert torch.allclose(term, run[index]["keep"])
    assert not torch.allclose(run[0]["keep"], run[2]["keep"])  # other batches, other terms


def test_the_term_is_zero_at_the_start_and_positive_after_the_weights_move(
    setup: tuple[Path, Path], tmp_path: Path
) -> None:
    model_dir, data = setup
    cfg = config(model_dir, data, tmp_path)  # no dropout: the same forward twice
    prep = prepare(cfg)
    keep = make_keep(prep.model, prep.config, prep)
    assert isinstance(keep, KeepLoss)
    prep.model.train()
    start = keep(prep.model, 0)["keep"]
    assert (
        start.requires_grad and abs(float(start.detach())) < 1e-5
    )  # the adapters at their identity
    adapters = [p for p in prep.model.parameters() if p.requires_grad]
    assert adapters and all(p.grad is None for p in adapters)
    with torch.no_grad():
        for p in adapters:
            p.add_(0.1 * torch.randn_like(p))
    moved = keep(prep.model, 0)["keep"]
    assert float(moved.detach()) > 1e-4
    moved.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in adapters)


def test_an_instruct_run_logs_the_chat_keep_term_and_is_off_by_default(
    setup: tuple[Path, Path], tmp_path: Path
) -> None:
    model_dir, data = setup
    summary = run_tune(config(model_dir, data, tmp_path))
    rows_ = (Path(summary["run"]) / "metrics.jsonl").read_text().splitlines()
    assert all("train_keep" in json.loads(r) for r in rows_)
    off = config(model_dir, data, tmp_path, keep=None, name="off")
    prep = prepare(off)
    assert make_keep(prep.model, prep.config, prep) is None  # causal LMs' default weight: 0


def test_two_processes_take_the_same_keep_term_as_one(
    setup: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under torchrun (FSDP: the answers generated on every rank, rank 0's kept) the keep
    conversations, their answers and the logged term are one process's."""
    from test_distributed import launch

    model_dir, data = setup
    options = OPTIONS | {"model": str(model_dir), "data": str(data), "runs_dir": "runs"}
    options |= {"keep_examples": 24, "eval_batch_size": 4}
    found = {}
    for name, procs in (("single", 0), ("fsdp", 2)):
        monkeypatch.setenv("LEANTUNE_CACHE", str(tmp_path / f"cache-{name}"))
        run = options | {"name": name, "batch_size": 8 // max(procs, 1), "fsdp": procs > 0}
        done, _ = launch(tmp_path, name, run, procs, timeout=500)
        assert done.returncode == 0, done.stderr[-2000:]
        (cached,) = (tmp_path / f"cache-{name}" / "keep-chat").glob("*.json")
        metrics = (tmp_path / "runs" / name / "metrics.jsonl").read_text().splitlines()
        found[name] = (json.loads(cached.read_text()), [json.loads(r) for r in metrics])
    (answers, rows), (answers2, rows2) = found["single"], found["fsdp"]
    assert answers == answers2 and len(answers["answers"]) == 32
    for a, b in zip(rows, rows2, strict=True):
        assert abs(a["train_keep"] - b["train_keep"]) <= 1e-5 * a["train_keep"] + 1e-7
        assert abs(a["train_loss"] - b["train_loss"]) <= 1e-5 * a["train_loss"]
