"""LoRA adapters served over one base model, batched together (see `engine.lora.manager`)."""

from engine.lora.adapter import AdapterError, LoRAAdapter, load_peft_adapter
from engine.lora.manager import LoRAManager, StepAdapters

__all__ = ["AdapterError", "LoRAAdapter", "LoRAManager", "StepAdapters", "load_peft_adapter"]
