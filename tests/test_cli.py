"""The leantune command: output for good input, one stderr line and exit 2 for bad input."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import leantune as lt
from helpers import build
from leantune.adapters.config import MixedConfig
from leantune.adapters.formats import describe
from leantune.adapters.methods.bitfit import BitFitConfig


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "leantune.cli", *args], capture_output=True, text=True
    )


def test_info_describes_an_adapter(tmp_path: Path) -> None:
    model = build("bert")
    lt.inject(
        model,
        lt.LoraConfig(r=4, targets=["query"], rank_pattern={"layer.0.attention.self.query": 2}),
    )
    lt.save_adapter(model, tmp_path / "a")
    res = run("info", str(tmp_path / "a"))
    assert res.returncode == 0, res.stderr
    assert "rank / alpha     4 / 16" in res.stdout
    assert "3 modules" in res.stdout and "SEQ_CLS" in res.stdout
    expected = sum(t.numel() for t in lt.adapter_state_dict(model).values())
    assert f"{expected:,} parameters" in res.stdout


def test_describe_gives_the_rows_of_a_peft_and_a_leantune_adapter(tmp_path: Path) -> None:
    model = build("bert")
    lt.inject(model, lt.LoraConfig(r=4, targets=["query", "value"], dora=True))
    lt.save_adapter(model, tmp_path / "lora")
    rows = dict(describe(tmp_path / "lora"))
    assert list(rows) == [
        "method",
        "rank / alpha",
        "rank_pattern",
        "rsLoRA",
        "targets",
        "modules_to_save",
        "task_type",
        "base model",
        "tensors",
        "file bytes",
        "config",
    ]
    assert rows["method"] == "LORA (DoRA)" and rows["rank / alpha"] == "4 / 16"
    assert rows["targets"] == "6 modules" and rows["modules_to_save"] == '["classifier"]'
    count = sum(t.numel() for t in lt.adapter_state_dict(model).values())
    assert rows["tensors"].endswith(f"holding {count:,} parameters")
    assert rows["config"] == str(tmp_path / "lora" / "adapter_config.json")

    model = build("bert")
    parts = [
        lt.LoraConfig(r=2, targets=["layer.0.attention.self.query"]),
        BitFitConfig(targets=["layer.1.attention.self.query", "layer.2.attention.self.query"]),
    ]
    lt.inject(model, MixedConfig(parts=parts))
    lt.save_adapter(model, tmp_path / "mixed")
    rows = dict(describe(tmp_path / "mixed"))
    assert rows["method"].startswith("LEANTUNE")
    assert rows["modules"] == "1 lora, 2 bitfit"
    assert rows["task_type"] == "SEQ_CLS" and rows["tensors"].endswith(" values")
    size = (tmp_path / "mixed" / "adapter_model.safetensors").stat().st_size
    assert rows["file bytes"].startswith(f"{size:,} ")


def test_info_bad_input_is_one_line_without_traceback(tmp_path: Path) -> None:
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "adapter_model.safetensors").write_bytes(b"\x80\x04not really")
    for target in (tmp_path / "missing", tmp_path / "junk"):
        res = run("info", str(target))
        assert res.returncode == 2
        assert res.stderr.count("\n") == 1 and res.stderr.startswith("leantune: ")
        assert "Traceback" not in res.stderr
