"""Settings from flags, environment, a TOML file and defaults — in that order of precedence.

Each setting is declared once, as a field of a config dataclass with :func:`option` (its default, help,
and how to parse it). From that one declaration come the ``--flag``, the ``PRINTRELAY_FLAG`` environment
variable that containers and Helm use, the key in the ``--config`` TOML file, and the default shown by
``--help``. Unknown keys and unparsable values are errors that name the setting and its source.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import tomllib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

ENV_PREFIX = "PRINTRELAY_"
MAX_CONFIG_BYTES = 1024 * 1024

C = TypeVar("C")


class SettingsError(Exception):
    """A setting could not be used; the message names it and where it came from."""


def option(
    default: Any,
    help: str,
    *,
    parse: Callable[[str], Any] | None = None,
    multiple: bool = False,
    metavar: str | None = None,
    secret: bool = False,
) -> Any:
    meta = {"help": help, "parse": parse, "multiple": multiple, "metavar": metavar, "secret": secret}
    if multiple:
        return dataclasses.field(default_factory=lambda: list(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


_SIZE_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1024, "m": 1000**2, "mb": 1000**2,
               "mib": 1024**2, "g": 1000**3, "gb": 1000**3, "gib": 1024**3}  # fmt: skip
_DURATION_UNITS = {"": 1.0, "ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_size(text: str) -> int:
    """``1048576``, ``64KiB``, ``1 GiB``, ``20MB``."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(text))
    if not match or match.group(2).lower() not in _SIZE_UNITS:
        raise ValueError(f"not a size: {text!r} (use bytes or a unit like 64KiB, 20MiB, 1GiB)")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2).lower()])


def parse_duration(text: str) -> float:
    """``30``, ``500ms``, ``15s``, ``10m``, ``14d``."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*", str(text))
    if not match or match.group(2) not in _DURATION_UNITS:
        raise ValueError(f"not a duration: {text!r} (use seconds or a unit like 500ms, 15s, 10m, 14d)")
    return float(match.group(1)) * _DURATION_UNITS[match.group(2)]


def parse_hostport(text: str) -> tuple[str, int]:
    """``127.0.0.1:8080``, ``[::1]:8080``, ``:8080`` (all interfaces)."""
    match = re.fullmatch(r"\[([^\]]+)\]:(\d+)|([^:\[\]]*):(\d+)", text.strip())
    if not match:
        raise ValueError(f"not HOST:PORT: {text!r}")
    host = match.group(1) or match.group(3) or ""
    port = int(match.group(2) or match.group(4))
    if not 0 <= port <= 65535:
        raise ValueError(f"port out of range in {text!r}")
    return host, port


def parse_bool(text: str) -> bool:
    lowered = str(text).strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off", ""}:
        return False
    raise ValueError(f"not a boolean: {text!r}")


def flag_name(field: dataclasses.Field[Any]) -> str:
    return "--" + field.name.replace("_", "-")


def env_name(field: dataclasses.Field[Any]) -> str:
    return ENV_PREFIX + field.name.upper()


def _fields(cls: type[Any]) -> Sequence[dataclasses.Field[Any]]:
    return [f for f in dataclasses.fields(cls) if "help" in f.metadata]


def add_arguments(parser: argparse.ArgumentParser, cls: type[Any]) -> None:
    """One flag per setting; defaults are left out of the namespace so we can tell what was given."""
    parser.add_argument("--config", metavar="FILE", help="TOML file with settings (keys as the flags, "
                        "without --; env PRINTRELAY_CONFIG)", default=argparse.SUPPRESS)  # fmt: skip
    for field in _fields(cls):
        meta = field.metadata
        default = field.default_factory() if meta["multiple"] else field.default  # type: ignore[operator]
        # Defaults as one would type them (1GiB, 14d, 127.0.0.1:8080); a secret's default is not shown.
        shown = (
            f" (env {env_name(field)})"
            if meta["secret"]
            else f" (default: {_show(default, meta['parse'])}; env {env_name(field)})"
        )
        kwargs: dict[str, Any] = {"help": meta["help"] + shown, "default": argparse.SUPPRESS}
        if isinstance(default, bool) and meta["parse"] is None:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["metavar"] = meta["metavar"] or field.name.upper()
            if meta["multiple"]:
                kwargs["action"] = "append"
        parser.add_argument(flag_name(field), dest=field.name, **kwargs)


def format_size(size: int) -> str:
    """``1GiB`` for 1073741824: the largest binary unit that divides it, as parse_size reads it back."""
    for unit, factor in (("TiB", 1024**4), ("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if size and size % factor == 0:
            return f"{size // factor}{unit}"
    return str(size)


def format_duration(seconds: float) -> str:
    """``14d`` for 1209600, ``500ms`` for 0.5: the largest unit that divides it (parse_duration reads it)."""
    for unit, factor in (("d", 86400.0), ("h", 3600.0), ("m", 60.0), ("s", 1.0)):
        if seconds and seconds % factor == 0:
            return f"{int(seconds // factor)}{unit}"
    millis = seconds * 1000
    return f"{int(millis)}ms" if millis == int(millis) else f"{seconds:g}s"


def _show(value: Any, parse: Callable[[str], Any] | None = None) -> str:
    if isinstance(value, list):
        return " ".join(_show(v, parse) for v in value) or "none"
    if value is None or value == "":
        return "none"
    if parse is parse_size and isinstance(value, int):
        return format_size(value)
    if parse is parse_duration and isinstance(value, int | float):
        return format_duration(float(value))
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[1], int):  # HOST:PORT
        host = f"[{value[0]}]" if ":" in str(value[0]) else value[0]
        return f"{host}:{value[1]}"
    return str(value)


def load(cls: type[C], args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> C:
    """Build ``cls`` from flags > environment > config file > defaults."""
    environ = os.environ if environ is None else environ
    given = vars(args)
    config_path = given.get("config") or environ.get(ENV_PREFIX + "CONFIG")
    file_values = read_config_file(Path(config_path), cls) if config_path else {}
    values: dict[str, Any] = {}
    for field in _fields(cls):
        if field.name in given:
            raw, source = given[field.name], flag_name(field)
        elif env_name(field) in environ:
            raw, source = environ[env_name(field)], env_name(field)
            if field.metadata["multiple"]:
                raw = [part for part in re.split(r"[,\n]\s*", raw) if part.strip()]
        elif field.name in file_values:
            raw, source = file_values[field.name], f"{config_path}: {field.name}"
        else:
            continue
        values[field.name] = _convert(field, raw, source)
    try:
        return cls(**values)
    except ValueError as exc:
        raise SettingsError(str(exc)) from exc


def _convert(field: dataclasses.Field[Any], raw: Any, source: str) -> Any:
    meta = field.metadata
    if meta["multiple"]:
        items = raw if isinstance(raw, list) else [raw]
        return [_convert_one(field, item, source) for item in items]
    return _convert_one(field, raw, source)


def _convert_one(field: dataclasses.Field[Any], raw: Any, source: str) -> Any:
    parse = field.metadata["parse"]
    default = field.default if not field.metadata["multiple"] else None
    try:
        if parse is not None:
            return parse(raw) if isinstance(raw, str) else parse(str(raw))
        if isinstance(default, bool):
            return raw if isinstance(raw, bool) else parse_bool(raw)
        if isinstance(default, int):
            return int(raw)
        if isinstance(default, float):
            return float(raw)
        return str(raw) if raw is not None else None
    except (ValueError, TypeError) as exc:
        raise SettingsError(f"{source}: {exc}") from exc


def read_config_file(path: Path, cls: type[Any]) -> dict[str, Any]:
    try:
        size = path.stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise SettingsError(
                f"{path}: {size} bytes exceeds the {MAX_CONFIG_BYTES} byte limit for config files"
            )
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise SettingsError(f"cannot read config file {path}: {exc.strerror or exc}") from exc
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise SettingsError(f"{path}: not valid TOML: {exc}") from exc
    known = {f.name for f in _fields(cls)}
    values: dict[str, Any] = {}
    for key, value in data.items():
        name = key.replace("-", "_")
        if name not in known:
            raise SettingsError(f"{path}: unknown setting {key!r} (known: {', '.join(sorted(known))})")
        values[name] = value
    return values
