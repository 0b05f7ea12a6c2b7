"""ProxyConfig: CLI flags > env vars > config file > defaults."""
from __future__ import annotations

import json

import pytest

from proxy.config import ProxyConfig


def test_defaults_reproduce_the_reference_setup():
    c = ProxyConfig.from_cli([], env={})
    assert (c.host, c.port, c.strategy, c.block_size, c.hash_algo, c.tokenizer) == ("127.0.0.1", 8000, "kv_aware", 16, "sha256", "cl100k_base")
    assert c.default_capacity_blocks == 924 and c.emulators == 4 and c.backends == []


def test_env_vars_and_cli_precedence(tmp_path):
    env = {"KVROUTE_PORT": "9100", "KVROUTE_BACKENDS": "127.0.0.1:8001, http://127.0.0.1:8002/", "KVROUTE_STRATEGY": "round_robin",
           "KVROUTE_API_KEY": "a,b", "KVROUTE_ADMIN_KEY": "adm", "KVROUTE_TIME_SCALE": "0.5"}
    c = ProxyConfig.from_cli([], env=env)
    assert c.port == 9100 and c.strategy == "round_robin" and c.api_keys == ["a", "b"] and c.admin_key == "adm"
    assert c.backends == ["http://127.0.0.1:8001", "http://127.0.0.1:8002"] and c.time_scale == 0.5
    c = ProxyConfig.from_cli(["--port", "0", "--backend", "h:1", "--backends", "h:2,h:3", "--strategy", "prefix"], env=env)
    assert c.port == 0 and c.backends == ["http://h:1", "http://h:2", "http://h:3"] and c.strategy == "prefix"


def test_config_file_and_backends_file(tmp_path):
    bf = tmp_path / "backends.txt"
    bf.write_text("# fleet\nhttp://10.0.0.1:8000\n10.0.0.2:8000  # second\n\n")
    cf = tmp_path / "proxy.json"
    cf.write_text(json.dumps({"port": 7000, "backends_file": str(bf), "max_body_bytes": 65536}))
    c = ProxyConfig.from_cli(["--config", str(cf), "--max-body-bytes", "4096"], env={"KVROUTE_PORT": "7100"})
    assert c.port == 7100 and c.max_body_bytes == 4096
    assert c.all_backends() == ["http://10.0.0.1:8000", "http://10.0.0.2:8000"]


def test_bad_values_exit_with_a_message(tmp_path, capsys):
    with pytest.raises(SystemExit):
        ProxyConfig.from_cli(["--port", "abc"], env={})
    with pytest.raises(SystemExit):
        ProxyConfig.from_cli([], env={"KVROUTE_PORT": "x"})
    cf = tmp_path / "c.json"
    cf.write_text(json.dumps({"nope": 1}))
    with pytest.raises(SystemExit):
        ProxyConfig.from_cli(["--config", str(cf)], env={})
    assert "unknown keys" in capsys.readouterr().err


def test_unknown_strategy_or_profile_is_rejected():
    with pytest.raises(SystemExit):
        ProxyConfig.from_cli(["--strategy", "fastest"], env={})
    with pytest.raises(ValueError):
        ProxyConfig(profile="h200")


@pytest.mark.parametrize("argv,env,line", [
    # each check names the one flag whose value is wrong (two checks used to share a message naming the first)
    (["--retry-backoff", "-1"], {}, "--retry-backoff: must be >= 0"),
    (["--max-model-len", "1"], {}, "--max-model-len: must be >= 2"),
    (["--breaker-cooldown", "-1"], {}, "--breaker-cooldown: must be >= 0"),
    (["--policy-param", "kv_aware.nope=1"], {}, "--policy-param 'kv_aware.nope=1': kv_aware has no tunable 'nope'"),
    # a value from the environment is named by its variable, and the message still names the flag
    ([], {"KVROUTE_UNHEALTHY_AFTER": "0"}, "KVROUTE_UNHEALTHY_AFTER='0': --unhealthy-after must be >= 1"),
])
def test_a_bad_value_names_its_own_flag(argv, env, line, capsys):
    with pytest.raises(SystemExit) as e:
        ProxyConfig.from_cli(argv, env=env)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith(f"python -m proxy: error: {line}"), err


def test_config_errors_carry_their_field():
    from kvblocks.cli import ConfigValueError

    with pytest.raises(ConfigValueError) as e:
        ProxyConfig(retry_backoff_max=-1)
    assert (e.value.field, e.value.message) == ("retry_backoff_max", "must be >= 0")
    assert isinstance(e.value, ValueError) and str(e.value) == "retry_backoff_max: must be >= 0"
