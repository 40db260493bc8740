"""One function per tab: its model box, its form (left) and results (right), its Generate button wired to
its task. Each runs inside a `gr.Tab` context (see `ui/app.py`); the field names are those `ui/tasks.py` reads.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import gradio as gr

from stablepipe.ui.controls import (
    Results,
    model_loader,
    prompt_fields,
    results_panel,
    sampling_fields,
    strength_field,
    wire_generate,
)
from stablepipe.ui.session import ModelManager
from stablepipe.ui.tasks import SAFE_LEVELS

IMAGE_SIZE_NOTE = "The result has the picture's size (rounded down to a multiple of 8)."
Fields = dict[str, Any]


def layout(form: Callable[[], Fields], *, depth: bool = False) -> tuple[Fields, gr.Button, Results]:
    """The form and its Generate button on the left, the results on the right."""
    with gr.Row(equal_height=False):
        with gr.Column(scale=5):
            fields = form()
            button = gr.Button("Generate", variant="primary", elem_classes="generate")
        with gr.Column(scale=6):
            results = results_panel(depth=depth)
    return fields, button, results


def txt2img_tab(manager: ModelManager, out_dir: Path) -> None:
    def form() -> Fields:
        fields = prompt_fields()
        with gr.Row():
            fields["safe"] = gr.Checkbox(False, label="Safe mode (Safe Latent Diffusion)")
            fields["safe_level"] = gr.Dropdown(list(SAFE_LEVELS), value="MEDIUM", label="Safety level")
        return fields | sampling_fields(size=manager.default_size("sd"))

    wire_generate(*layout(form), manager=manager, task="txt2img", out_dir=out_dir)


def img2img_tab(manager: ModelManager, out_dir: Path) -> None:
    def form() -> Fields:
        fields = {"image": gr.Image(type="pil", label="Picture to start from", height=300)} | prompt_fields()
        fields["strength"] = strength_field(0.75)
        gr.Markdown(IMAGE_SIZE_NOTE)
        return fields | sampling_fields()

    wire_generate(*layout(form), manager=manager, task="img2img", out_dir=out_dir)


def inpaint_tab(manager: ModelManager, out_dir: Path) -> None:
    model_loader(manager, "inpaint", note="Optional: without an inpainting model, the main model inpaints.")

    def form() -> Fields:
        editor = gr.ImageEditor(
            type="pil", label="Picture and mask: paint what to repaint", height=380, image_mode="RGBA",
            brush=gr.Brush(default_size=24, colors=["#ffffff"], color_mode="fixed"), transforms=(),
            layers=False, elem_classes="mask-painter",
        )
        fields = {"editor": editor} | prompt_fields() | {"strength": strength_field(1.0)}
        gr.Markdown(IMAGE_SIZE_NOTE)
        return fields | sampling_fields()

    wire_generate(*layout(form), manager=manager, task="inpaint", out_dir=out_dir)


def depth2img_tab(manager: ModelManager, out_dir: Path) -> None:
    model_loader(manager, "depth")

    def form() -> Fields:
        with gr.Row():
            fields = {"image": gr.Image(type="pil", label="Picture to start from", height=260)}
            fields["depth_map"] = gr.Image(type="pil", image_mode=None, label="Depth map (optional)", height=260)
        fields |= prompt_fields() | {"strength": strength_field(0.8)}
        return fields | sampling_fields()

    wire_generate(*layout(form), manager=manager, task="depth2img", out_dir=out_dir)


def variation_tab(manager: ModelManager, out_dir: Path) -> None:
    model_loader(manager, "variation")

    def form() -> Fields:
        fields = {"image": gr.Image(type="pil", label="Picture to vary", height=300)}
        return fields | sampling_fields(guidance=3.0, size=manager.default_size("variation"))

    wire_generate(*layout(form), manager=manager, task="variation", out_dir=out_dir)


def upscale_tab(manager: ModelManager, out_dir: Path) -> None:
    model_loader(manager, "x4")
    model_loader(manager, "x2")

    def form() -> Fields:
        choices = [("x4 upscaler", "x4"), ("x2 latent upscaler", "x2")]
        fields = {"upscaler": gr.Radio(choices, value="x4", label="Upscaler")}
        fields["image"] = gr.Image(type="pil", label="Picture to upscale (x4: 4 times as wide)", height=260)
        fields |= prompt_fields()
        fields["noise_level"] = gr.Slider(0, 350, value=20, step=1, label="Noise level (x4 only)")
        return fields | sampling_fields(steps=50, guidance=9.0, batch=False)

    wire_generate(*layout(form), manager=manager, task="upscale", out_dir=out_dir)


def sdxl_tab(manager: ModelManager, out_dir: Path) -> None:
    model_loader(manager, "sdxl")
    model_loader(manager, "refiner", note="Optional. The refiner shares the base's second text encoder and VAE.")

    def form() -> Fields:
        fields = prompt_fields()
        with gr.Row():
            fields["refiner"] = gr.Checkbox(False, label="Refine (the refiner does the last steps)")
            fields["high_noise_frac"] = gr.Slider(0.5, 0.95, value=0.8, step=0.05, label="Base's share of the steps")
        return fields | sampling_fields(guidance=5.0, size=manager.default_size("sdxl"))

    wire_generate(*layout(form), manager=manager, task="sdxl", out_dir=out_dir)


def ldm3d_tab(manager: ModelManager, out_dir: Path) -> None:
    model_loader(manager, "ldm3d")

    def form() -> Fields:
        return prompt_fields() | sampling_fields(guidance=5.0, size=manager.default_size("ldm3d"))

    wire_generate(*layout(form, depth=True), manager=manager, task="ldm3d", out_dir=out_dir)


TABS = (
    ("Text to image", txt2img_tab), ("Image to image", img2img_tab), ("Inpainting", inpaint_tab),
    ("Depth to image", depth2img_tab), ("Image variation", variation_tab), ("Upscaling", upscale_tab),
    ("SDXL", sdxl_tab), ("LDM3D", ldm3d_tab),
)
