"""leantune: train only the parameters that matter, and prove it with numbers.

The public API is what this module exports (the adapter functions, every method's config,
``minilm_dir``, ``use_pooling``) plus ``leantune.train.loop.train`` and ``leantune.tune``'s
job functions (``run_tune``, ``make_config`` ...). The layers below (``core``, ``models``,
``adapters``, ``analysis``, ``train``, ``tune``, ``search``, ``cli``) are docs/ARCHITECTURE.md.
"""

# isort: off
from leantune.core import quiet as _quiet  # noqa: F401  (first: quiets torchao before transformers loads it)

# isort: on
from leantune.adapters.accounting import ParameterReport, parameter_report
from leantune.adapters.base import BASE, AdapterModule
from leantune.adapters.combine import combine
from leantune.adapters.config import METHODS, AdapterConfig, MixedConfig, register
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
from leantune.adapters.methods.bitfit import BitFitConfig
from leantune.adapters.methods.bottleneck import BottleneckConfig
from leantune.adapters.methods.ia3 import IA3Config
from leantune.adapters.methods.layernorm import LayerNormConfig
from leantune.adapters.methods.lora.config import LoraConfig
from leantune.adapters.methods.prefix_tuning import PrefixConfig
from leantune.adapters.methods.prompt import PromptConfig
from leantune.adapters.methods.sparse import SparseConfig
from leantune.adapters.methods.vera import VeraConfig
from leantune.core.defaults import minilm_dir
from leantune.core.errors import AdapterFileError, LeantuneError, TargetError
from leantune.models.pooling import use_pooling

__version__ = "0.1.0"

__all__ = [
    "BASE",
    "METHODS",
    "AdapterConfig",
    "AdapterFileError",
    "AdapterModule",
    "BitFitConfig",
    "BottleneckConfig",
    "IA3Config",
    "LayerNormConfig",
    "LeantuneError",
    "LoraConfig",
    "MixedConfig",
    "ParameterReport",
    "PrefixConfig",
    "PromptConfig",
    "SparseConfig",
    "TargetError",
    "VeraConfig",
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
    "minilm_dir",
    "mixed_batch",
    "parameter_report",
    "prepare_hotswap",
    "register",
    "remove_adapter",
    "save_adapter",
    "set_active",
    "unload",
    "unmerge",
    "use_pooling",
]
