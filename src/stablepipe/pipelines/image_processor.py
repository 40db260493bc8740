"""diffusers' `pipe.image_processor` and `pipe.mask_processor`, on stablepipe's own image stages.

User code reaches for them to prepare an image the way the pipeline would (`pipe.image_processor.preprocess(image)`
-> (B, 3, H, W) in [-1, 1], sizes rounded down to a multiple of the VAE's scale factor), to decode latents by hand
(`pipe.image_processor.postprocess(pipe.vae.decode(latents).sample, output_type="pil")`) and to make inpainting
masks (`pipe.mask_processor.preprocess(mask)` -> (B, 1, H, W) of 0 and 1). The conversions are the pipelines'
own (`image.py`, `image_stages.py`), so what these give is what a call would have used.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import PIL.Image
import torch

from stablepipe import image as image_conversions
from stablepipe.image import ImageInput
from stablepipe.pipelines import image_stages


class VaeImageProcessor:
    """Images to and from the VAE's pixel range; `mask=True`: masks, grayscale and binarized at 0.5 (diffusers'
    `VaeImageProcessor(do_normalize=False, do_binarize=True, do_convert_grayscale=True)`)."""

    def __init__(self, vae_scale_factor: int = 8, vae_latent_channels: int = 4, *, mask: bool = False):
        self.vae_scale_factor, self.vae_latent_channels, self.mask = vae_scale_factor, vae_latent_channels, mask

    def preprocess(self, image: ImageInput, height: int | None = None, width: int | None = None) -> torch.Tensor:
        """Any image input -> (B, 3, H, W) in [-1, 1] (masks: (B, 1, H, W) of 0 and 1); tensors with the VAE's
        latent channel count are latents and come back as they are."""
        multiple = self.vae_scale_factor
        if self.mask:
            return image_stages.preprocess_mask(image, height=height, width=width, multiple=multiple)
        return image_stages.preprocess_image(
            image, height=height, width=width, multiple=multiple, latent_channels=self.vae_latent_channels
        )

    def postprocess(
        self, image: torch.Tensor, output_type: str = "pil", do_denormalize: Sequence[bool] | None = None
    ) -> torch.Tensor | np.ndarray | list[PIL.Image.Image]:
        """Decoded pixels (B, C, H, W) in [-1, 1] -> "pil", "np" (B, H, W, C) or "pt" in [0, 1] ("latent": as is)."""
        if not isinstance(image, torch.Tensor):
            raise TypeError(f"postprocess takes the VAE's output as a (B, C, H, W) tensor, got {type(image).__name__}")
        if self.mask and do_denormalize is None:
            do_denormalize = [False] * image.shape[0]  # masks are in [0, 1] already
        return image_conversions.postprocess(image, output_type, do_denormalize=do_denormalize)

    numpy_to_pil = staticmethod(image_conversions.numpy_to_pil)
    pt_to_numpy = staticmethod(image_conversions.pt_to_numpy)
    denormalize = staticmethod(image_conversions.denormalize)

    @staticmethod
    def pil_to_numpy(images: PIL.Image.Image | Sequence[PIL.Image.Image]) -> np.ndarray:
        """PIL images -> (B, H, W, C) float32 in [0, 1]."""
        images = [images] if isinstance(images, PIL.Image.Image) else list(images)
        return image_conversions.pt_to_numpy(image_conversions.pil_to_pt(images))

    @staticmethod
    def normalize(images: torch.Tensor | np.ndarray) -> torch.Tensor | np.ndarray:
        """[0, 1] -> [-1, 1]."""
        return 2.0 * images - 1.0
