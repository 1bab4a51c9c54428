"""`tune --task instruct` end to end on a tiny chat Llama built here: the loss is the answers',
the test split is answered by generation and scored before and after, the adapter is saved, and
`generate` answers from the saved run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from helpers import chat_model_folder
from leantune.analysis.evaluate import make_batch
from leantune.analysis.generate import Sampling, generate, sample_examples, score_answers
from leantune.cli import app
from leantune.core.errors import LeantuneError
from leantune.models.chat import ChatExample
from leantune.tune import (
    TuneConfig,
    evaluate_run,
    generate_run,
    load_run,
    merge_run,
    run_tune,
)
from leantune.tune.prepare import prepare

TOPICS = ["sport", "tech", "business"]
WORDS = {
    "sport": "match goal team win cup",
    "tech": "phone chip software web data",
    "business": "shares profit bank market sales",
}


def rows(n: int) -> list[dict[str, str]]:
    out = []
    for i in range(n):
        topic = TOPICS[i % 3]
        words = WORDS[topic].split()
        text = " ".join(words[(i + j) % 5] for j in range(6))
        out.append({"prompt": f"{text}. Which topic?", "response": topic})
    return out


@pytest.fixture
def setup(tmp_path: Path) -> tuple[Path, Path]:
    corpus = [f"{r['prompt']} {r['response']}" for r in rows(30)]
    model = chat_model_folder(tmp_path / "chat", extra=corpus)
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows(90)))
    return model, data


def config(model: Path, data: Path, tmp_path: Path, **extra: object) -> TuneConfig:
    values: dict[str, object] = {
        "task": "instruct",
        "model": str(model),
        "data": str(data),
        "runs_dir": str(tmp_path / "runs"),
        "name": "chat",
        "epochs": 6,
        "batch_size": 8,
        "lr": 1e-2,
        "layers": "all",
        "reference_examples": 0,
        "gen_examples": 12,
        "max_new_tokens": 4,
    }
    return TuneConfig(**(values | extra))  # type: ignore[arg-type]


def test_instruct_batches_train_on_the_answers_only(setup: tuple[Path, Path], tmp_path: Path):
    model, data = setup
    prep = prepare(config(model, data, tmp_path))
    batch = make_batch(prep.train, list(range(4)), prep.tok.pad_token_id, causal=True)
    for ids, labels in zip(batch["input_ids"], batch["labels"], strict=True):
        trained = ids[labels != -100]
        text = prep.tok.decode(trained)
        assert text.strip().removesuffix("<|im_end|>").strip() in TOPICS, text
    assert prep.evaluate(prep.val).metrics["perplexity"] > 1


def test_tune_instruct_improves_the_generated_answers(setup: tuple[Path, Path], tmp_path: Path):
    """Full tuning: a random tiny model's frozen features are too poor for LoRA to learn the
    task in seconds (SmolLM2's are not: README), and this is about the instruct pipeline."""
    model, data = setup
    summary = run_tune(config(model, data, tmp_path, method="full"))
    assert summary["task"] == "instruct"
    assert summary["test_exact_match_before"] < 0.5 <= summary["test_exact_match"]
    run = tmp_path / "runs" / "chat"
    samples = json.loads((run / "history.json").read_text())["samples"]
    assert len(samples) == 12 and {"prompt", "reference", "answer", "base_answer"} <= set(
        samples[0]
    )
    assert (run / "trained" / "model.safetensors").is_file()
    page = (run / "report.html").read_text()
    assert "Example generations" in page and samples[0]["reference"] in page
    general = json.loads((run / "history.json").read_text())["general"]
    assert len(general) == summary["general_examples"] == 200  # --general-examples' default
    assert all(g["base_answer"] != g["answer"] for g in general[:4])
    assert 0 <= summary["general_before"] <= 1 and 0 <= summary["general_after"] <= 1
    assert "general prompts" in page and "general score" in page


def test_tune_instruct_with_lora_then_eval_and_generate(setup: tuple[Path, Path], tmp_path: Path):
    model, data = setup
    summary = run_tune(config(model, data, tmp_path, epochs=1, gen_examples=3))
    assert summary["test_perplexity"] < summary["test_perplexity_before"]
    assert "test_exact_match" in summary
    run = tmp_path / "runs" / "chat"
    assert (run / "adapter" / "adapter_config.json").is_file()
    metrics = evaluate_run(run)
    assert metrics["perplexity"] == pytest.approx(summary["test_perplexity"], rel=1e-4)
    assert metrics["generated"] == 3 and "exact_match" in metrics
    # The CLI: one prompt is streamed; a file of prompts gives JSON lines.
    cli = CliRunner()
    one = cli.invoke(app, ["generate", str(run), "--prompt", "match goal. Which topic?"])
    assert one.exit_code == 0, one.output
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "phone chip. Which topic?"}) + "\n")
    many = cli.invoke(app, ["generate", str(run), "--input", str(prompts), "--max-new-tokens", "3"])
    assert many.exit_code == 0, many.output
    row = json.loads(many.stdout.strip().splitlines()[-1])
    assert row["prompt"] == "phone chip. Which topic?" and isinstance(row["answer"], str)
    bad = cli.invoke(app, ["generate", str(run)])
    assert bad.exit_code == 2 and "--prompt" in bad.stderr
    # merge: a plain transformers folder whose greedy answers are base + adapter's.
    prompts_list = ["match goal team. Which topic?", "bank profit. Which topic?"]
    tuned = [r["answer"] for r in generate_run(run, prompts_list, None, Sampling(6))]
    merged = merge_run(run, tmp_path / "merged")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    m_model = AutoModelForCausalLM.from_pretrained(merged)
    m_tok = AutoTokenizer.from_pretrained(merged)
    convs = [[{"role": "user", "content": p}] for p in prompts_list]
    assert generate(m_model, m_tok, convs, Sampling(6)) == tuned
    # peft loads the adapter on the same base model and gives the same logits.
    from peft import PeftModel

    saved = load_run(run)
    peft_model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(model), run / "adapter"
    )
    x = {"input_ids": torch.tensor([[5, 9, 14, 20, 7]])}
    torch.testing.assert_close(
        peft_model(**x).logits, saved.model(**x).logits, atol=1e-5, rtol=1e-5
    )


def test_select_auto_and_penalties_accept_instruct_runs(setup: tuple[Path, Path], tmp_path: Path):
    model, data = setup
    summary = run_tune(
        config(model, data, tmp_path, select="auto", budget="5%", epochs=1, gen_examples=0, ewc=0.1)
    )
    run = tmp_path / "runs" / "chat"
    assert (run / "plan.json").is_file() and summary["trainable_params"] > 0
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert all('"train_ewc"' in line and '"train_l2"' in line for line in lines)


def test_scoring_splits_short_and_free_answers() -> None:
    short = ChatExample(
        [{"role": "user", "content": "q"}, {"role": "assistant", "content": "tech"}]
    )
    free = ChatExample(
        [
            {"role": "user", "content": "q"},
            {"role": "assistant", "content": "shares rise on profit"},
        ]
    )
    metrics, report = score_answers([short, free], ["Tech.", "shares rise"])
    assert metrics["exact_match"] == 1.0
    assert 0 < metrics["rouge_l"] < 1
    assert report[1]["answer"] == "shares rise"
    kinds = [ChatExample(short.messages, kind=k) for k in "aab" * 10]
    picked = sample_examples(kinds, 9, seed=0)
    assert len(picked) == 9 and sum(e.kind == "b" for e in picked) == 3


def test_generate_is_greedy_and_deterministic(setup: tuple[Path, Path]) -> None:
    from leantune.models.loading import load_model, load_tokenizer

    model_dir, _ = setup
    tok = load_tokenizer(model_dir)
    model = load_model(model_dir, "instruct")
    convs = [[{"role": "user", "content": "match goal. Which topic?"}]] * 2 + [
        [{"role": "user", "content": "phone chip software web data chip. Which topic?"}]
    ]
    a = generate(model, tok, convs, Sampling(max_new_tokens=5), batch_size=2)
    b = generate(model, tok, convs, Sampling(max_new_tokens=5), batch_size=3)
    assert a == b and a[0] == a[1]  # padding and batch size change nothing
    torch.manual_seed(0)
    sampled = generate(model, tok, convs, Sampling(max_new_tokens=5, temperature=1.5))
    assert len(sampled) == 3
    with pytest.raises(LeantuneError, match="top-p"):
        Sampling(top_p=0)


def test_packing_batches_keep_every_answer_token(setup: tuple[Path, Path], tmp_path: Path):
    model, data = setup
    plain = prepare(config(model, data, tmp_path))
    packed = prepare(config(model, data, tmp_path, packing=True))
    assert packed.model.config.use_cache is False  # a cache would hide the segments
    want = sum(sum(t != -100 for t in row) for row in plain.train.targets)
    batches = packed.batches(0)
    assert sum(int((b["labels"] != -100).sum()) for b in batches) == want
    rows = sum(len(b["input_ids"]) for b in batches)
    assert rows < len(plain.train)  # fuller rows, fewer of them
    for b in batches:  # positions restart at each conversation
        assert int((b["position_ids"] == 0).sum()) > len(b["input_ids"])
    summary = run_tune(config(model, data, tmp_path, packing=True, epochs=1, gen_examples=0))
    assert summary["test_perplexity"] < summary["test_perplexity_before"]
    with pytest.raises(LeantuneError, match="--packing"):
        TuneConfig(packing=True)


def test_precision_and_memory_options_run_an_instruct_tune(
    setup: tuple[Path, Path], tmp_path: Path
):
    model, data = setup
    summary = run_tune(
        config(
            model,
            data,
            tmp_path,
            epochs=1,
            gen_examples=3,
            base_dtype="bf16",  # implies --precision bf16
            quantize="int8",
            gradient_checkpointing=True,
        )
    )
    assert summary["test_perplexity"] < summary["test_perplexity_before"]
    saved = (tmp_path / "runs" / "chat" / "config.yaml").read_text()
    assert "precision: bf16" in saved and "quantize: int8" in saved
    with pytest.raises(LeantuneError, match="plain LoRA"):
        TuneConfig(quantize="int8", dora=True)
    with pytest.raises(LeantuneError, match="--base-dtype bf16"):
        TuneConfig(base_dtype="bf16", precision="fp16")


def test_merging_into_a_quantized_base_is_refused() -> None:
    import leantune as lt
    from helpers import build
    from leantune.models.precision import quantize_base

    model = build("llama")
    quantize_base(model, "int8")
    lt.inject(model, lt.LoraConfig(r=2, targets="all-linear"))
    with pytest.raises(LeantuneError, match="Dequantize, merge, save"):
        lt.merge(model)


def test_precision_auto_is_bf16_for_instruct_where_bf16_is_native() -> None:
    from leantune.models.precision import fast_bf16

    assert TuneConfig().resolved().precision == "fp32"  # classification stays fp32
    want = "bf16" if fast_bf16("cpu") else "fp32"
    assert TuneConfig(task="instruct", device="cpu").resolved().precision == want
    assert TuneConfig(task="instruct", precision="fp32").resolved().precision == "fp32"
    assert TuneConfig(base_dtype="bf16").resolved().precision == "bf16"


def test_compare_ranks_instruct_strategies_by_perplexity(setup: tuple[Path, Path], tmp_path: Path):
    from leantune.search.compare import run_compare
    from leantune.search.strategies import Strategy

    model, data = setup
    base = {k: v for k, v in vars(config(model, data, tmp_path)).items() if k not in ("name",)}
    common = base | {"epochs": 1, "gen_examples": 0, "runs_dir": str(tmp_path / "c")}
    result = run_compare(
        [Strategy("lora", {}), Strategy("layernorm", {"method": "layernorm"})],
        common,
        tmp_path / "compare",
    )
    assert result["metric"] == "perplexity"
    assert {r["strategy"] for r in result["rows"]} == {"lora", "layernorm"}
    assert all(r["test_perplexity"] > 1 for r in result["rows"])


def test_the_embedded_models_by_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from leantune.core import smollm2 as llm
    from leantune.models.loading import model_dir

    monkeypatch.setattr(llm, "smollm2_dir", lambda: tmp_path / "built")
    assert model_dir("smollm2", "classify") == tmp_path / "built"
    assert model_dir(None, "instruct") == tmp_path / "built"
    monkeypatch.chdir(tmp_path)
    with pytest.raises(LeantuneError, match="does not exist"):
        model_dir("smollm3")
