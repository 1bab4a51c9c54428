"""leantune: train only the parameters that matter, and prove it with numbers."""

from leantune import _quiet  # noqa: F401  (first: quiets torchao before transformers loads it)
from leantune.accounting import ParameterReport, parameter_report
from leantune.combine import combine
from leantune.errors import AdapterFileError, LeantuneError, TargetError
from leantune.formats import adapter_config, adapter_state_dict, load_adapter, save_adapter
from leantune.hotswap import hotswap, prepare_hotswap
from leantune.inject import (
    BASE,
    METHODS,
    AdapterConfig,
    AdapterModule,
    active_adapter,
    adapter_parameters,
    disable,
    inject,
    mark_trainable,
    merge,
    mixed_batch,
    register,
    remove_adapter,
    set_active,
    unload,
    unmerge,
)
from leantune.methods.lora import LoraConfig

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
