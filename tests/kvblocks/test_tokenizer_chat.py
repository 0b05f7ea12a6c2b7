from kvblocks import BlockHasher, get_tokenizer, render_chat
from kvblocks.chat import ChatFormatError
import pytest


def test_builtin_tokenizer_roundtrip_offline():
    tok = get_tokenizer()
    ids = tok.encode("hello world, <|endoftext|> is plain text here")
    assert ids[:2] == [15339, 1917]
    assert tok.decode(ids) == "hello world, <|endoftext|> is plain text here"
    assert 100257 not in ids  # special tokens are never parsed from user text


def test_chat_turns_are_prefixes_at_block_level():
    tok = get_tokenizer()
    h = BlockHasher(16)
    convo = [{"role": "system", "content": "You are terse. " * 20}, {"role": "user", "content": "Question one? " * 10}]
    t1 = render_chat(convo)
    convo2 = convo + [{"role": "assistant", "content": "Answer one."}, {"role": "user", "content": "And two?"}]
    t2 = render_chat(convo2)
    assert t2.startswith(t1)
    b1, b2 = h.hashes(tok.encode(t1)), h.hashes(tok.encode(t2))
    assert len(b1) >= 8 and b2[: len(b1) - 1] == b1[:-1]


def test_content_parts_and_errors():
    assert "hi there" in render_chat([{"role": "user", "content": [{"type": "text", "text": "hi there"}]}])
    with pytest.raises(ChatFormatError):
        render_chat([])
    with pytest.raises(ChatFormatError) as e:
        render_chat([{"role": "wizard", "content": "x"}])
    assert e.value.param == "messages[0].role"
