"""Flower run-config overrides: TOML value quoting, app defaults, key checks.

``flwr run APP CONN --run-config "k1=v1 k2=v2"`` parses its argument with the
regex ``(\\S+?)=('[^']*'|"[^"]*"|\\S+)`` and then reads every ``k = v`` as TOML
(flwr/common/config.py ``parse_config_args``). So a value must be one TOML
token that the regex keeps whole:

- bool -> ``true``/``false``; int -> ``42``; float -> ``0.5``, ``1e-05``, ``inf``, ``nan``
  (always with a ``.``/exponent, so TOML reads a float back);
- str without ``"`` -> a TOML basic string ``"..."`` (backslashes and control
  characters escaped); str with ``"`` but no ``'`` or newline -> a TOML literal
  string ``'...'``; anything else cannot be said on the command line, and
  :func:`format_run_config` raises (``flwr run`` also accepts a ``.toml`` file
  path instead, which :func:`write_run_config_toml` writes).

Keys must be bare TOML keys (letters, digits, ``-``, ``_``; dots for nested
tables). Flower rejects a key that is not in ``[tool.flwr.app.config]`` only
once the ServerApp starts (the run then fails); :func:`check_run_config`
catches it before submitting, names the key, and casts ints to floats where
the app's default is a float (``strict_types=True`` also refuses type changes).
"""

from __future__ import annotations

import math
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pilot.errors import ConfigError

RunConfigValue = bool | int | float | str

_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$")
_TOML_BASIC_ESCAPES = {"\\": "\\\\", '"': '\\"', "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}


def toml_value(value: RunConfigValue, *, key: str = "?") -> str:
    """One run-config value as a TOML token that survives ``flwr run --run-config``."""
    if isinstance(value, bool):  # before int: bool is an int
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        text = repr(value)
        return text if any(c in text for c in ".eE") else text + ".0"
    if isinstance(value, str):
        if '"' not in value:
            out = []
            for ch in value:
                if ch in _TOML_BASIC_ESCAPES:
                    out.append(_TOML_BASIC_ESCAPES[ch])
                elif ord(ch) < 0x20 or ord(ch) == 0x7F:
                    out.append(f"\\u{ord(ch):04x}")
                else:
                    out.append(ch)
            return '"' + "".join(out) + '"'
        if "'" not in value and not any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in value):
            return "'" + value + "'"
        raise ConfigError(
            f"run-config {key!r}: a string holding both ' and \" (or control characters "
            "with a \") cannot be passed with --run-config; pass a TOML file instead"
        )
    raise ConfigError(f"run-config {key!r}: {type(value).__name__} is not bool, int, float or str")


def _check_key(key: str) -> None:
    if not isinstance(key, str) or not _BARE_KEY.match(key):
        raise ConfigError(f"run-config key {key!r} is not a bare TOML key (letters, digits, '-', '_', '.')")


def format_run_config(values: Mapping[str, RunConfigValue]) -> str:
    """The ``--run-config`` argument for ``values``: ``'k1=v1 k2="s"'`` (keys sorted)."""
    parts = []
    for key in sorted(values):
        _check_key(key)
        parts.append(f"{key}={toml_value(values[key], key=key)}")
    return " ".join(parts)


def write_run_config_toml(values: Mapping[str, RunConfigValue], path: Path) -> Path:
    """Write ``values`` as a flat TOML file (``flwr run --run-config PATH.toml`` reads it)."""
    lines = []
    for key in sorted(values):
        _check_key(key)
        value = values[key]
        if isinstance(value, str) and '"' in value:
            # basic string with escapes: a file is not squeezed through the CLI regex
            token = '"' + "".join(_TOML_BASIC_ESCAPES.get(c, c) for c in value) + '"'
        else:
            token = toml_value(value, key=key)
        # dotted keys mean nested tables in TOML, which flwr flattens back to "a.b"
        lines.append(f"{key} = {token}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def load_app_config(app_dir: Path) -> dict[str, Any]:
    """The app's ``pyproject.toml`` as a dict (raises ConfigError when absent/invalid)."""
    path = Path(app_dir) / "pyproject.toml"
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError as err:
        raise ConfigError(f"no Flower app at {app_dir}: {path} is missing") from err
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path} is not valid TOML: {err}") from err


def _flatten(table: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in table.items():
        full = f"{prefix}.{key}" if prefix else key
        if isinstance(value, Mapping):
            flat.update(_flatten(value, full))
        else:
            flat[full] = value
    return flat


def app_run_config_defaults(app_dir: Path) -> dict[str, RunConfigValue]:
    """``[tool.flwr.app.config]`` of the app, flattened to dotted keys (as Flower does)."""
    config = load_app_config(app_dir)
    table = config.get("tool", {}).get("flwr", {}).get("app", {}).get("config", {})
    return _flatten(table)


def check_run_config(
    values: Mapping[str, RunConfigValue],
    defaults: Mapping[str, RunConfigValue],
    *,
    strict_types: bool = False,
) -> dict[str, RunConfigValue]:
    """``values`` checked against the app's defaults: every key must be known.

    An int where the default is a float becomes a float. Other type changes
    pass (Flower allows them, and a key such as ``outer-lr`` may be ``"auto"``
    or a float; the app's own typed config validates values) unless
    ``strict_types``, which raises :class:`ConfigError` naming the key.
    """
    checked: dict[str, RunConfigValue] = {}
    for key, value in values.items():
        _check_key(key)
        if key not in defaults:
            known = ", ".join(sorted(defaults)) or "none"
            raise ConfigError(f"run-config key {key!r} is not in [tool.flwr.app.config] (known: {known})")
        if not isinstance(value, (bool, int, float, str)):
            raise ConfigError(f"run-config {key!r}: {type(value).__name__} is not bool, int, float or str")
        default = defaults[key]
        if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        elif strict_types and type(value) is not type(default):
            raise ConfigError(
                f"run-config {key!r}: expected {type(default).__name__} like the app default "
                f"{default!r}, got {type(value).__name__} {value!r}"
            )
        checked[key] = value
    return checked
