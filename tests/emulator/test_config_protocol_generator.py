"""Configuration precedence, request validation and the dummy generator's contract."""
from __future__ import annotations

import json

import pytest

from kvblocks import APIError, get_tokenizer

from emulator.config import EmulatorConfig
from emulator.detokenizer import OutputText
from emulator.generator import TokenGenerator
from emulator.protocol import RequestParser

TOK = get_tokenizer()


def test_defaults_reproduce_a100_llama2_13b():
    c = EmulatorConfig()
    assert c.resolved_num_gpu_blocks == 924 and c.port == 8001 and c.max_model_len == 4096
    assert c.profile == "a100-40gb-llama2-13b" and c.engine == "batched" and c.enable_prompt_tokens_details


def test_cli_beats_env_beats_file(tmp_path):
    f = tmp_path / "emu.json"
    f.write_text(json.dumps({"port": 7000, "max_num_seqs": 8, "time_scale": 0.5}))
    env = {"KVROUTE_EMU_PORT": "7100", "KVROUTE_EMU_NUM_GPU_BLOCKS": "50", "KVROUTE_EMU_LOG_REQUESTS": "false",
           "KVROUTE_EMU_MAX_MODEL_LEN": "784"}
    c = EmulatorConfig.from_cli(["--config", str(f), "--port", "7200", "--engine", "simple",
                                 "--no-enable-prompt-tokens-details"], env=env)
    assert c.port == 7200 and c.max_num_seqs == 8 and c.time_scale == 0.5
    assert c.num_gpu_blocks == 50 and c.resolved_num_gpu_blocks == 50 and c.log_requests is False
    assert c.engine == "simple" and c.enable_prompt_tokens_details is False


def test_invalid_settings_are_rejected():
    with pytest.raises(SystemExit):
        EmulatorConfig.from_cli(["--time-scale", "0"], env={})
    with pytest.raises(ValueError):
        EmulatorConfig(engine="turbo")
    with pytest.raises(ValueError):
        EmulatorConfig(model="unknown/model")
    assert EmulatorConfig(model="unknown/model", num_gpu_blocks=300).resolved_num_gpu_blocks == 300


def test_generator_is_deterministic_and_emits_decodable_ordinary_tokens():
    gen = TokenGenerator(TOK, seed=3)
    a = gen.for_prompt([1, 2, 3])
    b = gen.for_prompt([1, 2, 3])
    c = gen.for_prompt([1, 2, 4])
    ta = [a.next_token(True) for _ in range(50)]
    assert ta == [b.next_token(True) for _ in range(50)]
    assert ta != [c.next_token(True) for _ in range(50)]
    assert ta != [TokenGenerator(TOK, seed=4).for_prompt([1, 2, 3]).next_token(True) for _ in range(50)]
    assert all(t < TOK.ordinary_vocab_size for t in ta)
    text = "".join(gen.token_text(t) for t in ta)
    assert "\ufffd" not in text and TOK.encode(text) == ta


def test_eos_only_when_allowed():
    gen = TokenGenerator(TOK, seed=0, eos_probability=1.0)
    s = gen.for_prompt([5])
    assert s.next_token(False) != TOK.eos_token_id
    assert s.next_token(True) == TOK.eos_token_id


def test_stop_string_split_across_tokens_is_held_back_and_cut():
    out = OutputText(stop=["STOP"])
    sent = [out.append(" hello"), out.take_delta(False)]
    assert sent == [None, " he"]  # the last 3 chars could start "STOP"
    assert out.append(" ST") is None and out.take_delta(False) == "llo"
    assert out.append("OP more") == "STOP"
    assert out.take_delta(True) == " " and out.text == " hello "
    inc = OutputText(stop=["STOP"], include_stop_str_in_output=True)
    inc.append("a STOP b")
    assert inc.text == "a STOP"


@pytest.fixture
def parser():
    return RequestParser("m", TOK, 100)


def test_completion_defaults_and_prompt_forms(parser):
    g = parser.completion({"prompt": "hello world"})
    assert g.params.max_tokens == 16 and g.prompts == [TOK.encode("hello world")] and not g.stream
    assert parser.completion({"prompt": [[1, 2], [3]]}).prompts == [[1, 2], [3]]
    assert parser.completion({"prompt": ["a", "b"]}).prompt_texts == ["a", "b"]
    g = parser.completion({"prompt": "x", "stream": True, "stream_options": {}, "whatever": 1})
    assert g.include_usage and g.unknown_fields == ["whatever"]


def test_chat_default_max_tokens_fills_the_context(parser):
    g = parser.chat({"messages": [{"role": "user", "content": "hi"}]})
    assert g.params.max_tokens == 100 - len(g.prompts[0])
    assert parser.chat({"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 5}).params.max_tokens == 5


@pytest.mark.parametrize("body,param", [
    ({"prompt": "x", "max_tokens": 100}, "max_tokens"),
    ({"prompt": list(range(100))}, "prompt"),
    ({"prompt": "x", "min_tokens": 20, "max_tokens": 10}, "min_tokens"),
    ({"prompt": "x", "top_p": 0}, "top_p"),
    ({"prompt": "x", "stop": [1]}, "stop"),
    ({"prompt": "x", "ignore_eos": "yes"}, "ignore_eos"),
    ({"prompt": "x", "max_tokens": True}, "max_tokens"),
])
def test_validation_errors_name_the_parameter(parser, body, param):
    with pytest.raises(APIError) as e:
        parser.completion(body)
    assert e.value.status == 400 and e.value.param == param
