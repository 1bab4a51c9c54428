"""leantune: train only the parameters that matter, and prove it with numbers."""

from leantune.adapters.accounting import ParameterReport, parameter_report
from leantune.adapters.base import BASE, AdapterModule
from leantune.adapters.combine import combine
from leantune.adapters.config import METHODS, AdapterConfig, register
from leantune.adapters.formats import adapter_config, adapter_state_dict, load_adapter, save_adapter
from leantune.adapters.hotswap import hotswap, prepare_hotswap
from leantune.adapters.inject import (
    active_adapter,
    adapter_parameters,
    disable,
    inject,
    mark_trainable,
    merge,
    mixed_batch,
    remove_adapter,
    set_active,
    unload,
    unmerge,
)
from leantune.adapters.methods.lora.config import LoraConfig
from leantune.core import quiet as _quiet  # noqa: F401  (first: quiets torchao before transformers loads it)
from leantune.core.errors import AdapterFileError, LeantuneError, TargetError

__version__ = "0.1.0"

__all__ = [
    "BASE",
    "METHODS",
    "AdapterConfig",
    "AdapterFileError",
    "AdapterModule",
    "LeantuneError",
    "LoraConfig",
    "ParameterReport",
    "TargetError",
    "active_adapter",
    "adapter_config",
    "adapter_parameters",
    "adapter_state_dict",
    "combine",
    "disable",
    "hotswap",
    "inject",
    "load_adapter",
    "mark_trainable",
    "merge",
    "mixed_batch",
    "parameter_report",
    "prepare_hotswap",
    "register",
    "remove_adapter",
    "save_adapter",
    "set_active",
    "unload",
    "unmerge",
]
