"""How much of the original model's behaviour a tuned model kept, measured on general text.

Encoders: the mean-pooled last hidden states of reference texts, before and after tuning.
``cosine`` is the mean cosine similarity of each text's two embeddings (1.0: unchanged);
``knn_overlap`` the mean fraction of each text's k nearest neighbours (by cosine, among the
reference texts) that are the same before and after (1.0: the geometry is intact); and one
ability a user relies on, paraphrase retrieval: each text gets a near-paraphrase (a quarter of its
words dropped, two neighbours swapped; seeded, so the same for every run), and
``paraphrase_top1`` is the share of paraphrases whose nearest reference text is their own source,
for the original (``_before``) and the tuned model. Causal LMs: perplexity on the reference text
before and after, and their ratio.

Reference text: a user file (entries separated by lines holding ``%``, else by blank lines,
else one per line), else the fortunes of the Debian packages ``fortunes-min`` / ``fortunes``
under /usr/share/games/fortunes when installed, else none (the measurement is skipped).

The original model's side (embeddings or perplexity) is the same for every run of one model on
one set of texts, so it is kept in a cache (``$LEANTUNE_CACHE``, else ``$XDG_CACHE_HOME/leantune``,
else ``~/.cache/leantune``; under ``reference/``) keyed by the model folder's files (names, sizes,
modification times), the token ids, the dtype and the device type: compare, sweep and repeated
runs pay for it once. Cache files are safetensors; an unreadable one is recomputed.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from leantune.analysis.evaluate import Encoded, evaluate
from leantune.core.defaults import cache_root
from leantune.core.distributed import current
from leantune.core.errors import LeantuneError
from leantune.core.files import read_tensors
from leantune.models.data import pad_batch

FORTUNES = Path("/usr/share/games/fortunes")


def split_entries(text: str) -> list[str]:
    """Entries of a reference file: ``%`` separator lines, else blank lines, else lines."""
    if re.search(r"^%\s*$", text, flags=re.M):
        parts = re.split(r"^%\s*$", text, flags=re.M)
    elif re.search(r"\n\s*\n", text):
        parts = re.split(r"\n\s*\n", text)
    else:
        parts = text.splitlines()
    return [" ".join(p.split()) for p in parts if p.strip()]


def reference_texts(path: str | None, limit: int = 256, seed: int = 0) -> tuple[list[str], str]:
    """Up to ``limit`` reference texts and where they came from ("" and [] when there are none).

    A user file that is missing, unreadable or empty is an error; missing fortunes are not.
    """
    if path is not None:
        file = Path(path)
        try:
            text = file.read_text(encoding="utf-8", errors="replace")
        except OSError as e:
            raise LeantuneError(
                f"--reference-text {path}: cannot read it ({e.strerror}); give a text file"
            ) from None
        entries = split_entries(text)
        if not entries:
            raise LeantuneError(f"--reference-text {path} is empty; give a file with text in it")
        source = str(file)
    else:
        files = sorted(
            f for f in FORTUNES.glob("*") if f.is_file() and f.suffix not in (".dat", ".u8")
        )
        if not files:
            return [], ""
        entries = []
        for f in files:
            entries += split_entries(f.read_text(encoding="utf-8", errors="replace"))
        source = str(FORTUNES)
    entries = [e for e in entries if len(e) >= 20]  # one-word fortunes say little
    random.Random(seed).shuffle(entries)
    return entries[:limit], source


def near_paraphrase(text: str, seed: int) -> str:
    """``text`` with about a quarter of its words dropped and two neighbours swapped."""
    rng = random.Random(seed)
    words = text.split()
    kept = [w for w in words if rng.random() >= 0.25]
    if len(kept) < max(3, len(words) // 2):
        kept = words[:]
    if len(kept) > 2:
        i = rng.randrange(len(kept) - 1)
        kept[i], kept[i + 1] = kept[i + 1], kept[i]
    return " ".join(kept)


def paraphrase_top1(texts: torch.Tensor, paraphrases: torch.Tensor) -> float:
    """Share of paraphrases (row i of ``paraphrases``) whose nearest text by cosine is row i."""
    if texts.shape[0] == 0:
        return 1.0
    sim = F.normalize(paraphrases, dim=1) @ F.normalize(texts, dim=1).T
    hits = sim.argmax(dim=1) == torch.arange(texts.shape[0])
    return float(hits.float().mean())


@dataclass
class Reference:
    """Tokenized reference texts and what the original model made of them."""

    enc: Encoded
    source: str
    pad_id: int
    causal: bool
    embeddings: torch.Tensor | None = None
    paraphrases: Encoded | None = None
    """Encoders: a near-paraphrase of each reference text, in the same order."""
    paraphrase_embeddings: torch.Tensor | None = None
    perplexity: float | None = None
    seconds: float = 0.0
    cached: bool = False
    """The original model's side came from the cache."""


def folder_fingerprint(folder: Path) -> str:
    """A hash of a model folder's file names, sizes and modification times (not contents)."""
    rows = [
        (str(f.relative_to(folder)), f.stat().st_size, f.stat().st_mtime_ns)
        for f in sorted(folder.rglob("*"))
        if f.is_file()
    ]
    return hashlib.sha256(json.dumps([str(folder.resolve()), rows]).encode()).hexdigest()


def _cache_file(model: nn.Module, enc: Encoded, causal: bool, fingerprint: str) -> Path:
    p = next(model.parameters())
    key = json.dumps(
        [2, fingerprint, causal, str(p.dtype), p.device.type, enc.ids], separators=(",", ":")
    )
    return cache_root() / "reference" / f"{hashlib.sha256(key.encode()).hexdigest()}.safetensors"


def _read_cache(file: Path, ref: Reference) -> bool:
    try:
        saved = read_tensors(file)
    except LeantuneError:
        return False
    if ref.causal and saved.get("perplexity") is not None and saved["perplexity"].numel() == 1:
        ref.perplexity = float(saved["perplexity"])
        return True
    emb, para = saved.get("embeddings"), saved.get("paraphrases")
    n = len(ref.enc)
    if ref.causal or emb is None or para is None:
        return False
    if emb.ndim == 2 and emb.shape[0] == n and para.shape == emb.shape:
        ref.embeddings, ref.paraphrase_embeddings = emb.float(), para.float()
        return True
    return False


def _write_cache(file: Path, ref: Reference) -> None:
    if ref.causal:
        tensors = {"perplexity": torch.tensor([ref.perplexity], dtype=torch.float64)}
    else:
        assert ref.embeddings is not None and ref.paraphrase_embeddings is not None
        tensors = {
            "embeddings": ref.embeddings.contiguous(),
            "paraphrases": ref.paraphrase_embeddings.contiguous(),
        }
    tmp = file.with_name(f".{file.name}.{os.getpid()}.tmp")
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, tmp)
        tmp.replace(file)  # whole or not at all; a read-only cache only costs the time
    except OSError:
        tmp.unlink(missing_ok=True)


def _inner(model: nn.Module) -> nn.Module:
    """The transformer body (``model.bert``, ``model.model`` ...): its last hidden state."""
    base = getattr(model, "base_model", None)
    return base if isinstance(base, nn.Module) else model


def mean_pool(out: Any, mask: torch.Tensor) -> torch.Tensor:
    """The mean of a body output's last hidden states under ``mask`` (float32)."""
    hidden = (out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]).float()
    weights = mask.unsqueeze(-1).float()
    return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1)


@torch.no_grad()
def body_rows(
    model: nn.Module,
    enc: Encoded,
    pad_id: int,
    pick: Callable[[Any, dict[str, torch.Tensor]], torch.Tensor],
    batch_size: int = 64,
) -> torch.Tensor:
    """``pick(body output, batch)`` for every text: one row each (eval mode, on CPU).

    Texts run in batches of similar length (less padding), rows come back in input order."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    body = _inner(model)
    order = sorted(range(len(enc.ids)), key=lambda i: len(enc.ids[i]))
    rows = []
    try:
        for i in range(0, len(order), batch_size):
            batch = pad_batch([enc.ids[j] for j in order[i : i + batch_size]], pad_id)
            batch = {k: v.to(device) for k, v in batch.items()}
            rows.append(pick(body(**batch), batch).float().cpu())
    finally:
        model.train(was_training)
    pooled = torch.cat(rows)
    return pooled[torch.argsort(torch.tensor(order))] if order else pooled


def pooled_embeddings(
    model: nn.Module, enc: Encoded, pad_id: int, batch_size: int = 64
) -> torch.Tensor:
    """Mean-pooled last hidden states, one row per text (float32), in input order."""
    return body_rows(
        model, enc, pad_id, lambda out, b: mean_pool(out, b["attention_mask"]), batch_size
    )


def knn_overlap(before: torch.Tensor, after: torch.Tensor, k: int = 10) -> float:
    """Mean fraction of each row's k nearest neighbours (cosine, itself excluded) kept."""
    n = before.shape[0]
    k = min(k, n - 1)
    if k <= 0:
        return 1.0

    def neighbours(x: torch.Tensor) -> torch.Tensor:
        x = F.normalize(x, dim=1)
        sim = x @ x.T
        sim.fill_diagonal_(-math.inf)
        return sim.topk(k, dim=1).indices

    a, b = neighbours(before), neighbours(after)
    same = [len(set(a[i].tolist()) & set(b[i].tolist())) / k for i in range(n)]
    return sum(same) / n


def prepare_reference(
    model: nn.Module,
    tok: Any,
    texts: Sequence[str],
    source: str,
    *,
    causal: bool,
    max_length: int = 64,
    fingerprint: str | None = None,
) -> Reference:
    """Tokenize the reference texts and record the original model's embeddings/perplexity.

    With ``fingerprint`` (of the folder the model was loaded from, :func:`folder_fingerprint`)
    the result is read from / written to the cache; the model must be the folder's, unchanged
    (adapters at their identity start)."""
    start = time.perf_counter()
    texts = list(texts)
    ids = tok(texts, truncation=True, max_length=max_length)["input_ids"]
    kept = [i for i, x in enumerate(ids) if len(x) > (1 if causal else 0)]
    enc = Encoded([ids[i] for i in kept])
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    ref = Reference(enc, source, pad_id, causal)
    if not causal:
        para = [near_paraphrase(texts[i], i) for i in kept]
        ref.paraphrases = Encoded(tok(para, truncation=True, max_length=max_length)["input_ids"])
    # Under several processes every rank measures (a cache one rank has and another lacks
    # would leave the others waiting in the sharded evaluation).
    cached = fingerprint and not current().parallel
    file = _cache_file(model, enc, causal, fingerprint) if fingerprint and cached else None
    if file is not None and _read_cache(file, ref):
        ref.cached = True
    else:
        if causal:
            ref.perplexity = evaluate(model, enc, causal=True, pad_id=pad_id).metrics["perplexity"]
        else:
            assert ref.paraphrases is not None
            ref.embeddings = pooled_embeddings(model, enc, pad_id)
            ref.paraphrase_embeddings = pooled_embeddings(model, ref.paraphrases, pad_id)
        if file is not None:
            _write_cache(file, ref)
    ref.seconds = time.perf_counter() - start
    return ref


def knowledge_kept(model: nn.Module, ref: Reference) -> dict[str, float]:
    """The tuned model against the original on the reference texts (see the module doc)."""
    start = time.perf_counter()
    out: dict[str, float] = {"reference_texts": float(len(ref.enc))}
    if ref.causal:
        assert ref.perplexity is not None
        after = evaluate(model, ref.enc, causal=True, pad_id=ref.pad_id).metrics["perplexity"]
        out |= {
            "reference_perplexity_before": ref.perplexity,
            "reference_perplexity_after": after,
            "reference_perplexity_ratio": after / ref.perplexity,
        }
    else:
        assert ref.embeddings is not None and ref.paraphrase_embeddings is not None
        assert ref.paraphrases is not None
        now = pooled_embeddings(model, ref.enc, ref.pad_id)
        para_now = pooled_embeddings(model, ref.paraphrases, ref.pad_id)
        out |= {
            "knowledge_cosine": float(F.cosine_similarity(ref.embeddings, now, dim=1).mean()),
            "knowledge_knn_overlap": knn_overlap(ref.embeddings, now),
            "paraphrase_top1_before": paraphrase_top1(ref.embeddings, ref.paraphrase_embeddings),
            "paraphrase_top1": paraphrase_top1(now, para_now),
        }
    out["knowledge_seconds"] = ref.seconds + time.perf_counter() - start
    return out
