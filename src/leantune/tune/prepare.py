"""What a run starts from: the model and tokenizer, the train/validation/test splits, and
their token ids; :func:`prepare` loads and checks them all and writes nothing."""

from __future__ import annotations

import random
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from leantune.adapters.accounting import cast_base
from leantune.adapters.planning import Scores
from leantune.analysis.evaluate import Encoded, Evaluation, evaluate, make_batch
from leantune.analysis.generate import Sampling, evaluate_by_generation, sample_examples
from leantune.analysis.plan import Plan, masks_path
from leantune.core.defaults import builtin_data
from leantune.core.distributed import broadcast_bytes, current, launched, shard_blocks, together
from leantune.core.errors import LeantuneError
from leantune.models.chat import (
    ChatExample,
    InstructSplits,
    TokenizedChats,
    bbc_instruct,
    load_chats,
    pack,
    packed_batch,
    tokenize_chats,
    use_template,
)
from leantune.models.data import (
    PARTS,
    TextTable,
    encode_labels,
    label_names,
    length_buckets,
    load_table,
    stratified_split,
    too_few_rows,
)
from leantune.models.loading import load_model, load_tokenizer, max_positions, model_dir
from leantune.models.precision import (
    autocast,
    check_base_dtype,
    check_precision,
    dtype_of,
    enable_checkpointing,
    quantize_base,
)
from leantune.train.answer import Forward, answer_forward_for
from leantune.tune import preference
from leantune.tune.config import TuneConfig
from leantune.tune.strategy import (
    apply_method,
    apply_plan,
    gradient_scores,
    head_modules,
    make_plan,
    start_from_adapter,
    start_on_gradient,
    uses_plan,
)


@dataclass
class Splits:
    train: TextTable
    val: TextTable
    test: TextTable
    label_names: list[str]
    chats: InstructSplits | None = None
    """instruct: the conversations of each split (the tables are then empty)."""


def _subset(table: TextTable, rows: list[int]) -> TextTable:
    labels = [table.labels[i] for i in rows] if table.labels else []
    return TextTable([table.texts[i] for i in rows], labels)


def _sample(table: TextTable, n: int | None, seed: int) -> TextTable:
    """A stratified sample of ``n`` rows of ``table`` (all of them when n is None or more)."""
    if n is None or n >= len(table.texts):
        return table
    keep = n / len(table.texts)
    inner = table.labels or ["_"] * len(table.texts)
    ids = {name: i for i, name in enumerate(sorted(set(inner)))}
    return _subset(table, stratified_split([ids[s] for s in inner], (keep, 1 - keep, 0.0), seed)[0])


def load_splits(config: TuneConfig) -> Splits:
    label_column = None if config.causal else config.label_column
    embedded = builtin_data(config.data)
    if config.data is not None and embedded is None:
        data = load_table(config.data, config.text_column, label_column)
    else:
        from leantune.core.defaults import bbc_news

        bbc = bbc_news(headlines=embedded == "bbc-headlines")
        labels = [] if config.causal else [bbc.label_names[y] for y in bbc.labels]
        data = TextTable(bbc.texts, labels)

    def side(path: str | None) -> TextTable | None:
        return None if path is None else load_table(path, config.text_column, label_column)

    val, test = side(config.eval_data), side(config.test_data)
    train_f, val_f, test_f = config.fractions()
    val_f, test_f = (0.0 if val else val_f), (0.0 if test else test_f)
    total = train_f + val_f + test_f
    if total <= 0:
        raise LeantuneError("--split leaves no training data")
    strata = data.labels or ["_"] * len(data.texts)
    index = {n: i for i, n in enumerate(sorted(set(strata)))}
    parts = stratified_split(
        [index[s] for s in strata], (train_f / total, val_f / total, test_f / total), config.seed
    )
    train_part = _subset(data, parts[0])
    train_part = _sample(train_part, config.train_examples, config.seed)
    val = _sample(val or _subset(data, parts[1]), config.eval_examples, config.seed)
    test = _sample(test or _subset(data, parts[2]), config.eval_examples, config.seed)
    for what, table in (("training", train_part), ("validation", val), ("test", test)):
        if not table.texts:
            fractions = (train_f / total, val_f / total, test_f / total)
            where = config.data or "the data"
            cause = too_few_rows(data.labels, fractions, PARTS.index(what), where)
            if cause:  # labels with too few rows, not too few rows in all
                raise LeantuneError(cause)
            raise LeantuneError(
                f"the {what} split is empty: {config.data or 'the data'} has {len(data.texts)} "
                "rows; give more rows, a separate file, or other --split fractions"
            )
    names = [] if config.causal else label_names(train_part.labels)
    if not config.causal and len(names) < 2:
        raise LeantuneError(
            f"the training data has {len(names)} label value(s) in column "
            f"{config.label_column!r}; classification needs at least 2"
        )
    return Splits(train_part, val, test, names)


BBC_BODY_WORDS = preference.BODY_WORDS
"""Words of each article the embedded instruct data keeps: the prompt stays short on CPU."""


def load_chat_splits(config: TuneConfig) -> Splits:
    """instruct: conversations from --data (or the embedded BBC instructions), split as for
    classification (the embedded data by article, so an article's two rows share a split)."""
    if config.data is None:
        bbc = bbc_instruct(config.seed, config.fractions(), body_words=BBC_BODY_WORDS)
        train, val, test = bbc.train, bbc.validation, bbc.test
    else:

        def read(path: str) -> list[ChatExample]:
            return load_chats(
                path,
                config.prompt_column,
                config.response_column,
                config.system_column,
                config.messages_column,
            )

        rows = read(config.data)
        given_val = read(config.eval_data) if config.eval_data else None
        given_test = read(config.test_data) if config.test_data else None
        train_f, val_f, test_f = config.fractions()
        val_f, test_f = (0.0 if given_val else val_f), (0.0 if given_test else test_f)
        total = train_f + val_f + test_f
        if total <= 0:
            raise LeantuneError("--split leaves no training data")
        kinds = {k: i for i, k in enumerate(sorted({r.kind for r in rows}))}
        parts = stratified_split(
            [kinds[r.kind] for r in rows],
            (train_f / total, val_f / total, test_f / total),
            config.seed,
        )
        train = [rows[i] for i in parts[0]]
        val = given_val or [rows[i] for i in parts[1]]
        test = given_test or [rows[i] for i in parts[2]]
    train = sample_examples(train, config.train_examples, config.seed)
    val = sample_examples(val, config.eval_examples, config.seed)
    test = sample_examples(test, config.eval_examples, config.seed)
    for what, part in (("training", train), ("validation", val), ("test", test)):
        if not part:
            raise LeantuneError(
                f"the {what} split has no conversations; give more rows, a separate file, or "
                "other --split fractions"
            )
    empty = TextTable([], [])
    return Splits(empty, empty, empty, [], InstructSplits(train, val, test))


def encode_chats(
    tok: Any, examples: list[ChatExample], max_length: int, notes: list[str], where: str
) -> Encoded:
    """Token ids and per-token labels (the assistant's tokens only); truncation is noted."""
    chats = tokenize_chats(tok, examples, max_length)
    if chats.truncated:
        notes.append(
            f"{where}: {chats.truncated} of {len(examples)} conversations cut to --max-length "
            f"{max_length} from the prompt side (the answers kept)"
        )
    return Encoded(chats.input_ids, targets=chats.labels)


def encode(tok: Any, table: TextTable, names: list[str], max_length: int, where: str) -> Encoded:
    # Texts are cut to 100 characters per token of max_length before tokenizing, so one huge
    # text costs no more than a normal one. Natural text averages about 4 characters a token
    # and tokens beyond 20 are rare, so max_length tokens end far before the cut and the ids
    # are those of the whole text. A cut text that does not fill max_length (a long run of
    # spaces, a giant unknown word) may have lost tokens, so it is tokenized again whole.
    bound = max_length * 100
    texts = [t[:bound] for t in table.texts]
    ids = tok(texts, truncation=True, max_length=max_length)["input_ids"]
    again = [i for i, t in enumerate(table.texts) if len(t) > bound and len(ids[i]) < max_length]
    if again:
        whole = tok([table.texts[i] for i in again], truncation=True, max_length=max_length)
        for i, seq in zip(again, whole["input_ids"], strict=True):
            ids[i] = seq
    labels = encode_labels(table.labels, names, where) if names else []
    return Encoded(ids, labels)


@dataclass
class Prepared:
    """A model and tokenized data, ready to train or evaluate."""

    config: TuneConfig
    model: nn.Module
    tok: Any
    splits: Splits
    train: Encoded
    val: Encoded
    test: Encoded
    device: torch.device
    plan: Plan | None = None
    scores: Scores | None = None
    notes: list[str] = field(default_factory=list)
    """What preparing found worth saying (conversations truncated ...)."""
    forward: Forward | None = None
    """instruct: the loss with the output head on the answer tokens only (train/answer.py),
    when it equals the model's own."""
    sharded: list[nn.Module] = field(default_factory=list)
    """--fsdp: the transformer blocks FSDP2 shards."""
    batch_rows: int | None = None
    """Rows of each training batch: --batch-size, or under several processes the global
    batch (--batch-size × processes) that the loop cuts into one slice per process."""
    pref: preference.PreferenceRun | None = None
    """preference: the pairs' tokens, batches and metrics (tune/preference.py)."""
    _cache: dict[int, list[dict[str, torch.Tensor]]] = field(default_factory=dict)

    def use_batch_rows(self, rows: int) -> None:
        """Training batches of ``rows`` rows from now on (the global batch)."""
        if rows != (self.batch_rows or self.config.batch_size):
            self.batch_rows = rows
            self._cache.clear()  # batches made for the old size

    def evaluate(self, enc: Encoded) -> Evaluation:
        with autocast(self.config.precision, self.device):
            return self._evaluate(enc)

    def _evaluate(self, enc: Encoded) -> Evaluation:
        if self.pref is not None:
            return self.pref.evaluate(self, enc)
        return evaluate(
            self.model,
            enc,
            causal=self.config.causal,
            num_labels=len(self.splits.label_names),
            pad_id=self.tok.pad_token_id,
            batch_size=self.config.eval_batch_size,
            forward=self.forward,
        )

    def evaluate_test(self) -> Evaluation:
        """The test split: loss and task metrics; instruct runs add metrics of generated
        answers on --gen-examples test conversations (``samples`` holds them)."""
        result = self.evaluate(self.test)
        chats = self.splits.chats
        if chats is None or not self.config.gen_examples or self.pref is not None:
            return result
        examples = sample_examples(chats.test, self.config.gen_examples, self.config.seed)
        sampling = Sampling(max_new_tokens=self.config.max_new_tokens)
        with autocast(self.config.precision, self.device):
            metrics, rows = evaluate_by_generation(
                self.model, self.tok, examples, sampling, batch_size=self.config.eval_batch_size
            )
        result.metrics |= metrics
        result.samples = rows
        return result

    def packed_batches(self, epoch: int) -> list[dict[str, torch.Tensor]]:
        """--packing: the training conversations packed into rows (``instruct.pack``), the
        rows shuffled per epoch and batched."""
        length = min(self.config.max_length, max_positions(self.model) or self.config.max_length)
        rows = pack(TokenizedChats(self.train.ids, self.train.targets), length)
        order = list(range(len(rows)))
        random.Random(self.config.seed * 100_003 + epoch).shuffle(order)
        size, pad = self.batch_rows or self.config.batch_size, self.tok.pad_token_id
        return [
            packed_batch([rows[i] for i in order[k : k + size]], pad)
            for k in range(0, len(order), size)
        ]

    def batches(self, epoch: int) -> list[dict[str, torch.Tensor]]:
        """This epoch's training batches: similar lengths together, padded per batch."""
        if epoch in self._cache:
            return self._cache[epoch]
        if self.pref is not None:
            self._cache = {epoch: self.pref.batches(self, epoch)}
            return self._cache[epoch]
        rows = length_buckets(
            [len(x) for x in self.train.ids],
            self.batch_rows or self.config.batch_size,
            seed=self.config.seed * 100_003 + epoch,
        )
        pad = self.tok.pad_token_id
        if self.config.packing:
            self._cache = {epoch: self.packed_batches(epoch)}
            return self._cache[epoch]
        rows_too = self.config.cache_prefix
        self._cache = {
            epoch: [make_batch(self.train, r, pad, self.config.causal, rows_too) for r in rows]
        }
        return self._cache[epoch]


def pick_device(spec: str) -> torch.device:
    if spec == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        return torch.device("cuda", current().local_rank) if launched() else torch.device("cuda")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise LeantuneError(f"--device {spec!r} is not a device; use auto, cpu or cuda") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LeantuneError("--device cuda: no CUDA device is available here; use --device auto")
    return device


def prepare(config: TuneConfig, with_method: bool = True) -> Prepared:
    """Load and check everything; writes nothing."""
    config = preference.with_run_model(config.resolved())
    device = pick_device(config.device)
    folder = model_dir(config.model, config.task)
    pairs = preference.load_preference_splits(config) if config.preference else None
    if pairs is not None:  # the tables stay empty: the pairs are in Prepared.pref
        splits = Splits(TextTable([], []), TextTable([], []), TextTable([], []), [])
    else:
        splits = load_chat_splits(config) if config.instruct else load_splits(config)
    tok = load_tokenizer(folder)
    if config.instruct or config.preference:
        use_template(tok, config.template)
    random.seed(config.seed)
    torch.manual_seed(config.seed)
    model = load_model(folder, config.task, splits.label_names, tok.pad_token_id, config.pooling)
    preference.merge_from_run(model, config)  # --from-run: the start and the reference
    if config.packing:  # a KV cache switches off the detection of packed segments
        model.config.use_cache = False  # type: ignore[union-attr]
    length = min(config.max_length, max_positions(model) or config.max_length)
    names, notes = splits.label_names, list[str]()
    run = preference.encode_run(tok, config, pairs, length) if pairs is not None else None
    if run is not None:
        train_enc, val_enc, test_enc = (run.encoded(d) for d in (run.train, run.val, run.test))
        notes += run.notes
    elif splits.chats is not None:
        train_enc = encode_chats(tok, splits.chats.train, length, notes, "the training data")
        val_enc = encode_chats(tok, splits.chats.validation, length, notes, "validation")
        test_enc = encode_chats(tok, splits.chats.test, length, notes, "test")
    else:
        train_enc = encode(tok, splits.train, names, length, "the training data")
        val_enc = encode(tok, splits.val, names, length, config.eval_data or "the validation split")
        test_enc = encode(tok, splits.test, names, length, config.test_data or "the test split")
    if config.task == "causal-lm":
        for enc in (train_enc, val_enc, test_enc):  # a 1-token text predicts nothing
            enc.ids = [x for x in enc.ids if len(x) > 1]
        if not train_enc.ids or not val_enc.ids or not test_enc.ids:
            raise LeantuneError("causal-lm needs texts of at least 2 tokens in every split")
    model.to(device)
    check_precision(config.precision, device)
    if config.quantize:  # before the adapters, which go on top of the quantized layers
        done = quantize_base(model, config.quantize, head_modules(model, config.causal))
        notes.append(f"--quantize {config.quantize}: {len(done)} linear layers of the base")
    plan, scores = None, None
    if with_method and uses_plan(config):
        plan, scores = shared_plan(model, config, train_enc, tok.pad_token_id)
    if with_method and plan is not None:
        apply_plan(model, plan)
    elif with_method and config.init_adapter:
        start_from_adapter(model, config)
    elif with_method:
        apply_method(model, config)
    if with_method and config.init == "grad":
        # Every process scores the same seeded batches: the same directions without a broadcast.
        found = scores
        if found is None or not found.has_directions:
            found = gradient_scores(model, config, train_enc, tok.pad_token_id)
        started = start_on_gradient(model, found)
        notes.append(
            f"--init grad: {started} LoRA layer(s) start on the task gradient's top directions"
        )
    if config.base_dtype not in (None, "fp32"):  # after the adapters, which stay fp32
        check_base_dtype(dtype_of(config.base_dtype), device)
        cast_base(model, config.base_dtype)
    if config.gradient_checkpointing:
        enable_checkpointing(model)
    model.to(device)
    sharded = shard_blocks(model) if config.fsdp else []
    if sharded:
        notes.append(f"--fsdp: {len(sharded)} transformer blocks sharded over the processes")
    prep = Prepared(
        config, model, tok, splits, train_enc, val_enc, test_enc, device, plan, scores, notes
    )
    prep.sharded = sharded
    if run is not None:
        preference.start_run(prep, run)
    elif config.instruct and not config.cache_prefix:
        with autocast(config.precision, device):
            prep.forward = answer_forward_for(model, prep.batches(0)[0])
    return prep


def shared_plan(
    model: nn.Module, config: TuneConfig, train: Encoded, pad_id: int
) -> tuple[Plan, Scores | None]:
    """The run's plan; under several processes rank 0 selects and the others receive its plan
    (the selection scores are computed once)."""
    if not current().parallel:
        return make_plan(model, config, train, pad_id)
    with tempfile.TemporaryDirectory(prefix="leantune-plan-") as tmp:
        path = Path(tmp) / "plan.json"
        made: list[tuple[Plan, Scores | None]] = []

        def select() -> None:
            if current().main:
                made.append(make_plan(model, config, train, pad_id))
                made[0][0].save(path)

        together(select, "selection")
        masks = masks_path(path)
        texts = [broadcast_bytes(f.read_bytes() if f.exists() else b"") for f in (path, masks)]
        if made:
            return made[0]
        path.write_bytes(texts[0])
        if texts[1]:
            masks.write_bytes(texts[1])
        return Plan.load(path), None
