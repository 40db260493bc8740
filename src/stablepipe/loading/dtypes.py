"""The `torch_dtype=` / `dtype=` argument of the loaders: a torch dtype, or its name as a string."""

from __future__ import annotations

from typing import Any

import torch

# Names people write for the dtypes weights are loaded in ("float16" as transformers accepts it, "fp16" as in
# variant names, "torch.float16" as printed).
DTYPE_NAMES = {
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "float64": torch.float64, "fp64": torch.float64, "double": torch.float64,
}


def resolve_dtypes(torch_dtype: Any = None, dtype: Any = None) -> torch.dtype | dict[str, torch.dtype] | None:
    """`resolve_dtype`, or for a pipeline a dict {component name: dtype, "default": dtype} as diffusers takes it
    (components it does not name get "default", or load as stored without one)."""
    value = torch_dtype if torch_dtype is not None else dtype
    if isinstance(value, dict):
        return {name: resolve_dtype(v) for name, v in value.items()}
    return resolve_dtype(torch_dtype, dtype)


def dtype_for(torch_dtype: torch.dtype | dict[str, torch.dtype] | None, component: str) -> torch.dtype | None:
    """The dtype a pipeline component loads in, from `resolve_dtypes`' result."""
    if isinstance(torch_dtype, dict):
        return torch_dtype.get(component, torch_dtype.get("default"))
    return torch_dtype


def resolve_dtype(torch_dtype: Any = None, dtype: Any = None) -> torch.dtype | None:
    """The floating-point dtype asked for by `torch_dtype` or its newer name `dtype` (diffusers 0.42 accepts both).

    A name ("float16", "bf16", "torch.float16") is taken as that dtype. diffusers 0.42.1 loads float32 for a string
    and only logs a warning; stablepipe gives what was meant, and refuses what is not a floating-point dtype."""
    if torch_dtype is not None and dtype is not None and torch_dtype != dtype:
        raise ValueError(f"got torch_dtype={torch_dtype!r} and dtype={dtype!r}; pass one of them")
    value = torch_dtype if torch_dtype is not None else dtype
    if value is None or isinstance(value, torch.dtype) and value.is_floating_point:
        return value
    if isinstance(value, str) and value.strip().lower().removeprefix("torch.") in DTYPE_NAMES:
        return DTYPE_NAMES[value.strip().lower().removeprefix("torch.")]
    raise TypeError(
        f"torch_dtype must be a floating-point torch dtype such as torch.float16, torch.bfloat16 or torch.float32 "
        f"(or its name, 'float16'), not {value!r}; pass torch.float16. (diffusers would load float32 here and only "
        "log a warning; stablepipe refuses, so that a typo does not silently cost memory and speed)"
    )
