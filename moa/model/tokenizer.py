"""A thin tokenizer over the `tokenizers` library: encode, decode, special tokens, chat template."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as HFTokenizer

from moa.errors import MoaError
from moa.io import read_json

# ChatML, as SmolLM2 and Qwen2 use it; the default for models that ship no template.
CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# llama.cpp's pre-tokenizer names -> the text split its vocabulary's merges were learned on.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _byte_level(split: str | None = None, digits: bool = False) -> pre_tokenizers.PreTokenizer:
    steps: list[pre_tokenizers.PreTokenizer] = []
    if digits:
        steps.append(pre_tokenizers.Digits(individual_digits=True))
    if split is not None:
        steps.append(pre_tokenizers.Split(Regex(split), behavior="isolated"))
    steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=split is None))
    return pre_tokenizers.Sequence(steps)


PRE_TOKENIZERS = {
    "gpt2": lambda: _byte_level(),
    "default": lambda: _byte_level(),
    "smollm": lambda: _byte_level(digits=True),  # SmolLM splits every digit apart
    "llama3": lambda: _byte_level(_LLAMA3_SPLIT),
    "llama-bpe": lambda: _byte_level(_LLAMA3_SPLIT),
    "qwen2": lambda: _byte_level(_QWEN2_SPLIT),
}


@dataclass
class Tokenizer:
    backend: HFTokenizer
    bos_token: str | None = None
    eos_token: str | None = None
    pad_token: str | None = None
    chat_template: str | None = None
    add_bos_token: bool = False

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_id(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    @property
    def eos_token_id(self) -> int | None:
        return self.token_id(self.eos_token)

    @property
    def bos_token_id(self) -> int | None:
        return self.token_id(self.bos_token)

    @property
    def pad_token_id(self) -> int:
        pad = self.token_id(self.pad_token)
        return pad if pad is not None else (self.eos_token_id or 0)

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        ids = self.backend.encode(text, add_special_tokens=False).ids
        if (self.add_bos_token if add_bos is None else add_bos) and self.bos_token_id is not None:
            ids = [self.bos_token_id, *ids]
        return ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        template = jinja2.Environment(trim_blocks=True, lstrip_blocks=True).from_string(
            self.chat_template or CHATML_TEMPLATE)
        return template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                               bos_token=self.bos_token or "", eos_token=self.eos_token or "")

    def save(self, directory: str | Path) -> None:
        """Write tokenizer.json and a tokenizer_config.json that transformers' AutoTokenizer reads."""
        directory = Path(directory)
        self.backend.save(str(directory / "tokenizer.json"))
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": self.bos_token, "eos_token": self.eos_token, "pad_token": self.pad_token,
            "add_bos_token": self.add_bos_token, "chat_template": self.chat_template,
            "clean_up_tokenization_spaces": False, "model_max_length": 1 << 20,
        }
        (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))

    @classmethod
    def from_dir(cls, directory: str | Path) -> Tokenizer:
        directory = Path(directory)
        path = directory / "tokenizer.json"
        if not path.is_file():
            raise MoaError(f"{path}: missing; a model directory needs tokenizer.json (the fast-tokenizer format)")
        try:
            backend = HFTokenizer.from_file(str(path))
        except Exception as err:  # tokenizers raises a bare Exception on malformed files
            raise MoaError(f"{path}: not a valid tokenizer.json ({err})") from err
        config_path = directory / "tokenizer_config.json"
        config = read_json(config_path, "re-save the tokenizer") if config_path.exists() else {}
        template = config.get("chat_template")
        if (directory / "chat_template.jinja").exists():  # transformers >= 4.43 writes it beside the config
            template = (directory / "chat_template.jinja").read_text()
        special = {k: _token_text(config.get(k)) for k in ("bos_token", "eos_token", "pad_token")}
        return cls(backend, **special, chat_template=template, add_bos_token=bool(config.get("add_bos_token")))


def _token_text(token: str | dict[str, Any] | None) -> str | None:
    return token.get("content") if isinstance(token, dict) else token


def byte_level_bpe(tokens: list[str], merges: list[str], special: list[str], pre: str) -> HFTokenizer:
    """Rebuild a GPT-2-style byte-level BPE from its vocabulary and merges (as GGUF stores them)."""
    if pre not in PRE_TOKENIZERS:
        raise MoaError(f"unknown pre-tokenizer {pre!r} in the GGUF metadata: moa knows {', '.join(PRE_TOKENIZERS)}")
    vocab = {token: i for i, token in enumerate(tokens)}
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    backend = HFTokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False))
    backend.pre_tokenizer = PRE_TOKENIZERS[pre]()
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    return backend


def byte_tokenizer() -> Tokenizer:
    """A merge-free byte-level tokenizer (256 bytes + 3 ChatML specials) for the tiny test model."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokens = special + sorted(alphabet)
    backend = byte_level_bpe(tokens, [], special, "gpt2")
    return Tokenizer(backend, bos_token="<|im_start|>", eos_token="<|im_end|>",
                     pad_token="<|endoftext|>", chat_template=CHATML_TEMPLATE)
