"""Scaled dot-product attention: the compiled CPU kernel where it applies, PyTorch's everywhere else.

`scaled_dot_product_attention(q, k, v)` takes the arguments of `torch.nn.functional.scaled_dot_product_attention`
and gives its result. It runs stablepipe's kernel (`csrc/attention.cpp`, built on first use) for CPU tensors of
shape (B, H, N, D) in bfloat16 (on AVX-512-BF16 CPUs), head size a multiple of 8 up to 256, no mask, no dropout,
not causal, no gradient, outside torch.compile. Everything else goes to PyTorch, as does everything when
`STABLEPIPE_KERNELS=0` is set or inside `use_kernels(False)`: the switch that lets tests compare the two paths.
float32 stays on PyTorch's kernel unless asked for (`use_kernels(True, float32=True)`): there the results are
diffusers' bit for bit, and PyTorch's kernel is as fast except on short key sequences (the kernel then runs only
up to `FLOAT32_MAX_KEYS` keys).
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from stablepipe.kernels.build import compiled_ops

log = logging.getLogger("stablepipe.kernels")
MAX_HEAD_SIZE = 256
FLOAT32_MAX_KEYS = 128  # float32 self-attention over more keys runs faster in PyTorch's kernel (measured)
BLOCK_ROWS = 64  # query rows per task; fewer where that leaves too few tasks for the threads
_DEFAULT = frozenset({torch.bfloat16})
_ENABLED: contextvars.ContextVar[frozenset] = contextvars.ContextVar("stablepipe_kernel_dtypes", default=_DEFAULT)
_DTYPE_BITS = {torch.float32: 1, torch.bfloat16: 2}  # the kernel's capabilities() bits


@contextlib.contextmanager
def use_kernels(enabled: bool, *, float32: bool = False) -> Iterator[None]:
    """Within the block, run the compiled kernels where they apply (True; with `float32`, on float32 too) or never
    (False); the previous choice comes back after."""
    dtypes = (_DEFAULT | {torch.float32} if float32 else _DEFAULT) if enabled else frozenset()
    token = _ENABLED.set(dtypes)
    try:
        yield
    finally:
        _ENABLED.reset(token)


def kernel_dtypes() -> frozenset:
    """The dtypes the compiled kernels may run on here (none where `STABLEPIPE_KERNELS=0` or `use_kernels(False)`)."""
    return _ENABLED.get() if os.environ.get("STABLEPIPE_KERNELS", "1") != "0" else frozenset()


def kernel_applies(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether the kernel computes this attention (masks, dropout and causality are checked by the caller)."""
    if q.device.type != "cpu" or q.dtype not in kernel_dtypes() or q.dim() != 4 or torch.compiler.is_compiling():
        return False
    if k.dtype != q.dtype or v.dtype != q.dtype or k.shape != v.shape or k.dim() != 4:
        return False
    b, h, _, d = q.shape
    if k.shape[0] != b or k.shape[1] != h or k.shape[3] != d or d % 8 or d > MAX_HEAD_SIZE or k.shape[2] == 0:
        return False
    if q.dtype == torch.float32 and k.shape[2] > FLOAT32_MAX_KEYS:
        return False
    return not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad))


def block_rows(batch_heads: int, queries: int) -> int:
    """Query rows per task: BLOCK_ROWS, halved (down to 16) until every thread gets at least four tasks."""
    rows, wanted = BLOCK_ROWS, 4 * torch.get_num_threads()
    while rows > 16 and batch_heads * -(-queries // rows) < wanted:
        rows //= 2
    return rows


def scaled_dot_product_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    *,
    scale: float | None = None,
) -> torch.Tensor:
    """softmax(q k^T scale) v as `torch.nn.functional.scaled_dot_product_attention`: (B, H, N, D) -> (B, H, N, D).

    The compiled kernel runs where it applies (see the module docstring); its output is a (B, N, H, D)-contiguous
    tensor seen as (B, H, N, D), so merging the heads afterwards costs no copy."""
    if attn_mask is None and dropout_p == 0.0 and not is_causal:
        ops = compiled_ops() if kernel_applies(query, key, value) else None
        if ops is not None and ops.capabilities() & _DTYPE_BITS[query.dtype]:
            q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (query, key, value))
            d = q.shape[-1]
            rows = block_rows(q.shape[0] * q.shape[1], q.shape[2])
            return ops.attention(q, k, v, d**-0.5 if scale is None else scale, rows)
    return F.scaled_dot_product_attention(
        query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale
    )
