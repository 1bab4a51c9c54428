"""One adapter made of several methods, each on its own modules (what a Plan asks for).

``MixedConfig(parts=[LoraConfig(...), BitFitConfig(...), ...])`` adapts the union of the parts'
explicit module lists, each module by the first part that names it. Saved in leantune's own
format (docs/FORMAT.md); a Plan that is only LoRA becomes a plain ``LoraConfig`` instead, which
peft loads.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from torch import nn

from leantune.errors import LeantuneError
from leantune.methods.base import AdapterConfig, register
from leantune.targets import name_matches


@dataclass
class MixedConfig(AdapterConfig):
    """Several methods in one adapter, each part on the modules it lists by name."""

    method: ClassVar[str] = "mixed"

    parts: list[AdapterConfig] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.parts:
            raise LeantuneError("a mixed adapter needs at least one part")
        names: list[str] = []
        for part in self.parts:
            if not isinstance(part.targets, list):
                raise LeantuneError(
                    f"each part of a mixed adapter lists its modules by name; the {part.method} "
                    f"part has targets {part.targets!r}"
                )
            names += part.targets
        if len(set(names)) != len(names):
            twice = next(n for n in names if names.count(n) > 1)
            raise LeantuneError(f"{twice} is in two parts of a mixed adapter; one method a module")
        self.targets = names
        super().__post_init__()

    def supported_types(self) -> tuple[type[nn.Module], ...]:
        return tuple({t for part in self.parts for t in part.supported_types()})

    def part_for(self, module_name: str) -> AdapterConfig:
        for part in self.parts:
            if name_matches(module_name, part.targets):
                return part
        raise LeantuneError(f"no part of the mixed adapter names {module_name}")

    def adapt(self, module: nn.Module, adapter_name: str, module_name: str) -> nn.Module:
        return self.part_for(module_name).adapt(module, adapter_name, module_name)

    def rewrites_base_weight(self) -> bool:
        return any(part.rewrites_base_weight() for part in self.parts)


register("mixed", MixedConfig)
