"""Routing policies by name: adding one is a file with a `Policy` subclass plus a line here."""
from __future__ import annotations

from .base import Decision, Policy, RequestContext, RoutingEnv
from .kv_aware import KvAwarePolicy
from .least_loaded import LeastLoadedPolicy
from .least_work import LeastWorkPolicy
from .prefix import PrefixPolicy
from .random_choice import RandomPolicy
from .round_robin import RoundRobinPolicy
from .sglang import SGLangCacheAwarePolicy

POLICIES: dict[str, type[Policy]] = {
    cls.name: cls
    for cls in (
        KvAwarePolicy,
        PrefixPolicy,
        RoundRobinPolicy,
        LeastLoadedPolicy,
        LeastWorkPolicy,
        RandomPolicy,
        SGLangCacheAwarePolicy,
    )
}
DEFAULT_POLICY = KvAwarePolicy.name


def policy_names() -> list[str]:
    return list(POLICIES)


def parse_policy_params(items: list[str]) -> dict[str, dict[str, float]]:
    """`POLICY.NAME=VALUE` strings -> {policy: {name: value}}; only numeric class-level tunables."""
    out: dict[str, dict[str, float]] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        pol, dot, name = key.strip().partition(".")
        cls = POLICIES.get(pol)
        if not sep or not dot or cls is None or name.startswith("_") or \
                not isinstance(getattr(cls, name, None), (int, float)) or isinstance(getattr(cls, name), bool):
            raise ValueError(f"bad policy parameter {item!r}: expected POLICY.NAME=NUMBER with a numeric tunable of a "
                             f"known policy ({', '.join(POLICIES)})")
        try:
            out.setdefault(pol, {})[name] = float(raw)
        except ValueError:
            raise ValueError(f"bad policy parameter {item!r}: {raw!r} is not a number") from None
    return out


def create_policies(env: RoutingEnv, params: list[str] | None = None) -> dict[str, Policy]:
    """One instance of every policy sharing `env` (policies keep private state, e.g. a rotation),
    with `params` (POLICY.NAME=VALUE) set on the instances."""
    policies = {name: cls(env) for name, cls in POLICIES.items()}
    for pol, values in parse_policy_params(params or []).items():
        for name, value in values.items():
            setattr(policies[pol], name, value)
    return policies


__all__ = ["parse_policy_params", "DEFAULT_POLICY", "Decision", "POLICIES", "Policy", "RequestContext", "RoutingEnv", "create_policies", "policy_names"]
