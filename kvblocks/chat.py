"""The fixed chat template both the emulator and the proxy render conversations with.

Each message renders to a self-delimited segment, and the generation prompt is exactly the opening
of the next assistant message, so a conversation's earlier turns are a text (and, at the 16-token
block level, a token) prefix of its later turns: multi-turn chat hits the prefix cache.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

ROLES = ("system", "user", "assistant", "tool", "developer")


class ChatFormatError(ValueError):
    """A message list the template cannot render; `param` names the offending field."""

    def __init__(self, message: str, param: str = "messages") -> None:
        super().__init__(message)
        self.param = param


def message_text(content: Any, index: int) -> str:
    """A message's text: a string, or the text parts of an OpenAI content-part list."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for j, part in enumerate(content):
            if not isinstance(part, Mapping) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ChatFormatError(
                    "only text content parts are supported", param=f"messages[{index}].content[{j}]"
                )
            parts.append(part["text"])
        return "".join(parts)
    raise ChatFormatError("content must be a string or a list of content parts", param=f"messages[{index}].content")


def render_chat(messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True) -> str:
    """Render messages as `<|im_start|>role\\ncontent<|im_end|>\\n` segments (ChatML style)."""
    if not isinstance(messages, Sequence) or isinstance(messages, (str, bytes)) or not messages:
        raise ChatFormatError("messages must be a non-empty list")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise ChatFormatError("each message must be an object", param=f"messages[{i}]")
        role = m.get("role")
        if role not in ROLES:
            raise ChatFormatError(f"role must be one of {', '.join(ROLES)}", param=f"messages[{i}].role")
        out.append(f"<|im_start|>{role}\n{message_text(m.get('content'), i)}<|im_end|>\n")
    if add_generation_prompt:
        out.append("<|im_start|>assistant\n")
    return "".join(out)
