"""Memory and speed options give the output of the plain path, and options that change it say by how much.

Bounds used here (images in [0, 1], CPU float32 unless stated):
- attention slicing, fused QKV projections, VAE slicing, channels-last, model and sequential CPU offload:
  the same computation reordered, so <= 1e-5 against the plain path;
- VAE tiling: the seams are blended, so it matches diffusers' tiled decode (<= 2e-3), not the untiled one;
- bfloat16 against float32: PSNR >= 35 dB on the tiny model; torch.compile (inductor): <= 1e-4 on a block.
No timings are asserted; speed is measured by the scripts in benchmarks/.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from stablepipe import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from stablepipe.models.attention import Attention, resolve_slice_sizes
from stablepipe.pipelines import memory

SAME = 1e-5  # reordered float32 arithmetic


def load(folder, cls=StableDiffusionPipeline):
    pipe = cls.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run(pipe, **kwargs) -> np.ndarray:
    kwargs = {"num_inference_steps": 2, "output_type": "np", **kwargs}
    return pipe("a red cube", generator=torch.Generator().manual_seed(0), **kwargs).images


def max_diff(a, b) -> float:
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).max())


def psnr(a, b) -> float:
    mse = float(np.mean((np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


@pytest.fixture(scope="module")
def plain(sd1_folder) -> np.ndarray:
    return run(load(sd1_folder))


@pytest.fixture(scope="module")
def unet_inputs():
    torch.manual_seed(0)
    return torch.randn(2, 4, 16, 16), torch.tensor([10, 10]), torch.randn(2, 77, 32)


# ---- attention slicing ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("slice_size", ["auto", "max", 3])
def test_attention_slicing_gives_the_plain_image(sd1_folder, plain, slice_size):
    pipe = load(sd1_folder)
    pipe.enable_attention_slicing(slice_size)
    sizes = {m.slice_size for m in pipe.unet.modules() if isinstance(m, Attention)}
    assert sizes == {{"auto": 4, "max": 1}.get(slice_size, slice_size)}  # the tiny UNet has 8 heads
    assert max_diff(run(pipe), plain) <= SAME
    pipe.disable_attention_slicing()
    assert {m.slice_size for m in pipe.unet.modules() if isinstance(m, Attention)} == {None}


def test_attention_slicing_matches_diffusers_sliced(sd1_folder):
    import diffusers

    ours, theirs = load(sd1_folder), load(sd1_folder, diffusers.StableDiffusionPipeline)
    ours.enable_attention_slicing("max")
    theirs.enable_attention_slicing("max")
    assert max_diff(run(ours), run(theirs)) <= 2e-3


def test_attention_slice_sizes_are_checked():
    assert resolve_slice_sizes("auto", [8, 5, 1]) == [4, 2, 1]
    assert resolve_slice_sizes([2, None], [8, 4]) == [2, None]
    with pytest.raises(ValueError, match="one per layer"):
        resolve_slice_sizes([1, 2, 3], [8, 8])
    with pytest.raises(ValueError, match=r"\[1, 8\]"):
        resolve_slice_sizes(9, [8])
    with pytest.raises(ValueError, match="auto"):
        resolve_slice_sizes("half", [8])


# ---- fused QKV projections --------------------------------------------------------------------------------------


def test_fused_projections_give_the_plain_image(sd1_folder, plain):
    pipe = load(sd1_folder)
    pipe.fuse_qkv_projections()
    layers = [m for m in [*pipe.unet.modules(), *pipe.vae.modules()] if isinstance(m, Attention)]
    assert layers and all(m.fused_projections for m in layers)
    assert max_diff(run(pipe), plain) <= SAME
    pipe.unfuse_qkv_projections()
    assert not any(m.fused_projections for m in layers)
    assert max_diff(run(pipe), plain) <= SAME


def test_fused_weights_are_views_that_follow_edits_and_casts(sd1_folder, unet_inputs):
    unet = UNet2DConditionModel.from_pretrained(sd1_folder / "unet")
    fused = UNet2DConditionModel.from_pretrained(sd1_folder / "unet")
    fused.fuse_qkv_projections()
    layer = next(m for m in fused.modules() if isinstance(m, Attention) and not m.is_cross_attention)
    weight, _ = layer.fused_weight()
    assert layer.to_k.weight.data_ptr() == weight[layer.to_q.weight.shape[0] :].data_ptr()  # no copy kept
    with torch.no_grad():
        for model in (unet, fused):  # an in-place edit, as fuse_lora makes it
            model.get_submodule(layer_name(fused, layer)).to_v.weight.data += 0.05
        assert (unet(*unet_inputs).sample - fused(*unet_inputs).sample).abs().max() <= SAME
        unet.to(torch.float64), fused.to(torch.float64)  # cast: fused again from the cast weights
        x, t, text = unet_inputs
        expected = unet(x.double(), t, text.double()).sample
        assert (fused(x.double(), t, text.double()).sample - expected).abs().max() <= 1e-10


def layer_name(model: torch.nn.Module, layer: torch.nn.Module) -> str:
    return next(name for name, m in model.named_modules() if m is layer)


def test_fused_model_saves_and_loads_unchanged(sd1_folder, tmp_path, unet_inputs):
    unet = UNet2DConditionModel.from_pretrained(sd1_folder / "unet")
    with torch.no_grad():
        expected = unet(*unet_inputs).sample
    unet.fuse_qkv_projections()
    unet.save_pretrained(tmp_path)  # safetensors refuses tensors sharing memory: the state dict holds copies
    reloaded = UNet2DConditionModel.from_pretrained(tmp_path)
    with torch.no_grad():
        assert torch.equal(reloaded(*unet_inputs).sample, expected)


def test_fused_projections_step_aside_for_hooks(sd1_folder, unet_inputs):
    """LoRA adapters and sequential offload hook the projection layers: those must still be called."""
    unet = UNet2DConditionModel.from_pretrained(sd1_folder / "unet")
    unet.fuse_qkv_projections()
    layer = next(m for m in unet.modules() if isinstance(m, Attention) and not m.is_cross_attention)
    with torch.no_grad():
        before = unet(*unet_inputs).sample
        handle = layer.to_k.register_forward_hook(lambda module, args, out: out * 2)
        hooked = unet(*unet_inputs).sample
        handle.remove()
        unet.unfuse_qkv_projections()
        layer.to_k.register_forward_hook(lambda module, args, out: out * 2)
        assert (hooked - unet(*unet_inputs).sample).abs().max() <= SAME
    assert (hooked - before).abs().max() > 1e-3


def test_vae_fused_projections(sd1_folder):
    vae = AutoencoderKL.from_pretrained(sd1_folder / "vae")
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = vae.decode(z).sample
        vae.fuse_qkv_projections()
        assert (vae.decode(z).sample - expected).abs().max() <= SAME
        plain = AutoencoderKL.from_pretrained(sd1_folder / "vae").to(torch.float64)
        vae.to(torch.float64)  # weights and biases (the VAE's projections have them) fused again after the cast
        layer = next(m for m in vae.modules() if isinstance(m, Attention))
        assert layer.to_v.bias.data_ptr() == layer.fused_weight()[1][2 * layer.to_q.bias.shape[0] :].data_ptr()
        assert (vae.decode(z.double()).sample - plain.decode(z.double()).sample).abs().max() <= 1e-10


# ---- VAE slicing and tiling ----------------------------------------------------------------------------------------


def test_vae_slicing_gives_the_plain_images(sd1_folder):
    pipe = load(sd1_folder)
    expected = run(pipe, num_images_per_prompt=2)
    pipe.enable_vae_slicing()
    assert pipe.vae.use_slicing
    assert max_diff(run(pipe, num_images_per_prompt=2), expected) <= SAME
    pipe.disable_vae_slicing()
    assert not pipe.vae.use_slicing


def test_vae_tiling_matches_diffusers_tiled_decode(sd1_folder):
    import diffusers

    ours, theirs = load(sd1_folder), load(sd1_folder, diffusers.StableDiffusionPipeline)
    untiled = run(ours, height=64, width=64)  # 32x32 latents: above the tiny VAE's 16-latent tiles
    ours.enable_vae_tiling()
    theirs.vae.enable_tiling()  # diffusers 0.42 dropped the pipeline method
    tiled = run(ours, height=64, width=64)
    assert max_diff(tiled, run(theirs, height=64, width=64)) <= 2e-3
    assert max_diff(tiled, untiled) > 1e-4  # blended seams: a different image, as documented
    ours.disable_vae_tiling()
    assert max_diff(run(ours, height=64, width=64), untiled) <= SAME


# ---- channels-last, compile, bfloat16 -----------------------------------------------------------------------------


def test_channels_last_gives_the_plain_image(sd1_folder, plain):
    pipe = load(sd1_folder)
    pipe.enable_channels_last()
    assert pipe.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert max_diff(run(pipe), plain) <= SAME


def test_torch_compile_wiring(sd1_folder):
    pipe = load(sd1_folder)
    pipe.enable_torch_compile(backend="eager")
    compiled = [pipe.unet, pipe.vae.encoder, pipe.vae.decoder]
    assert all(m._compiled_call_impl is not None for m in compiled)
    pipe.disable_torch_compile()
    assert all(m._compiled_call_impl is None for m in compiled)


def test_torch_compile_output_change_is_bounded(sd1_folder):
    """inductor fuses and reorders float32 arithmetic: measured on one transformer of the tiny UNet (compiling
    the whole UNet takes minutes on two cores)."""
    unet = UNet2DConditionModel.from_pretrained(sd1_folder / "unet")
    block = unet.down_blocks[1].attentions[0]  # norm, projections, self- and cross-attention, GEGLU
    generator = torch.Generator().manual_seed(2)
    x, text = torch.randn(2, 64, 8, 8, generator=generator), torch.randn(2, 77, 32, generator=generator)
    with torch.no_grad():
        expected = block(x, text)
        compiled = torch.compile(block)(x, text)
    assert (compiled - expected).abs().max() <= 1e-4 * expected.abs().max()


def test_bfloat16_against_float32(sd1_folder, plain):
    pipe = load(sd1_folder).to(torch.bfloat16)
    image = run(pipe)
    assert psnr(image, plain) >= 35.0, f"bfloat16 PSNR {psnr(image, plain):.1f} dB"


# ---- CPU offload (the accelerator played by the CPU) ----------------------------------------------------------------


def test_model_cpu_offload_gives_the_plain_image_moving_one_model_at_a_time(sd1_folder, plain):
    pipe = load(sd1_folder)
    pipe.enable_model_cpu_offload(device="cpu")
    assert pipe.device == torch.device("cpu") and pipe._execution_device == torch.device("cpu")
    assert max_diff(run(pipe), plain) <= SAME
    assert list(pipe._offload.onloads) == ["text_encoder", "unet", "vae"]  # each moved once per image
    assert pipe._offload.current is pipe.vae
    pipe.maybe_free_model_hooks()
    assert pipe._offload.current is None
    pipe.remove_all_hooks()
    assert pipe._offload is None and not pipe.unet._forward_pre_hooks


def test_sequential_cpu_offload_gives_the_plain_image(sd1_folder, plain):
    pipe = load(sd1_folder)
    pipe.fuse_qkv_projections()  # fused layers must step aside for the per-layer hooks
    pipe.enable_sequential_cpu_offload(device="cpu")
    assert max_diff(run(pipe), plain) <= SAME
    layers = sum(1 for m in pipe.unet.modules() if next(m.parameters(recurse=False), None) is not None)
    assert pipe._offload.onloads >= 2 * layers  # every UNet layer moved at each of the two steps
    pipe.remove_all_hooks()
    assert not any(m._forward_hooks for m in pipe.unet.modules())


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given when there is no accelerator")
def test_offload_without_accelerator_says_what_to_do(sd1_folder):
    pipe = load(sd1_folder)
    with pytest.raises(ValueError, match="device='cpu'"):
        pipe.enable_model_cpu_offload()
    with pytest.raises(ValueError, match="index once"):
        memory.accelerator_device(1, "cuda:0")
    assert memory.accelerator_device(1, "cuda") == torch.device("cuda", 1)


# ---- defaults and repeated work ------------------------------------------------------------------------------------


def test_fast_dtype_follows_the_hardware(monkeypatch):
    assert memory.fast_dtype("cuda") == torch.float16
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True, raising=False)
    assert memory.fast_dtype("cpu") == torch.bfloat16
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    assert memory.fast_dtype("cpu") == torch.float32
    assert memory.fast_dtype("mps") == torch.float32


def test_cli_auto_dtype_is_the_fast_path(sd1_folder):
    import argparse

    from stablepipe.model_flags import load_pipeline_from_flags, pick_device_and_dtype

    assert pick_device_and_dtype("cpu", "auto") == (torch.device("cpu"), memory.fast_dtype("cpu"))
    assert pick_device_and_dtype("cpu", "float32")[1] == torch.float32
    flags = dict(model=str(sd1_folder), variant=None, revision=None, device="cpu", no_safety_checker=True,
                 scheduler=None, quiet=True, json=False)  # fmt: skip
    fast = load_pipeline_from_flags(StableDiffusionPipeline, argparse.Namespace(**flags, dtype="auto"), print)
    assert fast.unet.dtype == memory.fast_dtype("cpu")
    assert fast.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    plain = load_pipeline_from_flags(StableDiffusionPipeline, argparse.Namespace(**flags, dtype="float32"), print)
    assert plain.unet.dtype == torch.float32 and plain.unet.conv_in.weight.is_contiguous()


def test_text_is_encoded_once_per_image_whatever_the_steps(sd1_folder):
    pipe = load(sd1_folder)
    calls = {"text": 0, "unet": 0}
    pipe.text_encoder.register_forward_pre_hook(lambda *a: calls.__setitem__("text", calls["text"] + 1))
    pipe.unet.register_forward_pre_hook(lambda *a: calls.__setitem__("unet", calls["unet"] + 1))
    run(pipe, num_inference_steps=2)
    first, first_steps = dict(calls), len(pipe.scheduler.timesteps)
    run(pipe, num_inference_steps=5)
    assert calls["text"] - first["text"] == first["text"] == 2  # prompt and negative prompt, once each
    steps = (first_steps, len(pipe.scheduler.timesteps))  # PNDM: one more timestep than steps
    assert (first["unet"], calls["unet"] - first["unet"]) == steps  # one batched (uncond, cond) call per timestep


# ---- layerwise casting (weights stored in float8, each layer computed in the model's dtype) --------------------


def test_layerwise_casting_stores_float8_and_computes_in_the_model_dtype(sd1_folder, unet_inputs):
    """The result is the model run on its weights rounded to float8 once, in float32: nothing else changes."""
    sample, t, context = unet_inputs
    cast = load(sd1_folder)
    rounded = load(sd1_folder)
    cast.unet.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
    kept = []
    for name, module in rounded.unet.named_modules():  # the same layers, rounded by hand and left in float32
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) and "norm" not in name:
            module.weight.data = module.weight.data.to(torch.float8_e4m3fn).float()
            if module.bias is not None:
                module.bias.data = module.bias.data.to(torch.float8_e4m3fn).float()
            kept.append(name)
    layers = dict(cast.unet.named_modules())
    assert kept and all(layers[name].weight.dtype == torch.float8_e4m3fn for name in kept)
    assert cast.unet.conv_norm_out.weight.dtype == torch.float32  # norms are skipped
    assert cast.unet.dtype == torch.float32  # what the pipeline casts its inputs to
    with torch.no_grad():
        ours = cast.unet(sample, t, context).sample
        expected = rounded.unet(sample, t, context).sample
    torch.testing.assert_close(ours, expected, rtol=0, atol=0)
    assert all(layers[name].weight.dtype == torch.float8_e4m3fn for name in kept)  # back in storage after
    image = run(cast)
    assert image.shape == (1, 32, 32, 3) and np.isfinite(image).all()
