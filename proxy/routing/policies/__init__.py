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
    """The registered strategy names, in registry order."""
    return list(POLICIES)


def policy_tunables() -> dict[str, dict[str, float]]:
    """Each policy's numeric class-level tunables with their defaults: what --policy-param may set."""
    out: dict[str, dict[str, float]] = {}
    for pol, cls in POLICIES.items():
        names = sorted(n for n in dir(cls) if not n.startswith("_") and _is_tunable(getattr(cls, n, None)))
        if names:
            out[pol] = {n: getattr(cls, n) for n in names}
    return out


def tunables_text(policy: str | None = None) -> str:
    """'kv_aware: amortize=1.0, decode_weight=0.5, ...; sglang: ...' (one policy's, or every policy's)."""
    table = policy_tunables()
    if policy is not None:
        table = {policy: table.get(policy, {})}
    return "; ".join(f"{pol}: {', '.join(f'{n}={v:g}' for n, v in names.items()) or 'none'}"
                     for pol, names in table.items())


def _is_tunable(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def parse_policy_params(items: list[str]) -> dict[str, dict[str, float]]:
    """`POLICY.NAME=VALUE` strings -> {policy: {name: value}}; only numeric class-level tunables. A
    mistake's message lists the tunables that exist, with their defaults."""
    out: dict[str, dict[str, float]] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        pol, dot, name = key.strip().partition(".")
        cls = POLICIES.get(pol)
        if not sep or not dot or cls is None:
            raise ValueError(f"--policy-param {item!r}: expected POLICY.NAME=NUMBER; tunables (default): "
                             f"{tunables_text()}")
        if name.startswith("_") or not _is_tunable(getattr(cls, name, None)):
            raise ValueError(f"--policy-param {item!r}: {pol} has no tunable {name!r}; its tunables "
                             f"(default): {tunables_text(pol)}")
        try:
            out.setdefault(pol, {})[name] = float(raw)
        except ValueError:
            raise ValueError(f"--policy-param {item!r}: {raw!r} is not a number") from None
    return out


def create_policies(env: RoutingEnv, params: list[str] | None = None) -> dict[str, Policy]:
    """One instance of every policy sharing `env` (policies keep private state, e.g. a rotation),
    with `params` (POLICY.NAME=VALUE) set on the instances."""
    policies = {name: cls(env) for name, cls in POLICIES.items()}
    for pol, values in parse_policy_params(params or []).items():
        for name, value in values.items():
            setattr(policies[pol], name, value)
    return policies


__all__ = ["parse_policy_params", "policy_tunables", "tunables_text", "DEFAULT_POLICY", "Decision", "POLICIES", "Policy", "RequestContext", "RoutingEnv", "create_policies", "policy_names"]
