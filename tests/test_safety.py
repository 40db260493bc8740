"""The safety checker against diffusers' on tiny random CLIP towers saved in the real folder layout."""

from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from diffusers.image_processor import VaeImageProcessor
from diffusers.pipelines.stable_diffusion.safety_checker import (
    StableDiffusionSafetyChecker as ReferenceChecker,
)
from safetensors.torch import load_file, save_file
from transformers import CLIPConfig, CLIPImageProcessor

from stablepipe.image import numpy_to_pil, pt_to_numpy
from stablepipe.models.safety import StableDiffusionSafetyChecker, run_safety_checker

BATCH = 8
PATCH_KEY = "vision_model.vision_model.embeddings.patch_embedding.weight"  # as in the released SD 1.x folders


def tiny_config() -> CLIPConfig:
    tower = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2)
    return CLIPConfig(text_config=tower, vision_config=dict(tower, image_size=32, patch_size=4), projection_dim=16)


def make_images(seed: int = 0) -> torch.Tensor:
    """(BATCH, 3, 40, 48) in [0, 1]: noise, then ramps; on a 1/256 grid so x * 2 - 1 and back is exact."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.rand(BATCH // 2, 3, 40, 48, generator=generator)
    gains = torch.rand(BATCH // 2, 3, 1, 1, generator=generator)
    ramp = torch.linspace(0, 1, 48).expand(BATCH // 2, 3, 40, 48) * gains
    return (torch.cat([noise, ramp]) * 256).floor().clamp(max=255) / 256


def to_clip_input(feature_extractor: CLIPImageProcessor, images: torch.Tensor) -> torch.Tensor:
    return feature_extractor(numpy_to_pil(pt_to_numpy(images)), return_tensors="pt").pixel_values


def unit(embeds: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(embeds, dim=-1)


def file_keys(folder: Path) -> set[str]:
    return set(load_file(folder / "model.safetensors"))


def copy_of(checker: torch.nn.Module, cls: type) -> torch.nn.Module:
    """A fresh `cls` with `checker`'s weights, for tests that edit weights without touching the fixtures."""
    copy = cls(checker.config).eval()
    copy.load_state_dict(checker.state_dict())
    return copy


@pytest.fixture(scope="module")
def feature_extractor() -> CLIPImageProcessor:
    return CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})


@pytest.fixture(scope="module")
def reference_checker(feature_extractor) -> ReferenceChecker:
    """diffusers' checker with random concepts and thresholds chosen so that the test batch is mixed."""
    torch.manual_seed(0)
    checker = ReferenceChecker(tiny_config()).eval()
    with torch.no_grad():
        pooled = checker.vision_model(to_clip_input(feature_extractor, make_images()))[1]
        embeds = unit(checker.visual_projection(pooled))  # (B, P)
        for concepts, thresholds, quantile in [
            (checker.concept_embeds, checker.concept_embeds_weights, 0.97),
            (checker.special_care_embeds, checker.special_care_embeds_weights, 0.6),
        ]:
            picks = embeds[torch.randint(BATCH, (len(concepts),))]
            concepts.copy_(picks + 0.3 * torch.randn(concepts.shape))
            similarity = embeds @ unit(concepts).T  # (B, N)
            thresholds.copy_(similarity.quantile(quantile, dim=0))
        checker.concept_embeds_weights[4:] = 2.0  # only 4 concepts can fire: some images stay clean
    return checker


@pytest.fixture(scope="module")
def diffusers_folder(reference_checker, tmp_path_factory) -> Path:
    """The folder diffusers' `save_pretrained` writes (with transformers 5: flattened vision_model.* keys)."""
    folder = tmp_path_factory.mktemp("diffusers_saved")
    reference_checker.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def released_folder(diffusers_folder, tmp_path_factory) -> Path:
    """The layout of the released SD 1.x safety_checker: pytorch_model.bin, vision_model.vision_model.* keys
    and the old persistent position_ids buffer."""

    def nest(state: dict) -> None:
        for key in [key for key in state if key.startswith("vision_model.")]:
            state["vision_model." + key] = state.pop(key)
        state["vision_model.vision_model.embeddings.position_ids"] = torch.arange(65)[None]

    folder = tmp_path_factory.mktemp("released") / "safety_checker"
    return rewrite_weights(diffusers_folder, folder, nest, name="pytorch_model.bin")


@pytest.fixture(scope="module")
def checkers(diffusers_folder):
    ours = StableDiffusionSafetyChecker.from_pretrained(diffusers_folder)
    return ours, ReferenceChecker.from_pretrained(diffusers_folder)


def rewrite_weights(source: Path, target: Path, edit, *, name: str = "model.safetensors") -> Path:
    target.mkdir()
    shutil.copy(source / "config.json", target / "config.json")
    state = dict(load_file(source / "model.safetensors"))
    edit(state)
    if name.endswith(".bin"):
        torch.save(state, target / name)
    else:
        save_file(state, target / name, metadata={"format": "pt"})
    return target


@pytest.mark.parametrize("layout", ["diffusers_folder", "released_folder"])
def test_loads_diffusers_folders_with_identical_weights(request, reference_checker, layout):
    folder = request.getfixturevalue(layout)
    ours = StableDiffusionSafetyChecker.from_pretrained(folder)
    ours_sd, reference_sd = ours.state_dict(), reference_checker.state_dict()
    assert sorted(ours_sd) == sorted(reference_sd)
    assert all(torch.equal(ours_sd[key], reference_sd[key]) for key in reference_sd)


def test_forward_matches_diffusers_on_tensors_and_arrays(checkers, feature_extractor):
    ours, reference = checkers
    images = make_images()
    clip_input = to_clip_input(feature_extractor, images)
    out, flags = ours(clip_input=clip_input, images=images)
    expected, expected_flags = reference(clip_input=clip_input, images=images.clone())
    assert flags == expected_flags
    assert 2 <= sum(flags) <= BATCH - 2, "fixture should flag some images and pass others"
    assert torch.equal(out, expected)
    assert torch.equal(images, make_images()), "our checker must not modify its input"

    arrays = pt_to_numpy(images)  # (B, H, W, C)
    out_np, flags_np = ours(clip_input=clip_input, images=arrays)
    expected_np, _ = reference(clip_input=clip_input, images=arrays.copy())
    assert flags_np == flags
    np.testing.assert_array_equal(out_np, expected_np)
    for image, flag in zip(out_np, flags):
        assert (image.max() == 0) == flag


def test_scores_on_the_rounding_edge_match_diffusers(checkers, feature_extractor):
    """Thresholds put scores within +-0.0006 of 0, where diffusers' rounding to 3 decimals decides."""
    ours, reference = copy_of(checkers[0], StableDiffusionSafetyChecker), copy_of(checkers[1], ReferenceChecker)
    images = make_images(seed=3)
    clip_input = to_clip_input(feature_extractor, images)
    with torch.no_grad():
        embeds = unit(ours.embed_images(clip_input))  # (B, P)
        owner = torch.arange(17) % BATCH
        ours.concept_embeds.copy_(embeds[owner])
        similarity = (embeds[owner] * embeds[owner]).sum(-1)  # (17,), about 1
        ours.concept_embeds_weights.copy_(similarity + torch.linspace(-0.0006, 0.0006, 17))
        ours.special_care_embeds_weights.fill_(2.0)
    reference.load_state_dict(ours.state_dict())
    flags = ours(clip_input, images)[1]
    assert flags == reference(clip_input, images.clone())[1]
    assert 2 <= sum(flags) <= BATCH - 2


def test_special_care_adjustment_matches_diffusers(checkers, feature_extractor):
    """Concept scores just below 0 (-0.005) flip to flagged once a special-care concept fires (+0.01)."""
    ours, reference = copy_of(checkers[0], StableDiffusionSafetyChecker), copy_of(checkers[1], ReferenceChecker)
    images = make_images(seed=1)
    clip_input = to_clip_input(feature_extractor, images)
    with torch.no_grad():
        embeds = unit(ours.embed_images(clip_input))  # (B, P)
        ours.concept_embeds.copy_(embeds[0].expand_as(ours.concept_embeds))
        ours.concept_embeds_weights.fill_(1.005)  # image 0: 1 - 1.005 = -0.005
        ours.special_care_embeds_weights.fill_(2.0)  # nothing special
    assert ours(clip_input, images)[1] == [False] * BATCH
    assert (embeds[1:] @ embeds[0]).max() < 0.989, "image 0 must stand apart from the others"
    with torch.no_grad():
        ours.special_care_embeds[0] = embeds[0]
        ours.special_care_embeds_weights[0] = 0.99  # fires for image 0 only
    reference.load_state_dict(ours.state_dict())
    assert ours(clip_input, images)[1] == [True] + [False] * (BATCH - 1)
    assert reference(clip_input, images.clone())[1] == [True] + [False] * (BATCH - 1)


def test_crafted_concept_blacks_out_that_image_only(checkers, feature_extractor):
    ours = copy_of(checkers[0], StableDiffusionSafetyChecker)
    images = make_images(seed=2)[[0, BATCH - 1]]  # noise, ramp
    clip_input = to_clip_input(feature_extractor, images)
    with torch.no_grad():
        embeds = unit(ours.embed_images(clip_input))  # (2, P)
        similarity = float(embeds[0] @ embeds[1])
        assert similarity < 0.99, "the two test images must be told apart by the tiny model"
        ours.concept_embeds[5] = embeds[0]
        ours.concept_embeds_weights.fill_(2.0)
        ours.concept_embeds_weights[5] = (1 + similarity) / 2  # between the two images' similarities
        ours.special_care_embeds_weights.fill_(2.0)
    out, flags = ours(clip_input=clip_input, images=images)
    assert flags == [True, False]
    assert out[0].abs().max() == 0 and images[0].abs().max() > 0
    assert torch.equal(out[1], images[1])
    out_list, flags_list = ours(clip_input=clip_input, images=list(pt_to_numpy(images)))
    assert flags_list == flags and out_list[0].max() == 0
    np.testing.assert_array_equal(out_list[1], pt_to_numpy(images)[1])


@pytest.mark.parametrize("output_type", ["np", "pil"])
def test_run_safety_checker_matches_diffusers_pipeline(checkers, feature_extractor, output_type):
    ours, reference = checkers
    images = make_images()  # (B, 3, H, W) in [0, 1]
    out, flags = run_safety_checker(ours, feature_extractor, images, device="cpu", dtype=torch.float32)

    pipe = SimpleNamespace(
        safety_checker=reference, feature_extractor=feature_extractor, image_processor=VaeImageProcessor()
    )
    decoded, expected_flags = StableDiffusionPipeline.run_safety_checker(pipe, images * 2 - 1, "cpu", torch.float32)
    expected = pipe.image_processor.postprocess(
        decoded, output_type=output_type, do_denormalize=[not flag for flag in expected_flags]
    )
    assert flags == expected_flags and 2 <= sum(flags) <= BATCH - 2
    got = pt_to_numpy(out)
    if output_type == "pil":
        got = np.stack([np.asarray(image) for image in numpy_to_pil(got)])
        expected = np.stack([np.asarray(image) for image in expected])
    np.testing.assert_array_equal(got, expected)


def test_run_safety_checker_without_checker_passes_images_through(feature_extractor):
    images = make_images()
    out, flags = run_safety_checker(None, feature_extractor, images, device="cpu", dtype=torch.float32)
    assert out is images and flags is None
    with pytest.raises(ValueError, match="feature_extractor"):
        run_safety_checker(lambda **_: None, None, images, device="cpu", dtype=torch.float32)


def test_saved_folder_has_released_keys_and_loads_in_diffusers(checkers, released_folder, feature_extractor, tmp_path):
    ours, _ = checkers
    ours.save_pretrained(tmp_path / "ours")
    saved = file_keys(tmp_path / "ours")
    assert PATCH_KEY in saved and not any(key.startswith("vision_model.embeddings") for key in saved)
    ReferenceChecker.from_pretrained(released_folder).save_pretrained(tmp_path / "diffusers")
    assert saved == file_keys(tmp_path / "diffusers")

    reloaded, info = ReferenceChecker.from_pretrained(tmp_path / "ours", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert all(torch.equal(value, reloaded.state_dict()[key]) for key, value in ours.state_dict().items())
    clip_input = to_clip_input(feature_extractor, make_images())
    assert reloaded(clip_input, make_images())[1] == ours(clip_input, make_images())[1]


def test_torch_dtype_is_honoured(diffusers_folder, feature_extractor):
    ours = StableDiffusionSafetyChecker.from_pretrained(diffusers_folder, torch_dtype=torch.bfloat16)
    reference = ReferenceChecker.from_pretrained(diffusers_folder, torch_dtype=torch.bfloat16)
    assert {p.dtype for p in ours.parameters()} == {torch.bfloat16}
    images = make_images()
    out, flags = run_safety_checker(ours, feature_extractor, images, device="cpu", dtype=torch.bfloat16)
    clip_input = to_clip_input(feature_extractor, images).to(torch.bfloat16)
    assert flags == reference(clip_input, images.clone())[1]
    assert out.dtype == torch.float32  # the images keep their own dtype


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda s: s.pop("concept_embeds"), r"missing keys \['concept_embeds'\]"),
        (lambda s: s.update(extra=torch.ones(2)), r"unexpected keys \['extra'\]"),
        (lambda s: s.update(special_care_embeds=torch.ones(3, 8)), r"special_care_embeds \(file \(3, 8\)"),
    ],
    ids=["missing", "unexpected", "shape"],
)
def test_bad_weights_fail_loudly(diffusers_folder, tmp_path, edit, message):
    folder = rewrite_weights(diffusers_folder, tmp_path / "bad", edit)
    with pytest.raises(ValueError, match=message) as error:
        StableDiffusionSafetyChecker.from_pretrained(folder)
    assert str(folder) in str(error.value)
