"""AUTOMATIC1111 prompt syntax: parsing, 75-token chunks (BREAK, comma backtracking), and weighted embeddings
against a hand-computed expectation (chunks encoded alone and concatenated, weights applied, mean restored)."""

from __future__ import annotations

import pytest
import torch
from conftest import max_diff

import stablepipe
from stablepipe.pipelines import text
from stablepipe.pipelines.prompt_weighting import BREAK, chunk_tokens, parse_prompt_attention

PARSES = {
    "plain": ("normal text", [("normal text", 1.0)]),
    "round": ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    "square": ("a [quiet] sea", [("a ", 1.0), ("quiet", 1 / 1.1), (" sea", 1.0)]),
    "explicit": ("a (red:1.5) circle", [("a ", 1.0), ("red", 1.5), (" circle", 1.0)]),
    "nested": ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))), [[[blue]]]",
               [("a ", 1.0), ("house", 1.3 * 1.1 * 1.1), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
                (", sun, ", 1.1), ("sky", 1.1**4), (", ", 1.1), ("blue", 1.1 / 1.1**3)]),  # "(((" left one open
    "escaped": ("a \\(literal\\) \\[bracket\\]", [("a (literal) [bracket]", 1.0)]),
    "unclosed": ("unclosed (word", [("unclosed ", 1.0), ("word", 1.1)]),
    "colon-text": ("time: noon", [("time: noon", 1.0)]),
    "empty": ("", [("", 1.0)]),
}


@pytest.mark.parametrize("case", PARSES)
def test_parse(case):
    text, expected = PARSES[case]
    got = parse_prompt_attention(text)
    assert [t for t, _ in got] == [t for t, _ in expected]
    assert [w for _, w in got] == pytest.approx([w for _, w in expected])


def test_break_splits_and_is_not_merged():
    got = parse_prompt_attention("(a:1.2) BREAK [b] BREAK c")
    assert [t for t, _ in got] == ["a", BREAK, "b", BREAK, "c"]


@pytest.fixture(scope="module")
def sd1(sd1_folder):
    """The tiny SD 1.x pipeline; its final layer norm gets a bias so that hidden states have a mean to restore
    (a random model's layer-normed output has mean exactly 0)."""
    pipe = stablepipe.StableDiffusionPipeline.from_pretrained(sd1_folder)
    final_norm = getattr(pipe.text_encoder, "text_model", pipe.text_encoder).final_layer_norm
    torch.nn.init.constant_(final_norm.bias, 0.3)
    return pipe


def sd_encode(tokenizer, text_encoder, prompt, *, prompt_weighting: bool = False, **kwargs):
    """SD 1/2's prompt encoding with one tokenizer and text encoder: (embeds, negative embeds)."""
    encoder = text.TextEncoder(text.SD_TEXT_ENCODER, tokenizer, text_encoder)
    embeds = text.encode_prompt_batch([encoder], prompt, weighted=prompt_weighting, **kwargs)
    return embeds.prompt_embeds, embeds.negative_prompt_embeds


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids


def test_chunks_bos_eos_padding_and_break(sd1):
    tok = sd1.tokenizer
    bos, eos, pad = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    [(chunk, weights)] = chunk_tokens(tok, "a (red:1.5) circle")
    body = ids(tok, "a ") + ids(tok, "red") + ids(tok, " circle")
    assert chunk == [bos, *body, eos] + [pad] * (75 - len(body)) and len(chunk) == 77
    red = len(ids(tok, "a ")) + 1
    assert weights[red : red + len(ids(tok, "red"))] == [1.5] * len(ids(tok, "red")) and weights[0] == 1.0
    chunks = chunk_tokens(tok, "one BREAK two")
    starts = [c[0][1 : 1 + len(ids(tok, w))] for c, w in zip(chunks, ["one", "two"])]
    assert starts == [ids(tok, "one"), ids(tok, "two")]


def test_long_prompt_chunks_and_comma_backtrack(sd1):
    tok = sd1.tokenizer
    word = ids(tok, "x")  # one token
    assert len(word) == 1
    long = " ".join(["x"] * 80)
    first, second = chunk_tokens(tok, long)
    assert first[0][1:76] == word * 75 and second[0][1:6] == word * 5 and second[0][6] == tok.eos_token_id
    # a comma 10 tokens before the end of a full chunk: the chunk breaks after it, the rest moves on
    text = " ".join(["x"] * 64) + ", " + " ".join(["x"] * 20)
    first, second = chunk_tokens(tok, text)
    comma = tok.convert_tokens_to_ids(",</w>")
    assert first[0][65] == comma and first[0][66] == tok.eos_token_id
    assert second[0][1:21] == word * 20


def expected_embeddings(pipe, chunks: list[tuple[list[int], list[float]]]) -> torch.Tensor:
    """By hand: each chunk through the encoder alone, times its weights, rescaled to the unweighted mean."""
    parts = []
    for chunk_ids, weights in chunks:
        z = pipe.text_encoder(torch.tensor([chunk_ids]))[0]  # (1, 77, D)
        w = torch.tensor(weights)[None, :, None]
        weighted = z * w
        parts.append(weighted * (z.mean() / weighted.mean()))
    return torch.cat(parts, dim=1)


def test_weighted_long_prompt_matches_hand_computation(sd1):
    tok = sd1.tokenizer
    bos, eos, pad = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    words = ids(tok, " ".join(["the red"] * 40))  # 80 tokens: two chunks
    red = ids(tok, "(red:1.4)".strip("()").split(":")[0])
    prompt = " ".join(["the red"] * 40) + " (on the sea:1.4) [tree]"
    tail = ids(tok, " ") + ids(tok, "on the sea") + ids(tok, " ") + ids(tok, "tree")
    tail_weights = [1.0] * len(ids(tok, " ")) + [1.4] * len(ids(tok, "on the sea")) + [1.0] * len(ids(tok, " "))
    tail_weights += [1 / 1.1] * len(ids(tok, "tree"))
    rest = words[75:] + tail
    chunks = [([bos, *words[:75], eos], [1.0] * 77),
              ([bos, *rest, eos] + [pad] * (75 - len(rest)), [1.0] * (1 + len(words) - 75) + tail_weights
               + [1.0] * (1 + 75 - len(rest)))]
    assert red and chunk_tokens(tok, prompt) == chunks
    with torch.no_grad():
        got, negative = sd_encode(
            tok, sd1.text_encoder, prompt, device=torch.device("cpu"), prompt_weighting=True,
            negative_prompt="(blurry:1.2)",
        )
        expected = expected_embeddings(sd1, chunks)
        negative_expected = expected_embeddings(sd1, chunk_tokens(tok, "(blurry:1.2)") + [chunk_tokens(tok, "")[0]])
    assert got.shape == (1, 154, 32) and negative.shape == (1, 154, 32)  # the negative padded with an empty chunk
    assert torch.allclose(got, expected, atol=1e-6) and torch.allclose(negative, negative_expected, atol=1e-6)


def test_plain_short_prompt_is_unchanged_by_the_option(sd1):
    with torch.no_grad():
        kwargs = dict(device=torch.device("cpu"), negative_prompt=["blue", ""], num_images_per_prompt=2)
        plain = sd_encode(sd1.tokenizer, sd1.text_encoder, ["a red circle", "sea"], **kwargs)
        weighted = sd_encode(
            sd1.tokenizer, sd1.text_encoder, ["a red circle", "sea"], prompt_weighting=True, **kwargs
        )
        skip = [sd_encode(sd1.tokenizer, sd1.text_encoder, "a red circle", device=torch.device("cpu"),
                                     clip_skip=1, prompt_weighting=w)[0] for w in (False, True)]
    for a, b in zip(plain, weighted):
        assert a.shape == b.shape and torch.allclose(a, b, atol=1e-6)
    assert torch.allclose(skip[0], skip[1], atol=1e-6)


def test_a_shorter_tokenizer_gets_chunks_of_its_own_length(tmp_path):
    """The demo model's tokenizer holds 24 tokens, and its text encoder no more: chunks are BOS + 22 + EOS."""
    from transformers import CLIPTextConfig, CLIPTextModel

    from stablepipe.builtin import write_tiny_tokenizer

    tok = write_tiny_tokenizer(tmp_path, max_length=24)
    torch.manual_seed(0)
    encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2,
        max_position_embeddings=24, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )).eval()
    word = ids(tok, "x")
    first, second = chunk_tokens(tok, " ".join(["x"] * 30))
    assert len(first[0]) == len(second[0]) == 24
    assert first[0][1:23] == word * 22 and second[0][1:9] == word * 8 and second[0][9] == tok.eos_token_id
    cpu = torch.device("cpu")
    with torch.no_grad():
        long, negative = sd_encode(tok, encoder, " ".join(["(x:1.2)"] * 30), device=cpu,
                                              prompt_weighting=True, negative_prompt="")
        plain = sd_encode(tok, encoder, "a red circle", device=cpu)[0]
        weighted = sd_encode(tok, encoder, "a red circle", device=cpu, prompt_weighting=True)[0]
    assert long.shape == negative.shape == (1, 48, 32) and plain.shape == (1, 24, 32)
    assert torch.allclose(plain, weighted, atol=1e-6)


def test_long_weighted_embeddings_run_through_the_pipeline_like_diffusers(sd1_folder, sd1):
    """154-token embeddings go through the UNet's cross-attention in both libraries alike."""
    import diffusers

    theirs = diffusers.StableDiffusionPipeline.from_pretrained(sd1_folder)
    prompt = ", ".join(["a (red:1.3) circle on the [sea]"] * 6)
    with torch.no_grad():
        embeds, negative = sd_encode(
            sd1.tokenizer, sd1.text_encoder, prompt, device=torch.device("cpu"), prompt_weighting=True
        )
    assert embeds.shape[1] == 77 * len(chunk_tokens(sd1.tokenizer, prompt)) >= 77 * 2
    images = []
    for pipe in (sd1, theirs):
        pipe.set_progress_bar_config(disable=True)
        images.append(pipe(prompt_embeds=embeds, negative_prompt_embeds=negative, num_inference_steps=2,
                           height=32, width=32, output_type="np", generator=torch.Generator().manual_seed(0)).images)
    assert max_diff(*images) < 2e-3
