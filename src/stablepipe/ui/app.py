"""The web app: a header with the loaded models, a tab per task, one shared queue.

    manager = ModelManager(device=torch.device("cpu"), dtype=torch.float32)
    manager.load("stable-diffusion-v1-5/stable-diffusion-v1-5")
    launch(build_app(manager, out_dir=Path("outputs")), host="127.0.0.1", port=7860, out_dir=Path("outputs"))
"""

from __future__ import annotations

from pathlib import Path

import gradio as gr

from stablepipe.ui.controls import model_loader
from stablepipe.ui.session import ModelManager
from stablepipe.ui.tabs import TABS

# System fonts: the page works offline (gradio's default theme fetches Google fonts).
THEME = gr.themes.Soft(font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])
CSS = ".seed-random, .seed-reuse { align-self: end; } .model-status p { margin: 0; }"
MAX_QUEUE = 64  # waiting requests beyond this are turned away with a message


def build_app(manager: ModelManager, *, out_dir: Path) -> gr.Blocks:
    """The Blocks of the app. Every event that runs a model shares one queue slot (one generation at a
    time); people waiting see their position in the queue."""
    with gr.Blocks(title="stablepipe", analytics_enabled=False) as app:
        shown = out_dir if manager.allow_paths else out_dir.name  # a public app does not show its disk
        gr.Markdown("## stablepipe\nStable Diffusion, from scratch in PyTorch. Images are saved in "
                    f"`{shown}` with their prompt and settings in the PNG metadata (AUTOMATIC1111's infotext).")
        model_loader(manager, None)
        with gr.Tabs():
            for title, build_tab in TABS:
                name = build_tab.__name__.removesuffix("_tab")
                with gr.Tab(title, id=name, elem_id=f"tab-{name}"):
                    build_tab(manager, out_dir)
    app.queue(max_size=MAX_QUEUE, default_concurrency_limit=1)
    return app


def launch(app: gr.Blocks, *, host: str, port: int | None, out_dir: Path, block: bool = True) -> gr.Blocks:
    """Serve `app` on host:port (port None: the first free one from 7860)."""
    from starlette.middleware import Middleware

    from stablepipe.ui.guard import MAX_UPLOAD, BodyLimit, not_found_handlers

    out_dir.mkdir(parents=True, exist_ok=True)
    guards = {"middleware": [Middleware(BodyLimit)], "exception_handlers": not_found_handlers()}
    app.launch(
        server_name=host, server_port=port, allowed_paths=[str(out_dir.resolve())], show_error=True,
        prevent_thread_lock=not block, theme=THEME, css=CSS, footer_links=[], quiet=False, app_kwargs=guards,
        max_file_size=MAX_UPLOAD,
    )
    return app
