"""The shared kernel the emulator and the proxy both import, neither importing the other.

The single definition of a KV block: tokenize -> cut into full blocks -> chained hashes identical to
vLLM's for the same token ids. Beside it: the KV-event codec, OpenAI-style errors, the latency
profiles (`kvblocks.latency`), start-up config and logs. `kvblocks.http_errors` (aiohttp serving
that answers JSON errors, `json_response`, `bearer_token`) is not imported here: it needs aiohttp.
"""
from .blocks import DEFAULT_BLOCK_SIZE, BlockHasher, full_blocks, num_full_blocks
from .chat import ChatFormatError, render_chat
from .errors import APIError, error_body
from .extra_keys import ExtraKeys, LoraKey, extra_keys
from .hashing import HASH_ALGOS, hash_block, hash_fn, hash_to_int, none_hash, salt_extra_keys
from .tokenizer import BUILTIN_TOKENIZER, Tokenizer, get_tokenizer

__all__ = [
    "APIError",
    "BUILTIN_TOKENIZER",
    "BlockHasher",
    "ChatFormatError",
    "DEFAULT_BLOCK_SIZE",
    "ExtraKeys",
    "LoraKey",
    "extra_keys",
    "HASH_ALGOS",
    "Tokenizer",
    "error_body",
    "full_blocks",
    "get_tokenizer",
    "hash_block",
    "hash_fn",
    "hash_to_int",
    "none_hash",
    "salt_extra_keys",
    "num_full_blocks",
    "render_chat",
]
