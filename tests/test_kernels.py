"""The compiled CPU attention kernel: accuracy against float64 and aten, where it runs, and pipelines on both paths.

The kernel is built once per machine into torch's extension folder (about 40 s on two cores); later runs load it.
"""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from conftest import max_diff

import stablepipe
from stablepipe.kernels import build, scaled_dot_product_attention, use_kernels
from stablepipe.kernels.attention import kernel_applies

KERNEL = "stablepipe_kernels::attention"
HEAD_SIZES = (40, 64, 80, 160)
KEY_COUNTS = (77, 300, 1024)  # cross-attention, a key count that fills no block, several blocks


@pytest.fixture(scope="module")
def ops():
    ops = build.compiled_ops()
    assert ops is not None, "the kernel did not build on this machine (see the log for why)"
    return ops


def random_qkv(batch: int, heads: int, queries: int, keys: int, dim: int, dtype: torch.dtype, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    shapes = ((batch, heads, queries, dim), (batch, heads, keys, dim), (batch, heads, keys, dim))
    return tuple(torch.randn(shape, generator=generator).to(dtype) for shape in shapes)


def float64_attention(q, k, v) -> torch.Tensor:
    return F.scaled_dot_product_attention(q.double(), k.double(), v.double())


def kernel_calls(fn) -> int:
    """How many times `fn()` ran the compiled kernel (counted by torch's profiler)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        fn()
    return sum(event.count for event in profile.key_averages() if event.key == KERNEL)


def errors(x: torch.Tensor, reference: torch.Tensor) -> tuple[float, float]:
    """(max, root mean square) of the difference."""
    diff = x.double() - reference
    return diff.abs().max().item(), diff.pow(2).mean().sqrt().item()


# ---- accuracy ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dim", HEAD_SIZES)
@pytest.mark.parametrize("keys", KEY_COUNTS)
def test_bfloat16_no_less_accurate_than_aten(ops, dim, keys):
    q, k, v = random_qkv(1, 2, 37, keys, dim, torch.bfloat16, seed=dim + keys)  # 37 queries: a short last tile
    reference = float64_attention(q, k, v)
    assert kernel_calls(lambda: scaled_dot_product_attention(q, k, v)) == 1
    ours = scaled_dot_product_attention(q, k, v)
    aten_max, aten_rms = errors(F.scaled_dot_product_attention(q, k, v), reference)
    our_max, our_rms = errors(ours, reference)
    assert ours.dtype == torch.bfloat16 and ours.shape == q.shape
    assert our_rms <= 1.05 * aten_rms, (our_rms, aten_rms)
    assert our_max <= 1.25 * aten_max, (our_max, aten_max)


@pytest.mark.parametrize("dim", HEAD_SIZES)
def test_float32_matches_aten(ops, dim):
    q, k, v = random_qkv(2, 3, 50, 77, dim, torch.float32, seed=dim)
    assert kernel_calls(lambda: scaled_dot_product_attention(q, k, v)) == 0  # float32 is opt-in
    with use_kernels(True, float32=True):
        assert kernel_calls(lambda: scaled_dot_product_attention(q, k, v)) == 1
        ours = scaled_dot_product_attention(q, k, v)
    assert max_diff(ours, F.scaled_dot_product_attention(q, k, v)) < 2e-6
    assert max_diff(ours, float64_attention(q, k, v)) < 2e-6


def test_float32_kernel_on_many_keys(ops):
    """The operator itself runs float32 at any key count (the dispatch sends long float32 sequences to aten)."""
    q, k, v = random_qkv(1, 2, 20, 333, 64, torch.float32)
    assert max_diff(ops.attention(q, k, v, 64**-0.5, 16), float64_attention(q, k, v)) < 2e-6


def test_16384_keys_and_custom_scale(ops):
    q, k, v = random_qkv(1, 1, 64, 16384, 40, torch.bfloat16)
    reference = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), scale=0.3)
    ours = scaled_dot_product_attention(q, k, v, scale=0.3)
    aten = F.scaled_dot_product_attention(q, k, v, scale=0.3)
    assert errors(ours, reference)[1] <= 1.1 * errors(aten, reference)[1]


def test_strided_inputs_and_head_merge(ops):
    """q, k, v as head views of (B, N, H*D) projections; the output's (B, N, H, D) memory makes merging free."""
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(2, 70, 3 * 4 * 40, generator=generator).bfloat16()  # fused q, k, v: 4 heads of 40
    q, k, v = (t.view(2, 70, 4, 40).transpose(1, 2) for t in x.chunk(3, dim=-1))  # (B, H, N, D) views
    out = scaled_dot_product_attention(q, k, v)
    assert out.transpose(1, 2).is_contiguous()
    reference = float64_attention(q, k, v)
    assert errors(out, reference)[1] <= 1.05 * errors(F.scaled_dot_product_attention(q, k, v), reference)[1]


def test_batch_and_rows_per_task_do_not_change_the_result(ops):
    q, k, v = random_qkv(2, 2, 130, 90, 80, torch.bfloat16)
    whole = ops.attention(q, k, v, 80**-0.5, 64)
    assert torch.equal(whole, ops.attention(q, k, v, 80**-0.5, 16))
    assert torch.equal(whole[1:], ops.attention(q[1:], k[1:], v[1:], 80**-0.5, 64))


# ---- where the kernel runs --------------------------------------------------------------------------------------


def test_fallback_for_masks_dropout_causal_and_unsupported_inputs(ops):
    q, k, v = random_qkv(1, 2, 16, 16, 40, torch.bfloat16)
    mask = torch.ones(16, 16, dtype=torch.bool).tril()
    cases = {
        "mask": (lambda: scaled_dot_product_attention(q, k, v, attn_mask=mask),
                 lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)),
        "causal": (lambda: scaled_dot_product_attention(q, k, v, is_causal=True),
                   lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)),
        "float16": (lambda: scaled_dot_product_attention(q.half(), k.half(), v.half()),
                    lambda: F.scaled_dot_product_attention(q.half(), k.half(), v.half())),
        "head size 36": (lambda: scaled_dot_product_attention(q[..., :36], k[..., :36], v[..., :36]),
                         lambda: F.scaled_dot_product_attention(q[..., :36], k[..., :36], v[..., :36])),
        "3-d": (lambda: scaled_dot_product_attention(q[0], k[0], v[0]),
                lambda: F.scaled_dot_product_attention(q[0], k[0], v[0])),
    }  # fmt: skip
    for name, (ours, aten) in cases.items():
        assert kernel_calls(ours) == 0, name
        assert torch.equal(ours(), aten()), name


def test_fallback_when_gradients_are_needed_or_float32_keys_are_many(ops):
    q, k, v = random_qkv(1, 2, 16, 16, 40, torch.bfloat16)
    q.requires_grad_(True)
    assert not kernel_applies(q, k, v)
    with torch.no_grad():
        assert kernel_applies(q, k, v)
    q, k, v = random_qkv(1, 2, 16, 200, 40, torch.float32)
    assert not kernel_applies(q, k[:, :, :100], v[:, :, :100])  # float32: opt-in
    with use_kernels(True, float32=True):
        assert kernel_applies(q, k[:, :, :100], v[:, :, :100])
        assert not kernel_applies(q, k, v)  # float32 self-attention over many keys: aten is faster
    assert kernel_applies(q.bfloat16(), k.bfloat16(), v.bfloat16())


def test_switched_off_by_env_and_by_context(ops, monkeypatch):
    q, k, v = random_qkv(1, 2, 16, 77, 40, torch.bfloat16)
    with use_kernels(False):
        assert kernel_calls(lambda: scaled_dot_product_attention(q, k, v)) == 0
        with use_kernels(True):
            assert kernel_calls(lambda: scaled_dot_product_attention(q, k, v)) == 1
        assert torch.equal(scaled_dot_product_attention(q, k, v), F.scaled_dot_product_attention(q, k, v))
    monkeypatch.setenv("STABLEPIPE_KERNELS", "0")
    assert kernel_calls(lambda: scaled_dot_product_attention(q, k, v)) == 0


def test_failed_build_falls_back_with_one_message(monkeypatch, caplog, tmp_path):
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))  # a new build key, and a compiler that fails
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    with caplog.at_level(logging.WARNING, logger="stablepipe.kernels"):
        assert build.compiled_ops.__wrapped__() is None
    messages = [r.getMessage() for r in caplog.records if r.name == "stablepipe.kernels"]
    assert len(messages) == 1 and "not used" in messages[0] and "build failed" in messages[0], messages


# ---- pipelines on both paths ------------------------------------------------------------------------------------


def generate(pipe, **kwargs):
    call = dict(prompt="a red circle", num_inference_steps=3, height=32, width=32, output_type="np", **kwargs)
    return pipe(generator=torch.Generator().manual_seed(0), **call).images


def test_pipeline_matches_diffusers_on_both_paths(sd1_folder):
    import diffusers

    ours = stablepipe.StableDiffusionPipeline.from_pretrained(sd1_folder)
    theirs = diffusers.StableDiffusionPipeline.from_pretrained(sd1_folder)
    for pipe in (ours, theirs):
        pipe.set_progress_bar_config(disable=True)
    expected = generate(theirs)
    with use_kernels(True, float32=True):  # the tiny model's attention has few keys: the kernel runs everywhere
        assert kernel_calls(lambda: generate(ours)) > 0
        assert max_diff(generate(ours), expected) < 2e-3
    with use_kernels(False):
        assert kernel_calls(lambda: generate(ours)) == 0
        assert max_diff(generate(ours), expected) < 2e-3


def test_bfloat16_pipeline_on_both_paths(sd1_folder):
    pipe = stablepipe.StableDiffusionPipeline.from_pretrained(sd1_folder)
    pipe.set_progress_bar_config(disable=True)
    full = generate(pipe)
    pipe = pipe.to(torch.bfloat16)
    assert kernel_calls(lambda: generate(pipe)) > 0
    with_kernel = generate(pipe)
    with use_kernels(False):
        without = generate(pipe)
    assert max_diff(with_kernel, without) < 2e-2  # two bfloat16 roundings of the same computation
    assert abs(max_diff(with_kernel, full) - max_diff(without, full)) < 1e-2  # equally close to float32


def test_bfloat16_unet_with_sd15_head_sizes_as_accurate_as_aten():
    """A UNet whose attention has SD 1.5's head sizes 40 and 80: against its float32 output, the kernel path's
    bfloat16 error is that of the aten path's (the two round differently, so they are not equal to each other)."""
    import diffusers

    torch.manual_seed(0)
    config = dict(
        block_out_channels=(40, 80), layers_per_block=1, norm_num_groups=8, attention_head_dim=(1, 1),
        down_block_types=("CrossAttnDownBlock2D",) * 2, up_block_types=("CrossAttnUpBlock2D",) * 2,
        cross_attention_dim=32, sample_size=16,
    )  # fmt: skip
    theirs = diffusers.UNet2DConditionModel(**config)
    unet = stablepipe.UNet2DConditionModel.from_state_dict(dict(theirs.config), theirs.state_dict()).eval()
    generator = torch.Generator().manual_seed(1)
    x, text = torch.randn(2, 4, 16, 16, generator=generator), torch.randn(2, 77, 32, generator=generator)
    with torch.no_grad():
        full = unet(x, torch.tensor([999, 17]), text).sample
        unet = unet.to(torch.bfloat16)
        call = lambda: unet(x.bfloat16(), torch.tensor([999, 17]), text.bfloat16()).sample  # noqa: E731
        assert kernel_calls(call) == 2 * 7  # self and cross in each transformer: 2 down, 1 mid, 4 up
        with_kernel = call()
        with use_kernels(False):
            without = call()
    rms = [(out.float() - full).pow(2).mean().sqrt().item() for out in (with_kernel, without)]
    assert rms[0] <= 1.1 * rms[1], rms
