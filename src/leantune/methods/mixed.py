"""One adapter made of several methods, each on its own modules (what a Plan asks for).

``MixedConfig`` knows no concrete method, so it lives in ``methods/config.py``; this module
keeps its old import path.
"""

from leantune.methods.config import MixedConfig as MixedConfig
