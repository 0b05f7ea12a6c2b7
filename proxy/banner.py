"""The proxy's start-up lines: what a user (and a script) reads to know where to point a client.

Shared by the launcher (`python -m proxy`) and the `--workers` supervisor, which prints them once for all
workers; kept apart from both so neither imports the other.
"""
from __future__ import annotations

WILDCARD_HOSTS = ("0.0.0.0", "::", "")


def announce(url: str, host: str) -> str:
    """The start-up line (scripts read the URL from it); a wildcard bind says so instead of hiding it."""
    if host in WILDCARD_HOSTS:
        return f"kvroute proxy listening on {url} (bound to {host or '*'}: every interface)"
    return f"kvroute proxy listening on {url}"


def how_to_use(url: str, access_log: bool) -> str:
    """The second start-up line: the base URL an OpenAI SDK needs (with /v1) and how to see requests."""
    seen = ("one access-log line per request (--access-log)" if access_log else
            "requests are not logged one by one: add --access-log to see each")
    return f"  OpenAI base URL for clients and SDKs: {url}/v1 (e.g. OpenAI(base_url=\"{url}/v1\")); {seen}"
