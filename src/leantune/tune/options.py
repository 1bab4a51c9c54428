"""The options of a tune run, in groups (as litgpt groups its arguments).

``TuneConfig`` (``tune/config.py``) inherits every group, so each option is one flat field:
the CLI flag ``--lr`` and the YAML key ``lr`` are as they always were, and ``config.lr`` reads
it. The groups give the source, the ``--help`` panels and config.yaml their sections. Each
field's docstring is its help text and its comment in config.yaml.
"""

from __future__ import annotations

import ast
import inspect
import itertools
import math
from dataclasses import dataclass, is_dataclass
from typing import Any

from leantune.core.errors import LeantuneError
from leantune.models.pooling import POOLINGS


@dataclass(frozen=True)
class OwnParameters:
    """A way to tune that trains the model's own parameters, not an adapter: ``--method full``,
    ``head`` or ``probe``. Beside the registered adapter methods (``METHODS``), the one other
    kind of ``--method``."""

    name: str
    lr: float
    """Its default peak learning rate."""
    quantizable: bool
    """Whether it can run on a quantized (frozen) base."""
    what: str


OWN_PARAMETERS = {
    own.name: own
    for own in (
        OwnParameters("full", 5e-5, False, "every parameter of the model"),
        OwnParameters("head", 5e-3, True, "the task heads only"),
        OwnParameters("probe", 5e-3, True, "the head, fitted on the frozen model's features"),
    )
}
FULL, HEAD, PROBE = OWN_PARAMETERS


CLASSIFY_METRICS = ("accuracy", "macro_f1", "loss")
DEFAULT_MODEL_NAMES = {
    "classify": "minilm",
    "causal-lm": "minilm",
    "instruct": "smollm2",
    "preference": "smollm2",
}
DEFAULT_MODEL_TITLES = {
    "classify": "the embedded MiniLM-L6",
    "causal-lm": "the embedded MiniLM-L6",
    "instruct": "the embedded SmolLM2-135M-Instruct",
    "preference": "the embedded SmolLM2-135M-Instruct",
}
INSTRUCT_TRAIN_EXAMPLES = 400
INSTRUCT_EVAL_EXAMPLES = 200
"""The embedded instruct data's default samples (training; validation and test): an instruct
run on 2 CPU cores ends in under 15 minutes (README); --train-examples and --eval-examples
override them."""


@dataclass
class RunOptions:
    """Where the run goes and how it runs."""

    name: str | None = None
    """Run folder name under runs_dir (default: <model>-<data>-<method>)."""
    runs_dir: str = "runs"
    """Folder that holds the run folders."""
    seed: int = 0
    """Seed for the split, initialisation, batches and dropout."""
    device: str = "auto"
    """auto (CUDA when present), cpu, cuda or cuda:N."""
    track: str | None = None
    """Experiment tracking, off by default: tensorboard (<run>/tensorboard), mlflow (local
    SQLite store <runs_dir>/mlflow.db) or tensorboard,mlflow; each an optional extra of leantune."""
    fsdp: bool = False
    """Under torchrun / accelerate launch: shard each transformer block of the frozen base and
    its adapters over the processes with FSDP2, for bases that do not fit on one device (the
    default is data parallel: every process holds the whole model)."""
    dist_timeout: float = 600.0
    """Under torchrun: seconds a process waits for the others in a collective before it stops
    (a process died or hangs)."""


@dataclass
class DataOptions:
    """The model, the task and its data."""

    model: str | None = None
    """Local transformers model folder, or an embedded model: minilm (MiniLM-L6, the default)
    or smollm2 (SmolLM2-135M-Instruct, the default of --task instruct)."""
    pooling: str = "auto"
    """classify: what the head sits on. auto: the model's sentence embedding where its folder
    declares one (sentence-transformers' 1_Pooling: MiniLM's normalised mean of the token
    states), else its pooler; pooler: the model's own pooler (BERT's CLS pooler; what
    transformers and peft use); mean or cls: that pooling of the last hidden states. Not
    pooler: peft alone reproduces the run only with the same pooling (leantune's commands apply
    it; ``leantune.use_pooling`` does it for a plain model)."""
    task: str = "classify"
    """classify (sequence classification), causal-lm (language modelling; metric perplexity)
    instruct (chat / instruction tuning of a causal LM: the loss counts the assistant's
    tokens only; default model SmolLM2-135M-Instruct, default data BBC headline and topic
    instructions) or preference (DPO, IPO, ORPO, SimPO or KTO on chosen / rejected answers,
    --objective; default data: BBC headlines preferred over another article's)."""
    data: str | None = None
    """Training data: .csv, .jsonl or a datasets save_to_disk folder, or an embedded set: bbc
    (BBC News articles → topic, the default) or bbc-headlines (only each article's headline: a
    harder task where the frozen model's features are not enough)."""
    eval_data: str | None = None
    """Validation data file; default: a split of --data."""
    test_data: str | None = None
    """Test data file; default: a split of --data."""
    text_column: str = "text"
    """Column holding the text."""
    label_column: str = "label"
    """Column holding the label (classification)."""
    prompt_column: str = "prompt"
    """instruct: column holding the user's prompt (with --response-column), unless the data
    has a --messages-column."""
    response_column: str = "response"
    """instruct: column holding the assistant's answer."""
    system_column: str = "system"
    """instruct: optional column holding a system prompt."""
    messages_column: str = "messages"
    """instruct: column holding whole conversations, lists of {role, content} (system, user,
    assistant); used when the data has it."""
    packing: bool = False
    """instruct: pack several conversations into each training row of --max-length tokens
    (position ids restart per conversation, so attention and loss stay inside it): fewer,
    fuller rows. Validation and test stay unpacked."""
    template: str | None = None
    """instruct: a Jinja chat template (text, or a file holding it) for a tokenizer without
    one, or to replace its own."""
    split: str = "0.7,0.1,0.2"
    """Train,validation,test fractions of --data, stratified by label."""
    train_examples: int | None = None
    """Train on a stratified sample of this many training examples (the validation and test
    splits stay the same): a small-data run."""
    max_length: int = 128
    """Truncate texts to this many tokens (capped at the model's positions)."""
    batch_size: int = 16
    """Training batch size; batches group texts of similar length."""
    eval_batch_size: int = 64
    """Batch size for validation, test and predict."""


@dataclass
class MethodOptions:
    """What trains: an adapter method, the model's own parameters, or a plan of methods."""

    method: str = "lora"
    """lora; ia3 (learned scales of keys, values and feed-forward inputs); vera (shared frozen
    random projections, trained scaling vectors); bottleneck (Houlsby/Pfeiffer adapters);
    prompt or prefix (trained virtual tokens / per-layer key-value prefixes); bitfit (biases)
    or layernorm (norm scales and shifts) within --layers; sparse (the
    top-Fisher weight entries within --budget and --layers, a FISH mask); full (every
    parameter) or head (the task head only); probe (the head alone, fitted to convergence on
    the frozen model's features: a logistic regression in seconds, no training loop)."""
    init_adapter: str | None = None
    """An adapter folder (peft's or leantune's) the run starts from instead of a new adapter:
    its config says the method, targets and ranks, its weights are the start (an adapter that
    peft initialised, e.g. with EVA or LoftQ; or an earlier run's, to go on training on new
    data). --method must name its method; --targets, --r, --select and --plan do not apply."""
    warm_head: bool | None = None
    """classify: start from the probe's head (fitted on the frozen model's features) instead
    of a random one, then train the method (LP-FT). Left out: on for classification where the
    head is one linear layer on the pooled features; --no-warm-head: a random head."""


@dataclass
class LoraOptions:
    """LoRA's options (--method lora, and the LoRA entries of a plan)."""

    # Their help is LoraConfig's field docstrings (see option_docs).
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    rslora: bool = False
    dora: bool = False
    init: str = "auto"
    targets: str = "all-linear"
    """LoRA targets: all-linear, a comma list of module names, or a regex."""


@dataclass
class VirtualTokenOptions:
    """Prompt and prefix tuning's options."""

    num_virtual_tokens: int = 20
    """prompt / prefix: virtual tokens prepended to every input (or key/value prefixes)."""
    prefix_projection: bool = True
    """prefix: train the prefixes through a two-layer MLP (Li & Liang's reparametrization);
    the saved adapter holds the prefixes it makes, as peft saves them."""


@dataclass
class BottleneckOptions:
    """Bottleneck adapters' options."""

    variant: str = "houlsby"
    """bottleneck: houlsby (after the attention and the feed-forward outputs) or pfeiffer
    (after the feed-forward output only)."""
    reduction_factor: int = 16
    """bottleneck: hidden size / bottleneck width."""


@dataclass
class PlacementOptions:
    """Where it trains: the layers, or a plan that selection fits to a budget."""

    layers: str = "upper-half"
    """Layers adapted (and where --select auto may spend): upper-half, all, a range 3-5 or a
    list 3,4,5."""
    select: str | None = None
    """none (the default: --targets or --plan place the adapter by hand) or auto: score the
    parameters on a few training batches and spend --budget on the ones that matter (per
    module: a method from --plan-methods and its size, + the head) within --layers; replaces
    --targets and --r."""
    budget: str = "0.5%"
    """Trainable parameters for --select auto and --method sparse: a count (68000) or a share of
    the model (0.5%)."""
    plan_methods: str = "lora"
    """Methods --select auto may spend the budget on: a comma list of lora, bitfit, layernorm,
    sparse (one method per module; the best gain per parameter wins)."""
    plan: str | None = None
    """A plan.json (from leantune select or --select auto, maybe edited) to tune by."""
    score_examples: int = 64
    """Training examples --select auto scores the parameters on."""
    score_head: str = "random"
    """classify, --select auto: the head the parameters are scored with: random (the new
    head's own) or warm (the probe's head, fitted first: the gradients then describe the
    task rather than a random head's noise). Measured in docs/BENCHMARKS.md, issue 28."""
    adapt: float = 1.0
    """Adaptive budget (AdaLoRA-style): LoRA starts at this multiple of its ranks and prunes
    rank components by smoothed |w·grad| importance, cubically from the end of warmup to 70%
    of the steps, down to the parameter count it started from; the adapter is saved at that
    size with uneven ranks (1: off)."""


@dataclass
class OptimOptions:
    """How it trains: the optimizer, the schedule, gradual tuning and the penalties."""

    epochs: int = 2
    """Passes over the training data."""
    min_steps: int = 0
    """At least this many optimizer steps: a small training set gets more epochs (0: off)."""
    lr: float | None = None
    """Peak learning rate (default per method: lora 2e-3, full 5e-5, head 5e-3)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    warmup_ratio: float = 0.06
    """Fraction of steps warming up before the decay (slanted: the rise)."""
    schedule: str = "linear"
    """Learning-rate shape after warmup: linear, cosine, constant or slanted (slanted
    triangular: short rise, long fall to 1/32)."""
    layer_decay: float = 1.0
    """Layer-wise rate decay: layer l of L trains at decay^(L-1-l) of the rate (1: off)."""
    unfreeze_every: int | None = None
    """Gradual unfreezing: the head and top layer train first, one more layer every N
    optimizer steps (default: everything from the start)."""
    loraplus_ratio: float = 1.0
    """LoRA+: the B matrices train at this multiple of A's rate (1: off; the paper uses 16)."""
    l2: float | None = None
    """Weight of the L2 penalty on the learned change (LoRA: |s·B·A|²; in-place tuning: L2-SP,
    |θ - θ₀|²; task heads are not penalized). Default: 1e-3 for LoRA (not DoRA/PiSSA), else 0."""
    l1: float = 0.0
    """Weight of the L1 penalty on the learned change."""
    ewc: float = 0.0
    """Weight of EWC: Σ F·change², F the Fisher diagonal of the pretrained weights on
    --score-examples training examples."""
    grad_accum: int = 1
    """Batches per optimizer step."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm (0 turns clipping off)."""
    max_steps: int | None = None
    """Stop after N optimizer steps (a quick look; the schedule still spans all epochs)."""
    cache_prefix: bool = False
    """Run the frozen bottom layers without dropout and reuse their outputs after the first
    epoch: later epochs skip them (faster; holds their outputs in memory)."""


@dataclass
class EvalOptions:
    """When it validates and which checkpoint it keeps."""

    eval_every: int | None = None
    """Also validate every N optimizer steps (default: once per epoch)."""
    patience: int | None = None
    """Stop after N validations without improvement (default: never)."""
    eval_examples: int | None = None
    """Validate and test on a seeded sample of this many examples of each split (default: all;
    an instruct run on the embedded data: 200, so that it ends in minutes on a CPU)."""
    gen_examples: int = 100
    """instruct: test examples answered by generation (greedy) and scored, before and after
    training: exact match for short answers, ROUGE-L for free text (0: none)."""
    max_new_tokens: int = 32
    """instruct: the longest answer generated when scoring."""
    metric: str | None = None
    """Validation metric for the best checkpoint (default: accuracy, perplexity, or for
    preference reward_accuracy)."""


@dataclass
class KnowledgeOptions:
    """What "knowledge kept" is measured on."""

    reference_text: str | None = None
    """General (not task) text to measure knowledge kept on: entries separated by % lines,
    blank lines or newlines (default: the fortunes of fortunes-min when installed, else skip)."""
    reference_examples: int = 256
    """Reference texts used to measure knowledge kept (0 turns the measurement off)."""
    keep: float | None = None
    """Weight of the keep loss: each batch also pulls the model's outputs on general reference
    text (not the texts that measure knowledge kept) toward the original model's — the pooled
    embedding's cosine for encoders, KL to the original's top-16 next-token probabilities for
    causal LMs; --task instruct: KL on the assistant's tokens of general conversations answered
    once by the original model (cached). 0 is off. Left out: 1 for classification (off when
    there is no reference text), 0 for causal LMs."""
    keep_every: int = 0
    """The keep loss on every k-th batch only, at k times the weight: the same pull for a k-th
    of its cost (short task texts make the keep batch the larger part of a step). 0: the
    smallest k that keeps its tokens under a quarter of the task's (1 for long texts)."""
    keep_examples: int = 256
    """Reference texts (instruct: general conversations) the keep loss cycles through (beyond
    the --reference-examples ones)."""
    general_examples: int = 200
    """Causal LMs (instruct, causal-lm): prompts of the embedded general-ability set (arithmetic,
    facts, instruction following; 278 in all) answered greedily before and after training and
    scored by rule: the general score, before -> after (0 turns it off)."""


@dataclass
class PrecisionOptions:
    """Precision and memory: mixed precision, a smaller or quantized frozen base, checkpointing."""

    precision: str = "auto"
    """fp32, bf16 or fp16: the forward and evaluation run under autocast to it; adapter
    weights and optimizer state stay fp32 (fp16 with loss scaling; slow on CPUs). auto: bf16
    for instruct runs on a device with native bf16 (a recent GPU, a CPU with AVX512-BF16),
    else fp32."""
    base_dtype: str | None = None
    """bf16 or fp16: hold the frozen base model in it, trainable parameters in fp32 (implies
    --precision of the same dtype)."""
    quantize: str | None = None
    """int8 or nf4: quantize the frozen base's linear layers (torchao; the head and the
    embeddings stay as they are) and train LoRA on top (QLoRA). Plain LoRA, BitFit and
    LayerNorm tuning; merging into a quantized base is refused."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward instead of keeping them (less memory, slower)."""


@dataclass
class PreferenceOptions:
    """--task preference: the objective and its constants (TRL 1.16's defaults)."""

    objective: str = "dpo"
    """preference: dpo (the default), ipo, orpo, simpo or kto (docs/PREFERENCE.md); dpo, ipo and
    kto compare with the reference: the model with its adapter switched off."""
    beta: float = 0.1
    """preference: β, the pull toward the reference (IPO's τ; ORPO: the odds-ratio weight λ;
    SimPO: the reward scale)."""
    simpo_gamma: float = 0.5
    """preference, simpo: the target reward margin γ."""
    desirable_weight: float = 1.0
    """preference, kto: weight of the desirable rows' losses."""
    undesirable_weight: float = 1.0
    """preference, kto: weight of the undesirable rows' losses."""
    precompute_reference: bool = True
    """preference: the reference's log-probs of every row computed once before the first step
    and cached (by model, data, template); --no-precompute-reference: in every step."""
    from_run: str | None = None
    """preference: start from a finished run's model (runs/<name>, e.g. an instruct run): its
    adapter merged into its base is the policy's start and the reference."""


PREFERENCE_METRICS = ("reward_accuracy", "margin", "loss")
OBJECTIVES = ("dpo", "ipo", "orpo", "simpo", "kto")


def check_preference(c: Any) -> None:
    """The checks of the preference options (``c``: a TuneConfig)."""
    if c.objective not in OBJECTIVES:
        raise LeantuneError(f"--objective {c.objective!r} is unknown; use one of {OBJECTIVES}")
    if not (math.isfinite(c.beta) and c.beta > 0):
        raise LeantuneError(f"--beta must be a positive number, got {c.beta}")
    for key in ("simpo_gamma", "desirable_weight", "undesirable_weight"):
        if not (math.isfinite(getattr(c, key)) and getattr(c, key) >= 0):
            raise LeantuneError(f"--{key.replace('_', '-')} must be 0 or more")
    if c.task != "preference":
        return
    if c.packing or c.cache_prefix:
        raise LeantuneError("--task preference does not pack or cache prefixes; drop the option")
    if c.fsdp:  # several processes split a batch's rows, which would part a pair
        raise LeantuneError("--task preference runs in one process; drop --fsdp")


def check_new_options(c: Any) -> None:
    """The checks of the scale-out, probe and keep options (``c``: a TuneConfig)."""
    if c.fsdp and (c.quantize or c.adapt > 1):
        raise LeantuneError(
            "--fsdp shards fixed shapes in full or half precision: drop --quantize and "
            "--adapt, or run data parallel without --fsdp"
        )
    if (c.method == "probe" or c.warm_head) and c.causal:
        raise LeantuneError(
            f"--method probe / --warm-head fit a classification head; --task {c.task} "
            "has none (use --task classify, or drop them)"
        )
    if c.keep is not None and not (math.isfinite(c.keep) and c.keep >= 0):
        raise LeantuneError(f"--keep must be 0 (off) or a positive weight, got {c.keep}")
    if c.min_steps < 0:
        raise LeantuneError(f"--min-steps must be 0 (off) or more, got {c.min_steps}")
    if c.keep_every < 0:
        raise LeantuneError(
            f"--keep-every must be a number of batches (0: chosen from the lengths), got "
            f"{c.keep_every}"
        )
    if c.keep_examples <= 0:
        raise LeantuneError("--keep-examples must be positive")
    if c.pooling not in POOLINGS:
        raise LeantuneError(f"--pooling {c.pooling!r} is unknown; use one of {POOLINGS}")
    if not c.dist_timeout > 0:
        raise LeantuneError(f"--dist-timeout must be positive seconds, got {c.dist_timeout}")
    check_preference(c)


def field_docs(cls: type, inherited: bool = True) -> dict[str, str]:
    """Field docstrings (the string right after each field) of ``cls`` and (``inherited``)
    the classes it inherits fields from: CLI help and YAML comments."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__) if inherited else [cls]:
        if not is_dataclass(klass):
            continue
        body = ast.parse(inspect.getsource(klass)).body[0].body  # type: ignore[attr-defined]
        for node, nxt in itertools.pairwise(body):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
            ):
                docs[node.target.id] = " ".join(str(nxt.value.value).split())
    return docs
