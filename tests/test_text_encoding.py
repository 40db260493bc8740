"""text.py: the prompt encoder described by data. Each spec field against what it must do (the pipelines' parity
tests check the specs SD, SDXL and the x2 upscaler use against diffusers' own encode_prompt)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import max_diff

import stablepipe
from stablepipe.pipelines import text

pytest_plugins = ["fixtures_sdxl"]  # sdxl_folder
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def sd1(sd1_folder):
    return stablepipe.StableDiffusionPipeline.from_pretrained(sd1_folder, safety_checker=None,
                                                              requires_safety_checker=False)  # fmt: skip


def encoder(pipe, **spec) -> text.TextEncoder:
    return text.TextEncoder(dataclasses.replace(text.SD_TEXT_ENCODER, **spec), pipe.tokenizer, pipe.text_encoder)


@torch.no_grad()
def test_layers_final_norm_and_clip_skip(sd1):
    ids = text.tokenize(sd1.tokenizer, ["a red circle"]).input_ids
    out = sd1.text_encoder(ids, output_hidden_states=True)
    norm = getattr(sd1.text_encoder, "text_model", sd1.text_encoder).final_layer_norm  # transformers 4 / 5
    cases = {  # (spec fields, clip_skip) -> what must be read
        "last, normed": (dict(), None, out.last_hidden_state),
        "clip_skip 1, normed": (dict(), 1, norm(out.hidden_states[-2])),
        "penultimate, raw": (dict(layer=-2, final_norm=False), None, out.hidden_states[-2]),
        "penultimate + clip_skip 1, raw": (dict(layer=-2, final_norm=False), 1, out.hidden_states[-3]),
    }
    for case, (spec, clip_skip, expected) in cases.items():
        hidden, pooled = text.run_text_encoder(encoder(sd1, **spec), ids, device=CPU, clip_skip=clip_skip)
        assert pooled is None and torch.equal(hidden, expected), case
    _, pooled = text.run_text_encoder(encoder(sd1, pooled="pooler_output"), ids, device=CPU)
    assert torch.equal(pooled, out.pooler_output)
    with pytest.raises(ValueError, match="gives no `text_embeds`"):
        text.run_text_encoder(encoder(sd1, pooled="text_embeds"), ids, device=CPU)


@torch.no_grad()
def test_attention_mask_where_the_config_asks_for_it(sd1_folder, sd1):
    """diffusers passes the tokens' mask to an SD text encoder whose config sets use_attention_mask."""
    import diffusers

    theirs = diffusers.StableDiffusionPipeline.from_pretrained(sd1_folder, safety_checker=None)
    for pipe in (sd1, theirs):
        pipe.text_encoder.config.use_attention_mask = True
    try:
        args = (["a red circle", "sea"], CPU, 1, True)
        ours, theirs_embeds = sd1.encode_prompt(*args, ["x", ""]), theirs.encode_prompt(*args, ["x", ""])
        unmasked = text.encode_texts(encoder(sd1, attention_mask=False), ["a red circle"], device=CPU)[0]
    finally:
        sd1.text_encoder.config.use_attention_mask = False
    for a, b in zip(ours, theirs_embeds, strict=True):
        assert max_diff(a, b) == 0.0
    assert max_diff(ours[0][:1], unmasked) > 1e-4  # the padding is masked out


@torch.no_grad()
def test_zeros_for_an_empty_negative_only_where_every_spec_says_so(sdxl_folder):
    pipe = stablepipe.StableDiffusionXLPipeline.from_pretrained(sdxl_folder)
    zeroing = [dataclasses.replace(s, zeros_for_empty_negative=True) for s in text.SDXL_TEXT_ENCODERS]
    mixed = [zeroing[0], dataclasses.replace(zeroing[1], zeros_for_empty_negative=False)]
    kwargs = dict(device=CPU, dtype=torch.float32)
    zeros = text.encode_prompt_batch(text.bind_text_encoders(pipe, zeroing), "a cat", **kwargs)
    encoded = text.encode_prompt_batch(text.bind_text_encoders(pipe, mixed), "a cat", **kwargs)
    explicit = text.encode_prompt_batch(text.bind_text_encoders(pipe, zeroing), "a cat", "", **kwargs)
    assert not zeros.negative_prompt_embeds.any() and not zeros.negative_pooled_prompt_embeds.any()
    assert torch.equal(encoded.negative_prompt_embeds, explicit.negative_prompt_embeds)  # "" encoded
    assert encoded.negative_prompt_embeds.abs().sum() > 0
    unguided = text.encode_prompt_batch(text.bind_text_encoders(pipe, zeroing), "a cat", guided=False, **kwargs)
    assert unguided.negative_prompt_embeds is None and unguided.negative_pooled_prompt_embeds is None
    assert unguided.pooled_prompt_embeds.shape == (1, 32)  # the second encoder's projection


@torch.no_grad()
def test_clip_skip_reaches_weighted_negatives_only_where_the_spec_says_so(sd1):
    kwargs = dict(device=CPU, clip_skip=1, weighted=True)
    skipped = text.encode_prompt_batch([encoder(sd1)], "a cat", "a dog", **kwargs).negative_prompt_embeds
    kept = text.encode_prompt_batch([encoder(sd1, clip_skip_weighted_negatives=False)], "a cat", "a dog",
                                    **kwargs).negative_prompt_embeds  # fmt: skip
    plain = text.encode_prompt_batch([encoder(sd1)], "a cat", "a dog", device=CPU, clip_skip=1).negative_prompt_embeds
    dog = text.encode_texts(encoder(sd1), ["a dog"], device=CPU)[0]
    dog_skipped = text.encode_texts(encoder(sd1), ["a dog"], device=CPU, clip_skip=1)[0]
    assert torch.allclose(skipped, dog_skipped, atol=1e-6) and torch.allclose(kept, dog, atol=1e-6)
    assert torch.equal(plain, dog)  # diffusers never skips layers for negatives
    assert max_diff(dog, dog_skipped) > 1e-3


@torch.no_grad()
def test_given_embeddings_and_missing_encoders(sd1):
    embeds = text.encode_prompt_batch([encoder(sd1)], ["a", "b"], device=CPU, num_images_per_prompt=3)
    assert embeds.prompt_embeds.shape == embeds.negative_prompt_embeds.shape == (6, 77, 32)
    assert torch.equal(embeds.prompt_embeds[1], embeds.prompt_embeds[2])  # each prompt's copies side by side
    absent = text.TextEncoder(text.SD_TEXT_ENCODER, None, None)
    given = text.PromptEmbeds(torch.ones(1, 77, 32, dtype=torch.float64), torch.zeros(1, 77, 32))
    out = text.encode_prompt_batch([absent], None, given=given, device=CPU, num_images_per_prompt=2)
    assert out.prompt_embeds.dtype == torch.float64 and out.negative_prompt_embeds.shape == (2, 77, 32)
    with pytest.raises(ValueError, match="no text encoder: pass prompt_embeds"):
        text.encode_prompt_batch([absent], "a cat", device=CPU)
    pooled = [text.TextEncoder(text.LATENT_UPSCALER_TEXT_ENCODER, sd1.tokenizer, sd1.text_encoder)]
    with pytest.raises(ValueError, match="pass `negative_pooled_prompt_embeds` too .* from text_encoder"):
        text.encode_prompt_batch(pooled, None, given=text.PromptEmbeds(*given.as_tuple()[:2], torch.ones(1, 32)),
                                 device=CPU)  # fmt: skip
    with pytest.raises(ValueError, match=r"negative_prompt_embeds \(2, 77, 32\) and prompt_embeds \(1, 77, 32\)"):
        text.encode_prompt_batch([absent], None, given=text.PromptEmbeds(torch.ones(1, 77, 32), torch.ones(2, 77, 32)),
                                 device=CPU)  # fmt: skip
