"""The widgets every tab shares, and the wiring of a Generate button to a task.

A tab is a dict of named fields (`prompt`, `steps`, `seed` ... the names `ui/tasks.py` reads) plus a
`Results` panel. `wire_generate` turns a button press into `run.generate(...)` in the shared queue: one
generation at a time, live progress from the pipeline's progress bar, errors shown in the page.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
from pathlib import Path
from typing import Any

import gradio as gr

from stablepipe.ui import run
from stablepipe.ui.session import SLOTS, ModelManager

DEFAULT_SCHEDULER = "model default"
QUEUE = "generate"  # the concurrency group of every event that runs a model: one at a time
USER_ERRORS = (ValueError, TypeError, OSError)  # bad input, a missing file or model: said as it is
logger = logging.getLogger("stablepipe.ui")


def scheduler_choices() -> list[str]:
    """The model's own sampler, then the familiar (AUTOMATIC1111) names."""
    from stablepipe.schedulers.names import list_scheduler_names

    return [DEFAULT_SCHEDULER, *(name for name in list_scheduler_names() if name != name.lower())]


def shown_in_page(fn, *args, **kwargs):
    """Call `fn`; an error becomes a message in the page (gr.Error) and the server keeps serving."""
    try:
        return fn(*args, **kwargs)
    except gr.Error:
        raise
    except USER_ERRORS as err:
        text = str(err)
        if len(text) > 1 and text[0] == text[-1] and text[0] in "'\"":  # a KeyError's repr: unquoted
            text = text[1:-1]
        raise gr.Error(text, title="Cannot do that") from None
    except Exception as err:  # a bug or an out-of-memory: say so, log the traceback, keep serving
        logger.exception("generation failed")
        raise gr.Error(f"{type(err).__name__}: {err}", title="Something went wrong") from None


# ---- fields ------------------------------------------------------------------------------------------------


def prompt_fields(*, negative: bool = True) -> dict[str, gr.components.Component]:
    fields = {"prompt": gr.Textbox("", label="Prompt", lines=2, max_length=run.MAX_PROMPT_CHARS,
                                   placeholder="an astronaut riding a horse, oil painting")}
    if negative:
        fields["negative_prompt"] = gr.Textbox("", label="Negative prompt", lines=1, max_length=run.MAX_PROMPT_CHARS,
                                               placeholder="blurry, low quality")
    fields["prompt_weighting"] = gr.Checkbox(
        False, label="AUTOMATIC1111 prompt syntax: (word:1.3), (word), [word], BREAK, prompts over 77 tokens"
    )
    return fields


def sampling_fields(
    *, steps: int = 25, guidance: float = 7.5, size: tuple[int, int] | None = None, batch: bool = True
) -> dict[str, gr.components.Component]:
    """Sampler, steps, guidance, seed, batch size, and width and height when `size` (their defaults) is given."""
    fields: dict[str, gr.components.Component] = {}
    with gr.Row():
        fields["scheduler"] = gr.Dropdown(scheduler_choices(), value=DEFAULT_SCHEDULER, label="Sampler")
        fields["steps"] = gr.Slider(1, 150, value=steps, step=1, label="Steps")
        fields["guidance"] = gr.Slider(0, 30, value=guidance, step=0.5, label="Guidance (CFG scale)")
    if size is not None:
        with gr.Row():
            fields["width"] = gr.Slider(*size_range(size[0]), value=size[0], step=8, label="Width")
            fields["height"] = gr.Slider(*size_range(size[1]), value=size[1], step=8, label="Height")
    with gr.Row():
        fields["seed"] = gr.Number(-1, precision=0, label="Seed (-1: random)", scale=3)
        random_seed = gr.Button("Random", scale=0, min_width=80, elem_classes="seed-random")
        fields["batch"] = gr.Slider(1, 8, value=1, step=1, label="Batch size", visible=batch, scale=3)
    random_seed.click(lambda: -1, None, fields["seed"], queue=False)
    return fields


def size_range(default: int) -> tuple[int, int]:
    """A size slider's (minimum, maximum) around the loaded model's own size: down to 64 px (or the model's size
    if smaller: the demo model draws 32 px), up to 4 times it (at least 2048 px)."""
    return min(64, default), max(2048, 4 * default)


def strength_field(value: float) -> gr.Slider:
    return gr.Slider(0, 1, value=value, step=0.01, label="Strength (0: keep the picture, 1: repaint all)")


# ---- results -------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Results:
    """The gallery, the seeds and settings of the last run, the PNG files to download."""

    gallery: gr.Gallery
    info: gr.Markdown
    files: gr.File
    seeds: gr.State  # the last run's seeds
    picked: gr.State  # the index of the image clicked in the gallery: "Reuse seed" puts its seed in the form
    reuse: gr.Button
    depth: gr.Gallery | None = None

    def outputs(self) -> list[gr.components.Component]:
        return [c for c in (self.gallery, self.info, self.files, self.seeds, self.picked, self.depth) if c is not None]

    def show(self, result: run.Result) -> dict[gr.components.Component, Any]:
        shown = {
            self.gallery: [(str(path), caption) for path, caption in zip(result.files, result.captions)],
            self.info: result.describe(),
            self.files: [str(p) for p in [*result.files, *result.depth_files, *result.extra_files]],
            self.seeds: result.seeds, self.picked: 0,
        }
        if self.depth is not None:
            shown[self.depth] = [(str(p), c) for p, c in zip(result.depth_files, result.captions)]
        return shown


def results_panel(*, depth: bool = False) -> Results:
    with gr.Row(equal_height=False):
        gallery = gr.Gallery(label="Images" if not depth else "RGB", columns=2, height=420, format="png",
                             buttons=["download", "fullscreen"], elem_classes="results")
        depth_gallery = gr.Gallery(label="Depth", columns=2, height=420, format="png",
                                   buttons=["download", "fullscreen"]) if depth else None
    with gr.Row():
        info = gr.Markdown("Results appear here, each with its seed.", elem_classes="result-info")
        reuse = gr.Button("Reuse seed", scale=0, min_width=120, elem_classes="seed-reuse")
    files = gr.File(label="Download PNGs (prompt and settings in the metadata)", file_count="multiple",
                    interactive=False)
    results = Results(gallery, info, files, gr.State([]), gr.State(0), reuse, depth_gallery)
    gallery.select(picked_index, None, results.picked, queue=False)
    return results


def picked_index(evt: gr.SelectData) -> int:
    return evt.index


def reused_seed(seeds: list[int], picked: int) -> int:
    """The seed of the picked image of the last run; -1 (random) before any run."""
    return seeds[picked] if seeds and 0 <= picked < len(seeds) else -1


# ---- wiring --------------------------------------------------------------------------------------------------


def wire_generate(
    fields: dict[str, Any], button: gr.Button, results: Results, *, manager: ModelManager, task: str, out_dir: Path
) -> None:
    """Button (and Enter in the prompt) -> run the task in the shared queue -> results; seed reuse. The API
    endpoint is named after the task (`/txt2img` ...), its inputs in the order of the form's fields."""
    names = list(fields)

    def generate(*data):  # the form's values in `names` order, then gradio's progress tracker
        values = dict(zip(names, data))
        if values.get("scheduler") == DEFAULT_SCHEDULER:
            values["scheduler"] = None
        return results.show(shown_in_page(run.generate, manager, task, values, out_dir))

    generate.__signature__ = named_parameters(names)  # what gradio reads: the API's parameter names, the tracker

    triggers = [button.click] + ([fields["prompt"].submit] if "prompt" in fields else [])
    gr.on(triggers, generate, inputs=list(fields.values()), outputs=results.outputs(), concurrency_id=QUEUE,
          concurrency_limit=1, api_name=task)
    results.reuse.click(reused_seed, [results.seeds, results.picked], fields["seed"], queue=False)


def named_parameters(names: list[str]) -> inspect.Signature:
    """A signature of one parameter per form field, then `progress` (gradio passes its tracker by that default:
    live progress from the pipeline's tqdm bar)."""
    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    tracker = inspect.Parameter("progress", kind, default=gr.Progress(track_tqdm=True))
    return inspect.Signature([*(inspect.Parameter(name, kind) for name in names), tracker])


def model_loader(manager: ModelManager, slot: str | None, *, note: str = "") -> gr.Markdown:
    """A box to load a checkpoint into `slot` (None: whichever slot the checkpoint is for), with its status."""
    example = SLOTS[slot].example if slot else SLOTS["sd"].example

    def status() -> str:
        return (note + "  \n" if note else "") + (manager.status(slot) if slot else loaded_summary(manager))

    with gr.Group(elem_classes="model-loader"):
        shown = gr.Markdown(status, elem_classes="model-status", padding=True)
        with gr.Row(equal_height=True):
            source = gr.Textbox(show_label=False, placeholder=f"Hub id, folder or .safetensors, e.g. {example}",
                                container=False, scale=5)
            button = gr.Button("Load", scale=1, min_width=80)

    def load(text: str, progress=gr.Progress(track_tqdm=True)):  # noqa: B008
        shown_in_page(manager.load, text, slot=slot)
        return status()

    gr.on([button.click, source.submit], load, source, shown, concurrency_id=QUEUE, concurrency_limit=1)
    return shown


def loaded_summary(manager: ModelManager) -> str:
    if not manager.sources:
        return "No model loaded: type one below."
    shown = (f"`{source}` ({SLOTS[slot].name})" for slot, source in manager.sources.items())
    return "Loaded: " + "; ".join(shown)
