"""The general-ability measure (issue 29): a fixed set of at least 200 general prompts, the same
on every call and in every process, scored by rule; causal-LM runs report the score before and
after (summary, the run's line, the report, compare's table)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from helpers import chat_model_folder, tiny_model_folder
from leantune.analysis.general import (
    GeneralMeasure,
    general_answers,
    normalize,
    plain_answer,
    score_general,
    score_item,
)
from leantune.analysis.general_set import (
    GENERAL_PROMPTS,
    GeneralItem,
    general_items,
    general_prompts,
)
from leantune.core.errors import LeantuneError
from leantune.models.loading import load_model, load_tokenizer
from leantune.search.strategies import markdown_table, table_row
from leantune.tune import TuneConfig, run_tune

SET_DIGEST = (
    "import json\n"
    "from leantune.analysis.general_set import general_items\n"
    "print(json.dumps([[i.prompt, i.kind, i.category, list(i.answers), i.rule] "
    "for i in general_items()]))\n"
)


def _in_another_process() -> list[list[object]]:
    """The set as a process with another hash seed builds it."""
    seed = "1" if os.environ.get("PYTHONHASHSEED") != "1" else "2"
    out = subprocess.run(
        [sys.executable, "-c", SET_DIGEST],
        env=os.environ | {"PYTHONHASHSEED": seed},
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout)


def test_the_set_is_fixed_large_and_holds_the_four_old_prompts() -> None:
    items = general_items()
    assert items == general_items()
    assert len(items) >= 200
    assert len({i.prompt for i in items}) == len(items)  # no prompt twice
    kinds = Counter(i.kind for i in items)
    assert set(kinds) == {"arithmetic", "fact", "instruction"} and min(kinds.values()) >= 50
    assert general_prompts() == [i.prompt for i in items]
    assert set(GENERAL_PROMPTS) <= set(general_prompts())
    # The same set in other processes, whatever their hash seed.
    here = [[i.prompt, i.kind, i.category, list(i.answers), i.rule] for i in items]
    assert _in_another_process() == here
    by_prompt = {i.prompt: i for i in items}
    assert score_item(by_prompt["What is the capital of France?"], "It is Paris.") == 1.0
    assert score_item(by_prompt["What is 12 times 11?"], "12 * 11 = 121") == 1.0
    assert score_item(by_prompt["What is 12 times 11?"], "12 * 11 = 131") == 0.0
    assert by_prompt["Give three tips for staying healthy."].rule == "list_three"
    assert by_prompt["Write one sentence about the sea."].rule == "one_sentence"


def test_a_smaller_count_is_a_prefix_that_starts_with_the_old_prompts() -> None:
    small, larger = general_items(20), general_items(200)
    assert [i.prompt for i in small[:4]] == list(GENERAL_PROMPTS)
    assert larger[:20] == small and len(larger) == 200
    assert len({i.category for i in larger}) == len({i.category for i in general_items()})
    assert general_items(0) == [] and GeneralMeasure.of(0, "fp32") is None
    with pytest.raises(LeantuneError, match=r"^--general-examples must be 0 \(off\) or more"):
        general_items(-1)


def test_no_fact_gives_its_answer_away_and_arithmetic_results_differ_from_operands() -> None:
    for item in general_items():
        if item.kind == "fact":
            said = f" {normalize(item.prompt)} "
            assert not any(f" {normalize(a)} " in said for a in item.answers), item
        if item.kind == "arithmetic":
            operands = [w for w in normalize(item.prompt).split() if w.isdigit()]
            assert item.answers[0] not in operands, item


def _item(rule: str, *answers: str, kind: str = "instruction") -> GeneralItem:
    return GeneralItem("a prompt", kind, rule, answers, rule)


@pytest.mark.parametrize(
    ("item", "right", "wrong"),
    [
        (_item("contains", "121", kind="arithmetic"), "12 times 11 is 121.", "It is 131."),
        (_item("contains", "1000", kind="fact"), "There are 1,000 metres.", "There are 100."),
        (_item("contains", "60", kind="fact"), "Sixty minutes.", "Six minutes."),
        (_item("contains", "21", kind="arithmetic"), "twenty-one", "twenty"),
        (_item("contains", "Paris", kind="fact"), "The capital is PARIS.", "It is Lyon."),
        (_item("contains", "Brasilia", kind="fact"), "Brasília.", "Rio de Janeiro."),
        (_item("contains", "H2O", kind="fact"), "It is H₂O.", "It is HO."),
        (_item("contains", "0", kind="fact"), "At zero degrees.", "At 10 degrees."),
        (_item("contains", "South America", kind="fact"), "In South America.", "In America."),
        (_item("one_word", "green"), "Green.", "The answer is green."),
        (_item("one_word", "day"), "Day", "Night"),
        (_item("one_sentence"), "The sea is deep and blue.", "The sea is deep. It is blue."),
        (_item("one_sentence"), "The moon shines at night!", "The moon\nshines at night"),
        (_item("list_three"), "1. Apples\n2. Pears\n3. Plums", "1. Apples\n2. Pears"),
        (_item("list_three"), "- red\n- blue\n- green", "- a\n- b\n- c\n- d"),
        (_item("list_three"), "Apples, pears and plums.", "Apples and pears."),
        (_item("uppercase"), "HELLO THERE!", "Hello there!"),
        (_item("yes_no", "yes"), "Yes, it is.", "No."),
        (_item("yes_no", "no"), "no", "Yes, they can."),
        (_item("number_only", "4"), "4", "A dog has 4 legs."),
        (_item("number_only", "4"), "Four.", "5"),
        (_item("few_words"), "Soft, curious and independent.", "A cat is a small furry pet."),
        (_item("few_words"), "Soft and curious", "Cats"),
        (_item("min_words"), " ".join(["word"] * 20), "A short answer."),
    ],
)
def test_each_rule_passes_the_right_answer_and_fails_the_wrong_one(
    item: GeneralItem, right: str, wrong: str
) -> None:
    assert score_item(item, right) == 1.0
    assert score_item(item, wrong) == 0.0


def test_the_score_is_the_share_passed_by_kind_and_category() -> None:
    items = general_items(8)
    by_prompt = {i.prompt: i for i in items}
    answers = ["Paris", "1. a\n2. b\n3. c", "131", "Two. Sentences."] + ["?"] * 4
    score = score_general(items, answers)
    assert score.scores[:4] == [1.0, 1.0, 0.0, 0.0]
    assert score.mean == pytest.approx(sum(score.scores) / 8)
    assert score.by_category["capital"] == pytest.approx(
        sum(s for i, s in zip(items, score.scores, strict=True) if i.category == "capital")
        / sum(i.category == "capital" for i in items)
    )
    assert set(score.by_kind) == {by_prompt[p].kind for p in by_prompt}


def test_plain_answers_stop_at_a_blank_line_or_the_next_question() -> None:
    assert plain_answer(" Paris.\n\nQuestion: what else") == "Paris."
    assert plain_answer("1. a\n2. b\nQuestion: next") == "1. a\n2. b"


def test_models_with_and_without_a_chat_template_answer(tmp_path: Path) -> None:
    items = general_items(6)
    for folder in (
        chat_model_folder(tmp_path / "chat"),
        tiny_model_folder(tmp_path / "w", "llama"),
    ):
        tok = load_tokenizer(folder)
        model = load_model(folder, "causal-lm", pad_token_id=tok.pad_token_id)
        answers = general_answers(model, tok, items, batch_size=4)
        assert len(answers) == 6 and all(isinstance(a, str) for a in answers)
        assert answers == general_answers(model, tok, items, batch_size=4)  # greedy


def _chat_data(path: Path) -> Path:
    pairs = [("goal", "sport"), ("chip", "tech"), ("bank", "business")] * 10
    rows = [{"prompt": f"{w} {w} news. Which topic?", "response": t} for w, t in pairs]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_an_instruct_run_reports_the_general_score_before_and_after(tmp_path: Path) -> None:
    said: list[str] = []
    config = TuneConfig(
        task="instruct",
        model=str(chat_model_folder(tmp_path / "chat")),
        data=str(_chat_data(tmp_path / "chat.jsonl")),
        runs_dir=str(tmp_path / "runs"),
        name="chat",
        epochs=1,
        reference_examples=0,
        gen_examples=3,
        max_new_tokens=4,
        general_examples=12,
    )
    summary = run_tune(config, log=said.append)
    assert summary["general_examples"] == 12
    assert 0 <= summary["general_before"] <= 1 and 0 <= summary["general_after"] <= 1
    delta = summary["general_after"] - summary["general_before"]
    assert summary["general_delta"] == pytest.approx(delta, abs=1e-4)
    assert summary["general_prompting"] == "chat template"
    run = Path(summary["run"])
    saved = json.loads((run / "summary.json").read_text())
    assert saved["general_before"] == summary["general_before"]
    line = next(s for s in said if s.startswith("task: "))
    assert f"general: {summary['general_before']:.3f} -> {summary['general_after']:.3f}" in line
    rows = json.loads((run / "history.json").read_text())["general"]
    assert [r["prompt"] for r in rows] == [i.prompt for i in general_items(12)]
    assert {"base_answer", "answer", "base_score", "score", "category"} <= set(rows[0])
    page = (run / "report.html").read_text()
    assert "general ability:" in page and "general score" in page and "capital" in page
    table = markdown_table([table_row("chat", summary, "perplexity")], "perplexity")
    assert f"{summary['general_before']:.3f} → {summary['general_after']:.3f}" in table


def test_a_causal_lm_run_is_measured_with_plain_prompts_and_0_turns_it_off(
    tmp_path: Path, data_file: Path
) -> None:
    llama = tiny_model_folder(tmp_path / "llama", "llama")
    values = {
        "model": str(llama),
        "task": "causal-lm",
        "data": str(data_file),
        "runs_dir": str(tmp_path / "runs"),
        "epochs": 1,
        "reference_examples": 0,
    }
    summary = run_tune(TuneConfig(**values, name="on", general_examples=8))  # type: ignore[arg-type]
    assert summary["general_examples"] == 8
    assert summary["general_prompting"] == "plain Question/Answer"
    off = run_tune(TuneConfig(**values, name="off", general_examples=0))  # type: ignore[arg-type]
    assert not any(k.startswith("general_") for k in off)
    assert "general" not in json.loads((Path(off["run"]) / "history.json").read_text())


def test_a_summary_from_before_the_measure_still_makes_a_table_row() -> None:
    old = {"test_accuracy": 0.9, "trainable_params": 10, "method": "lora"}
    table = markdown_table([table_row("old", old, "accuracy")], "accuracy")
    assert table.splitlines()[-1].endswith("| - |")
