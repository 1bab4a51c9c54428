"""PEFT methods, one file each, registered here by name.

Importing any part of ``leantune.adapters.methods`` registers leantune's own methods, so the registry
(``adapters.config.METHODS``) is full wherever the core reads it. A new method registers itself
the same way (``register(name, ConfigClass)``), from its own module or a test. ``MixedConfig``
(several methods in one adapter) is no method of its own and is not registered.
"""

from leantune.adapters.config import register
from leantune.adapters.methods.bitfit import BitFitConfig
from leantune.adapters.methods.bottleneck import BottleneckConfig
from leantune.adapters.methods.ia3 import IA3_FORMAT, IA3Config
from leantune.adapters.methods.layernorm import LayerNormConfig
from leantune.adapters.methods.lora.arith import LORA_ARITHMETIC
from leantune.adapters.methods.lora.config import LoraConfig
from leantune.adapters.methods.lora.peft import LORA_FORMAT
from leantune.adapters.methods.prefix_tuning import PREFIX_FORMAT, PrefixConfig
from leantune.adapters.methods.prompt import PROMPT_FORMAT, PromptConfig
from leantune.adapters.methods.sparse import SparseConfig
from leantune.adapters.methods.vera import VERA_FORMAT, VeraConfig

register("lora", LoraConfig, peft=LORA_FORMAT, combiner=LORA_ARITHMETIC, swapper=LORA_ARITHMETIC)
register("bitfit", BitFitConfig)
register("layernorm", LayerNormConfig)
register("sparse", SparseConfig)
register("prompt", PromptConfig, peft=PROMPT_FORMAT)
register("prefix", PrefixConfig, peft=PREFIX_FORMAT)
register("bottleneck", BottleneckConfig)
register("ia3", IA3Config, peft=IA3_FORMAT)
register("vera", VeraConfig, peft=VERA_FORMAT)
