"""Start-up configuration shared by `python -m proxy|emulator|loadgen`: one loader, one way to fail.

A mistake a user can fix at start-up (a bad flag, env var, file or URL, a port in use) is one line
`PROG: error: WHERE: WHAT` on stderr and exit status 2 - never a traceback. WHERE names the flag or
the env var the bad value came from, so the user knows what to change. Settings are dataclasses;
`load_dataclass` applies the one precedence rule: defaults < `--config FILE.json` < env vars < flags.
"""
from __future__ import annotations

import argparse
import dataclasses
import errno
import json
import re
import socket
import sys
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlsplit

USAGE_EXIT = 2


class UsageError(Exception):
    """A start-up mistake: `where` is the flag or env var to change, `message` what is wrong with it."""

    def __init__(self, where: str, message: str) -> None:
        super().__init__(f"{where}: {message}" if where else message)
        self.where = where
        self.message = message


class ConfigValueError(ValueError):
    """A setting's value is wrong: `field` is the dataclass field, `message` what is wrong with it (the
    field not repeated). `load_dataclass` turns it into a UsageError naming the flag, env var or config
    key the value came from, with no need to find the field in the text."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def print_usage_error(prog: str, err: UsageError | str) -> None:
    print(f"{prog}: error: {err}", file=sys.stderr, flush=True)


@contextmanager
def exit_on_usage_error(prog: str) -> Iterator[None]:
    """Turn a UsageError into its one line and SystemExit(2)."""
    try:
        yield
    except UsageError as e:
        print_usage_error(prog, e)
        raise SystemExit(USAGE_EXIT) from None


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one line (argparse's own message names the flag) and exit 2."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        print_usage_error(self.prog, f"{message} (see {self.prog} --help)")
        raise SystemExit(USAGE_EXIT)


def check_listen(host: str, ports: list[int]) -> None:
    """Before starting anything: each port (0 = any) can be bound on `host`, or a UsageError naming the flag.

    A server started first would log its own start-up (health checks, emulators) before failing to bind."""
    for port in ports:
        try:
            infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        except socket.gaierror as e:
            raise UsageError("--host", f"{host!r}: cannot resolve ({e.strerror})") from None
        family, kind, proto, _, addr = infos[0]
        with socket.socket(family, kind, proto) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers bind
            try:
                s.bind(addr)
            except OSError as e:
                if e.errno == errno.EADDRINUSE:
                    raise UsageError("--port", f"{host}:{port} is already in use (another server? --port 0 picks a "
                                     "free one)") from None
                if e.errno == errno.EACCES:
                    raise UsageError("--port", f"{port}: permission denied (ports below 1024 need privileges)") from None
                raise UsageError("--host", f"cannot bind {host}:{port}: {e.strerror or e}") from None


def flag_of(field: str, aliases: Mapping[str, str] | None = None) -> str:
    """The CLI flag of a dataclass field (`time_scale` -> `--time-scale`)."""
    return "--" + (aliases or {}).get(field, field).replace("_", "-")


def with_default(help_text: str | None, default: Any, choices: Any = None) -> str:
    """A help text that always states the default and, when there are any, the choices."""
    parts = [help_text.rstrip(".")] if help_text else []
    if choices:
        parts.append("one of: " + ", ".join(map(str, choices)))
    if default is None or default == [] or default == "":
        parts.append("default: none")
    else:
        if isinstance(default, (list, tuple)):
            default = ",".join(map(str, default))
        parts.append(f"default: {default}")
    return "; ".join(parts).replace("%", "%%")


def coerce(where: str, raw: str, kind: type) -> Any:
    """An env var's text as `kind` (bool, int, float, str, list, dict), or a UsageError naming the variable."""
    text = raw.strip()
    if kind is bool:
        low = text.lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off", ""):
            return False
        raise UsageError(f"{where}={raw!r}", "expected a boolean (1/0, true/false, yes/no, on/off)")
    if kind is list:
        return [x.strip() for x in raw.split(",") if x.strip()]
    if kind is dict:
        try:
            value = json.loads(raw)
        except json.JSONDecodeError as e:
            raise UsageError(f"{where}={raw!r}", f"expected a JSON object ({e.msg})") from None
        if not isinstance(value, dict):
            raise UsageError(f"{where}={raw!r}", "expected a JSON object")
        return value
    if kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            raise UsageError(f"{where}={raw!r}", f"expected {'an integer' if kind is int else 'a number'}") from None
    return raw


def json_object(text: str) -> dict[str, Any]:
    """argparse `type=` for flags taking a JSON object."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not JSON ({e.msg}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


def read_json_object(where: str, path: str) -> dict[str, Any]:
    """A `--config FILE.json`: must exist and hold one JSON object."""
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except FileNotFoundError:
        raise UsageError(where, f"{path}: no such file") from None
    except OSError as e:
        raise UsageError(where, f"{path}: cannot read ({e.strerror})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UsageError(where, f"{path}: not JSON ({e})") from None
    if not isinstance(value, dict):
        raise UsageError(where, f"{path}: expected a JSON object")
    return value


def http_url(where: str, url: str) -> str:
    """An http(s) base URL without a trailing slash; a bare `host:port` gets `http://`."""
    url = url.strip()
    if "://" not in url:
        url = "http://" + url
    url = url.rstrip("/") if url.partition("://")[2].strip("/") else url
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise UsageError(where, f"{url!r}: expected an http:// or https:// URL")
    try:
        parts.port  # noqa: B018 - raises on a port that is not a number
    except ValueError:
        raise UsageError(where, f"{url!r}: the port is not a number") from None
    if not parts.hostname:
        raise UsageError(where, f"{url!r}: no host")
    return url


def error_for(e: Exception, field_names: list[str], sources: Mapping[str, str],
              aliases: Mapping[str, str] | None = None) -> UsageError:
    """A dataclass validation error as a UsageError naming where the bad value came from (its flag, or the
    env var / config key). A `ConfigValueError` says its field; for a plain ValueError field names in the
    text become flags and WHERE is the first one named."""
    if isinstance(e, ConfigValueError):
        flag = flag_of(e.field, aliases)
        where = sources.get(e.field) or flag
        return UsageError(where, e.message if where == flag else f"{flag} {e.message}")
    message = str(e)
    found = None
    for name in sorted(field_names, key=len, reverse=True):
        pattern = rf"(?<![\w-]){re.escape(name)}(?![\w-])"
        m = re.search(pattern, message)
        if m is None:
            continue
        if found is None or m.start() < found[1]:
            found = (name, m.start())
        # An identifier with an underscore is a field name wherever it appears; a plain word only where it
        # names the setting (first), so "tokenizer ... a tokenizer folder" keeps its second word.
        message = re.sub(pattern, flag_of(name, aliases), message, count=0 if "_" in name else 1)
    if found is None:
        return UsageError("", message)
    flag = flag_of(found[0], aliases)
    where = sources.get(found[0]) or flag
    if where == flag:
        for sep in (" ", ": "):
            if message.startswith(flag + sep):
                message = message[len(flag) + len(sep):]
                break
    return UsageError(where, message)


_JSON_TYPES: dict[type, tuple[type, ...]] = {
    bool: (bool,), int: (int,), float: (int, float), str: (str,), list: (list,), dict: (dict,),
}


def _check_json_type(where: str, value: Any, kind: type, default: Any) -> None:
    """A config-file value must have its setting's type (null only where the default is null)."""
    if value is None and default is None:
        return
    ok = isinstance(value, _JSON_TYPES.get(kind, (object,))) and not (kind in (int, float) and isinstance(value, bool))
    if not ok:
        name = {bool: "true or false", int: "an integer", float: "a number", str: "a string", list: "a list",
                dict: "a JSON object"}.get(kind, kind.__name__)
        raise UsageError(where, f"expected {name}, got {json.dumps(value)}")


def load_dataclass(
    cls: type,
    ns: argparse.Namespace,
    env: Mapping[str, str],
    *,
    env_names: Callable[[dataclasses.Field], list[str]],
    kind_of: Callable[[dataclasses.Field], type],
    config_file: tuple[str, str] | None = None,
    aliases: Mapping[str, str] | None = None,
    from_cli: Callable[[dataclasses.Field, Any], Any] = lambda f, v: v,
) -> Any:
    """Build `cls` from defaults < the JSON config file < env vars < flags (`ns`, None = unset).

    Every failure is a UsageError naming the flag, env var or file the bad value came from.
    `config_file` is (where, path) when one was given.
    """
    names = [f.name for f in dataclasses.fields(cls)]
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    if config_file:
        where, path = config_file
        loaded = read_json_object(where, path)
        unknown = sorted(set(loaded) - set(names))
        if unknown:
            raise UsageError(where, f"{path}: unknown keys {unknown}; known: {', '.join(names)}")
        by_name = {f.name: f for f in dataclasses.fields(cls)}
        for k, v in loaded.items():
            _check_json_type(f"{where} {path} key {k!r}", v, kind_of(by_name[k]), by_name[k].default)
        values.update(loaded)
        sources.update({k: f"{where} {path} key {k!r}" for k in loaded})
    for f in dataclasses.fields(cls):
        cli_value = getattr(ns, f.name, None)
        if cli_value is not None:
            values[f.name] = from_cli(f, cli_value)
            sources.pop(f.name, None)
            continue
        for env_name in env_names(f):
            if env_name in env:
                values[f.name] = coerce(env_name, env[env_name], kind_of(f))
                sources[f.name] = f"{env_name}={env[env_name]!r}"
                break
    try:
        return cls(**values)
    except (TypeError, ValueError) as e:
        raise error_for(e, names, sources, aliases) from None
