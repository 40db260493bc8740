"""Loading from the Hub cache (offline), choosing files, sharded and .bin weights, configs."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import max_diff

import stablepipe
from stablepipe.loading.components import hub_patterns
from stablepipe.loading.files import find_weight_files

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def make_hub_cache(folder, cache, repo="tiny-org/tiny-sd"):
    """Lay `folder` out as huggingface_hub's cache holds a downloaded repo."""
    root = cache / ("models--" + repo.replace("/", "--"))
    shutil.copytree(folder, root / "snapshots" / COMMIT)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(COMMIT)
    return root / "snapshots" / COMMIT


def test_repo_id_loads_offline_from_the_cache(sd1_folder, tmp_path):
    make_hub_cache(sd1_folder, tmp_path)
    from_hub = stablepipe.StableDiffusionPipeline.from_pretrained("tiny-org/tiny-sd", cache_dir=tmp_path)
    local = stablepipe.StableDiffusionPipeline.from_pretrained(sd1_folder)
    common = dict(prompt="a", num_inference_steps=2, height=32, width=32, output_type="np")
    for p in (from_hub, local):
        p.set_progress_bar_config(disable=True)
    a = from_hub(generator=torch.Generator().manual_seed(0), **common).images
    b = local(generator=torch.Generator().manual_seed(0), **common).images
    assert max_diff(a, b) == 0.0
    unet = stablepipe.UNet2DConditionModel.from_pretrained("tiny-org/tiny-sd", subfolder="unet", cache_dir=tmp_path)
    assert torch.equal(unet.conv_in.weight, local.unet.conv_in.weight)


def test_missing_repo_file_offline_names_repo_and_file(sd1_folder, tmp_path):
    snapshot = make_hub_cache(sd1_folder, tmp_path, repo="tiny-org/partial")
    (snapshot / "model_index.json").unlink()
    with pytest.raises(OSError, match="'model_index.json' of Hub repo 'tiny-org/partial' is not in the local cache"):
        stablepipe.StableDiffusionPipeline.from_pretrained("tiny-org/partial", cache_dir=tmp_path)


def test_a_mistyped_local_path_is_reported_as_such(tmp_path):
    missing = tmp_path / "runs" / "step1"
    with pytest.raises(OSError, match="is neither a local folder \\(no such path\\) nor a Hub repo id"):
        stablepipe.StableDiffusionPipeline.from_pretrained(str(missing))


def test_hub_patterns_pick_one_weight_format_per_component():
    index = {"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
             "vae": ["diffusers", "AutoencoderKL"], "safety_checker": [None, None]}
    files = ["model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.bin",
             "unet/diffusion_pytorch_model.safetensors", "unet/diffusion_pytorch_model.fp16.safetensors",
             "vae/diffusion_pytorch_model.bin", "vae/diffusion_pytorch_model.fp16.bin"]
    plain = hub_patterns(index, files, skip=set(), variant=None)
    assert "unet/diffusion_pytorch_model.safetensors" in plain and "unet/diffusion_pytorch_model.bin" not in plain
    assert "vae/diffusion_pytorch_model.bin" in plain and "vae/diffusion_pytorch_model.fp16.bin" not in plain
    assert not any(p.startswith("safety_checker") for p in plain)
    fp16 = hub_patterns(index, files, skip={"vae"}, variant="fp16")
    assert "unet/diffusion_pytorch_model.fp16.safetensors" in fp16
    assert "unet/diffusion_pytorch_model.safetensors" not in fp16 and not any(p.startswith("vae") for p in fp16)


def test_bin_and_sharded_weights_load(sd1_folder, tmp_path):
    from safetensors.torch import load_file, save_file

    unet_dir = shutil.copytree(sd1_folder / "unet", tmp_path / "unet")
    state = load_file(unet_dir / "diffusion_pytorch_model.safetensors")
    reference = stablepipe.UNet2DConditionModel.from_pretrained(unet_dir)
    (unet_dir / "diffusion_pytorch_model.safetensors").unlink()
    keys = sorted(state)
    shards = {"diffusion_pytorch_model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "diffusion_pytorch_model-00002-of-00002.safetensors": keys[len(keys) // 2 :]}
    for name, names in shards.items():
        save_file({k: state[k] for k in names}, unet_dir / name)
    index = {"metadata": {}, "weight_map": {k: name for name, names in shards.items() for k in names}}
    (unet_dir / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    assert len(find_weight_files(unet_dir, "diffusion_pytorch_model")) == 2
    sharded = stablepipe.UNet2DConditionModel.from_pretrained(unet_dir)
    assert all(torch.equal(a, b) for a, b in zip(reference.state_dict().values(), sharded.state_dict().values()))

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shutil.copy(unet_dir / "config.json", bin_dir)
    torch.save(state, bin_dir / "diffusion_pytorch_model.bin")
    from_bin = stablepipe.UNet2DConditionModel.from_pretrained(bin_dir)
    assert torch.equal(from_bin.conv_out.weight, reference.conv_out.weight)


def test_bin_that_needs_code_is_refused(sd1_folder, tmp_path):
    import pickle

    class Evil:
        def __reduce__(self):
            return (print, ("this must never run",))

    bin_dir = shutil.copytree(sd1_folder / "vae", tmp_path / "vae")
    (bin_dir / "diffusion_pytorch_model.safetensors").unlink()
    with open(bin_dir / "diffusion_pytorch_model.bin", "wb") as f:
        pickle.dump({"x": Evil()}, f)
    with pytest.raises(OSError, match="(?s)could not be read safely.*never runs pickle code"):
        stablepipe.AutoencoderKL.from_pretrained(bin_dir)


def test_model_dtype_and_config(sd1_folder):
    unet = stablepipe.UNet2DConditionModel.from_pretrained(sd1_folder, subfolder="unet", torch_dtype=torch.bfloat16)
    assert unet.dtype == torch.bfloat16
    assert unet.config.cross_attention_dim == 32 and unet.config["in_channels"] == 4
    with pytest.raises(AttributeError, match="read-only"):
        unet.config.in_channels = 9


# ---- reading safetensors tensor by tensor ------------------------------------------------------------------


def test_safetensors_reader_matches_the_library_and_converts_floats_only(tmp_path):
    from safetensors.torch import load_file, save_file

    from stablepipe.loading.checkpoint import read_safetensors_state, safetensors_metadata

    g = torch.Generator().manual_seed(0)
    tensors = {
        "f32": torch.randn(3, 4, generator=g), "f16": torch.randn(5, generator=g).half(),
        "bf16": torch.randn(2, 2, 2, generator=g).bfloat16(), "f64": torch.randn(1, generator=g).double(),
        "i64": torch.arange(7), "i8": torch.tensor([-3, 4], dtype=torch.int8),
        "u8": torch.tensor([255], dtype=torch.uint8),
        "mask": torch.tensor([True, False]), "empty": torch.zeros(0, 4), "scalar": torch.tensor(2.5),
    }
    path = tmp_path / "w.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt", "ss_steps": "12"})
    expected = load_file(str(path))
    got = read_safetensors_state(path)
    assert got.keys() == expected.keys()
    for name, tensor in expected.items():
        assert got[name].dtype == tensor.dtype and got[name].shape == tensor.shape and torch.equal(got[name], tensor)
    converted = read_safetensors_state(path, torch.bfloat16)
    assert {k for k, v in converted.items() if v.dtype == torch.bfloat16} == {
        "f32", "f16", "bf16", "f64", "empty", "scalar"}
    assert converted["i64"].dtype == torch.int64 and torch.equal(converted["f32"], tensors["f32"].bfloat16())
    assert safetensors_metadata(path) == {"format": "pt", "ss_steps": "12"}


def test_safetensors_reader_errors(tmp_path):
    from safetensors.torch import save_file

    from stablepipe.loading.files import load_state_dict

    path = tmp_path / "w.safetensors"
    save_file({"a": torch.ones(1000)}, str(path))
    data = path.read_bytes()
    path.write_bytes(data[:-100])
    with pytest.raises(OSError, match="not a readable safetensors file .*ends inside tensor 'a'.*re-download"):
        load_state_dict([path])
    path.write_bytes(b"\xff" * 64)
    with pytest.raises(OSError, match="header length"):
        load_state_dict([path])
    header = b'{"a":{"dtype":"F8_E4M3","shape":[1],"data_offsets":[0,1]}}'
    path.write_bytes(len(header).to_bytes(8, "little") + header + b"\x00")
    with pytest.raises(OSError, match="dtype F8_E4M3"):
        load_state_dict([path])


def test_models_load_converted_from_float32_files(sd1_folder):
    from stablepipe import AutoencoderKL

    full = AutoencoderKL.from_pretrained(sd1_folder / "vae")
    half = AutoencoderKL.from_pretrained(sd1_folder / "vae", torch_dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16
    for (name, a), (_, b) in zip(full.state_dict().items(), half.state_dict().items(), strict=True):
        assert torch.equal(a.bfloat16(), b), name
