"""Random numbers drawn exactly as diffusers draws them, so the same seed gives the same image."""

from __future__ import annotations

import torch

Generator = torch.Generator | list[torch.Generator] | None


def randn_tensor(
    shape: tuple[int, ...],
    *,
    generator: Generator = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Standard normal noise of `shape` on `device`.

    A CPU generator draws on the CPU whatever `device` is (so CPU seeds reproduce on a GPU); a list of
    generators draws one batch element from each, in order; a list of one is the same as that generator.
    """
    device = torch.device(device or "cpu")
    if isinstance(generator, list) and len(generator) == 1:
        generator = generator[0]
    generators = generator if isinstance(generator, list) else [generator]
    if isinstance(generator, list) and len(generator) != shape[0]:
        raise ValueError(
            f"got {len(generator)} generators for a batch of {shape[0]}; pass one generator or one per image"
        )
    gen_device = generators[0].device if generators[0] is not None else device
    if gen_device.type != device.type and gen_device.type != "cpu":
        raise ValueError(f"cannot draw a {device.type} tensor from a {gen_device.type} generator")
    draw_device = gen_device if generators[0] is not None else device
    if isinstance(generator, list):
        parts = [torch.randn((1, *shape[1:]), generator=g, device=draw_device, dtype=dtype) for g in generator]
        return torch.cat(parts).to(device)
    return torch.randn(shape, generator=generator, device=draw_device, dtype=dtype).to(device)
