"""Pictures in and out of the API: base64 decoding with limits, PNGs carrying their infotext, and the
mask handling of A1111's img2img (resize modes, invert, blur, "fill" of the masked area)."""

from __future__ import annotations

import base64
import binascii
import io
import warnings

import PIL.Image
import PIL.ImageFilter
import PIL.ImageOps
from PIL.PngImagePlugin import PngInfo

from stablepipe.pipelines.image_stages import fit_pil
from stablepipe.serve.errors import Unsupported

LANCZOS = PIL.Image.Resampling.LANCZOS
RESIZE_MODES = {0: "Just resize", 1: "Crop and resize", 2: "Resize and fill"}


def decode_image(text: str, field: str, *, max_pixels: int) -> PIL.Image.Image:
    """A base64 image (optionally a `data:image/...;base64,` URL) as a loaded PIL image, or a 422 naming
    `field`. Images over `max_pixels` are refused before their pixels are decoded."""
    if not isinstance(text, str) or not text:
        raise Unsupported(field, "expected a base64-encoded image (PNG, JPEG, WebP ...), got nothing")
    if text.startswith("data:") and "," in text:
        text = text.split(",", 1)[1]
    try:
        raw = base64.b64decode(text, validate=False)
    except (binascii.Error, ValueError) as err:
        raise Unsupported(field, f"not valid base64 ({err})") from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", PIL.Image.DecompressionBombWarning)
            image = PIL.Image.open(io.BytesIO(raw))
            if image.width * image.height > max_pixels:
                raise Unsupported(field, f"the image is {image.width}x{image.height}; at most {max_pixels} pixels "
                                         "are accepted")
            image.load()
    except Unsupported:
        raise
    except (PIL.UnidentifiedImageError, OSError, ValueError, SyntaxError, PIL.Image.DecompressionBombWarning,
            PIL.Image.DecompressionBombError) as err:
        raise Unsupported(field, f"not an image PIL can read ({type(err).__name__}: {err})") from None
    return image


def encode_png(image: PIL.Image.Image, infotext: str | None = None) -> str:
    """The image as a base64 PNG, its infotext in the `parameters` text chunk (as A1111 writes it)."""
    return base64.b64encode(png_bytes(image, infotext)).decode("ascii")


def png_bytes(image: PIL.Image.Image, infotext: str | None = None) -> bytes:
    info = PngInfo()
    if infotext:
        info.add_text("parameters", infotext)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def resize_for(image: PIL.Image.Image, width: int, height: int, resize_mode: int) -> PIL.Image.Image:
    """A1111's img2img resize modes: 0 stretch to width x height, 1 cover and crop, 2 fit and fill the edges."""
    if image.size == (width, height):
        return image
    if resize_mode == 0:
        return image.resize((width, height), resample=LANCZOS)
    return fit_pil(image, width, height, cover=resize_mode == 1)


def prepare_mask(mask: PIL.Image.Image, width: int, height: int, *, resize_mode: int, invert: bool,
                 blur: tuple[int, int], binary: bool = True) -> PIL.Image.Image:
    """The mask (white is repainted) as A1111's img2img makes it: its alpha channel if it has transparency,
    else its gray; rounded to black and white (`binary`, A1111's mask_round), inverted if asked, blurred by
    (x, y) pixels (A1111's mask_blur_x / mask_blur_y), then resized to width x height."""
    has_alpha = mask.mode == "RGBA" and mask.getchannel("A").getextrema() != (255, 255)
    gray = mask.getchannel("A") if has_alpha else mask.convert("L")
    if binary:
        gray = gray.point(lambda v: 255 if v > 128 else 0)
    if invert:
        gray = PIL.ImageOps.invert(gray)
    if any(blur):
        gray = gray.filter(PIL.ImageFilter.GaussianBlur(blur))
    return resize_for(gray.convert("RGB"), width, height, resize_mode).convert("L")


# radius of each blur pass and how many times it is laid on: wide passes first for the overall colour, then
# narrow ones for the colour near the mask's edge
FILL_PASSES = ((256, 1), (64, 1), (16, 2), (4, 4), (2, 2), (0, 1))


def fill_masked_area(image: PIL.Image.Image, mask: PIL.Image.Image) -> PIL.Image.Image:
    """A1111's "fill" masked content: the masked area painted with the blurred colours around it, so the
    sampler starts from the surroundings' colours rather than the old content."""
    known = PIL.Image.new("RGBa", image.size)  # the kept pixels, premultiplied by their weight
    known.paste(image.convert("RGBA").convert("RGBa"), mask=PIL.ImageOps.invert(mask.convert("L")))
    filled = PIL.Image.new("RGBA", image.size)
    for radius, times in FILL_PASSES:
        layer = known.filter(PIL.ImageFilter.GaussianBlur(radius)).convert("RGBA") if radius else known.convert("RGBA")
        for _ in range(times):
            filled.alpha_composite(layer)
    return filled.convert("RGB")
