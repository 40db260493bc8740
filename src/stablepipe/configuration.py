"""Configs shared by models and schedulers, in diffusers' `config.json` format.

A class declares its config by the keyword arguments of `__init__`, decorated with `@register_to_config`.
The resulting `.config` is a read-only dict with attribute access. Keys a class does not know are kept
(so a config round-trips through other classes) and ignored.
"""

from __future__ import annotations

import functools
import inspect
import json
import os
import warnings
from pathlib import Path
from typing import Any

from stablepipe import __version__


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
        """Read `config_name` from a folder, a subfolder, or a Hub repo."""
        from stablepipe.loading.files import fetch_file

        path = fetch_file(path_or_repo_id, cls.config_name, subfolder=subfolder, revision=revision, **hub_kwargs)
        try:
            return json.loads(Path(path).read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON ({err}); re-download or fix the file") from None

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
