"""PEFT methods, one file each, registered here by name.

Importing any part of ``leantune.methods`` registers leantune's own methods, so the registry
(``methods.base.METHODS``) is full wherever the core reads it. A new method registers itself
the same way (``register(name, ConfigClass)``), from its own module or a test. ``MixedConfig``
(several methods in one adapter) is no method of its own and is not registered.
"""

from leantune.methods.base import register
from leantune.methods.bitfit import BitFitConfig
from leantune.methods.layernorm import LayerNormConfig
from leantune.methods.lora import LoraConfig
from leantune.methods.lora_peft import LORA_FORMAT
from leantune.methods.sparse import SparseConfig

register("lora", LoraConfig, peft=LORA_FORMAT)
register("bitfit", BitFitConfig)
register("layernorm", LayerNormConfig)
register("sparse", SparseConfig)
