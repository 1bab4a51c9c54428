"""Helpers the tests share: tiny models built from configs (nothing is downloaded), their
inputs, topic-labelled rows and the files they go in. Fixtures stay in conftest.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

VOCAB = 64


class MLP(nn.Module):
    """A model that is not a transformer: adapters must work on any nn.Module."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 24)
        self.body = nn.Sequential(nn.Linear(24, 32), nn.GELU(), nn.Linear(32, 32), nn.GELU())
        self.head = nn.Linear(32, 5)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(self.embed(input_ids)).mean(1))


def tiny_bert(hidden: int = 32) -> nn.Module:
    cfg = BertConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        num_hidden_layers=3,
        num_attention_heads=2,
        intermediate_size=48,
        max_position_embeddings=32,
        num_labels=3,
    )
    return BertForSequenceClassification(cfg)


def tiny_llama() -> nn.Module:
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    return LlamaForCausalLM(cfg)


def tiny_gpt2() -> nn.Module:
    cfg = GPT2Config(
        vocab_size=VOCAB,
        n_embd=32,
        n_layer=2,
        n_head=2,
        n_positions=32,
        bos_token_id=0,
        eos_token_id=0,
        tie_word_embeddings=False,
    )
    return GPT2LMHeadModel(cfg)


def build(kind: str, seed: int = 0) -> nn.Module:
    """The same base weights for the same seed, in eval mode."""
    torch.manual_seed(seed)
    model = {"bert": tiny_bert, "llama": tiny_llama, "gpt2": tiny_gpt2, "mlp": MLP}[kind]()
    return model.eval()


# Per model: LoRA targets including an embedding, and linear-only targets (for DoRA).
TARGETS = {
    "bert": (
        ["query", "value", "output.dense", "word_embeddings"],
        ["query", "value", "output.dense"],
    ),
    "llama": (["q_proj", "v_proj", "down_proj", "embed_tokens"], ["q_proj", "v_proj", "down_proj"]),
    "gpt2": (["c_attn", "c_proj", "wte"], ["c_attn", "c_proj"]),
    "mlp": (["body.0", "body.2", "embed"], "all-linear"),
}


def inputs(kind: str, seed: int = 1, batch: int = 3) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (batch, 7), generator=g)
    return {"input_ids": ids}


def logits(model: nn.Module, x: dict[str, torch.Tensor]) -> torch.Tensor:
    out = model(**x)
    return out if isinstance(out, torch.Tensor) else out.logits


# ---------------------------------------------------------------------------- tune job data

TOPICS = {
    "sport": ["goal", "match", "team", "coach", "league"],
    "money": ["bank", "shares", "profit", "market", "trade"],
    "tech": ["chip", "software", "phone", "robot", "data"],
}
FILLER = ["the", "a", "said", "on", "today", "new", "with", "for", "week", "after"]


def topic_rows(n: int = 60, seed: int = 0) -> list[dict[str, str]]:
    """Texts whose label is told by its topic words, with filler of varying length."""
    import random

    rng = random.Random(seed)
    rows = []
    names = sorted(TOPICS)
    for i in range(n):
        label = names[i % len(names)]
        words = rng.choices(TOPICS[label], k=3) + rng.choices(FILLER, k=rng.randint(2, 12))
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "label": label})
    return rows


def snapshot(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root``: what "nothing on disk changed" compares."""
    import hashlib

    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def write_rows(path: Path, rows: list[dict[str, str]]) -> Path:
    """CSV or JSON Lines by suffix."""
    import csv
    import json

    if path.suffix == ".csv":
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def tiny_model_folder(path: Path, kind: str = "bert") -> Path:
    """A saved tiny model with a word-level tokenizer: a local transformers folder, offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for ws in TOPICS.values() for w in ws} | set(FILLER))
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
    vocab = {w: i for i, w in enumerate(specials + words)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    if kind == "bert":
        tk.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
        )
        tok = PreTrainedTokenizerFast(
            tokenizer_object=tk,
            unk_token="[UNK]",
            pad_token="[PAD]",
            cls_token="[CLS]",
            sep_token="[SEP]",
        )
    else:
        tok = PreTrainedTokenizerFast(
            tokenizer_object=tk, unk_token="[UNK]", pad_token="[PAD]", eos_token="[SEP]"
        )
    # The model's vocabulary (64) covers the tokenizer's 34 ids.
    model = build("bert" if kind == "bert" else "llama")
    model.save_pretrained(path)  # type: ignore[operator]
    tok.save_pretrained(path)
    return path


# ---------------------------------------------------------------------------- chat models

CHATML = (
    "{% for m in messages %}"
    "{% if loop.first and m['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a tiny model.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL = ["<pad>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "What is the capital of France? Paris is the capital.",
    "Write a headline for this article. The dollar gains on the euro.",
    "system user assistant You are a tiny model. Be brief, please!",
    "Hello! How can I help? Which topic: business, sport or tech?",
]


def chat_tokenizer(extra: list[str] | None = None) -> Any:
    """A byte-level BPE tokenizer with a ChatML template, trained on a few sentences."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    extra = extra or []
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(CORPUS * 5 + extra, trainer)
    t = PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token="<pad>", eos_token="<|im_end|>")
    t.chat_template = CHATML
    return t


def tiny_chat_llama(tok: Any, attn: str = "sdpa") -> LlamaForCausalLM:
    """A tiny Llama over ``tok``'s vocabulary."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=tok.pad_token_id,
    )
    config._attn_implementation = attn
    return LlamaForCausalLM(config).eval()


def chat_model_folder(path: Path, extra: list[str] | None = None) -> Path:
    """A saved tiny chat Llama with its ChatML tokenizer: a local transformers folder."""
    tok = chat_tokenizer(extra)
    tiny_chat_llama(tok).save_pretrained(path)
    tok.save_pretrained(path)
    return path
