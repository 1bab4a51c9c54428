"""Imported first by ``leantune``: with torchao installed (the int8 / nf4 base), every
``import transformers`` imports it, and it prints lines about CUDA kernels a CPU machine has no
use for, and torch warns about its enums. Both go through ``logging``; only errors are kept."""

import logging

for _name in ("torchao", "torch.utils._pytree"):
    logging.getLogger(_name).setLevel(logging.ERROR)
