"""Hints for the URL mistakes everyone makes once: an OpenAI path without /v1, a base URL that already
ends in /v1 (so the SDK asks for /v1/v1/...), and a backend given by its OpenAI base URL instead of
its root. Said where the mistake shows (a 404, a backend's health error), not left to guesswork."""
from __future__ import annotations

# The routes a client reaches through an OpenAI SDK, by method.
OPENAI_ROUTES = {("POST", "/v1/completions"), ("POST", "/v1/chat/completions"), ("GET", "/v1/models")}


def not_found_message(method: str, path: str, host: str) -> str:
    """The 404's message: what was asked, and the fix when the path misses /v1 or doubles it."""
    base = f"http://{host}/v1"
    if path.startswith("/v1/v1/"):
        return (f"{method} {path}: not found; /v1 appears twice: a client's base URL already ends in /v1 "
                f"(base_url={base}), so the path is {path[3:]}")
    if (method, "/v1" + path) in OPENAI_ROUTES:
        return (f"{method} {path}: not found; the OpenAI routes are under /v1: {method} /v1{path} "
                f"(an SDK's base_url is {base})")
    return f"{method} {path}: not found"


def backend_url_hint(url: str) -> str:
    """' (the URL ends in /v1: ...)' for a backend given by its OpenAI base URL, else ''."""
    u = url.rstrip("/")
    if not u.endswith("/v1"):
        return ""
    return (f" (the backend URL ends in /v1: give the server's root, {u[:-3]}; the proxy itself asks for "
            "/health, /metrics and /v1/...)")
