"""leantune's preference losses and their LoRA gradients equal TRL's own on the same tiny Llama,
batch and LoRA weights, for every objective: TRL's trainer computes its loss (its own code, not
a copy of its formula), and leantune's agrees within 1e-5 relative."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model

import leantune as lt
from helpers import chat_tokenizer, tiny_chat_llama
from leantune.train.preference import Objective, preference_outcome

TARGETS = ["q_proj", "v_proj", "down_proj"]
B = 3


def models() -> tuple[Any, Any, Any]:
    """The chat tokenizer, a tiny Llama and a peft LoRA model on a copy of it (B still zero)."""
    tok = chat_tokenizer()
    base = tiny_chat_llama(tok)
    peft_model = get_peft_model(
        copy.deepcopy(base), PeftLoraConfig(r=4, lora_alpha=8, target_modules=TARGETS)
    )
    return tok, base, peft_model


def mirror(peft_model: Any, base: Any, tmp_path: Path) -> Any:
    """Random weights for peft's adapter "default" and leantune's copy of the model with it.
    After TRL's trainer is built: given a peft model with an adapter, TRL keeps that start as
    its reference (an adapter "ref"); the start is the identity, so TRL's reference is the
    base model, as leantune's (the adapter switched off)."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name and ".default." in name:
                p.normal_(std=0.1)
    peft_model.save_pretrained(tmp_path / "lora", selected_adapters=["default"])
    return lt.load_adapter(copy.deepcopy(base), tmp_path / "lora", trainable=True)


def pairs(vocab: int, seed: int = 0) -> list[tuple[list[int], list[int], list[int]]]:
    """(prompt, chosen, rejected) token ids of different lengths."""
    g = torch.Generator().manual_seed(seed)

    def ids(n: int) -> list[int]:
        return torch.randint(3, vocab, (n,), generator=g).tolist()

    return [(ids(4 + i), ids(3 + 2 * i), ids(6 - i)) for i in range(B)]


def padded(rows: list[list[int]], width: int, value: int) -> torch.Tensor:
    return torch.tensor([r + [value] * (width - len(r)) for r in rows])


def sequences(
    prompts: list[list[int]], completions: list[list[int]], width: int
) -> dict[str, torch.Tensor]:
    rows = [p + c for p, c in zip(prompts, completions, strict=True)]
    masks = [[0] * len(p) + [1] * len(c) for p, c in zip(prompts, completions, strict=True)]
    return {
        "input_ids": padded(rows, width, 0),
        "attention_mask": padded([[1] * len(r) for r in rows], width, 0),
        "completion_mask": padded(masks, width, 0),
    }


def labelled(seqs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """leantune's form: labels are the ids on completion tokens, -100 elsewhere."""
    labels = seqs["input_ids"].masked_fill(seqs["completion_mask"] == 0, -100)
    return {"input_ids": seqs["input_ids"], "attention_mask": seqs["attention_mask"]} | {
        "labels": labels
    }


def grads(model: Any) -> dict[str, torch.Tensor]:
    """LoRA gradients keyed ``<module>.A`` / ``<module>.B``, from peft's or leantune's names."""
    out = {}
    for name, p in model.named_parameters():
        key = re.sub(r"\.lora_([AB])\.default\.weight$", r".\1", name)  # peft
        key = re.sub(r"\.lora\.default\.([AB])$", r".\1", key)  # leantune
        if key != name and p.grad is not None:
            out[key.removeprefix("base_model.model.")] = p.grad.detach().clone()
    return out


def assert_parity(ours_loss: torch.Tensor, trl_loss: torch.Tensor, ours: Any, peft: Any) -> None:
    torch.testing.assert_close(ours_loss.detach(), trl_loss.detach().float(), rtol=1e-5, atol=0)
    mine, theirs = grads(ours), grads(peft)
    assert mine.keys() == theirs.keys() and len(mine) == 2 * 2 * len(TARGETS)
    for key, g in theirs.items():
        scale = float(g.abs().max())
        assert scale > 0, key
        got = mine[key] if mine[key].shape == g.shape else mine[key].T
        torch.testing.assert_close(got, g, rtol=1e-5, atol=1e-5 * scale)


def text_pairs() -> Dataset:
    return Dataset.from_list([{"prompt": "Hello!", "chosen": " Paris.", "rejected": " tech"}] * 4)


def common_args(tmp_path: Path) -> dict[str, Any]:
    return {
        "output_dir": str(tmp_path / "trl"),
        "report_to": [],
        "per_device_train_batch_size": B,
        "use_cpu": True,
        "bf16": False,
    }


@pytest.mark.parametrize("objective", ["dpo", "ipo"])
def test_dpo_and_ipo_equal_trl(objective: str, tmp_path: Path) -> None:
    from trl import DPOConfig, DPOTrainer

    tok, base, peft_model = models()
    beta = 0.3
    loss_type = {"dpo": "sigmoid", "ipo": "ipo"}[objective]
    args = DPOConfig(**common_args(tmp_path), beta=beta, loss_type=[loss_type])
    trainer = DPOTrainer(
        model=peft_model, args=args, train_dataset=text_pairs(), processing_class=tok
    )
    data = pairs(len(tok))
    prompts = [p for p, _, _ in data] * 2
    completions = [c for _, c, _ in data] + [r for _, _, r in data]
    width = max(len(p) + len(c) for p, c in zip(prompts, completions, strict=True))
    seqs = sequences(prompts, completions, width)
    ours = mirror(trainer.model, base, tmp_path)
    trainer.model.train()
    trl_loss = trainer.compute_loss(trainer.model, dict(seqs))
    trl_loss.backward()
    ours.train()
    loss = preference_outcome(Objective(objective, beta=beta), ours, labelled(seqs)).loss
    loss.backward()
    assert_parity(loss, trl_loss, ours, trainer.model)


def side(prompts: list[list[int]], completions: list[list[int]]) -> dict[str, torch.Tensor]:
    """ORPO/CPO's per-side keys: input ids, attention mask, labels (-100 on the prompt)."""
    width = max(len(p) + len(c) for p, c in zip(prompts, completions, strict=True))
    seqs = labelled(sequences(prompts, completions, width))
    return seqs


@pytest.mark.parametrize("objective", ["orpo", "simpo"])
def test_orpo_and_simpo_equal_trl(objective: str, tmp_path: Path) -> None:
    tok, base, peft_model = models()
    beta = 0.4
    if objective == "orpo":
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer

        trainer: Any = ORPOTrainer(
            model=peft_model,
            args=ORPOConfig(**common_args(tmp_path), beta=beta),
            train_dataset=text_pairs(),
            processing_class=tok,
        )
    else:
        from trl.experimental.cpo import CPOConfig, CPOTrainer

        trainer = CPOTrainer(
            model=peft_model,
            args=CPOConfig(
                **common_args(tmp_path),
                beta=beta,
                loss_type="simpo",
                cpo_alpha=0.0,
                simpo_gamma=0.7,
            ),
            train_dataset=text_pairs(),
            processing_class=tok,
        )
    data = pairs(len(tok), seed=2)
    prompts = [p for p, _, _ in data]
    chosen = side(prompts, [c for _, c, _ in data])
    rejected = side(prompts, [r for _, _, r in data])
    batch = {f"chosen_{k}": v for k, v in chosen.items()}
    batch |= {f"rejected_{k}": v for k, v in rejected.items()}
    ours = mirror(trainer.model, base, tmp_path)
    trainer.model.train()
    trl_loss, _ = trainer.get_batch_loss_metrics(trainer.model, batch, "train")
    trl_loss.backward()
    width = max(chosen["input_ids"].shape[1], rejected["input_ids"].shape[1])
    prompts2 = prompts * 2
    completions = [c for _, c, _ in data] + [r for _, _, r in data]
    ours.train()
    obj = Objective(objective, beta=beta, gamma=0.7)
    loss = preference_outcome(obj, ours, labelled(sequences(prompts2, completions, width))).loss
    loss.backward()
    assert_parity(loss, trl_loss, ours, trainer.model)


def test_kto_equals_trl(tmp_path: Path) -> None:
    from trl import KTOConfig, KTOTrainer

    tok, base, peft_model = models()
    beta, dw, uw = 0.2, 1.3, 0.7
    ds = Dataset.from_list(
        [{"prompt": "Hello!", "completion": " Paris.", "label": i % 2 == 0} for i in range(4)]
    )
    trainer = KTOTrainer(
        model=peft_model,
        args=KTOConfig(
            **common_args(tmp_path), beta=beta, desirable_weight=dw, undesirable_weight=uw
        ),
        train_dataset=ds,
        processing_class=tok,
    )
    data = pairs(len(tok), seed=3)
    prompts = [p for p, _, _ in data]
    completions = [c for _, c, _ in data]
    shifted = [completions[-1], *completions[:-1]]  # TRL's mismatched pairs
    width = max(len(p) + len(c) for p, c in zip(prompts, completions, strict=True))
    kl_width = max(len(p) + len(c) for p, c in zip(prompts, shifted, strict=True))
    seqs = sequences(prompts, completions, width)
    kl = sequences(prompts, shifted, kl_width)
    label = torch.tensor([True, False, True])
    inputs = dict(seqs) | {f"KL_{k}": v for k, v in kl.items()} | {"label": label}
    ours = mirror(trainer.model, base, tmp_path)
    trainer.model.train()
    trl_loss = trainer.compute_loss(trainer.model, inputs)
    trl_loss.backward()
    assert trainer._metrics["train"]["kl"][-1] > 0  # the KL estimate takes part
    kl_ours = labelled(kl)
    batch = labelled(seqs) | {
        "kl_input_ids": kl_ours["input_ids"],
        "kl_attention_mask": kl_ours["attention_mask"],
        "kl_labels": kl_ours["labels"],
        "desirable": label.long(),
    }
    ours.train()
    obj = Objective("kto", beta=beta, desirable_weight=dw, undesirable_weight=uw)
    loss = preference_outcome(obj, ours, batch).loss
    loss.backward()
    assert_parity(loss, trl_loss, ours, trainer.model)
