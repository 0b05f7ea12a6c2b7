"""One configuration: CLI flag > KVROUTE_LOADGEN_<FIELD> env var > default; bad combinations rejected."""
import pytest

from loadgen.__main__ import configs, parse_args
from loadgen.config import RunConfig


def test_env_sets_defaults_and_flags_override(monkeypatch):
    monkeypatch.setenv("KVROUTE_LOADGEN_REQUESTS", "17")
    monkeypatch.setenv("KVROUTE_LOADGEN_TIME_SCALE", "0.25")
    monkeypatch.setenv("KVROUTE_LOADGEN_PREFIX_LENGTHS", "0,32")
    cfg = configs(parse_args(["run", "--workload", "prefix-sweep", "--time-scale", "0.5"]))
    assert cfg.workload.requests == 17 and cfg.time_scale == 0.5
    assert cfg.workload.prefix_lengths == (0, 32)
    assert cfg.target == "http://127.0.0.1:8000/v1" and cfg.load_description == "fixed concurrency 1"


def test_compare_without_target_and_rate_description():
    cfg = configs(parse_args(["compare", "--rate", "3", "--requests", "5"]))
    assert cfg.target == "" and cfg.load_description.startswith("Poisson arrivals at 3 req/s")


def test_rate_and_concurrency_exclusive():
    with pytest.raises(SystemExit):
        parse_args(["run", "--rate", "1", "--concurrency", "2"])
    with pytest.raises(ValueError):
        RunConfig(rate=1, concurrency=2)
    with pytest.raises(ValueError):
        RunConfig(time_scale=0)
