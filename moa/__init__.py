"""moa: compose task-specific LoRA adapters (Mixture-of-LoRAs routing vs. routing-free merges)."""

__version__ = "0.2.0"
