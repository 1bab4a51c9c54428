"""Native pooling, the linear probe (--method probe), the warm head and BBC headlines."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from helpers import tiny_model_folder
from leantune.analysis import probe as probe_module
from leantune.analysis.probe import fit_logistic
from leantune.core.errors import LeantuneError
from leantune.models.loading import load_model, load_tokenizer
from leantune.models.pooling import Pooler, native_pooling
from leantune.tune import TuneConfig, make_config, run_tune
from leantune.tune.finished import load_run


def sentence_transformers_folder(path: Path, normalize: bool = True) -> Path:
    """A tiny BERT folder that declares mean pooling (and Normalize) as sentence-transformers
    writes it."""
    folder = tiny_model_folder(path)
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {
            "idx": 1,
            "name": "1",
            "path": "1_Pooling",
            "type": "sentence_transformers.models.Pooling",
        },
    ]
    if normalize:
        modules.append(
            {
                "idx": 2,
                "name": "2",
                "path": "2_Normalize",
                "type": "sentence_transformers.models.Normalize",
            }
        )
    (folder / "modules.json").write_text(json.dumps(modules))
    (folder / "1_Pooling").mkdir()
    config = {"pooling_mode_cls_token": False, "pooling_mode_mean_tokens": True}
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(config))
    return folder


def test_mean_pooling_is_read_from_the_folder_and_the_head_sits_on_it(tmp_path: Path) -> None:
    folder = sentence_transformers_folder(tmp_path / "st")
    pooling = native_pooling(folder)
    assert pooling is not None and pooling.mode == "mean" and pooling.normalize
    model = load_model(folder, "classify", ["a", "b", "c"], None, "auto").eval()
    assert isinstance(model.base_model.pooler, Pooler)
    tok = load_tokenizer(folder)
    batch = tok(["cat dog", "stock market shares rose today"], padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
        hidden = model.base_model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    mean = F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)  # pads left out
    assert torch.allclose(logits, model.classifier(mean), atol=1e-6)
    # --pooling pooler keeps BERT's own; a plain folder keeps it under auto.
    assert not isinstance(
        load_model(folder, "classify", ["a", "b"], None, "pooler").base_model.pooler, Pooler
    )
    plain = tiny_model_folder(tmp_path / "plain")
    assert native_pooling(plain) is None
    assert not isinstance(
        load_model(plain, "classify", ["a", "b"], None, "auto").base_model.pooler, Pooler
    )


def test_the_logistic_fit_equals_scikit_learn() -> None:
    from sklearn.linear_model import LogisticRegression

    g = torch.Generator().manual_seed(0)
    x = torch.randn(60, 5, generator=g)
    y = (x[:, 0] + 0.5 * torch.randn(60, generator=g) > 0).long() + (x[:, 1] > 1).long()
    w, b = fit_logistic(x, y, 3, c=10.0)
    ref = LogisticRegression(C=10.0, tol=1e-10, max_iter=10_000).fit(x.numpy(), y.numpy())
    ref_w, ref_b = torch.tensor(ref.coef_), torch.tensor(ref.intercept_)
    assert torch.allclose(w, ref_w.float(), atol=1e-3) and torch.allclose(
        b, ref_b.float(), atol=1e-3
    )

    def objective(w: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
        """scikit-learn's objective / (C·n), and its largest gradient entry."""
        w, b = w.double().requires_grad_(), b.double().requires_grad_()
        loss = F.cross_entropy(x.double() @ w.T + b, y) + w.pow(2).sum() / (2 * 10.0 * 60)
        loss.backward()
        return float(loss.detach()), max(float(w.grad.abs().max()), float(b.grad.abs().max()))  # type: ignore[union-attr]

    ours, theirs = objective(w, b), objective(ref_w, ref_b)
    assert ours[0] <= theirs[0] + 1e-9 and ours[1] < 1e-6  # at least as close to the optimum


def probe_config(tmp_path: Path, folder: Path, data_file: Path, **kw: object) -> TuneConfig:
    values = {
        "model": str(folder),
        "data": str(data_file),
        "runs_dir": str(tmp_path / "runs"),
        "reference_examples": 0,
        "method": "probe",
        "pooling": "auto",
    }
    return make_config(values | kw)


def test_probe_run_fits_once_caches_features_and_saved_runs_use_it(
    tmp_path: Path, data_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = sentence_transformers_folder(tmp_path / "st")
    calls: list[int] = []
    features = probe_module.features

    def counted(*a: object, **k: object) -> torch.Tensor:
        calls.append(1)
        return features(*a, **k)  # type: ignore[arg-type]

    monkeypatch.setattr(probe_module, "features", counted)
    first = run_tune(probe_config(tmp_path, folder, data_file, name="p1"))
    second = run_tune(probe_config(tmp_path, folder, data_file, name="p2"))
    assert len(calls) == 1  # the second run read the cached features
    assert first["steps"] == 0 and first["trainable_params"] == 32 * 3 + 3
    assert first["test_accuracy"] == second["test_accuracy"]
    saved = load_run(tmp_path / "runs" / "p1")
    head = saved.model.classifier
    run_head = probe_module.head_module(saved.model)
    assert head is run_head and float(head.weight.detach().abs().sum()) > 0
    # merge: a folder that leantune loads with the same pooling and the same predictions
    from leantune.tune.finished import merge_run

    merged = merge_run(tmp_path / "runs" / "p1", tmp_path / "merged")
    assert (merged / "modules.json").is_file() and (merged / "1_Pooling" / "config.json").is_file()
    again = load_model(merged, "classify", ["a", "b", "c"], None, "auto").eval()
    tok = load_tokenizer(folder)
    batch = tok(["stock market shares", "cat dog"], padding=True, return_tensors="pt")
    with torch.no_grad():
        assert torch.allclose(again(**batch).logits, saved.model.cpu()(**batch).logits, atol=1e-5)
    rows = [
        json.loads(x) for x in (tmp_path / "runs" / "p1" / "metrics.jsonl").read_text().splitlines()
    ]
    assert rows[0]["step"] == 0 and "val_accuracy" in rows[0]


def test_warm_head_starts_lora_from_the_probe(tmp_path: Path, data_file: Path) -> None:
    from leantune.tune.prepare import prepare
    from leantune.tune.strategy import warm_start

    folder = sentence_transformers_folder(tmp_path / "st")
    config = probe_config(tmp_path, folder, data_file, method="lora", warm_head=True)
    prep = prepare(config)
    probe = warm_start(prep)
    assert probe is not None
    assert torch.equal(prep.model.classifier.weight.detach(), probe.weight)
    lines: list[str] = []
    summary = run_tune(
        config.__class__(**{**config.__dict__, "name": "warm", "epochs": 1}), log=lines.append
    )
    assert summary["steps"] > 0
    # The probe is the bar: its scores stand beside the tuned ones.
    assert summary["probe_test_accuracy"] == summary["test_accuracy_before"]
    assert summary["probe_val_accuracy"] == pytest.approx(
        prep.evaluate(prep.val).metrics["accuracy"]
    )
    assert any("(the probe)" in line for line in lines)
    # Steps that change nothing (rate 1e-12): the run says the probe was enough.
    lines.clear()
    flat = run_tune(
        config.__class__(**{**config.__dict__, "name": "flat", "lr": 1e-12}), log=lines.append
    )
    assert flat["best_val_accuracy"] == pytest.approx(flat["probe_val_accuracy"])
    assert any("less than half a point over the probe" in line for line in lines)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"method": "probe", "task": "causal-lm"}, "--method probe / --warm-head fit a"),
        ({"warm_head": True, "task": "causal-lm"}, "--method probe / --warm-head fit a"),
        ({"pooling": "max-ish"}, "--pooling 'max-ish' is unknown"),
    ],
)
def test_bad_probe_options_are_one_line(options: dict[str, object], message: str) -> None:
    with pytest.raises(LeantuneError, match="^" + message.replace("(", r"\(")) as e:
        make_config(options)
    assert "\n" not in str(e.value)


def test_bbc_headlines_are_the_first_line_of_each_article() -> None:
    from leantune.core.defaults import bbc_news

    articles, headlines = bbc_news(), bbc_news(headlines=True)
    assert len(headlines.texts) == len(articles.texts) == 2225
    assert headlines.labels == articles.labels
    for article, headline in zip(articles.texts[:50], headlines.texts[:50], strict=True):
        assert "\n" not in headline and article.startswith(headline)
    assert sum(len(t) for t in headlines.texts) < sum(len(t) for t in articles.texts) / 20


def test_min_steps_gives_a_small_set_more_epochs(tmp_path: Path, data_file: Path) -> None:
    import yaml

    folder = tiny_model_folder(tmp_path / "bert")
    config = probe_config(tmp_path, folder, data_file, method="lora", name="few", epochs=1)
    plain = run_tune(config)
    more = run_tune(config.__class__(**{**config.__dict__, "name": "more", "min_steps": 12}))
    per_epoch = plain["steps"]
    assert per_epoch < 12 and more["steps"] == per_epoch * -(-12 // per_epoch)
    saved = yaml.safe_load((tmp_path / "runs" / "more" / "config.yaml").read_text())
    assert saved["epochs"] == -(-12 // per_epoch) and saved["min_steps"] == 12
    with pytest.raises(LeantuneError, match=r"^--min-steps must be 0 \(off\) or more"):
        make_config({"min_steps": -1})


def test_under_several_processes_every_rank_computes_the_features(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A rank that read the features from a cache file another rank wrote would skip the
    forward passes the others are in (FSDP's all-gathers): the FSDP equality test hung in two
    of this session's three full test runs.
    Under a world of two, the cache is neither read nor written."""
    from helpers import build
    from leantune.analysis import probe
    from leantune.analysis.evaluate import Encoded
    from leantune.core.distributed import World

    model = build("bert")
    enc = Encoded([[2, 5, 6, 3], [2, 7, 3], [2, 8, 9, 10, 3]], [0, 1, 2])
    probe.fit_probe(model, enc, 0, 3, cache_key="k")  # one process: computed, cached
    calls = []
    real = probe.features
    monkeypatch.setattr(probe, "features", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert probe.fit_probe(model, enc, 0, 3, cache_key="k").cached and not calls
    monkeypatch.setattr(probe, "current", lambda: World(rank=1, size=2))
    fitted = probe.fit_probe(model, enc, 0, 3, cache_key="k")
    assert not fitted.cached and calls == [1]
