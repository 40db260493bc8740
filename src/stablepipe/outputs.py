"""`BaseOutput`: the results of models, schedulers and pipelines, both a dataclass and an ordered dict.

As diffusers' outputs: `out.sample`, `out["sample"]`, `out[0]`, `out.to_tuple()`, `out.keys()`, `out.values()`
work; iterating gives the keys, as with any dict. The dict holds only the fields that are not None, so
`out[0]` is the first field set.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from typing import Any


class BaseOutput(OrderedDict):
    """Base of every output dataclass. Subclasses are declared with `@dataclasses.dataclass`."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is not None:
                OrderedDict.__setitem__(self, f.name, value)

    def __getitem__(self, key: int | slice | str) -> Any:
        if isinstance(key, str):
            return OrderedDict.__getitem__(self, key)
        return self.to_tuple()[key]

    def __setitem__(self, key: str, value: Any) -> None:
        OrderedDict.__setitem__(self, key, value)
        object.__setattr__(self, key, value)

    def __setattr__(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)
        if name in self.keys() or (value is not None and name in self._field_names()):
            OrderedDict.__setitem__(self, name, value)

    def __delitem__(self, key: str) -> None:
        raise TypeError(f"cannot delete {key!r} from a {type(self).__name__}; set it to a new value instead")

    def _readonly(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError(f"{type(self).__name__} fields are set by attribute or item, one at a time")

    pop = popitem = setdefault = update = _readonly

    def to_tuple(self) -> tuple[Any, ...]:
        """The fields that are not None, in declaration order."""
        return tuple(OrderedDict.__getitem__(self, k) for k in self.keys())

    def _field_names(self) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(self)) if dataclasses.is_dataclass(self) else ()

    def __reduce__(self):  # pickle and copy.deepcopy rebuild it from its fields
        return (type(self), tuple(getattr(self, name) for name in self._field_names()))
