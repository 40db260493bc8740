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
        bound.apply_defaults()
        values = {k: v for k, v in list(bound.arguments.items())[1:] if k not in self.ignore_for_config}
        extra = values.pop("kwargs", None) or {}
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

    def register_to_config(self, **values: Any) -> None:
        merged = dict(getattr(self, "_config", {}))
        merged.update(values)
        merged["_class_name"] = type(self).__name__
        object.__setattr__(self, "_config", FrozenConfig(merged))

    @property
    def config(self) -> FrozenConfig:
        return self._config

    @classmethod
    def init_keys(cls) -> set[str]:
        parameters = inspect.signature(cls.__init__).parameters
        return {k for k, p in parameters.items() if k != "self" and p.kind is not p.VAR_KEYWORD}

    @classmethod
    def from_config(cls, config: dict[str, Any] | None = None, **overrides: Any):
        """Build from any config dict (another class's too); `overrides` win. Unknown keys are kept, unused."""
        values = {**(config or {}), **overrides}
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
        data = {k: _jsonable(v) for k, v in self.config.items()}
        data["_class_name"] = type(self).__name__
        data["_diffusers_version"] = "0.42.1"
        data["_stablepipe_version"] = __version__
        path = folder / self.config_name
        path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
        return path
