"""The shared start-up loader: precedence, and every failure naming where the bad value came from."""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field

import pytest

from kvblocks.cli import UsageError, coerce, error_for, http_url, load_dataclass


@dataclass
class Settings:
    time_scale: float = 1.0
    backends: list[str] = field(default_factory=list)
    tokenizer: str = "cl100k_base"

    def __post_init__(self) -> None:
        if not self.time_scale > 0:
            raise ValueError("time_scale must be > 0")


def _load(ns: dict, env: dict, config: tuple[str, str] | None = None) -> Settings:
    kinds = {"time_scale": float, "backends": list, "tokenizer": str}
    return load_dataclass(Settings, argparse.Namespace(**ns), env, env_names=lambda f: [f"X_{f.name.upper()}"],
                          kind_of=lambda f: kinds[f.name], config_file=config, aliases={"backends": "backend"})


def test_precedence_defaults_file_env_flags(tmp_path):
    cf = tmp_path / "c.json"
    cf.write_text(json.dumps({"time_scale": 0.5, "tokenizer": "backend"}))
    s = _load({"time_scale": None, "backends": None, "tokenizer": None}, {"X_TIME_SCALE": "0.25"}, ("--config", str(cf)))
    assert (s.time_scale, s.tokenizer, s.backends) == (0.25, "backend", [])
    s = _load({"time_scale": 2.0, "backends": ["a"], "tokenizer": None}, {"X_TIME_SCALE": "0.25", "X_BACKENDS": "b,c"})
    assert (s.time_scale, s.backends) == (2.0, ["a"])


@pytest.mark.parametrize("ns,env,where,text", [
    ({"time_scale": -1.0}, {}, "--time-scale", "must be > 0"),
    ({}, {"X_TIME_SCALE": "-1"}, "X_TIME_SCALE='-1'", "--time-scale must be > 0"),
    ({}, {"X_TIME_SCALE": "abc"}, "X_TIME_SCALE='abc'", "expected a number"),
])
def test_a_bad_value_names_its_flag_or_variable(ns, env, where, text):
    with pytest.raises(UsageError) as e:
        _load({"time_scale": None, "backends": None, "tokenizer": None} | ns, env)
    assert e.value.where == where and text in e.value.message


def test_config_file_mistakes_name_the_file_and_key(tmp_path):
    unset = {"time_scale": None, "backends": None, "tokenizer": None}
    with pytest.raises(UsageError, match="no such file"):
        _load(unset, {}, ("--config", str(tmp_path / "missing.json")))
    cf = tmp_path / "c.json"
    cf.write_text('{"time_scale": "fast"}')
    with pytest.raises(UsageError) as e:
        _load(unset, {}, ("--config", str(cf)))
    assert e.value.where == f"--config {cf} key 'time_scale'"
    cf.write_text('{"colour": 1}')
    with pytest.raises(UsageError, match="unknown keys"):
        _load(unset, {}, ("--config", str(cf)))


def test_error_for_rewrites_identifiers_not_words():
    e = error_for(ValueError("tokenizer 'x': no such tokenizer folder"), ["tokenizer"], {})
    assert (e.where, e.message) == ("--tokenizer", "'x': no such tokenizer folder")
    e = error_for(ValueError("retries, retry_backoff must be >= 0"), ["retries", "retry_backoff"], {})
    assert e.message == "--retries, --retry-backoff must be >= 0" and e.where == "--retries"


def test_urls_and_booleans():
    assert http_url("--backend", "h:1/") == "http://h:1"
    for bad in ("ftp://x", "http://h:port", "http://"):
        with pytest.raises(UsageError):
            http_url("--backend", bad)
    assert coerce("V", "Yes", bool) is True and coerce("V", "off", bool) is False
    with pytest.raises(UsageError, match="boolean"):
        coerce("V", "maybe", bool)
