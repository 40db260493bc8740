"""Configs shared by models and schedulers, in diffusers' `config.json` format.

A class declares its config by the keyword arguments of `__init__`, decorated with `@register_to_config`.
The resulting `.config` is a read-only dict with attribute access. Keys a class does not know are kept
(so a config round-trips through other classes) and ignored.
"""

from __future__ import annotations

import functools
import inspect
import json
import math
import numbers
import os
import re
import types
import typing
import warnings
from pathlib import Path
from typing import Any

from stablepipe.version import __version__


class FrozenConfig(dict):
    """A read-only dict whose keys are also attributes: `config.num_train_timesteps`."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"config has no key {name!r}") from None

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("configs are read-only; build a new object with from_config(config, key=value)")

    def _readonly(self, *args, **kwargs):
        raise TypeError("configs are read-only; build a new object with from_config(config, key=value)")

    __setitem__ = __delitem__ = update = pop = popitem = setdefault = clear = _readonly

    def __reduce__(self):  # copy.deepcopy and pickle rebuild it from a plain dict
        return (FrozenConfig, (dict(self),))


def register_to_config(init):
    """Decorate `__init__` so that every argument (given or defaulted) is recorded in `self.config`."""
    signature = inspect.signature(init)

    @functools.wraps(init)
    def wrapper(self, *args, **kwargs):
        bound = signature.bind(self, *args, **kwargs)
        given = set(bound.arguments)
        bound.apply_defaults()
        values = {k: v for k, v in list(bound.arguments.items())[1:] if k not in self.ignore_for_config}
        extra = values.pop("kwargs", None) or {}
        defaulted = sorted(k for k in values if k not in given)
        if defaulted:  # as diffusers: another class built from this config takes its own defaults for these
            extra["_use_default_values"] = defaulted
        self.register_to_config(**values, **extra)
        init(self, *args, **kwargs)

    return wrapper


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    if hasattr(value, "tolist"):  # numpy arrays, tensors
        return value.tolist()
    return value


class ConfigMixin:
    """Gives a class `config`, `from_config`, `load_config` and `save_config`."""

    config_name: str = "config.json"
    ignore_for_config: tuple[str, ...] = ()
    _deprecated_kwargs: tuple[str, ...] = ()  # old `__init__` names still taken through `**kwargs`

    def register_to_config(self, **values: Any) -> None:
        merged = dict(getattr(self, "_config", {}))
        merged.update(values)
        merged["_class_name"] = type(self).__name__
        object.__setattr__(self, "_config", FrozenConfig(merged))

    @property
    def config(self) -> FrozenConfig:
        return self._config

    def __getattr__(self, name: str) -> Any:
        """Config values read as attributes (`scheduler.beta_start`) work, with diffusers' FutureWarning."""
        config = self.__dict__.get("_config")
        if config is not None and name in config and not name.startswith("__"):
            warnings.warn(
                f"reading the config value {name!r} as an attribute of {type(self).__name__} is deprecated "
                f"(as in diffusers); read it from the config: `.config.{name}`",
                FutureWarning,
                stacklevel=2,
            )
            return config[name]
        raise AttributeError(f"'{type(self).__name__}' object has no attribute '{name}'")

    @classmethod
    def init_keys(cls) -> set[str]:
        parameters = inspect.signature(cls.__init__).parameters
        return {k for k, p in parameters.items() if k != "self" and p.kind is not p.VAR_KEYWORD}

    @classmethod
    def from_config(cls, config: dict[str, Any] | None = None, **overrides: Any):
        """Build from any config dict (another class's too); `overrides` win. Unknown keys are kept, unused."""
        config = dict(config or {})
        defaulted = set(config.pop("_use_default_values", ()))  # left to this class's own defaults
        values = {**{k: v for k, v in config.items() if k not in defaulted}, **overrides}
        known = cls.init_keys()
        init_args = {k: v for k, v in values.items() if k in known}
        check_config_values(cls, init_args, where=f"the config of {cls.__name__}")
        obj = cls(**init_args)
        hidden = {k: v for k, v in values.items() if k not in known and not k.startswith("_")}
        if hidden:
            obj.register_to_config(**hidden)
        return obj

    @classmethod
    def load_config(
        cls,
        path_or_repo_id: str | os.PathLike,
        *,
        subfolder: str | None = None,
        revision: str | None = None,
        **hub_kwargs: Any,
    ) -> dict[str, Any]:
        """Read `config_name` from a folder, a subfolder, or a Hub repo; values `cls` takes are checked."""
        from stablepipe.loading.files import fetch_file, read_json_object

        path = fetch_file(path_or_repo_id, cls.config_name, subfolder=subfolder, revision=revision, **hub_kwargs)
        config = read_json_object(path)
        check_config_values(cls, config, where=str(path))
        return config

    def save_config(self, folder: str | os.PathLike) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        data = {k: _jsonable(v) for k, v in self.config.items() if k != "_use_default_values"}
        data["_class_name"] = type(self).__name__
        data["_diffusers_version"] = "0.42.1"
        data["_stablepipe_version"] = __version__
        path = folder / self.config_name
        path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
        return path


# ---- checking values against `__init__`'s annotations ---------------------------------------------------------

# Keys that count or size something (in any config class): zero or less is a mistake, elementwise for lists.
POSITIVE_KEYS = re.compile(r"(_channels|_dim|_size|_heads|_groups|_kernel|_timesteps|_embeds|_order|_steps)$"
                           r"|^layers_per_block$")


@functools.cache
def init_annotations(cls: type) -> dict[str, Any]:
    """`cls.__init__`'s parameter annotations as types ({} where they cannot be resolved)."""
    try:
        return typing.get_type_hints(cls.__init__)
    except Exception:  # an annotation naming something not importable at run time: such classes go unchecked
        return {}


def check_config_values(cls: type, values: dict[str, Any], *, where: str) -> None:
    """Refuse a value that does not fit `cls.__init__`'s annotation (a string for an int, null for a list, NaN)
    or a count or size that is not positive, naming the key, the value and what is expected."""
    hints = init_annotations(cls)
    for key, value in values.items():
        hint = hints.get(key)
        if hint is None or key == "return":
            continue
        if not fits(value, hint):
            problem = f"expects {describe(hint)}"
        elif POSITIVE_KEYS.search(key) and not all(v > 0 for v in _integers(value)):
            problem = "expects a positive number here (it counts or sizes something)"
        else:
            continue
        raise ValueError(f"{where}: {key} is {_shown(value)}, but {cls.__name__} {problem}; fix the config")


def fits(value: Any, hint: Any) -> bool:
    """Whether a config value (as JSON gives it, or as code passes it) fits a type annotation."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(fits(value, arg) for arg in args)
    if hint is None or hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, numbers.Real) and not isinstance(value, bool) and not math.isnan(value)
    if hint is str:
        return isinstance(value, str)
    if hint in (tuple, list) or origin in (tuple, list):
        return isinstance(value, (tuple, list)) and _items_fit(value, args)
    if isinstance(hint, type) and hint is not typing.Any and origin is None:
        return isinstance(value, hint)
    return True  # Any, Callable, ...: not checked


def _items_fit(items: tuple | list, args: tuple) -> bool:
    if not args:
        return True
    if len(args) == 2 and args[1] is Ellipsis or len(args) == 1:
        return all(fits(item, args[0]) for item in items)
    return len(items) == len(args) and all(fits(item, arg) for item, arg in zip(items, args))


def describe(hint: Any) -> str:
    """An annotation in words: `int | tuple[int, ...]` -> "an integer or a list of integers"."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(describe(arg) for arg in args)
    words = {bool: "true or false", int: "an integer", float: "a number", str: "a string", type(None): "null"}
    if hint in words:
        return words[hint]
    plurals = {bool: "booleans", int: "integers", float: "numbers", str: "strings"}
    if origin in (tuple, list) and args and (len(args) == 1 or args[1] is Ellipsis):
        return f"a list of {plurals.get(args[0], describe(args[0]))}"
    if origin in (tuple, list) and args and len(set(args)) == 1 and args[0] in plurals:
        return f"a list of {len(args)} {plurals[args[0]]}"
    if origin in (tuple, list) and args:
        return f"a list of {len(args)} ({', '.join(describe(a) for a in args)})"
    return "a list" if hint in (tuple, list) or origin in (tuple, list) else getattr(hint, "__name__", str(hint))


def _integers(value: Any) -> list[Any]:
    """The numbers in a value (itself, or the items of a list, nested), for the positivity check."""
    if isinstance(value, (list, tuple)):
        return [n for item in value for n in _integers(item)]
    return [value] if isinstance(value, numbers.Real) and not isinstance(value, bool) else []


def _shown(value: Any) -> str:
    kind = {str: "a string", list: "a list", dict: "an object", type(None): "null"}.get(type(value))
    text = json.dumps(value) if kind else repr(value)
    return (text[:60] + "...") if len(text) > 60 else text + (f" ({kind})" if kind and value is not None else "")
