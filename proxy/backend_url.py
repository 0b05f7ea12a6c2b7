"""What a backend URL may be: scheme + host + port, and an optional plain path prefix. Nothing else.

A backend URL is shown in the `x-kvroute-backend` header, in metric labels, in `/admin/backends` and
in log lines, and the proxy sends requests to `<url>/health`, `/metrics`, `/v1/models` on its own.
So it may carry no credentials (userinfo: use `--backend-api-key` or a backends-file `api_key`), no
query or fragment (they would be glued into every request path), and a path prefix only of plain
segments (letters, digits, `-._~`; no `.`/`..`, no empty segment, no percent-escapes), for a backend
served under a prefix behind an ingress (`http://gw:80/vllm-a` -> `POST /vllm-a/v1/completions`).
"""
from __future__ import annotations

import ipaddress
import re

_SEGMENT = re.compile(r"[A-Za-z0-9._~-]+\Z")
_HOST_NAME = re.compile(r"(?=.{1,253}\Z)([A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?)(\.[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?)*\.?\Z")
MAX_URL = 2048


class BadBackendURL(ValueError):
    """The message never repeats what it rejected verbatim when that could hold a secret."""


def check_backend_url(url: object) -> str:
    """`url` as `scheme://host[:port][/prefix]` (lower-case scheme and host, no trailing slash);
    a bare `host:port` gets `http://`. Anything else raises `BadBackendURL` saying what to change."""
    if not isinstance(url, str):
        raise BadBackendURL("a backend URL must be a string")
    url = url.strip()
    if not url:
        raise BadBackendURL("a backend URL must not be empty")
    if len(url) > MAX_URL:
        raise BadBackendURL(f"a backend URL must be at most {MAX_URL} characters")
    if any(ord(c) < 0x21 or ord(c) > 0x7E for c in url):
        raise BadBackendURL("a backend URL must be printable ASCII without spaces")
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "http", url
    scheme = scheme.lower()
    authority, slash, path = rest.partition("/")
    if scheme not in ("http", "https"):
        shown = url if "@" not in authority else f"{scheme}://***@{authority.rsplit('@', 1)[1]}"
        raise BadBackendURL(f"{shown!r}: {scheme!r} is not a backend scheme: expected an http:// or https:// URL")
    if "@" in authority:
        # Never echo it: the part before @ is a password more often than not.
        host_part = authority.rsplit("@", 1)[1]
        raise BadBackendURL(
            f"{scheme}://***@{host_part}: credentials in a backend URL are refused (they would show in headers, "
            "metrics, admin answers and logs); pass the key with --backend-api-key or a backends-file api_key")
    if "?" in url or "#" in url:
        cut = min(i for i in (url.find("?"), url.find("#")) if i >= 0)
        raise BadBackendURL(f"{url[:cut]}: a backend URL takes no query or fragment (only scheme, host, port and a path prefix)")
    host, port = _split_host_port(authority)
    prefix = ""
    if slash and path.strip("/"):
        segments = path.rstrip("/").split("/")
        for s in segments:
            if not _SEGMENT.match(s) or s in (".", ".."):
                raise BadBackendURL(
                    f"{scheme}://{authority}/{path}: a backend path prefix is plain segments of letters, digits and "
                    "-._~ (no empty, '.' or '..' segment, no %-escapes)")
        prefix = "/" + "/".join(segments)
    netloc = host if port is None else f"{host}:{port}"
    return f"{scheme}://{netloc}{prefix}"


def _split_host_port(authority: str) -> tuple[str, int | None]:
    if authority.startswith("["):
        end = authority.find("]")
        if end < 0:
            raise BadBackendURL(f"{authority}: unclosed '[' in an IPv6 address")
        literal, after = authority[1:end], authority[end + 1:]
        try:
            ipaddress.IPv6Address(literal)
        except ValueError:
            raise BadBackendURL(f"{authority}: not an IPv6 address") from None
        host = f"[{literal.lower()}]"
        if after and not after.startswith(":"):
            raise BadBackendURL(f"{authority}: unexpected text after the IPv6 address")
        port_text = after[1:] if after else None
    else:
        host, colon, port_text = authority.partition(":")
        if not colon:
            port_text = None
        host = host.lower()
        if not host:
            raise BadBackendURL(f"{authority or '(empty)'}: no host")
        if not _HOST_NAME.match(host):
            raise BadBackendURL(f"{host}: not a host name or IPv4 address")
    port = None
    if port_text is not None:
        if not (port_text.isdigit() and len(port_text) <= 5) or not 1 <= int(port_text) <= 65535:
            raise BadBackendURL(f"{authority}: the port must be a number within 1..65535")
        port = int(port_text)
    return host, port
