"""vLLM's published test vectors (vllm-facts.md) must come out byte for byte."""
import pytest
from hypothesis import given, strategies as st

from kvblocks import BlockHasher, full_blocks, hash_block, hash_to_int, none_hash

TOKENS = list(range(1000, 1032))


def test_sha256_vectors():
    h = BlockHasher(16, "sha256")
    assert none_hash("sha256").hex() == "066b1e8987e027138e98701c46128929378935f9b6cd1549105ae6b4f0d71198"
    b0, b1 = h.hashes(TOKENS)
    assert b0.hex() == "9d9c413731095d0ee811a14814414907cafccd751ce2052f659e8e1f547aeb68"
    assert b1.hex() == "6eab5151ee783ec014728198ae09f5b0c20f18673ff098bcec4f29beb1e71e61"
    assert hash_to_int(b0) == 7322446309363477352
    assert hash_to_int(b1) == 17027874615116373601


def test_sha256_cbor_vectors():
    h = BlockHasher(16, "sha256_cbor")
    assert h.root.hex() == "9bd96a485ad84efdafb72ee48a1d7a69bcead0f8f0433173941b276b9581eef0"
    b0, b1 = h.hashes(TOKENS)
    assert b0.hex() == "15528b726efb88cb4d9efc583657a821bceb1f67307c6e813417567050a24fdc"
    assert b1.hex() == "b057b31190789434ae1b5f233801e9a318f5a49e9baf90762102e4d3c29c9005"


def test_pythonhashseed_changes_root(monkeypatch):
    monkeypatch.setenv("PYTHONHASHSEED", "42")
    assert none_hash("sha256") != none_hash("sha256", seed="vllm-none-hash")
    assert none_hash("sha256") == none_hash("sha256", seed="42")


def test_partial_tail_is_not_hashed():
    h = BlockHasher(16)
    assert len(h.hashes(list(range(47)))) == 2
    assert len(full_blocks(list(range(47)))) == 2
    assert h.hashes(list(range(15))) == []


def test_cache_salt_only_on_block0():
    h = BlockHasher(16)
    plain = h.hashes(TOKENS)
    salted = h.hashes(TOKENS, extra_keys_block0=("salt",))
    assert plain[0] != salted[0] and plain[1] != salted[1]  # the chain carries the salt on
    assert salted[1] == hash_block(salted[0], TOKENS[16:32])


def test_unknown_algo_rejected():
    with pytest.raises(ValueError):
        BlockHasher(16, "md5")


@given(st.lists(st.integers(0, 100_000), min_size=0, max_size=200), st.integers(1, 40))
def test_extending_a_chain_equals_hashing_whole(tokens, cut_blocks):
    h = BlockHasher(16)
    whole = h.hashes(tokens)
    k = min(cut_blocks, len(whole))
    if k == 0:
        return
    assert h.hashes(tokens, parent=whole[k - 1], start_block=k) == whole[k:]


@given(st.lists(st.integers(0, 1000), min_size=32, max_size=64), st.integers(0, 1000))
def test_first_token_change_changes_every_block(tokens, other):
    h = BlockHasher(16)
    changed = [other if other != tokens[0] else other + 1] + tokens[1:]
    assert not set(h.hashes(tokens)) & set(h.hashes(changed))


def test_cache_salt_keys_are_vllms_tagged_tuple():
    """vLLM 0.32/0.33 hash block 0 of a salted prompt with (("cache_salt", salt),); the bare (salt,)
    of earlier releases gives another hash, which real vLLM would never publish."""
    from kvblocks import salt_extra_keys

    assert salt_extra_keys("t") == (("cache_salt", "t"),)
    assert salt_extra_keys(None) is None and salt_extra_keys("") is None
    h = BlockHasher(16)
    assert h.hashes(TOKENS, extra_keys_block0=salt_extra_keys("t"))[0] != h.hashes(TOKENS, extra_keys_block0=("t",))[0]


def test_empty_pythonhashseed_is_a_seed_not_unset(monkeypatch):
    """vLLM checks `os.getenv("PYTHONHASHSEED") is not None`: "" seeds NONE_HASH with the empty string."""
    from kvblocks import none_hash
    from kvblocks.hashing import hash_fn

    monkeypatch.setenv("PYTHONHASHSEED", "")
    assert none_hash("sha256") == hash_fn("sha256")("")
    monkeypatch.delenv("PYTHONHASHSEED")
    assert none_hash("sha256") == hash_fn("sha256")("vllm-none-hash")
