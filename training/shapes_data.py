"""Procedurally generated captioned pictures for the demo model: one flat shape on a flat background.

A caption reads "a small red circle on a gray background, top left". Every attribute is drawn from a short
list below, so a non-learned checker (tests/test_demo_model.py) can tell whether a picture follows its caption.
Shapes are drawn anti-aliased by 4x supersampling, so edges look like a (tiny) photo rather than pixel art.
"""

from __future__ import annotations

import dataclasses

import numpy as np

SIZE = 32  # picture side in pixels
COLOURS = {  # shape colours (RGB in [0, 1])
    "red": (0.9, 0.1, 0.1), "green": (0.1, 0.75, 0.15), "blue": (0.15, 0.25, 0.95),
    "yellow": (0.95, 0.85, 0.1), "purple": (0.6, 0.15, 0.75),
}
BACKGROUNDS = {"black": (0.05, 0.05, 0.05), "white": (0.95, 0.95, 0.95), "gray": (0.5, 0.5, 0.5),
               "blue": COLOURS["blue"]}
SHAPES = ("circle", "square", "triangle")
POSITIONS = ("top left", "top right", "bottom left", "bottom right")
SIZES = {"small": 4.5, "large": 6.5}  # half the shape's width in pixels
JITTER = 1.5  # the shape's centre moves this many pixels around its quadrant's centre
SUPERSAMPLE = 4


@dataclasses.dataclass(frozen=True)
class Scene:
    colour: str
    shape: str
    position: str
    background: str
    size: str

    @property
    def caption(self) -> str:
        return f"a {self.size} {self.colour} {self.shape} on a {self.background} background, {self.position}"

    @property
    def centre(self) -> tuple[float, float]:
        """The quadrant's centre (x, y) in pixels."""
        row, col = self.position.split()
        return (0.75 if col == "right" else 0.25) * SIZE, (0.75 if row == "bottom" else 0.25) * SIZE


def all_scenes() -> list[Scene]:
    return [Scene(c, s, p, b, z) for c in COLOURS for s in SHAPES for p in POSITIONS for b in BACKGROUNDS
            for z in SIZES if b != c]


def shape_mask(
    shape: str, cx: float, cy: float, half: float, *, size: int = SIZE, supersample: int = SUPERSAMPLE
) -> np.ndarray:
    """Coverage in [0, 1] of each pixel by the shape, (size, size), by supersampling."""
    n = size * supersample
    coords = (np.arange(n) + 0.5) / supersample
    x, y = np.meshgrid(coords, coords)  # (n, n) each
    if shape == "circle":
        inside = (x - cx) ** 2 + (y - cy) ** 2 <= half**2
    elif shape == "square":
        inside = (np.abs(x - cx) <= half * 0.9) & (np.abs(y - cy) <= half * 0.9)
    else:  # an upright isosceles triangle: apex at the top, base at the bottom
        top, bottom = cy - half, cy + half
        t = (y - top) / (bottom - top)
        inside = (t >= 0) & (t <= 1) & (np.abs(x - cx) <= t * half * 1.1)
    return inside.reshape(size, supersample, size, supersample).mean(axis=(1, 3))


def render(scene: Scene, rng: np.random.Generator | None = None) -> np.ndarray:
    """The scene's picture, (SIZE, SIZE, 3) float32 in [0, 1]; `rng` jitters the position."""
    cx, cy = scene.centre
    if rng is not None:
        cx, cy = cx + rng.uniform(-JITTER, JITTER), cy + rng.uniform(-JITTER, JITTER)
    mask = shape_mask(scene.shape, cx, cy, SIZES[scene.size])[..., None]  # (H, W, 1)
    fg, bg = np.array(COLOURS[scene.colour]), np.array(BACKGROUNDS[scene.background])
    return (mask * fg + (1 - mask) * bg).astype(np.float32)


def make_dataset(count: int, *, seed: int) -> tuple[np.ndarray, list[str]]:
    """`count` pictures (N, 3, SIZE, SIZE) uint8 and their captions, drawn uniformly over all scenes."""
    rng = np.random.default_rng(seed)
    scenes = all_scenes()
    picks = rng.integers(len(scenes), size=count)
    images = np.stack([render(scenes[i], rng) for i in picks])  # (N, H, W, 3)
    return to_uint8_channels_first(images), [scenes[i].caption for i in picks]


def to_uint8_channels_first(pictures: np.ndarray) -> np.ndarray:
    """(N, H, W, 3) floats in [0, 1] -> (N, 3, H, W) uint8, as the training scripts store pictures."""
    return np.round(pictures * 255).astype(np.uint8).transpose(0, 3, 1, 2)


def make_vae_pictures(count: int, *, seed: int) -> np.ndarray:
    """`count` pictures (N, 3, SIZE, SIZE) uint8 for the VAE: one to three shapes of any colour, shape and size,
    anywhere (partly outside the frame too), on any background. Trained on the captioned scenes alone, whose
    pictures all hold one shape, the VAE's decoder learnt to read colours from the whole picture's statistics
    (through GroupNorm): it reconstructed one shape with mean error 0.02 but two shapes with 0.14, and inpainting,
    which puts a second shape beside the first, came out in the wrong colours."""
    rng = np.random.default_rng(seed)
    palette = [np.array(c) for c in (*COLOURS.values(), *BACKGROUNDS.values())]
    pictures = []
    for _ in range(count):
        picture = np.broadcast_to(palette[rng.integers(len(palette))], (SIZE, SIZE, 3)).copy()
        for _ in range(rng.integers(1, 4)):
            cx, cy = rng.uniform(-2, SIZE + 2, size=2)
            mask = shape_mask(SHAPES[rng.integers(3)], cx, cy, rng.uniform(3.0, 8.0))[..., None]  # (H, W, 1)
            picture = mask * palette[rng.integers(len(palette))] + (1 - mask) * picture
        pictures.append(picture)
    return to_uint8_channels_first(np.stack(pictures))


# ---- the checker: does a picture follow its scene? -------------------------------------------------------------


def nearest(colour: np.ndarray, palette: dict[str, tuple[float, float, float]]) -> str:
    return min(palette, key=lambda name: float(np.sum((np.array(palette[name]) - colour) ** 2)))


def foreground_alpha(image: np.ndarray, bg: np.ndarray, fg: np.ndarray) -> np.ndarray:
    """How far each pixel is from the background towards the foreground colour, (H, W) in [0, 1]."""
    direction = fg - bg
    return np.clip((image - bg) @ direction / max(float(direction @ direction), 1e-6), 0, 1)


def best_shape(alpha: np.ndarray) -> tuple[str, str]:
    """The (shape, size) whose drawing overlaps `alpha` best (soft intersection over union), trying small shifts."""
    total = alpha.sum()
    ys, xs = np.mgrid[0 : alpha.shape[0], 0 : alpha.shape[1]] + 0.5
    cx, cy = (alpha * xs).sum() / total, (alpha * ys).sum() / total  # the alpha-weighted centroid
    best, best_iou = ("", ""), -1.0
    for shape in SHAPES:
        for size, half in SIZES.items():
            y0 = cy - half / 3 if shape == "triangle" else cy  # a triangle's centroid is a third below its centre
            for dx in (-1, -0.5, 0, 0.5, 1):
                for dy in (-1, -0.5, 0, 0.5, 1):
                    mask = shape_mask(shape, cx + dx, y0 + dy, half, size=alpha.shape[0], supersample=2)
                    iou = np.minimum(mask, alpha).sum() / max(np.maximum(mask, alpha).sum(), 1e-6)
                    if iou > best_iou:
                        best, best_iou = (shape, size), iou
    return best


def read_picture(image: np.ndarray, position: str) -> dict[str, str]:
    """What a picture (H, W, 3) in [0, 1] shows, read without learning: the background is the median colour of the
    three quadrants away from `position`; the shape's pixels are those far from it; its colour is their median, its
    position the quadrant of their centroid, its shape and size the best-fitting drawing."""
    half = image.shape[0] // 2
    row, col = (0 if position.startswith("top") else 1), (0 if position.endswith("left") else 1)
    quadrants = [image[r * half : (r + 1) * half, c * half : (c + 1) * half] for r in (0, 1) for c in (0, 1)]
    away = np.concatenate([q.reshape(-1, 3) for i, q in enumerate(quadrants) if i != 2 * row + col])
    bg = np.median(away, axis=0)
    distance = np.linalg.norm(image - bg, axis=-1)  # (H, W)
    solid = distance > 0.3
    found = {"background": nearest(bg, BACKGROUNDS), "colour": "none", "position": "none", "shape": "none",
             "size": "none"}
    if solid.sum() < 8:
        return found
    fg = np.median(image[solid], axis=0)
    ys, xs = np.nonzero(solid)
    box = np.zeros_like(solid)
    box[max(ys.min() - 2, 0) : ys.max() + 3, max(xs.min() - 2, 0) : xs.max() + 3] = True
    alpha = foreground_alpha(image, bg, fg) * box  # (H, W), zero away from the shape
    alpha[alpha < 0.2] = 0
    vertical = "bottom" if ys.mean() + 0.5 >= half else "top"
    found.update(colour=nearest(fg, COLOURS), position=f"{vertical} {'right' if xs.mean() + 0.5 >= half else 'left'}")
    found["shape"], found["size"] = best_shape(alpha)
    return found


def check_picture(image: np.ndarray, scene: Scene) -> dict[str, bool]:
    """Which of the scene's attributes the picture follows."""
    found = read_picture(image, scene.position)
    return {key: found[key] == getattr(scene, key) for key in ("colour", "shape", "position", "background", "size")}


def benchmark_scenes(count: int = 32) -> list[Scene]:
    """A fixed set of scenes that cycles through every colour, shape, position, background and size."""
    colours, backgrounds, sizes = list(COLOURS), list(BACKGROUNDS), list(SIZES)
    scenes = []
    for i in range(count):
        colour = colours[i % len(colours)]
        options = [b for b in backgrounds if b != colour]
        background = options[(i // len(colours)) % len(options)]
        scenes.append(Scene(colour, SHAPES[i % 3], POSITIONS[i % 4], background, sizes[(i // 4) % 2]))
    return scenes
