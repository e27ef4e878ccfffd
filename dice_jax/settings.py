"""Declaring a setting once: type, default, range and help on the dataclass field.

Every component's config (`TrainConfig`, `SamplingConfig`, `DiceDataConfig`, `EvalConfig`,
...) is a dataclass whose fields are made with `setting(...)`. The run config
(`dice_jax.config.RunConfig`) nests those same classes, so a value such as `train.beta`
travels from the command line to the math as one attribute of one object, checked once by
`check_settings` against what its field declares. The classes are mutable only so that the
command line's `--config.a.b=VALUE` overrides (ml_collections' config_flags sets attributes)
can be applied before validation; treat them as frozen afterwards (they hash by value).

A field's metadata may carry:

- `help`: one line for `--helpfull`, config dumps and errors;
- `choices`: the allowed values;
- `min` / `max` (inclusive) and `above` / `below` (exclusive) bounds for numbers;
- `managed`: the field is set by the run loop (per-round seeds, the progress switch) and
  is not a run-config key; the name of the key that drives it instead.
"""

import dataclasses
import difflib
from typing import Any

from dice_jax.errors import ConfigError

_MISSING = dataclasses.MISSING


def setting(default: Any = _MISSING, help: str = "", *, factory: Any = _MISSING,
            choices: tuple | None = None, min: float | None = None,
            max: float | None = None, above: float | None = None,
            below: float | None = None, managed: str | None = None,
            **metadata: Any) -> Any:
    """A dataclass field with its help text and its allowed values (see module doc)."""
    meta = {"help": help, "choices": choices, "min": min, "max": max, "above": above,
            "below": below, "managed": managed, **metadata}
    if factory is not _MISSING:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def section(cls: type) -> type:
    """Decorator: a settings dataclass (slots, so a misspelt attribute in a config file
    raises; hashable by value, so compiled programs can be cached on it)."""
    return dataclasses.dataclass(slots=True, unsafe_hash=True)(cls)


def _describe_range(meta: dict[str, Any]) -> str:
    lo = (f">= {meta['min']!r}" if meta["min"] is not None else
          f"> {meta['above']!r}" if meta["above"] is not None else None)
    hi = (f"<= {meta['max']!r}" if meta["max"] is not None else
          f"< {meta['below']!r}" if meta["below"] is not None else None)
    return " and ".join(b for b in (lo, hi) if b)


def _check_value(key: str, value: Any, meta: dict[str, Any]) -> None:
    if value is None:
        return
    if meta.get("choices") is not None and value not in meta["choices"]:
        raise ConfigError(f"config.{key}: {value!r} is not one of {tuple(meta['choices'])}")
    if isinstance(value, bool) or not isinstance(value, int | float):
        return
    bad = ((meta.get("min") is not None and value < meta["min"])
           or (meta.get("max") is not None and value > meta["max"])
           or (meta.get("above") is not None and value <= meta["above"])
           or (meta.get("below") is not None and value >= meta["below"]))
    if bad:
        raise ConfigError(f"config.{key}: {value!r} must be {_describe_range(meta)}")


def _check_type(key: str, value: Any, field: dataclasses.Field) -> Any:
    """The value coerced to the field's declared type where that is lossless (an int
    for a float field), or a ConfigError naming the key."""
    kinds = _declared_types(field.type)
    if kinds is None or (value is None and type(None) in kinds):
        return value
    if isinstance(value, bool):
        ok = bool in kinds
    elif isinstance(value, int) and float in kinds and int not in kinds:
        return float(value)
    else:
        ok = any(isinstance(value, k) for k in kinds if k is not bool)
    if not ok:
        names = " or ".join(k.__name__ for k in kinds)
        raise ConfigError(f"config.{key}: {value!r} is a {type(value).__name__}, expected "
                          f"{names}")
    return value


def _declared_types(annotation: Any) -> tuple[type, ...] | None:
    """`float` -> (float,), `int | None` -> (int, NoneType); None when not checkable."""
    import types
    import typing

    if isinstance(annotation, type):
        return None if dataclasses.is_dataclass(annotation) else (annotation,)
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        args = typing.get_args(annotation)
        return tuple(args) if all(isinstance(a, type) for a in args) else None
    origin = typing.get_origin(annotation)
    return (origin,) if isinstance(origin, type) else None


def check_settings(obj: Any, prefix: str = "") -> None:
    """Checks every field of a settings dataclass (recursively) against its declaration:
    type, choices and range; then the class's own cross-field `check()` if it has one.
    Raises ConfigError naming `config.PREFIX.FIELD`."""
    for field in dataclasses.fields(obj):
        key = f"{prefix}{field.name}"
        value = getattr(obj, field.name)
        if dataclasses.is_dataclass(value):
            check_settings(value, key + ".")
            continue
        coerced = _check_type(key, value, field)
        if coerced is not value:
            setattr(obj, field.name, coerced)
        _check_value(key, coerced, dict(field.metadata))
    check = getattr(obj, "check", None)
    if check is not None:
        check()


def check_managed(obj: Any, prefix: str = "") -> None:
    """Raises if a field the run loop sets (`managed`) was given a value in the config."""
    for field in dataclasses.fields(obj):
        value = getattr(obj, field.name)
        key = f"{prefix}{field.name}"
        if dataclasses.is_dataclass(value):
            check_managed(value, key + ".")
        elif field.metadata.get("managed") and value != _default(field):
            raise ConfigError(f"config.{key}: set by the run itself, not a config key; use "
                              f"{field.metadata['managed']}")


def _default(field: dataclasses.Field) -> Any:
    if field.default is not _MISSING:
        return field.default
    return field.default_factory()  # type: ignore[misc]


def describe_settings(obj: Any, prefix: str = "") -> list[tuple[str, Any, str]]:
    """`(key, value, help)` of every leaf setting, for `--helpfull` style listings."""
    rows = []
    for field in dataclasses.fields(obj):
        value = getattr(obj, field.name)
        if dataclasses.is_dataclass(value):
            rows += describe_settings(value, f"{prefix}{field.name}.")
        elif not field.metadata.get("managed"):
            rows.append((f"{prefix}{field.name}", value, field.metadata.get("help", "")))
    return rows


def unknown_key_error(obj: Any, key: str) -> ConfigError:
    """`--config.KEY: unknown key (did you mean ...?)` for a key `obj` does not have."""
    keys = [name for name, _, _ in describe_settings(obj)]
    close = difflib.get_close_matches(key, keys, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ConfigError(f"--config.{key}: unknown key{hint}")


def has_key(obj: Any, key: str) -> bool:
    """Whether dotted `key` names a field (leaf or section) of `obj`."""
    node = obj
    for part in key.split("."):
        if not dataclasses.is_dataclass(node) or part not in {
                f.name for f in dataclasses.fields(node)}:
            return False
        node = getattr(node, part)
    return True
