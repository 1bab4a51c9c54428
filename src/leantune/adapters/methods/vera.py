"""VeRA (Kopiczko et al., 2024): one frozen random pair of projections for the whole model,
trained scaling vectors per layer.

The model shares A (r, max_in) and B (max_out, r), drawn once from ``projection_prng_key``
exactly as peft draws them (Kaiming-uniform with a seeded CPU ``torch.Generator``, A first);
each layer slices A[:, :in] and B[:out] and trains λ_d (r) and λ_b (out):
``y = W x + b + λ_b ⊙ B (λ_d ⊙ A x)``. λ_b starts at 0, so the model starts as the base model.
Merging adds ΔW = (λ_b ⊙ B)(λ_d ⊙ A) into W; unmerging subtracts it.

Saved in peft's ``VERA`` format: ``<layer>.vera_lambda_b`` / ``vera_lambda_d`` and, with
``save_projection``, the projections once, as ``base_model.vera_A`` / ``base_model.vera_B``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, cast

import torch
import torch.nn.functional as F
from torch import nn

from leantune.adapters.base import LINEAR_TYPES, AdapterLayer, Change, Conv1D
from leantune.adapters.config import AdapterConfig, AdapterRecord
from leantune.core import checks
from leantune.core.errors import AdapterFileError, LeantuneError

PEFT_TYPE = "VERA"
_LAYER_PREFIX = "base_model.model."
_SHARED = {"vera_A": "base_model.vera_A", "vera_B": "base_model.vera_B"}
"""Layer-relative projection keys and the one model-level key peft files keep each under."""


def kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """peft's ``_kaiming_init``: U(±√3·√2/√fan_in), fan_in = shape[1], from ``generator``."""
    bound = math.sqrt(3.0) * math.sqrt(2) / math.sqrt(shape[1])
    with torch.no_grad():
        return torch.empty(shape).uniform_(-bound, bound, generator=generator)


@dataclass
class VeraConfig(AdapterConfig):
    """VeRA: shared frozen random projections, a trained pair of vectors per layer."""

    method: ClassVar[str] = "vera"
    title: ClassVar[str] = "VeRA"

    r: int = 256
    """Rank of the shared projections (peft's default; the trained values per layer are r +
    out, so a high rank is cheap)."""
    projection_prng_key: int = 0
    """Seed the shared projections are drawn from."""
    save_projection: bool = True
    """Save the projections in the adapter file (else peft and leantune redraw them)."""
    dropout: float = 0.0
    """Dropout on the layer input (peft's vera_dropout)."""
    d_initial: float = 0.1
    """Initial value of every λ_d entry."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0:
            raise LeantuneError(f"VeRA rank r must be a positive integer, got {self.r!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise LeantuneError(f"VeRA dropout must be in [0, 1), got {self.dropout!r}")

    def supported_types(self) -> tuple[type[nn.Module], ...]:
        return LINEAR_TYPES

    def adapt(self, module: nn.Module, adapter_name: str, module_name: str) -> nn.Module:
        layer = VeraLayer.wrap(module, module_name)
        layer.add_adapter(adapter_name, self)
        return layer

    def attach(self, model: nn.Module, adapter_name: str, modules: list[str]) -> None:
        """Draw the shared projections at the largest in/out of the adapted layers (peft's
        order: A then B from one generator) and give every layer the same pair."""
        layers = [cast(VeraLayer, model.get_submodule(m)) for m in modules]
        dims = [layer.weight_oi().shape for layer in layers]
        max_out, max_in = max(d[0] for d in dims), max(d[1] for d in dims)
        generator = torch.Generator(device="cpu").manual_seed(self.projection_prng_key)
        shared = VeraProjection(
            kaiming_uniform((self.r, max_in), generator),
            kaiming_uniform((max_out, self.r), generator),
        ).to(layers[0].weight.device)
        for layer in layers:
            layer.adapter(adapter_name).projection = shared

    # --- runs

    default_lr: ClassVar[float] = 1e-2
    """The paper trains VeRA at 1e-2 to 4e-2 (GLUE, RoBERTa) where LoRA takes 4e-4 to 1e-3."""

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> VeraConfig:
        """--r, --dropout, --targets, --layers (tune's r default, 8, is LoRA's; pass --r)."""
        keys = ("r", "dropout", "targets", "layers")
        return cls(**{k: options[k] for k in keys if options.get(k) is not None})


class VeraProjection(nn.Module):
    """The frozen A (r, max_in) and B (max_out, r) every VeRA layer of one adapter slices."""

    def __init__(self, A: torch.Tensor, B: torch.Tensor):
        super().__init__()
        self.register_buffer("A", A, persistent=False)
        self.register_buffer("B", B, persistent=False)

    A: torch.Tensor
    B: torch.Tensor


class VeraAdapter(nn.Module):
    """One adapter's λ_d (r) and λ_b (out) on one layer, and the shared projection."""

    projection: VeraProjection

    def __init__(self, out_features: int, config: VeraConfig):
        super().__init__()
        self.save_projection = config.save_projection
        self.lambda_d = nn.Parameter(torch.full((config.r,), float(config.d_initial)))
        self.lambda_b = nn.Parameter(torch.zeros(out_features))
        self.dropout: nn.Module = nn.Dropout(config.dropout) if config.dropout else nn.Identity()


class VeraLayer(AdapterLayer):
    """A linear layer (nn.Linear or Conv1D) with named VeRA adapters."""

    method: ClassVar[str] = "vera"
    store: ClassVar[str] = "vera"
    vera: nn.ModuleDict
    peft_keys: ClassVar[dict[str, str]] = {
        "lambda_b": "vera_lambda_b",
        "lambda_d": "vera_lambda_d",
    }

    def adapter(self, name: str) -> VeraAdapter:
        return cast(VeraAdapter, self.vera[name])

    def weight_oi(self) -> torch.Tensor:
        """The weight as an (out, in) view (Conv1D stores it (in, out))."""
        conv = Conv1D is not None and issubclass(self._base_class, Conv1D)
        return self.weight.T if conv else self.weight

    def add_adapter(self, name: str, config: VeraConfig) -> None:
        if name in self.vera:
            raise LeantuneError(f"adapter {name!r} is already on this layer")
        adapter = VeraAdapter(self.weight_oi().shape[0], config)
        self.vera[name] = adapter.to(device=self.weight.device, dtype=self.weight.dtype)

    def _slices(self, a: VeraAdapter) -> tuple[torch.Tensor, torch.Tensor]:
        out, inp = self.weight_oi().shape
        return a.projection.A[:, :inp], a.projection.B[:out]

    def delta_weight(self, name: str) -> torch.Tensor:
        """(λ_b ⊙ B)(λ_d ⊙ A), shape (out, in)."""
        a = self.adapter(name)
        A, B = self._slices(a)
        return (a.lambda_b[:, None] * B.to(a.lambda_b.dtype)) @ (
            a.lambda_d[:, None] * A.to(a.lambda_d.dtype)
        )

    def apply_adapter(self, name: str, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        a = self.adapter(name)
        A, B = self._slices(a)
        h = F.linear(a.dropout(x), A.to(x.dtype)) * a.lambda_d.to(x.dtype)
        return out + (F.linear(h, B.to(h.dtype)) * a.lambda_b.to(h.dtype)).to(out.dtype)

    def merge_adapter(self, name: str) -> None:
        self.weight_oi().add_(self.delta_weight(name).to(self.weight.dtype))

    def unmerge_adapter(self, name: str) -> None:
        self.weight_oi().sub_(self.delta_weight(name).to(self.weight.dtype))

    def file_tensors(self, name: str) -> dict[str, torch.Tensor]:
        return {k: t.detach() for k, t in self.file_targets(name).items()}

    def file_targets(self, name: str) -> dict[str, torch.Tensor]:
        """λ_b, λ_d by peft's keys and, with save_projection, the shared A and B (the
        format keeps them once, at the model level)."""
        a = self.adapter(name)
        params = {key: getattr(a, short) for short, key in self.peft_keys.items()}
        if a.save_projection:
            params |= {"vera_A": a.projection.A, "vera_B": a.projection.B}
        return params

    def change_entries(self, name: str) -> list[Change]:
        delta = self.delta_weight(name)
        return [Change("weight", delta if self.weight_oi() is self.weight else delta.T)]


# ---------------------------------------------------------------------------- peft's format


class VeraFormat:
    """peft's ``VERA`` adapter_config.json and its model-level projection keys (``PeftFormat``,
    ``FileKeys``)."""

    peft_type = PEFT_TYPE

    def write(
        self, rec: AdapterRecord, name: str, layers: list[tuple[str, Any]], base: str | None
    ) -> dict[str, Any]:
        cfg = rec.config
        assert isinstance(cfg, VeraConfig)
        conv = any(Conv1D is not None and issubclass(lay._base_class, Conv1D) for _, lay in layers)
        return {
            "peft_type": PEFT_TYPE,
            "task_type": rec.task_type,
            "base_model_name_or_path": base,
            "r": cfg.r,
            "target_modules": sorted(n for n, _ in layers),
            "projection_prng_key": cfg.projection_prng_key,
            "save_projection": cfg.save_projection,
            "vera_dropout": cfg.dropout,
            "d_initial": cfg.d_initial,
            "fan_in_fan_out": conv,
            "bias": "none",
            "modules_to_save": rec.modules_to_save or None,
            "init_weights": True,
            "layers_to_transform": None,
            "layers_pattern": None,
            "inference_mode": True,
        }

    def read(self, raw: Mapping[str, Any]) -> VeraConfig:
        targets = raw.get("target_modules")
        if not targets:
            raise AdapterFileError("VeRA adapter config has no target_modules")
        if raw.get("bias", "none") != "none":
            raise AdapterFileError(
                f"adapter config bias={raw['bias']!r}: bias training is not supported"
            )
        key = raw.get("projection_prng_key", 0)
        if isinstance(key, bool) or not isinstance(key, int):
            raise checks.bad("projection_prng_key", key, "an integer")
        try:
            return VeraConfig(
                targets=targets
                if isinstance(targets, str)
                else checks.names("target_modules", targets),
                layers=checks.layers(raw.get("layers_to_transform")),
                layers_pattern=checks.layers_pattern(raw.get("layers_pattern")),
                modules_to_save=checks.names("modules_to_save", raw.get("modules_to_save")),
                task_type=checks.optional_str("task_type", raw.get("task_type")),
                r=checks.rank("r", raw.get("r", 256)),
                projection_prng_key=key,
                save_projection=checks.flag("save_projection", raw.get("save_projection", True)),
                dropout=checks.dropout("vera_dropout", raw.get("vera_dropout")),
                d_initial=checks.positive_number("d_initial", raw.get("d_initial", 0.1)),
            )
        except LeantuneError as e:
            if isinstance(e, AdapterFileError):
                raise
            raise AdapterFileError(
                f"adapter config does not describe a usable VeRA adapter: {e}"
            ) from None

    def describe(self, raw: Mapping[str, Any]) -> list[tuple[str, str]]:
        targets = raw.get("target_modules")
        return [
            ("method", PEFT_TYPE),
            ("rank", str(raw.get("r"))),
            ("projections", "in the file" if raw.get("save_projection", True) else "redrawn"),
            ("targets", targets if isinstance(targets, str) else f"{len(targets or [])} modules"),
        ]

    def keys_to_file(
        self, model: nn.Module, tensors: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Each layer's copy of the shared A and B becomes the one model-level key."""
        out: dict[str, torch.Tensor] = {}
        for key, t in tensors.items():
            short = key.rsplit(".", 1)[-1]
            out[_SHARED[short] if short in _SHARED and key.startswith(_LAYER_PREFIX) else key] = t
        return out

    def keys_from_file(
        self, model: nn.Module, tensors: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """The model-level A and B, given to every layer the file has λ_b for."""
        suffix = "." + self.peft_keys_b
        layers = [k[: -len(suffix)] for k in tensors if k.endswith(suffix)]
        out = {k: t for k, t in tensors.items() if k not in _SHARED.values()}
        for short, key in _SHARED.items():
            if key in tensors:
                out |= {f"{layer}.{short}": tensors[key] for layer in layers}
        return out

    peft_keys_b: ClassVar[str] = VeraLayer.peft_keys["lambda_b"]


VERA_FORMAT = VeraFormat()
