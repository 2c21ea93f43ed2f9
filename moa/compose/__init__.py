"""Composing task-specific LoRA adapters into one PEFT-format adapter (routing-free merges)."""
