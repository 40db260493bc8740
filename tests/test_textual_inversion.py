"""Textual inversion: AUTOMATIC1111 .pt / .safetensors, diffusers' format and SDXL's clip_l / clip_g embeddings
give diffusers' images; errors are clear."""

from __future__ import annotations

import os

import pytest
import torch
from conftest import max_diff
from fixtures_sdxl import sdxl_folder  # noqa: F401  (fixture)
from safetensors.torch import save_file

import stablepipe
from stablepipe.loading.checkpoint import CheckpointError

TOLERANCE = 2e-3
RUN = dict(num_inference_steps=2, height=32, width=32, output_type="np")


def image(pipe, prompt, seed=0, **kwargs):
    pipe.set_progress_bar_config(disable=True)
    return pipe(prompt, generator=torch.Generator().manual_seed(seed), **{**RUN, **kwargs}).images


def load_both(folder, name="StableDiffusionPipeline"):
    import diffusers

    return getattr(stablepipe, name).from_pretrained(folder), getattr(diffusers, name).from_pretrained(folder)


def vectors(n: int, width: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, width, generator=torch.Generator().manual_seed(seed)) * 2


def a1111_pt(path, name: str, n: int):
    torch.save({"string_to_param": {"*": vectors(n)}, "string_to_token": {"*": 265}, "name": name, "step": 500,
                "sd_checkpoint": "abc123", "sd_checkpoint_name": "v1-5"}, path)
    return path


FILES = {
    "a1111-pt-3-vectors": lambda tmp: (a1111_pt(tmp / "mystyle.pt", "mystyle", 3), None, "mystyle"),
    "a1111-safetensors": lambda tmp: (save_file({"emb_params": vectors(2, seed=1)}, str(tmp / "e.safetensors"))
                                      or tmp / "e.safetensors", "oilpaint", "oilpaint"),
    "diffusers-bin": lambda tmp: (torch.save({"<cat-toy>": vectors(1, seed=2)[0]}, tmp / "learned_embeds.bin")
                                  or tmp / "learned_embeds.bin", None, "<cat-toy>"),
}


@pytest.mark.parametrize("case", FILES)
def test_embedding_matches_diffusers(sd1_folder, tmp_path, case):
    path, token, word = FILES[case](tmp_path)
    ours, theirs = load_both(sd1_folder)
    prompt = f"a photo in the style of {word}, red"
    before = image(ours, prompt)
    ours.load_textual_inversion(path, token=token)
    theirs.load_textual_inversion(str(path), token=token)
    assert len(ours.tokenizer) == len(theirs.tokenizer)
    a, b = image(ours, prompt, negative_prompt=f"{word} blur"), image(theirs, prompt, negative_prompt=f"{word} blur")
    assert max_diff(a, b) < TOLERANCE
    assert max_diff(image(ours, prompt), before) > 0.01  # the embedding is used


def test_multi_vector_tokens_are_expanded_in_prompts(sd1_folder, tmp_path):
    pipe = stablepipe.StableDiffusionPipeline.from_pretrained(sd1_folder)
    pipe.load_textual_inversion(a1111_pt(tmp_path / "x.pt", "mystyle", 3))
    from stablepipe.pipelines.text import tokenize

    ids = tokenize(pipe.tokenizer, ["in mystyle"]).input_ids[0].tolist()
    new = [pipe.tokenizer.convert_tokens_to_ids(t) for t in ("mystyle", "mystyle_1", "mystyle_2")]
    assert ids[ids.index(new[0]) : ids.index(new[0]) + 3] == new
    table = pipe.text_encoder.get_input_embeddings().weight
    assert torch.equal(table[new[2]], vectors(3)[2])


def test_sdxl_embedding_fills_both_encoders(request, tmp_path):
    import diffusers  # noqa: F401

    ours, theirs = load_both(request.getfixturevalue("sdxl_folder"), "StableDiffusionXLPipeline")
    path = tmp_path / "xl.safetensors"
    save_file({"clip_l": vectors(2, seed=3), "clip_g": vectors(2, seed=4)}, str(path))
    ours.load_textual_inversion(path, token="unaestheticXL")
    state = {"clip_l": vectors(2, seed=3), "clip_g": vectors(2, seed=4)}
    theirs.load_textual_inversion(state["clip_l"], token="unaestheticXL", text_encoder=theirs.text_encoder,
                                  tokenizer=theirs.tokenizer)
    theirs.load_textual_inversion(state["clip_g"], token="unaestheticXL", text_encoder=theirs.text_encoder_2,
                                  tokenizer=theirs.tokenizer_2)
    prompt = "a castle, unaestheticXL"
    assert max_diff(image(ours, prompt), image(theirs, prompt)) < TOLERANCE


def test_embedding_errors(sd1_folder, tmp_path):
    pipe = stablepipe.StableDiffusionPipeline.from_pretrained(sd1_folder)
    with pytest.raises(ValueError, match="is 768 wide but this text encoder's is 32"):
        pipe.load_textual_inversion({"<x>": torch.zeros(768)})
    pipe.load_textual_inversion({"<y>": torch.zeros(32)})
    with pytest.raises(ValueError, match="'<y>' is already in the tokenizer"):
        pipe.load_textual_inversion({"<y>": torch.zeros(32)})
    with pytest.raises(ValueError, match="SDXL embedding"):
        pipe.load_textual_inversion({"clip_l": torch.zeros(1, 32), "clip_g": torch.zeros(1, 48)}, token="z")
    with pytest.raises(ValueError, match="pass the token"):
        pipe.load_textual_inversion(torch.zeros(32))

    class RunsCode:
        def __reduce__(self):
            return (os.makedirs, (str(tmp_path / "ran"),))

    torch.save({"string_to_param": {"*": torch.zeros(1, 32)}, "name": "evil", "x": RunsCode()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="needs code to unpickle"):
        pipe.load_textual_inversion(tmp_path / "evil.pt")
    assert not (tmp_path / "ran").exists()
