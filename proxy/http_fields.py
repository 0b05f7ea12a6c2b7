"""HTTP field syntax for the headers the proxy writes, to clients and to backends.

A value the proxy relays (a backend's Content-Type) or builds from configuration (a backend URL)
must never split a header line: names are RFC 9110 tokens, values carry no CR, LF or NUL. The
check runs on every header written; names are remembered once validated (they are few and fixed).
"""
from __future__ import annotations

import re
from http import HTTPStatus

_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_UNSAFE_VALUE = re.compile(r"[\x00\r\n]")
_GOOD_NAMES: set[str] = set()


class UnsafeField(ValueError):
    """A header name or value that would change the message's framing if written."""


def check_value(value: str) -> str:
    if _UNSAFE_VALUE.search(value) is not None:
        raise UnsafeField(f"header value with CR, LF or NUL: {value[:80]!r}")
    return value


def check_name(name: str) -> str:
    if name not in _GOOD_NAMES:
        if _TOKEN.fullmatch(name.encode("latin-1", "replace")) is None:
            raise UnsafeField(f"header name is not a token: {name[:80]!r}")
        if len(_GOOD_NAMES) < 1024:
            _GOOD_NAMES.add(name)
    return name


def header_lines(headers: dict[str, str]) -> bytes:
    """`Name: value\r\n` for each header, every name and value checked (`UnsafeField` otherwise).

    One pass over the joined lines: exactly one CR and one LF per line, no NUL (names seen before skip
    the token check)."""
    if not headers:
        return b""
    if not _GOOD_NAMES.issuperset(headers):
        for k in headers:
            check_name(k)
    text = "".join([f"{k}: {v}\r\n" for k, v in headers.items()])
    n = len(headers)
    if text.count("\r") != n or text.count("\n") != n or "\x00" in text:
        for v in headers.values():
            check_value(v)
    return text.encode("latin-1", "replace")


# aiohttp's default limit on header lines; beyond it: 431 (the front door and its hand-over guard alike).
MAX_HEADERS = 128
_STATUS_LINES: dict[int, bytes] = {}


def status_line(status: int) -> bytes:
    """`HTTP/1.1 <status> <phrase>\r\n`, built once per status."""
    line = _STATUS_LINES.get(status)
    if line is None:
        try:
            phrase = HTTPStatus(status).phrase
        except ValueError:
            phrase = ""
        line = _STATUS_LINES[status] = f"HTTP/1.1 {status} {phrase}\r\n".encode("latin-1")
    return line
