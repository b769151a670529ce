"""Adapters for fine-tuning: LoRA layers (slice-aware for fused projections) and freezing by pattern."""
from lmlab.adapters.freeze import ParamCounts, first_blocks, freeze, param_counts, unfreeze
from lmlab.adapters.lora import (LoRALinear, fused_slices, inject_lora, load_lora_state_dict, lora_modules,
                                 lora_settings, lora_state_dict, merge_lora, unload_lora, unmerge_lora)

__all__ = ["LoRALinear", "ParamCounts", "first_blocks", "freeze", "fused_slices", "inject_lora",
           "load_lora_state_dict", "lora_modules", "lora_settings", "lora_state_dict", "merge_lora",
           "param_counts", "unfreeze", "unload_lora", "unmerge_lora"]
