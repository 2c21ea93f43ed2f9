"""The LLaMA-family model, its config and presets, tokenizer, and loaders for every model source."""

from moa.model.checkpoint import load_hf_dir, save_hf_dir
from moa.model.config import DTYPES, PRESETS, ModelConfig, preset
from moa.model.llama import Documents, SlotCache, Transformer, causal_mask, document_mask
from moa.model.load import DEFAULT_MODEL, default_gguf, load_pretrained, load_tokenizer, random_model
from moa.model.tokenizer import Tokenizer

__all__ = [
    "DEFAULT_MODEL", "DTYPES", "PRESETS", "Documents", "ModelConfig", "SlotCache", "Tokenizer", "Transformer",
    "causal_mask", "default_gguf", "document_mask", "load_hf_dir", "load_pretrained", "load_tokenizer", "preset",
    "random_model", "save_hf_dir",
]
