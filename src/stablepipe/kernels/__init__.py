"""Compiled hot kernels, each with PyTorch's own as the automatic fallback (see `attention` and `build`)."""

from stablepipe.kernels.attention import kernel_dtypes, scaled_dot_product_attention, use_kernels

__all__ = ["kernel_dtypes", "scaled_dot_product_attention", "use_kernels"]
