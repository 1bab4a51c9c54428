"""PEFT methods, one file each, registered here by name.

Importing any part of ``leantune.methods`` registers leantune's own methods, so the registry
(``methods.base.METHODS``) is full wherever the core reads it. A new method registers itself
the same way (``register(name, ConfigClass)``), from its own module or a test. ``MixedConfig``
(several methods in one adapter) is no method of its own and is not registered.
"""

from leantune.methods.base import register
from leantune.methods.bitfit import BitFitConfig
from leantune.methods.bottleneck import BottleneckConfig
from leantune.methods.ia3 import IA3_FORMAT, IA3Config
from leantune.methods.layernorm import LayerNormConfig
from leantune.methods.lora import LoraConfig
from leantune.methods.lora_peft import LORA_FORMAT
from leantune.methods.prefix_tuning import PREFIX_FORMAT, PrefixConfig
from leantune.methods.prompt import PROMPT_FORMAT, PromptConfig
from leantune.methods.sparse import SparseConfig
from leantune.methods.vera import VERA_FORMAT, VeraConfig

register("lora", LoraConfig, peft=LORA_FORMAT)
register("bitfit", BitFitConfig)
register("layernorm", LayerNormConfig)
register("sparse", SparseConfig)
register("prompt", PromptConfig, peft=PROMPT_FORMAT)
register("prefix", PrefixConfig, peft=PREFIX_FORMAT)
register("bottleneck", BottleneckConfig)
register("ia3", IA3Config, peft=IA3_FORMAT)
register("vera", VeraConfig, peft=VERA_FORMAT)
