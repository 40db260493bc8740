"""The IP-Adapter stage of a pipeline call: reference images (or given embeds) -> the UNet's image embeds.

Every SD pipeline does the same, as diffusers' `prepare_ip_adapter_image_embeds`: one tensor per loaded
adapter, (B, n_images, [T,] D), repeated for every image the call makes, with the negative half (zero image
embeds, or the hidden states of a black image for the projections that read hidden states) stacked first
under classifier-free guidance.
"""

from __future__ import annotations

from typing import Any

import torch

from stablepipe.loading.ip_adapter import IPAdapterMixin
from stablepipe.models.embeddings import ImageProjection, MultiIPAdapterImageProjection


def image_projection_layers(pipe) -> list[torch.nn.Module]:
    """The image projection of each loaded adapter, or an error saying how to load one."""
    projection = getattr(getattr(pipe, "unet", None), "encoder_hid_proj", None)
    if not isinstance(projection, MultiIPAdapterImageProjection):
        raise ValueError(
            "ip_adapter_image / ip_adapter_image_embeds need an IP-Adapter: call pipe.load_ip_adapter(...) first"
        )
    return list(projection.image_projection_layers)


def encode_image(pipe, image, *, device, num_images_per_prompt: int, output_hidden_states: bool,
                 guided: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:  # fmt: skip
    """(embeds, negative embeds) of `image` (PIL / array / a list of them, or pixel values) by the image encoder:
    the projected image embeds (n, D), or the penultimate hidden states (n, T, D) when `output_hidden_states`,
    each repeated `num_images_per_prompt` times. The negative is zeros, or the hidden states of a black image;
    None unless `guided`."""
    encoder = getattr(pipe, "image_encoder", None)
    if encoder is None:
        raise ValueError(
            "ip_adapter_image needs the pipeline's image_encoder (a CLIPVisionModelWithProjection): load_ip_adapter "
            "loads it with image_encoder_folder=..., or build the pipeline with image_encoder=...; or give "
            "ip_adapter_image_embeds instead"
        )
    if not torch.is_tensor(image):
        if getattr(pipe, "feature_extractor", None) is None:
            raise ValueError("ip_adapter_image as pictures needs the pipeline's feature_extractor (a "
                             "CLIPImageProcessor); give one, or pixel values as a tensor")  # fmt: skip
        image = pipe.feature_extractor(image, return_tensors="pt").pixel_values
    image = image.to(device=device, dtype=next(encoder.parameters()).dtype)  # (n, 3, S, S)
    if output_hidden_states:
        embeds = encoder(image, output_hidden_states=True).hidden_states[-2]  # (n, T, D)
        negative = encoder(torch.zeros_like(image), output_hidden_states=True).hidden_states[-2] if guided else None
    else:
        embeds = encoder(image).image_embeds  # (n, D)
        negative = torch.zeros_like(embeds) if guided else None
    repeat = (lambda t: t.repeat_interleave(num_images_per_prompt, dim=0)) if num_images_per_prompt != 1 else None
    if repeat is not None:
        embeds, negative = repeat(embeds), (repeat(negative) if negative is not None else None)
    return embeds, negative


def check_ip_adapter_inputs(pipe, ip_adapter_image, ip_adapter_image_embeds, *, guided: bool) -> None:
    """Refuse, with what to give instead, IP-Adapter inputs that cannot fit the loaded adapters."""
    if ip_adapter_image is not None and ip_adapter_image_embeds is not None:
        raise ValueError("give ip_adapter_image or ip_adapter_image_embeds, not both")
    count = len(image_projection_layers(pipe))
    if ip_adapter_image is not None:
        images = ip_adapter_image if isinstance(ip_adapter_image, list) else [ip_adapter_image]
        if len(images) != count:
            raise ValueError(f"ip_adapter_image has {len(images)} entries for {count} loaded IP-Adapters; give one "
                             "image (or a list of images) per adapter: [[a, b]] for two images to one adapter")
        return
    embeds = ip_adapter_image_embeds
    if not isinstance(embeds, list) or not all(torch.is_tensor(t) for t in embeds):
        raise ValueError(f"ip_adapter_image_embeds must be a list of tensors, one per IP-Adapter, got "
                         f"{type(embeds).__name__}")  # fmt: skip
    if len(embeds) != count:
        raise ValueError(f"ip_adapter_image_embeds has {len(embeds)} tensors for {count} loaded IP-Adapters")
    for i, tensor in enumerate(embeds):
        if tensor.ndim not in (3, 4):
            raise ValueError(f"ip_adapter_image_embeds[{i}] has shape {tuple(tensor.shape)}; expected (batch, "
                             "n_images, dim) or (batch, n_images, tokens, dim)")  # fmt: skip
        if guided and tensor.shape[0] % 2:
            raise ValueError(
                f"ip_adapter_image_embeds[{i}] has batch {tensor.shape[0]}: with guidance (guidance_scale > 1) it "
                "holds the negative embeds first, then the positive ones, so its batch is even (2 for one image)"
            )


def prepare_ip_adapter_image_embeds(
    pipe, ip_adapter_image, ip_adapter_image_embeds, *, device, batch_size: int, guided: bool
) -> list[torch.Tensor]:
    """One tensor per adapter: [negative x batch_size, positive x batch_size] under guidance, else the positive
    repeated; `batch_size` is the number of images the call makes (prompts x num_images_per_prompt)."""
    check_ip_adapter_inputs(pipe, ip_adapter_image, ip_adapter_image_embeds, guided=guided)
    if ip_adapter_image_embeds is None:
        images = ip_adapter_image if isinstance(ip_adapter_image, list) else [ip_adapter_image]
        pairs = []
        for image, layer in zip(images, image_projection_layers(pipe)):
            hidden = not isinstance(layer, ImageProjection)  # the others read the encoder's hidden states
            embeds, negative = encode_image(pipe, image, device=device, num_images_per_prompt=1,
                                            output_hidden_states=hidden, guided=guided)  # fmt: skip
            pairs.append((embeds[None], negative[None] if negative is not None else None))  # (1, n, [T,] D)
    else:
        pairs = [tuple(t.chunk(2)[::-1]) if guided else (t, None) for t in ip_adapter_image_embeds]
    prepared = []
    for embeds, negative in pairs:
        stacked = torch.cat([embeds] * batch_size)  # (E * batch, n, [T,] D)
        if guided:
            stacked = torch.cat([torch.cat([negative] * batch_size), stacked])
        prepared.append(stacked.to(device=device))
    return prepared


def ip_adapter_unet_kwargs(
    pipe, ip_adapter_image, ip_adapter_image_embeds, *, batch_size: int, guided: bool, device
) -> dict[str, Any]:
    """The UNet kwargs of a call's IP-Adapter inputs: {"added_cond_kwargs": {"image_embeds": [...]}}, or {}
    without them. `batch_size`: prompts x num_images_per_prompt; `guided`: classifier-free guidance is on."""
    if ip_adapter_image is None and ip_adapter_image_embeds is None:
        return {}
    embeds = prepare_ip_adapter_image_embeds(
        pipe, ip_adapter_image, ip_adapter_image_embeds, device=device, batch_size=batch_size, guided=guided
    )
    return {"added_cond_kwargs": {"image_embeds": embeds}}


class IPAdapterPipelineMixin(IPAdapterMixin):
    """`IPAdapterMixin` (load, scale, unload) plus diffusers' pipeline methods of the stage above."""

    def encode_image(self, image, device, num_images_per_prompt: int, output_hidden_states: bool | None = None):
        """diffusers' signature: (image embeds, negative image embeds) of `image` by the pipeline's image encoder."""
        return encode_image(self, image, device=device, num_images_per_prompt=num_images_per_prompt,
                            output_hidden_states=bool(output_hidden_states))  # fmt: skip

    def prepare_ip_adapter_image_embeds(
        self, ip_adapter_image, ip_adapter_image_embeds, device, num_images_per_prompt: int,
        do_classifier_free_guidance: bool,
    ) -> list[torch.Tensor]:  # fmt: skip
        """diffusers' signature: one tensor per adapter, (negative, positive) stacked under guidance, repeated
        `num_images_per_prompt` times (the pipelines pass prompts x images per prompt)."""
        return prepare_ip_adapter_image_embeds(
            self, ip_adapter_image, ip_adapter_image_embeds, device=device, batch_size=num_images_per_prompt,
            guided=do_classifier_free_guidance,
        )
