"""Bad inputs to loading, one row each: the input and the fragment its clear error must contain (issue #19, items 2
and 8). A row with no fragment is an input that must be accepted (its function checks the result).

`outcome(row, env)` is also what counted the rows against the code before the fix: "ok", "raw" (an error that
does not say what the row expects: from inside torch / json, or pointing elsewhere) or "silent" (accepted).
"""

from __future__ import annotations

import json
import shutil
import tracemalloc
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from test_safetensors_header import bomb, forge_member_size, write_raw

import stablepipe
from stablepipe.loading.checkpoint import read_checkpoint

ALLOCATION_LIMIT = 1 << 24  # 16 MiB: reading the 94-byte file may not cost more


@dataclass
class Env:
    sd1: Path  # a tiny diffusers SD 1.x folder (not to be modified)
    tmp: Path  # this row's scratch folder
    pipe: Any  # a loaded pipeline for rows that add to one (its state is not changed by failed loads)

    def folder(self) -> Path:
        """A copy of the SD 1.x folder to damage."""
        return Path(shutil.copytree(self.sd1, self.tmp / "model"))


def edit_json(path: Path, **changes: Any) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def load(folder: Path, cls=stablepipe.StableDiffusionPipeline, **kwargs: Any):
    return cls.from_pretrained(folder, **kwargs)


def traced(read: Callable[[], Any]) -> Any:
    """Run `read`, failing the row when it allocated more than `ALLOCATION_LIMIT` (whatever it raised)."""
    tracemalloc.start()
    try:
        return read()
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        if peak > ALLOCATION_LIMIT:
            raise AssertionError(f"allocated {peak} bytes reading a small file")  # noqa: B012


# ---- rows: safetensors and .ckpt files (item 2) -------------------------------------------------------------


def bomb_single_file(env: Env):
    path = bomb(env.tmp / "model.safetensors")
    return traced(lambda: stablepipe.StableDiffusionPipeline.from_single_file(path))


def bomb_in_folder(env: Env):
    folder = env.folder()
    bomb(folder / "unet" / "diffusion_pytorch_model.safetensors")
    return traced(lambda: load(folder))


def bomb_text_encoder(env: Env):
    folder = env.folder()
    bomb(folder / "text_encoder" / "model.safetensors")
    return load(folder)  # transformers reads it: the header is checked before


def bomb_lora(env: Env):
    path = bomb(env.tmp / "lora.safetensors")
    return traced(lambda: env.pipe.load_lora_weights(path))


def bomb_embedding(env: Env):
    path = bomb(env.tmp / "embedding.safetensors")
    return traced(lambda: env.pipe.load_textual_inversion(path, token="<x>"))


def header_file(header: dict[str, Any], data: bytes = b"\x00" * 16) -> Callable[[Env], Any]:
    def read(env: Env):
        return read_checkpoint(write_raw(env.tmp / "model.safetensors", json.dumps(header).encode(), data))

    return read


def forged_ckpt(env: Env):
    path = env.tmp / "model.ckpt"
    torch.save({"state_dict": {"w": torch.ones(4)}}, path)
    member = next(n for n in zipfile.ZipFile(path).namelist() if n.endswith("data/0"))
    forge_member_size(path, member, 3_500_000_000)
    return traced(lambda: read_checkpoint(path))


def bad_shard_index(env: Env):
    folder = env.folder()
    unet = folder / "unet"
    (unet / "diffusion_pytorch_model.safetensors").rename(unet / "part-1.safetensors")
    (unet / "diffusion_pytorch_model.safetensors.index.json").write_text('{"weight_map": ["part-1.safetensors"]}')
    return load(folder)


# ---- rows: arguments, model_index.json, configs, embeddings, pipeline kinds (item 8) ----------------------------


def dtype_name(env: Env):
    pipe = load(env.sd1, torch_dtype="float16")
    assert pipe.unet.dtype == pipe.vae.dtype == pipe.text_encoder.dtype == torch.float16, pipe.unet.dtype


def dtype_wrong(value: Any) -> Callable[[Env], Any]:
    return lambda env: load(env.sd1, torch_dtype=value)


def generic_pipeline(env: Env):
    pipe = stablepipe.DiffusionPipeline.from_pretrained(env.sd1)
    assert type(pipe) is stablepipe.StableDiffusionPipeline, type(pipe)


def index_edit(**changes: Any) -> Callable[[Env], Any]:
    def read(env: Env):
        folder = env.folder()
        edit_json(folder / "model_index.json", **changes)
        return load(folder, stablepipe.DiffusionPipeline)

    return read


def component_entry(env: Env):
    folder = env.folder()
    edit_json(folder / "model_index.json", unet="diffusers")
    return load(folder)


def file_text(relative: str, text: str) -> Callable[[Env], Any]:
    def read(env: Env):
        folder = env.folder()
        (folder / relative).write_text(text)
        return load(folder)

    return read


def config_edit(relative: str, **changes: Any) -> Callable[[Env], Any]:
    def read(env: Env):
        folder = env.folder()
        edit_json(folder / relative, **changes)
        return load(folder)

    return read


def wide_embedding(env: Env):
    from safetensors.torch import save_file

    path = env.tmp / "style.safetensors"
    save_file({"emb_params": torch.zeros(2, 768)}, str(path))  # AUTOMATIC1111's layout: no token inside
    return env.pipe.load_textual_inversion(path)


def inpaint_unet(env: Env):
    unet = stablepipe.UNet2DConditionModel.from_config(env.pipe.unet.config, in_channels=9)
    return stablepipe.StableDiffusionPipeline(**{**env.pipe.components, "unet": unet})


def inpaint_folder(env: Env):
    folder = env.folder()
    shutil.rmtree(folder / "unet")
    stablepipe.UNet2DConditionModel.from_config(env.pipe.unet.config, in_channels=9).save_pretrained(folder / "unet")
    return load(folder)


def lora_metadata(env: Env):
    from safetensors.torch import save_file

    path = env.tmp / "lora.safetensors"
    save_file({"unet.x.lora_A.weight": torch.zeros(1, 1)}, str(path), metadata={"lora_adapter_metadata": "{oops"})
    return env.pipe.load_lora_weights(path)


ROWS: list[tuple[str, Callable[[Env], Any], str | None]] = [
    # item 2: every reader checks the header against the file before allocating
    ("94-byte safetensors claiming 3.5 GB, single file", bomb_single_file, "ends inside tensor 'w'"),
    ("94-byte safetensors as a folder's UNet weights", bomb_in_folder, "ends inside tensor 'w'"),
    ("94-byte safetensors as a folder's text encoder weights", bomb_text_encoder, "ends inside tensor 'w'"),
    ("94-byte safetensors as a LoRA", bomb_lora, "ends inside tensor 'w'"),
    ("94-byte safetensors as an embedding", bomb_embedding, "ends inside tensor 'w'"),
    ("tensors overlapping", header_file({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                                         "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}),
     "tensors 'a' and 'b' overlap"),
    ("shape x dtype size not the bytes given", header_file({"a": {"dtype": "F16", "shape": [3, 3],
                                                                  "data_offsets": [0, 16]}}),
     "has 16 bytes but its shape [3, 3] of F16 needs 18"),
    ("negative shape", header_file({"a": {"dtype": "F32", "shape": [-4], "data_offsets": [0, 16]}}),
     "not a list of at most 64 non-negative integers"),
    ("offsets not two ints", header_file({"a": {"dtype": "F32", "shape": [1], "data_offsets": ["0", "4"]}}),
     "not two non-negative integers"),
    ("header a JSON array", header_file([{"dtype": "F32"}]), "header is a JSON array, not an object"),
    ("tensor entry not an object", header_file({"a": "F32"}), "tensor 'a' is described by a JSON string"),
    ("unknown dtype", header_file({"a": {"dtype": "F4", "shape": [1], "data_offsets": [0, 1]}}),
     "dtype F4, which stablepipe does not read"),
    (".ckpt zip member declaring 3.5 GB", forged_ckpt, "declares 3500000000 bytes"),
    ("sharded index whose weight_map is a list", bad_shard_index, "no `weight_map` object of file names"),
    # item 8: errors that point the right way
    ("torch_dtype='float16' (a string)", dtype_name, None),
    ("torch_dtype='bogus'", dtype_wrong("bogus"), "pass torch.float16"),
    ("torch_dtype=torch.int8", dtype_wrong(torch.int8), "must be a floating-point torch dtype"),
    ("DiffusionPipeline.from_pretrained(folder)", generic_pipeline, None),
    ("_class_name no pipeline has", index_edit(_class_name="NoSuchPipeline"), "names _class_name 'NoSuchPipeline'"),
    ("model_index.json not JSON", file_text("model_index.json", '{"unet": ["diffusers",'),
     "model_index.json is not valid JSON: Expecting value at line 1, column 23"),
    ("model_index.json a list", file_text("model_index.json", "[1, 2]"), "must hold a JSON object"),
    ("component entry a string", component_entry, "needs component 'unet' as [library, class name]"),
    ("unet config.json not JSON", file_text("unet/config.json", "in_channels = 4\n"),
     "unet/config.json is not valid JSON: Expecting value at line 1, column 1"),
    ("scheduler config a list", file_text("scheduler/scheduler_config.json", "[]"),
     "scheduler_config.json must hold a JSON object"),
    ('in_channels: "4"', config_edit("unet/config.json", in_channels="4"),
     'in_channels is "4" (a string), but UNet2DConditionModel expects an integer'),
    ("block_out_channels: null", config_edit("unet/config.json", block_out_channels=None),
     "block_out_channels is null, but UNet2DConditionModel expects a list of integers"),
    ("latent_channels: 0", config_edit("vae/config.json", latent_channels=0),
     "latent_channels is 0, but AutoencoderKL"),
    ("num_train_timesteps: 0", config_edit("scheduler/scheduler_config.json", num_train_timesteps=0),
     "num_train_timesteps is 0, but PNDMScheduler expects a positive number"),
    ('beta_start: "x"', config_edit("scheduler/scheduler_config.json", beta_start="x"),
     'beta_start is "x" (a string), but PNDMScheduler expects a number'),
    ("embedding 768 wide for a 32-wide encoder", wide_embedding,
     "is 768 wide but this text encoder's is 32 (StableDiffusionPipeline.text_encoder)"),
    ("inpainting UNet in StableDiffusionPipeline(...)", inpaint_unet,
     "this UNet is an inpainting UNet (9 input channels: 4 latent + 1 mask + 4 masked-image latent); that one "
     "belongs in StableDiffusionInpaintPipeline"),
    ("inpainting folder in StableDiffusionPipeline.from_pretrained", inpaint_folder,
     "belongs in StableDiffusionInpaintPipeline"),
    ("LoRA metadata not JSON", lora_metadata, "lora_adapter_metadata is not a JSON object"),
]


def outcome(row: tuple[str, Callable[[Env], Any], str | None], env: Env) -> str:
    """"ok", or what went wrong: "raw: <error>" (not the expected clear error) or "silent" (accepted)."""
    _, run, expected = row
    try:
        run(env)
    except Exception as err:  # what each row is about: which error comes out
        text = f"{type(err).__name__}: {err}"
        return "ok" if expected is not None and expected in str(err) else f"raw: {text[:300]}"
    return "ok" if expected is None else "silent"


@pytest.fixture(scope="module")
def pipe(sd1_folder):
    return stablepipe.StableDiffusionPipeline.from_pretrained(sd1_folder)


@pytest.mark.parametrize("row", ROWS, ids=[row[0] for row in ROWS])
def test_bad_input_gets_its_clear_error(row, sd1_folder, pipe, tmp_path):
    assert outcome(row, Env(sd1_folder, tmp_path, pipe)) == "ok"
