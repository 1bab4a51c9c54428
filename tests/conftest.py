"""Fixtures; the helpers they use live in helpers.py. HF_HUB_OFFLINE makes sure nothing is
downloaded."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from collections.abc import Callable
from pathlib import Path

import pytest
from torch import nn

from helpers import build, tiny_model_folder, topic_rows, write_rows


@pytest.fixture(autouse=True)
def _own_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test its own leantune cache (reference results), never the user's ~/.cache."""
    monkeypatch.setenv("LEANTUNE_CACHE", str(tmp_path / "leantune-cache"))


@pytest.fixture
def make() -> Callable[..., nn.Module]:
    return build


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved tiny BERT with its tokenizer, shared by a test module."""
    return tiny_model_folder(tmp_path_factory.mktemp("models") / "tiny-bert")


@pytest.fixture(scope="module")
def data_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """60 labelled topic rows as JSON Lines."""
    return write_rows(tmp_path_factory.mktemp("data") / "topics.jsonl", topic_rows(60))
