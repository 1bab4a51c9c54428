"""`make demo` until `leantune tune` lands: LoRA on the embedded MiniLM with a few BBC articles.

Injects LoRA, trains a few dozen steps, saves the adapter, reloads it in a fresh process and
checks the logits match, then prints the accounting. Run: python -m leantune.demo
"""

from __future__ import annotations

import random
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForSequenceClassification, AutoTokenizer
from transformers.utils import logging as hf_logging

import leantune as lt
from leantune.defaults import bbc_news, minilm_dir

PER_CLASS_TRAIN, PER_CLASS_TEST, STEPS, BATCH, MAX_LEN = 16, 8, 40, 8, 128


def load_model(num_labels: int) -> torch.nn.Module:
    return AutoModelForSequenceClassification.from_pretrained(minilm_dir(), num_labels=num_labels)


def encode(texts: list[str]) -> dict[str, torch.Tensor]:
    tok = AutoTokenizer.from_pretrained(minilm_dir())
    return dict(tok(texts, truncation=True, max_length=MAX_LEN, padding=True, return_tensors="pt"))


@torch.no_grad()
def accuracy(model: torch.nn.Module, batch: dict[str, torch.Tensor], labels: torch.Tensor) -> float:
    model.eval()
    return (model(**batch).logits.argmax(-1) == labels).float().mean().item()


def main(out: Path = Path("runs/demo")) -> None:
    hf_logging.set_verbosity_error()
    torch.manual_seed(0)
    data = bbc_news()
    rng = random.Random(0)
    by_class: dict[int, list[int]] = {}
    for i, y in enumerate(data.labels):
        by_class.setdefault(y, []).append(i)
    train_idx, test_idx = [], []
    for idx in by_class.values():
        rng.shuffle(idx)
        train_idx += idx[:PER_CLASS_TRAIN]
        test_idx += idx[PER_CLASS_TRAIN : PER_CLASS_TRAIN + PER_CLASS_TEST]
    train = encode([data.texts[i] for i in train_idx])
    y_train = torch.tensor([data.labels[i] for i in train_idx])
    test = encode([data.texts[i] for i in test_idx])
    y_test = torch.tensor([data.labels[i] for i in test_idx])

    model = load_model(len(data.label_names))
    lt.inject(model, lt.LoraConfig(r=8, alpha=16, targets=["query", "value"]))
    print(lt.parameter_report(model))
    print(f"test accuracy before: {accuracy(model, test, y_test):.3f} ({len(test_idx)} articles)")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-3)
    start = time.perf_counter()
    for step in range(STEPS):
        model.train()
        rows = torch.randint(0, len(train_idx), (BATCH,))
        loss = model(**{k: v[rows] for k, v in train.items()}, labels=y_train[rows]).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        if step % 10 == 9:
            print(f"step {step + 1:3d}  loss {loss.item():.3f}")
    print(f"trained {STEPS} steps of {BATCH} in {time.perf_counter() - start:.1f} s")
    print(f"test accuracy after:  {accuracy(model, test, y_test):.3f}")

    adapter = lt.save_adapter(model, out / "adapter")
    with torch.no_grad():
        expected = model(**test).logits
    save_file({"logits": expected, **test}, str(out / "check.safetensors"))
    subprocess.run([sys.executable, "-m", "leantune.demo", "--check", str(out)], check=True)
    print(f"adapter saved in {adapter}: {sorted(p.name for p in adapter.iterdir())}")


def check(out: Path) -> None:
    """In a fresh process: load the base model and the adapter, compare logits."""
    hf_logging.set_verbosity_error()
    saved = load_file(str(out / "check.safetensors"))
    expected = saved.pop("logits")
    model = load_model(expected.shape[-1]).eval()
    lt.load_adapter(model, out / "adapter")
    with torch.no_grad():
        got = model(**saved).logits
    diff = (got - expected).abs().max().item()
    print(f"reloaded in a fresh process: max |logit difference| = {diff:.2e}")
    if diff > 1e-5:
        raise SystemExit("reloaded adapter does not reproduce the logits")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--check":
        check(Path(sys.argv[2]))
    else:
        main()
