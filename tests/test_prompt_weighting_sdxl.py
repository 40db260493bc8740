"""AUTOMATIC1111's prompt syntax and long prompts on SDXL (both text encoders) and the x2 latent upscaler."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import max_diff
from fixtures_upscale import load_both, write_x2_folder

import stablepipe
from stablepipe.pipelines import text
from stablepipe.pipelines.prompt_weighting import chunk_tokens

pytest_plugins = ["fixtures_sdxl"]  # sdxl_folder, sdxl_refiner_folder

LONG = ", ".join(["a (red:1.3) circle on the [sea]"] * 6)  # more than 77 tokens: several chunks
CPU = torch.device("cpu")


def with_mean(encoder) -> None:
    """A bias on the final layer norm and on every layer's output, so hidden states have a mean to restore."""
    model = getattr(encoder, "text_model", encoder)
    torch.nn.init.constant_(model.final_layer_norm.bias, 0.3)
    for layer in model.encoder.layers:
        torch.nn.init.constant_(layer.mlp.fc2.bias, 0.2)


def by_hand(tokenizer, encoder, prompt: str, chunks: int, *, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each chunk through the encoder alone: hidden_states[layer] times its weights, rescaled to the unweighted
    mean, concatenated; padded with empty chunks to `chunks`; and the first chunk's pooled output."""
    pieces = chunk_tokens(tokenizer, prompt)
    pieces += chunk_tokens(tokenizer, "") * (chunks - len(pieces))
    parts, pooled = [], None
    for ids, weights in pieces:
        out = encoder(torch.tensor([ids]), output_hidden_states=True)
        z = out.hidden_states[layer]  # (1, 77, D)
        weighted = z * torch.tensor(weights)[None, :, None]
        parts.append(weighted * (z.mean() / weighted.mean()))
        if pooled is None:
            pooled = out.text_embeds if hasattr(out, "text_embeds") else out.pooler_output  # (1, P)
    return torch.cat(parts, dim=1), pooled


@pytest.fixture(scope="module")
def sdxl(sdxl_folder):
    pipe = stablepipe.StableDiffusionXLPipeline.from_pretrained(sdxl_folder)
    with_mean(pipe.text_encoder)
    with_mean(pipe.text_encoder_2)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def encode(pipe, prompt, *, force_zeros_for_empty_prompt: bool = False, prompt_weighting: bool = False,
           **kwargs) -> text.PromptEmbeds:
    """SDXL's prompt encoding with `pipe`'s text encoders (both, or the refiner's second)."""
    specs = [dataclasses.replace(s, zeros_for_empty_negative=force_zeros_for_empty_prompt)
             for s in text.SDXL_TEXT_ENCODERS]
    with torch.no_grad():
        return text.encode_prompt_batch(text.bind_text_encoders(pipe, specs), prompt, device=CPU,
                                        dtype=torch.float32, weighted=prompt_weighting, **kwargs)


def encode_x2(pipe, prompt, *, prompt_weighting: bool = False, **kwargs) -> tuple:
    """The x2 latent upscaler's (embeds, negative, pooled, negative pooled) of `prompt`, guided."""
    encoders = text.bind_text_encoders(pipe, [text.LATENT_UPSCALER_TEXT_ENCODER])
    with torch.no_grad():
        return text.encode_prompt_batch(encoders, prompt, device=CPU, weighted=prompt_weighting, **kwargs).as_tuple()


def test_sdxl_weighted_long_prompt_matches_hand_computation(sdxl):
    chunks = len(chunk_tokens(sdxl.tokenizer, LONG))
    assert chunks >= 2
    got = encode(sdxl, LONG, negative_prompt="(blurry:1.2)", prompt_weighting=True)
    with torch.no_grad():
        first, _ = by_hand(sdxl.tokenizer, sdxl.text_encoder, LONG, chunks, layer=-2)
        second, pooled = by_hand(sdxl.tokenizer_2, sdxl.text_encoder_2, LONG, chunks, layer=-2)
        negative_first, _ = by_hand(sdxl.tokenizer, sdxl.text_encoder, "(blurry:1.2)", chunks, layer=-2)
        negative_second, negative_pooled = by_hand(
            sdxl.tokenizer_2, sdxl.text_encoder_2, "(blurry:1.2)", chunks, layer=-2
        )
    assert got.prompt_embeds.shape == (1, 77 * chunks, 64) == got.negative_prompt_embeds.shape
    assert torch.allclose(got.prompt_embeds, torch.cat([first, second], dim=-1), atol=1e-5)
    assert torch.allclose(got.negative_prompt_embeds, torch.cat([negative_first, negative_second], dim=-1), atol=1e-5)
    assert torch.allclose(got.pooled_prompt_embeds, pooled, atol=1e-6)  # the projection of the first chunk
    assert torch.allclose(got.negative_pooled_prompt_embeds, negative_pooled, atol=1e-6)


def test_sdxl_prompt_2_and_a_long_negative_set_the_chunk_count(sdxl):
    got = encode(sdxl, "a cat", prompt_2="a (dog:1.5)", negative_prompt=LONG, prompt_weighting=True)
    chunks = len(chunk_tokens(sdxl.tokenizer, LONG))
    assert got.prompt_embeds.shape[1] == got.negative_prompt_embeds.shape[1] == 77 * chunks
    with torch.no_grad():
        second, pooled = by_hand(sdxl.tokenizer_2, sdxl.text_encoder_2, "a (dog:1.5)", chunks, layer=-2)
    assert torch.allclose(got.prompt_embeds[..., 32:], second, atol=1e-5)  # prompt_2 goes to the second encoder
    assert torch.allclose(got.pooled_prompt_embeds, pooled, atol=1e-6)


def test_sdxl_plain_prompts_are_unchanged_by_the_option(sdxl):
    kwargs = dict(negative_prompt=["blue", ""], num_images_per_prompt=2, prompt_2=["a", "b c"])
    for force_zeros in (False, True):
        plain = encode(sdxl, ["a red circle", "sea"], force_zeros_for_empty_prompt=force_zeros, **kwargs)
        weighted = encode(sdxl, ["a red circle", "sea"], force_zeros_for_empty_prompt=force_zeros,
                          prompt_weighting=True, **kwargs)
        for a, b in zip(plain.as_tuple(), weighted.as_tuple(), strict=True):
            assert a.shape == b.shape and torch.allclose(a, b, atol=1e-6)
    plain = encode(sdxl, "a cat", force_zeros_for_empty_prompt=True)  # no negative: zeros, whatever the option
    weighted = encode(sdxl, "a cat", force_zeros_for_empty_prompt=True, prompt_weighting=True)
    assert not weighted.negative_prompt_embeds.any() and torch.equal(plain.prompt_embeds, weighted.prompt_embeds)


def test_sdxl_pipeline_with_weighting_is_diffusers_on_the_same_embeddings(sdxl_folder, sdxl):
    """The option changes only the embeddings: the pipeline given a long weighted prompt makes the image
    diffusers makes from those embeddings (154+ tokens through both UNets' cross-attention)."""
    import diffusers

    theirs = diffusers.StableDiffusionXLPipeline.from_pretrained(sdxl_folder)
    theirs.text_encoder.load_state_dict(sdxl.text_encoder.state_dict())
    theirs.text_encoder_2.load_state_dict(sdxl.text_encoder_2.state_dict())
    theirs.set_progress_bar_config(disable=True)
    embeds = encode(sdxl, LONG, negative_prompt="ugly", prompt_weighting=True,
                    force_zeros_for_empty_prompt=sdxl.force_zeros_for_empty_prompt)
    names = ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds")
    common = dict(num_inference_steps=2, height=32, width=32, output_type="np")
    sdxl.prompt_weighting = True
    try:
        ours = sdxl(LONG, negative_prompt="ugly", generator=torch.Generator().manual_seed(0), **common).images
    finally:
        sdxl.prompt_weighting = False
    expected = theirs(**dict(zip(names, embeds.as_tuple())), generator=torch.Generator().manual_seed(0), **common)
    assert max_diff(ours, expected.images) < 2e-3
    plain = sdxl(LONG, negative_prompt="ugly", generator=torch.Generator().manual_seed(0), **common).images
    assert max_diff(ours, plain) > 1e-3  # the weights and the words past 77 tokens do change the picture


def test_sdxl_refiner_takes_weighted_prompts(sdxl_refiner_folder):
    refiner = stablepipe.StableDiffusionXLImg2ImgPipeline.from_pretrained(sdxl_refiner_folder)
    refiner.set_progress_bar_config(disable=True)
    refiner.prompt_weighting = True
    embeds = encode(refiner, LONG, prompt_weighting=True, negative_prompt="x")
    assert embeds.prompt_embeds.shape == (1, 77 * len(chunk_tokens(refiner.tokenizer_2, LONG)), 32)
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    out = refiner(LONG, image=image, num_inference_steps=2, strength=0.5, output_type="np",
                  generator=torch.Generator().manual_seed(0)).images
    assert out.shape == (1, 32, 32, 3)


# ---- the x2 latent upscaler ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def x2_pipes(tmp_path_factory):
    ours, theirs = load_both("StableDiffusionLatentUpscalePipeline", write_x2_folder(tmp_path_factory.mktemp("x2")))
    with_mean(ours.text_encoder)
    theirs.text_encoder.load_state_dict(ours.text_encoder.state_dict())
    return ours, theirs


def test_x2_weighted_long_prompt_matches_hand_computation(x2_pipes):
    ours, _ = x2_pipes
    chunks = len(chunk_tokens(ours.tokenizer, LONG))
    embeds, negative, pooled, negative_pooled = encode_x2(ours, LONG, negative_prompt="[blurry]", prompt_weighting=True)
    with torch.no_grad():
        expected, expected_pooled = by_hand(ours.tokenizer, ours.text_encoder, LONG, chunks, layer=-1)
        expected_negative, expected_negative_pooled = by_hand(
            ours.tokenizer, ours.text_encoder, "[blurry]", chunks, layer=-1
        )
    assert embeds.shape == negative.shape == (1, 77 * chunks, 32)
    assert torch.allclose(embeds, expected, atol=1e-5) and torch.allclose(negative, expected_negative, atol=1e-5)
    assert torch.allclose(pooled, expected_pooled, atol=1e-6)
    assert torch.allclose(negative_pooled, expected_negative_pooled, atol=1e-6)
    plain = encode_x2(ours, "a cat", negative_prompt="dog")
    weighted = encode_x2(ours, "a cat", negative_prompt="dog", prompt_weighting=True)
    for a, b in zip(plain, weighted, strict=True):
        assert torch.allclose(a, b, atol=1e-6)  # no syntax, short: the same as without the option


def test_x2_pipeline_with_weighting_is_diffusers_on_the_same_embeddings(x2_pipes):
    ours, theirs = x2_pipes
    embeds = encode_x2(ours, LONG, prompt_weighting=True)
    names = ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds")
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    common = dict(image=latents, num_inference_steps=2, output_type="np")
    ours.prompt_weighting = True
    try:
        got = ours(LONG, generator=torch.Generator().manual_seed(0), **common).images
    finally:
        ours.prompt_weighting = False
    expected = theirs(**dict(zip(names, embeds)), generator=torch.Generator().manual_seed(0), **common).images
    assert got.shape == expected.shape and max_diff(got, expected) < 2e-3
