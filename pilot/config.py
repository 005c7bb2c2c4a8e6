"""Typed configuration, validated once, with errors that name the bad key.

Pilot's knobs arrive from three places: Flower run-config (kebab-case keys,
``--run-config "round-seconds=60 outer='diloco'"``), CLI flags, and environment
variables (``PILOT_<KEY>``). Each concern declares one pydantic model deriving
from :class:`PilotSettings`; :func:`parse_config` builds it once from a mapping
and turns every validation problem into a :class:`~pilot.errors.ConfigError`
that names the key (as the user spelled it, kebab-case) and the allowed values.

Keys may be written kebab-case (``batch-size``) or snake_case (``batch_size``);
unknown keys are refused with the closest known key suggested.
"""

from __future__ import annotations

import difflib
import os
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from pilot.errors import ConfigError

ENV_PREFIX = "PILOT_"


def kebab(name: str) -> str:
    return name.replace("_", "-")


def snake(name: str) -> str:
    return name.strip().replace("-", "_")


class PilotSettings(BaseModel):
    """Base for every Pilot config: frozen, strict about unknown keys."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)

    def as_run_config(self) -> dict[str, Any]:
        """The config as kebab-case keys with plain values (for logs, metadata)."""
        return {kebab(k): (str(v) if isinstance(v, os.PathLike) else v) for k, v in self.model_dump().items()}


Settings = TypeVar("Settings", bound=PilotSettings)


def _allowed_values(model: type[PilotSettings], field: str) -> str | None:
    info = model.model_fields.get(field)
    if info is None:
        return None
    annotation = info.annotation
    for candidate in (annotation, *typing.get_args(annotation)):
        if typing.get_origin(candidate) is typing.Literal:
            return ", ".join(repr(a) for a in typing.get_args(candidate))
    return None


def _describe(error: Mapping[str, Any], model: type[PilotSettings], source: str) -> str:
    loc = error.get("loc") or ()
    if not loc:  # a check across several keys: its message names them
        return f"{source}: {str(error.get('msg', 'invalid')).removeprefix('Value error, ')}"
    field = str(loc[0])
    message = f"{source}: bad value for '{kebab(field)}'"
    if "input" in error and error.get("type") != "missing":
        message += f" ({error['input']!r})"
    message += f": {error.get('msg', 'invalid')}"
    if error.get("type") == "missing":
        message = f"{source}: missing required key '{kebab(field)}'"
    allowed = _allowed_values(model, field)
    if allowed and error.get("type") != "missing":
        message += f"; allowed values: {allowed}"
    return message


def parse_config(model: type[Settings], values: Mapping[str, Any], *, source: str = "config") -> Settings:
    """Build ``model`` from ``values`` (kebab or snake keys), or raise ConfigError.

    ``source`` names where the values came from (``run-config``, ``pilot train``)
    so the message tells the user which knob to fix.
    """
    known = set(model.model_fields)
    normalised: dict[str, Any] = {}
    for raw_key, value in values.items():
        key = snake(str(raw_key))
        if key not in known:
            hint = difflib.get_close_matches(key, known, n=1)
            suggestion = f" Did you mean '{kebab(hint[0])}'?" if hint else ""
            valid = ", ".join(sorted(kebab(k) for k in known))
            raise ConfigError(f"{source}: unknown key '{raw_key}'.{suggestion} Known keys: {valid}")
        normalised[key] = value
    try:
        return model.model_validate(normalised)
    except ValidationError as exc:
        errors = exc.errors()
        raise ConfigError("; ".join(_describe(e, model, source) for e in errors)) from None


def env_overrides(model: type[PilotSettings], environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """Values for ``model``'s fields found in ``PILOT_<FIELD>`` environment variables."""
    environ = os.environ if environ is None else environ
    found: dict[str, str] = {}
    for field in model.model_fields:
        value = environ.get(ENV_PREFIX + field.upper())
        if value is not None:
            found[field] = value
    return found


def build_config(
    model: type[Settings],
    *layers: Mapping[str, Any] | None,
    source: str = "config",
    use_env: bool = True,
) -> Settings:
    """Merge layers left to right (later wins) over env defaults, then validate once.

    Typical order: ``build_config(TrainConfig, run_config, cli_flags)``. Flags
    whose value is ``None`` (not given on the command line) do not override.
    """
    merged: dict[str, Any] = dict(env_overrides(model)) if use_env else {}
    for layer in layers:
        if not layer:
            continue
        for key, value in layer.items():
            if value is not None:
                merged.pop(snake(str(key)), None)  # one spelling per key: the later layer's
                merged[str(key)] = value
    return parse_config(model, merged, source=source)
