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


def create_policies(env: RoutingEnv) -> dict[str, Policy]:
    """One instance of every policy sharing `env` (policies keep private state, e.g. a rotation)."""
    return {name: cls(env) for name, cls in POLICIES.items()}


__all__ = ["DEFAULT_POLICY", "Decision", "POLICIES", "Policy", "RequestContext", "RoutingEnv", "create_policies", "policy_names"]
