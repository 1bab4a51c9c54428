"""Preference data: TRL's formats read alike, the answer's tokens alone are labelled, truncation
cuts the prompt, KTO's mismatched rows; the reference is the model with its adapter off (not a
copy) and precomputing it gives the loss of computing it in the step."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import leantune as lt
from helpers import chat_tokenizer, tiny_chat_llama
from leantune.core.errors import LeantuneError
from leantune.models.preference import (
    PreferenceTokens,
    encode_preferences,
    load_preferences,
    preference_batch,
    unpaired,
)
from leantune.train.preference import Objective, preference_outcome, reference_logps, sequence_logps

USER = "Which topic: business, sport or tech?"


def write(path: Path, rows: list[dict[str, object]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_the_formats_read_alike(tmp_path: Path) -> None:
    strings = write(tmp_path / "s.jsonl", [{"prompt": USER, "chosen": "sport", "rejected": "tech"}])
    user = [{"role": "user", "content": USER}]
    chat = write(
        tmp_path / "c.jsonl",
        [
            {
                "prompt": user,
                "chosen": [{"role": "assistant", "content": "sport"}],
                "rejected": [{"role": "assistant", "content": "tech"}],
            }
        ],
    )
    implicit = write(
        tmp_path / "i.jsonl",
        [
            {
                "chosen": [*user, {"role": "assistant", "content": "sport"}],
                "rejected": [*user, {"role": "assistant", "content": "tech"}],
            }
        ],
    )
    csv = tmp_path / "c.csv"
    csv.write_text(
        "chosen,rejected\n"
        + ",".join(
            '"' + json.dumps([*user, {"role": "assistant", "content": a}]).replace('"', '""') + '"'
            for a in ("sport", "tech")
        )
        + "\n"
    )
    read = [load_preferences(p) for p in (strings, chat, implicit, csv)]
    assert all(r == read[0] for r in read), read
    assert read[0][0].prompt == user and read[0][0].chosen == "sport"
    kto = write(tmp_path / "k.jsonl", [{"prompt": USER, "completion": "tech", "label": False}])
    (row,) = load_preferences(kto)
    assert row.rejected is None and not row.desirable
    assert [(r.chosen, r.desirable) for r in unpaired(read[0])] == [
        ("sport", True),
        ("tech", False),
    ]


def test_an_implicit_prompt_must_be_shared(tmp_path: Path) -> None:
    rows = [
        {
            "chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "x"}],
            "rejected": [{"role": "user", "content": "b"}, {"role": "assistant", "content": "y"}],
        }
    ]
    with pytest.raises(LeantuneError, match="line 1: with no 'prompt' column"):
        load_preferences(write(tmp_path / "i.jsonl", rows))


def test_only_the_answer_is_labelled_and_truncation_cuts_the_prompt() -> None:
    tok = chat_tokenizer()
    long = [{"role": "user", "content": USER + " The dollar gains on the euro." * 6}]
    from leantune.models.preference import PreferenceExample

    examples = [PreferenceExample(long, "sport is the answer", "tech")]
    whole = encode_preferences(tok, examples, 512)
    cut = encode_preferences(tok, examples, 24)
    assert whole.truncated == 0 and cut.truncated == 1
    for data in (whole, cut):
        for side in (0, 1):
            seq, start = data.sides[side][0], data.starts[side][0]
            answer = tok.decode(seq[start:])
            assert answer.startswith(("sport is the answer", "tech")) and answer.endswith(
                "<|im_end|>"
            )
    assert cut.sides[0][0][cut.starts[0][0] :] == whole.sides[0][0][whole.starts[0][0] :]
    assert len(cut.sides[0][0]) <= 24
    batch = preference_batch(whole, [0], tok.pad_token_id)
    assert batch["input_ids"].shape[0] == 2  # chosen, then rejected
    labelled = batch["labels"][0][batch["labels"][0] != -100]
    assert tok.decode(labelled).startswith("sport is the answer")


def test_kto_rows_are_paired_with_the_previous_answer() -> None:
    data = PreferenceTokens()
    data.sides[0] = [[1, 2, 10, 11], [3, 20], [4, 5, 6, 30, 31, 32]]
    data.starts[0] = [2, 1, 3]
    data.desirable = [1, 0, 1]
    batch = preference_batch(data, [0, 2], 0)
    assert batch["kl_input_ids"][0].tolist()[:5] == [1, 2, 30, 31, 32]  # prompt 0, answer 2
    assert batch["kl_input_ids"][1].tolist() == [4, 5, 6, 20, 0]  # prompt 2, answer 1
    assert batch["desirable"].tolist() == [1, 1]


def pairs_batch(tok: object) -> dict[str, torch.Tensor]:
    from leantune.models.preference import PreferenceExample

    user = [{"role": "user", "content": USER}]
    examples = [PreferenceExample(user, a, b) for a, b in (("sport", "tech"), ("tech", "business"))]
    data = encode_preferences(tok, examples, 64)
    return preference_batch(data, [0, 1], tok.pad_token_id)  # type: ignore[attr-defined]


def test_the_reference_is_the_model_with_the_adapter_off() -> None:
    tok = chat_tokenizer()
    base = tiny_chat_llama(tok)
    batch = pairs_batch(tok)
    want = sequence_logps(base, batch["input_ids"], batch["attention_mask"], batch["labels"]).sums
    lt.inject(base, lt.LoraConfig(r=2, targets=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in base.named_parameters():
            if ".lora." in name:
                p.normal_(std=0.2)
    n_params = sum(p.numel() for p in base.parameters())
    ref, _ = reference_logps(base, batch)
    torch.testing.assert_close(ref, want)
    assert sum(p.numel() for p in base.parameters()) == n_params  # no copy was made
    policy = sequence_logps(base, batch["input_ids"], batch["attention_mask"], batch["labels"])
    assert not torch.allclose(policy.sums, want)  # the adapter is back on after


def test_precomputed_reference_gives_the_same_loss() -> None:
    tok = chat_tokenizer()
    model = tiny_chat_llama(tok)
    lt.inject(model, lt.LoraConfig(r=2, targets=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora." in name:
                p.normal_(std=0.2)
    batch = pairs_batch(tok)
    ref, _ = reference_logps(model, batch)
    for name in ("dpo", "ipo"):
        objective = Objective(name, beta=0.3)
        live = preference_outcome(objective, model, batch).loss
        stored = preference_outcome(objective, model, batch | {"ref_logps": ref}).loss
        torch.testing.assert_close(live, stored)
        assert live > 0


def test_from_run_makes_the_sft_model_the_start_and_the_reference(tmp_path: Path) -> None:
    from helpers import chat_model_folder
    from leantune.tune import TuneConfig
    from leantune.tune.prepare import prepare

    folder = chat_model_folder(tmp_path / "chat")
    sft = AutoModelForCausalLM.from_pretrained(folder)
    lt.inject(sft, lt.LoraConfig(r=2, targets=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in sft.named_parameters():
            if ".lora." in name:
                p.normal_(std=0.3)
    run = tmp_path / "runs" / "sft"
    lt.save_adapter(sft, run / "adapter")
    (run / "config.yaml").write_text(f"task: instruct\nmodel: {folder}\n")
    data = write(
        tmp_path / "p.jsonl",
        [{"prompt": USER, "chosen": a, "rejected": b} for a, b in [("sport", "tech")] * 10],
    )
    values = {"task": "preference", "data": str(data), "from_run": str(run)}
    prep = prepare(TuneConfig(**values, reference_examples=0, general_examples=0))
    batch = prep.batches(0)[0]
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    want = sequence_logps(sft.eval(), ids, mask, labels).sums  # the SFT model's
    bare = sequence_logps(AutoModelForCausalLM.from_pretrained(folder), ids, mask, labels).sums
    torch.testing.assert_close(batch["ref_logps"], want, atol=1e-4, rtol=1e-5)
    assert not torch.allclose(want, bare, atol=1e-3)  # not the bare base
    prep.model.eval()
    start = sequence_logps(prep.model, ids, mask, labels).sums  # the policy starts there too
    torch.testing.assert_close(start, want, atol=1e-4, rtol=1e-5)
    bad = TuneConfig(**values | {"from_run": str(tmp_path)})
    with pytest.raises(LeantuneError, match="is not a finished leantune run"):
        prepare(bad)
