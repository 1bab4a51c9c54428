"""LoRA and its variants (DoRA, rsLoRA, PiSSA, LoRA+): config, layers, conv, math, peft format, arithmetic."""
