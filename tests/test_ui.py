"""The web app: its model manager and runs on their own, then `stablepipe ui` served on 127.0.0.1 with the
built-in demo model and driven in headless Chromium (Debian's /usr/bin/chromium) with Playwright."""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import fixtures_image
import fixtures_sdxl
import numpy as np
import PIL.Image
import pytest
import torch

import stablepipe

pytest.importorskip("gradio", reason='the web app needs the ui extra: pip install -e ".[ui,test]"')
sync_api = pytest.importorskip("playwright.sync_api", reason="the web tests need playwright (the test extra)")

from stablepipe.ui import run, tasks  # noqa: E402  (after the skips: these import nothing optional)
from stablepipe.ui.session import ModelManager  # noqa: E402

depth_folder = fixtures_image.depth_folder  # session fixtures: tiny diffusers checkpoints for the tabs that
sdxl_folder = fixtures_sdxl.sdxl_folder  # have no built-in model
sdxl_refiner_folder = fixtures_sdxl.sdxl_refiner_folder
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--no-first-run",
]
TOLERANCE = 2 / 255  # the server runs on one thread, the tests on their own: float sums may round differently


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A fresh stablepipe cache holding the built-in demo model (unpacked here once, then shared with the
    server)."""
    folder = tmp_path_factory.mktemp("stablepipe-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("STABLEPIPE_CACHE", str(folder))
        from stablepipe.builtin import builtin_model_path

        builtin = builtin_model_path()
    return folder, builtin


@pytest.fixture(scope="module")
def manager(cache):
    manager = ModelManager(device=torch.device("cpu"), dtype=torch.float32)
    manager.load(str(cache[1]), label="builtin")
    return manager


def builtin_pipe(cache, cls=stablepipe.StableDiffusionPipeline):
    pipe = cls.from_pretrained(cache[1])
    pipe.set_progress_bar_config(disable=True)
    return pipe


def max_diff(a: PIL.Image.Image, b: PIL.Image.Image) -> float:
    return float(np.abs(np.asarray(a, dtype=np.float32) - np.asarray(b, dtype=np.float32)).max() / 255)


# ---- the parts without a browser ------------------------------------------------------------------------------


def test_tabs_share_the_loaded_weights_and_pick_samplers_by_name(manager):
    loaded = manager.loaded("sd")
    img2img = manager.pipeline(stablepipe.StableDiffusionImg2ImgPipeline, "sd", scheduler="Euler a")
    inpaint = manager.pipeline(stablepipe.StableDiffusionInpaintPipeline, "sd")
    assert img2img.unet is loaded.unet and inpaint.vae is loaded.vae and img2img.text_encoder is loaded.text_encoder
    assert type(img2img.scheduler).__name__ == "EulerAncestralDiscreteScheduler"
    assert inpaint.scheduler is loaded.scheduler and type(loaded.scheduler).__name__ == "DDIMScheduler"
    assert manager.default_size("sd") == (32, 32) and manager.default_size("sdxl") == (1024, 1024)


def test_a_tab_without_its_model_says_what_to_load(manager, cache):
    with pytest.raises(ValueError, match="needs a depth-to-image model.*stabilityai/stable-diffusion-2-depth"):
        manager.pipeline(stablepipe.StableDiffusionDepth2ImgPipeline, "depth")
    assert "stabilityai/stable-diffusion-xl-base-1.0" in manager.status("sdxl")
    with pytest.raises(ValueError, match="is a StableDiffusionPipeline; this tab needs an SDXL base model"):
        manager.load(str(cache[1]), slot="sdxl")
    assert manager.loaded("sdxl") is None


def test_seeds_and_their_errors():
    assert run.pick_seeds(7, 3) == [7, 8, 9]
    first, second = run.pick_seeds(-1, 2)
    assert 0 <= first <= run.MAX_SEED and second == first + 1
    with pytest.raises(ValueError, match="batch size must be a whole number >= 1"):
        run.pick_seeds(1, 0)
    with pytest.raises(ValueError, match="seed must be a whole number"):
        run.pick_seeds(1.5, 1)
    shown = run.Result([], [4, 5], {"prompt": "a cat", "steps": 2, "seed": 4}, flagged=[5]).describe()
    assert shown == "**Seeds: 4, 5**  \nPrompt: a cat  \nSteps: 2  \nThe safety checker flagged seed 5: blacked out."


def test_mask_from_the_painted_layers():
    background = PIL.Image.new("RGB", (19, 16), (10, 20, 30))
    strokes = [PIL.Image.new("RGBA", (19, 16), (0, 0, 0, 0)) for _ in range(2)]
    strokes[0].paste((255, 255, 255, 255), (0, 0, 19, 4))  # the top quarter on one layer
    strokes[1].paste((255, 255, 255, 128), (0, 4, 19, 8))  # the next quarter, half-transparent, on another
    image, mask = tasks.mask_from_editor({"background": background, "layers": strokes})
    assert image.size == mask.size == (16, 16)  # resized down to a multiple of 8
    painted = np.asarray(mask)  # (16, 16)
    assert (painted[:8] == 255).all() and (painted[8:] == 0).all()
    with pytest.raises(ValueError, match="Paint over the area to repaint first"):
        tasks.mask_from_editor({"background": background, "layers": [PIL.Image.new("RGBA", (19, 16))]})
    with pytest.raises(ValueError, match="Upload a picture to inpaint first"):
        tasks.mask_from_editor({"background": None, "layers": []})


def test_a_run_writes_pngs_with_settings_and_the_image_of_the_pipeline(manager, cache, tmp_path):
    values = {"prompt": "a red circle", "negative_prompt": "", "scheduler": "DDIM", "steps": 2, "guidance": 6.0,
              "width": 64, "height": 32, "seed": 11, "batch": 2, "safe": False}
    result = run.generate(manager, "txt2img", values, tmp_path)
    assert [p.name for p in result.files] == ["00000-11.png", "00001-12.png"] and result.seeds == [11, 12]
    saved = PIL.Image.open(result.files[1])
    assert saved.size == (64, 32)
    assert saved.text["parameters"].startswith(
        "a red circle\nSteps: 2, Sampler: DDIM, Schedule type: Automatic, CFG scale: 6, Seed: 12, Size: 64x32, "
        "Model hash: ")
    assert "**Seeds: 11, 12**" in result.describe() and "Model: builtin" in result.describe()
    pipe = builtin_pipe(cache)
    pipe.scheduler = stablepipe.DDIMScheduler.from_config(pipe.scheduler.config)
    expected = pipe("a red circle", num_inference_steps=2, guidance_scale=6.0, width=64, height=32,
                    generator=torch.Generator().manual_seed(12)).images[0]
    assert max_diff(saved, expected) == 0  # same process, same seed: the same image


@pytest.fixture(scope="module")
def every_model(manager, cache, depth_folder, sdxl_folder, sdxl_refiner_folder):
    """The manager with a model in every tab: the built-in tiny ones where there is one, else test folders."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("STABLEPIPE_CACHE", str(cache[0]))
        for slot in ("variation", "x4", "x2", "ldm3d"):
            assert manager.load("builtin", slot=slot) == slot
    for folder, slot in ((depth_folder, "depth"), (sdxl_folder, "sdxl"), (sdxl_refiner_folder, "refiner")):
        assert manager.load(str(folder)) == slot  # detected from model_index.json
    assert manager.loaded("refiner").vae is manager.loaded("sdxl").vae  # the refiner shares the base's VAE
    return manager


PICTURE = fixtures_image.sample_image(64, 48)
COMMON = {"prompt": "a cat", "negative_prompt": "", "scheduler": None, "steps": 2, "guidance": 5.0, "seed": 3,
          "batch": 1}
TASK_CASES = {  # task: (the form's values, the images' size, settings the PNGs must carry)
    "img2img": ({"image": PICTURE, "strength": 0.6}, (64, 48), {"strength": 0.6}),
    "depth2img": ({"image": PICTURE.resize((32, 32)), "strength": 0.9, "depth_map": None}, (32, 32),
                  {"depth_map": False}),
    "variation": ({"image": PICTURE, "width": 64, "height": 64}, (64, 64), {"command": "variation"}),
    "upscale": ({"image": PICTURE.resize((16, 16)), "upscaler": "x4", "noise_level": 30}, (64, 64),
                {"upscaler": "x4", "noise_level": 30}),
    "ldm3d": ({"width": 64, "height": 64, "batch": 2}, (64, 64), {"model": "builtin"}),
}


@pytest.mark.parametrize("task", TASK_CASES)
def test_every_tab_runs_its_pipeline_from_the_loaded_models(every_model, tmp_path, task):
    values, size, settings = TASK_CASES[task]
    result = run.generate(every_model, task, {**COMMON, **values}, tmp_path)
    assert len(result.files) == values.get("batch", 1)
    for path in result.files:
        saved = PIL.Image.open(path)
        assert saved.size == size and settings.items() <= json.loads(saved.text["stablepipe"]).items()
    if task == "ldm3d":  # the depth map of each image beside it, 16-bit
        assert [p.name for p in result.depth_files] == ["00000-3-depth.png", "00001-4-depth.png"]
        assert PIL.Image.open(result.depth_files[0]).mode in ("I;16", "I")


def test_the_x2_latent_upscaler_makes_one_image_per_seed(every_model, tmp_path):
    values = {**COMMON, "image": PICTURE.resize((64, 64)), "upscaler": "x2", "noise_level": 20, "batch": 2}
    result = run.generate(every_model, "upscale", values, tmp_path)
    first, second = (PIL.Image.open(path) for path in result.files)
    assert first.size == second.size == (128, 128) and max_diff(first, second) > 0.01  # two seeds, two images


def test_safe_mode_is_safe_latent_diffusion_at_the_chosen_level(manager, cache, tmp_path):
    values = {**COMMON, "safe": True, "safe_level": "strong", "width": 64, "height": 64}
    result = run.generate(manager, "txt2img", values, tmp_path)
    assert result.settings["safe"] == "STRONG"
    pipe = builtin_pipe(cache, stablepipe.StableDiffusionPipelineSafe)
    expected = pipe("a cat", num_inference_steps=2, guidance_scale=5.0, width=64, height=64,
                    generator=torch.Generator().manual_seed(3), **stablepipe.SafetyConfig.STRONG).images[0]
    assert max_diff(PIL.Image.open(result.files[0]), expected) == 0


def test_prompt_syntax_switch_reads_weights_and_long_prompts(manager, cache, tmp_path):
    prompt = ", ".join(["a (red:1.4) circle on the [sea]"] * 8)  # weights, and more than 77 tokens
    values = {**COMMON, "prompt": prompt, "width": 64, "height": 64, "prompt_weighting": True}
    result = run.generate(manager, "txt2img", values, tmp_path)
    assert result.settings["prompt_weighting"] is True
    pipe = builtin_pipe(cache)
    kwargs = dict(num_inference_steps=2, guidance_scale=5.0, width=64, height=64)
    plain = pipe(prompt, generator=torch.Generator().manual_seed(3), **kwargs).images[0]
    pipe.prompt_weighting = True
    expected = pipe(prompt, generator=torch.Generator().manual_seed(3), **kwargs).images[0]
    assert max_diff(PIL.Image.open(result.files[0]), expected) == 0 and max_diff(expected, plain) > 0
    unticked = run.generate(manager, "txt2img", {**values, "prompt_weighting": False}, tmp_path / "plain")
    assert max_diff(PIL.Image.open(unticked.files[0]), plain) == 0 and "prompt_weighting" not in unticked.settings


def test_sdxl_with_the_refiner_is_the_ensemble_of_experts(every_model, sdxl_folder, sdxl_refiner_folder, tmp_path):
    values = {**COMMON, "steps": 4, "width": 32, "height": 32, "refiner": True, "high_noise_frac": 0.5}
    result = run.generate(every_model, "sdxl", values, tmp_path)
    assert result.settings["refiner"] == str(sdxl_refiner_folder) and result.settings["high_noise_frac"] == 0.5
    base = stablepipe.StableDiffusionXLPipeline.from_pretrained(sdxl_folder)
    refiner = stablepipe.StableDiffusionXLImg2ImgPipeline.from_pretrained(
        sdxl_refiner_folder, text_encoder_2=base.text_encoder_2, vae=base.vae
    )
    kwargs = dict(prompt="a cat", num_inference_steps=4, guidance_scale=5.0)
    latents = base(**kwargs, width=32, height=32, denoising_end=0.5, output_type="latent",
                   generator=torch.Generator().manual_seed(3)).images
    expected = refiner(**kwargs, image=latents, denoising_start=0.5, generator=torch.Generator().manual_seed(3))
    assert max_diff(PIL.Image.open(result.files[0]), expected.images[0]) == 0


# ---- the served app in Chromium -------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def server(cache, tmp_path_factory):
    """`stablepipe ui` through the installed entry point, on a free port, until the module's tests are done."""
    exe = shutil.which("stablepipe")
    assert exe, "the stablepipe entry point is not installed (pip install -e .)"
    out, port = tmp_path_factory.mktemp("ui-out"), free_port()
    env = {**os.environ, "STABLEPIPE_CACHE": str(cache[0]), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "GRADIO_ANALYTICS_ENABLED": "False", "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}
    log = (out / "server.log").open("w")
    command = [exe, "ui", "--port", str(port), "--out", str(out), "--dtype", "float32"]  # float32: exact comparisons
    process = subprocess.Popen(command, env=env, stdout=log, stderr=log)
    url = f"http://127.0.0.1:{port}/"
    wait_until_serving(process, url, out / "server.log")
    yield url, out, process
    process.terminate()
    process.wait(timeout=30)
    log.close()


def wait_until_serving(process: subprocess.Popen, url: str, log: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"stablepipe ui exited with {process.returncode}:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    process.kill()
    pytest.fail(f"stablepipe ui did not answer on {url} within {timeout} s:\n{log.read_text()}")


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no Chromium at {CHROMIUM}: apt-get install chromium")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, server):
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    page.set_default_timeout(60_000)
    page.goto(server[0], wait_until="domcontentloaded")
    sync_api.expect(page.get_by_text("Loaded: builtin")).to_be_visible()  # the page's load events are done
    yield page
    page.close()


def open_tab(page, title: str, name: str):
    page.get_by_role("tab", name=title, exact=True).click()
    return page.locator(f"#tab-{name}")


def fill_form(tab, *, prompt: str, steps: int, seed: int, size: int | None = None) -> None:
    tab.get_by_label("Prompt", exact=True).fill(prompt)
    tab.get_by_label("number input for Steps").fill(str(steps))
    if size is not None:
        tab.get_by_label("number input for Width").fill(str(size))
        tab.get_by_label("number input for Height").fill(str(size))
    tab.get_by_label("Seed (-1: random)").fill(str(seed))


def result_image(tab, out: Path, seed: int) -> PIL.Image.Image:
    """Wait for the gallery to show the image of `seed`; the PNG the server wrote for it."""
    sync_api.expect(tab.locator(".result-info.prose")).to_contain_text(f"Seed: {seed}", timeout=180_000)
    tab.locator(".results img").first.wait_for()
    (path,) = [p for p in out.glob(f"*-{seed}.png")]
    return PIL.Image.open(path)


def test_type_a_prompt_press_generate_get_the_image_its_seed_and_its_settings(page, server, cache):
    tab = page.locator("#tab-txt2img")
    sync_api.expect(tab.get_by_label("number input for Width")).to_have_value("32")  # the demo model's own size
    fill_form(tab, prompt="a red circle", steps=2, seed=5)  # the size sliders' defaults are accepted
    sync_api.expect(tab.get_by_label("AUTOMATIC1111 prompt syntax", exact=False)).not_to_be_checked()
    tab.get_by_role("button", name="Generate").click()
    saved = result_image(tab, server[1], 5)
    shown = tab.locator(".results img").first.get_attribute("src")
    with urllib.request.urlopen(shown) as response:  # what the page shows and downloads: the PNG with settings
        served = PIL.Image.open(io.BytesIO(response.read()))
    assert served.text["parameters"].startswith(
        "a red circle\nSteps: 2, Sampler: DDIM, Schedule type: Automatic, CFG scale: 7.5, Seed: 5, Size: 32x32, "
        "Model hash: ") and served.text["parameters"].endswith(", Model: builtin")
    expected = builtin_pipe(cache)("a red circle", num_inference_steps=2, width=32, height=32,
                                   generator=torch.Generator().manual_seed(5)).images[0]
    assert saved.size == (32, 32) and max_diff(saved, expected) <= TOLERANCE
    assert max_diff(served, saved) == 0
    tab.get_by_role("button", name="Random").click()  # seed -1, then one click brings the result's seed back
    sync_api.expect(tab.get_by_label("Seed (-1: random)")).to_have_value("-1")
    tab.get_by_role("button", name="Reuse seed").click()
    sync_api.expect(tab.get_by_label("Seed (-1: random)")).to_have_value("5")


def test_inpaint_with_a_painted_mask(page, server, cache, tmp_path):
    picture = tmp_path / "picture.png"
    PIL.Image.new("RGB", (64, 64), (200, 30, 30)).save(picture)
    tab = open_tab(page, "Inpainting", "inpaint")
    editor = tab.locator(".mask-painter")
    editor.get_by_role("button", name="Image").click()
    with page.expect_file_chooser() as chooser:
        editor.get_by_role("button", name="Upload").click()
    chooser.value.set_files(picture)
    editor.get_by_role("button", name="Brush").click()
    box = editor.locator("canvas").first.bounding_box()
    x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2  # a stroke across the middle
    page.mouse.move(x - 40, y)
    page.mouse.down()
    page.mouse.move(x + 40, y, steps=4)  # few events: the canvas renders in software
    page.mouse.up()
    fill_form(tab, prompt="a cat", steps=2, seed=3)
    tab.get_by_role("button", name="Generate").click()
    saved = result_image(tab, server[1], 3)
    mask = PIL.Image.open(next(server[1].glob("*-3-mask.png")))
    painted = np.asarray(mask) > 0  # (64, 64)
    assert saved.size == mask.size == (64, 64)
    assert painted[32].any() and not painted[:8].any() and not painted[-8:].any()  # the stroke, not the rest
    pipe = builtin_pipe(cache, stablepipe.StableDiffusionInpaintPipeline)
    expected = pipe("a cat", image=PIL.Image.open(picture), mask_image=mask, width=64, height=64, strength=1.0,
                    num_inference_steps=2, generator=torch.Generator().manual_seed(3)).images[0]
    assert max_diff(saved, expected) <= TOLERANCE
    assert "Mask:" in tab.locator(".result-info.prose").inner_text()


def test_bad_input_shows_a_message_and_the_server_keeps_serving(page, server):
    tab = open_tab(page, "Image to image", "img2img")
    tab.get_by_role("button", name="Generate").click()  # no picture
    sync_api.expect(page.get_by_text("Upload a picture first.")).to_be_visible()
    tab = open_tab(page, "SDXL", "sdxl")
    sync_api.expect(tab.get_by_text("stabilityai/stable-diffusion-xl-base-1.0").first).to_be_visible()
    tab.get_by_role("button", name="Generate").click()
    sync_api.expect(page.get_by_text("This needs an SDXL base model, and none is loaded").first).to_be_visible()
    loader = page.get_by_placeholder("Hub id, folder or .safetensors, e.g. stable-diffusion-v1-5/stable-diffusion-v1-5")
    loader.fill("/no/such/model-folder")
    loader.press("Enter")
    sync_api.expect(page.get_by_text("/no/such/model-folder").first).to_be_visible()
    tab = open_tab(page, "Text to image", "txt2img")
    fill_form(tab, prompt="still serving", steps=1, seed=21, size=64)
    tab.get_by_role("button", name="Generate").click()
    assert result_image(tab, server[1], 21).size == (64, 64)


def test_a_tab_says_what_to_load_then_loads_it_and_shows_rgb_and_depth_side_by_side(page, server):
    tab = open_tab(page, "LDM3D", "ldm3d")
    sync_api.expect(tab.get_by_text("This tab needs an LDM3D model")).to_contain_text("Intel/ldm3d-4c")
    loader = tab.get_by_placeholder("Hub id, folder or .safetensors, e.g. Intel/ldm3d-4c")
    loader.fill("builtin")
    loader.press("Enter")
    sync_api.expect(tab.get_by_text("Loaded LDM3D model: builtin")).to_be_visible()
    fill_form(tab, prompt="a room", steps=2, seed=41, size=64)
    tab.get_by_role("button", name="Generate").click()
    rgb = result_image(tab, server[1], 41)
    depth = PIL.Image.open(next(server[1].glob("*-41-depth.png")))
    assert rgb.size == depth.size == (64, 64) and depth.mode in ("I;16", "I")
    shown_rgb, shown_depth = (tab.locator(f"img[src$='{name}']").first for name in ("-41.png", "-41-depth.png"))
    sync_api.expect(shown_depth).to_be_visible()
    assert shown_depth.bounding_box()["x"] > shown_rgb.bounding_box()["x"]  # side by side: RGB, then depth


def test_one_generation_at_a_time_and_waiting_users_see_their_place(browser, server):
    pages = [browser.new_page(viewport={"width": 1280, "height": 1000}) for _ in range(2)]
    tabs = []
    for page, seed in zip(pages, (31, 32)):
        page.set_default_timeout(60_000)
        page.goto(server[0], wait_until="domcontentloaded")
        sync_api.expect(page.get_by_text("Loaded: builtin")).to_be_visible()
        tabs.append(page.locator("#tab-txt2img"))
        fill_form(tabs[-1], prompt="a queue", steps=150, seed=seed, size=128)  # long enough to queue behind
    for tab in tabs:
        tab.get_by_role("button", name="Generate").click()
    sync_api.expect(tabs[1].get_by_text("queue: 1/1").first).to_be_visible()  # waiting behind the first
    sync_api.expect(tabs[0].get_by_text("Denoising").first).to_be_visible()  # live progress of the first
    for tab, seed in zip(tabs, (31, 32)):
        assert result_image(tab, server[1], seed).size == (128, 128)
    for page in pages:
        page.close()


def test_the_api_takes_its_own_defaults_and_memory_comes_back(server):
    """Through gradio_client with the defaults `view_api()` lists (the demo model's 32 px size among them), then
    many requests: the server's memory settles after a warm-up; a 5 MB prompt is refused before it is read."""
    psutil = pytest.importorskip("psutil")
    from gradio_client import Client

    client = Client(server[0], verbose=False)
    parameters = client.view_api(return_format="dict", print_info=False)["named_endpoints"]["/txt2img"]["parameters"]
    defaults = {p["label"]: p["parameter_default"] for p in parameters}
    assert (defaults["Width"], defaults["Height"], defaults["Prompt"]) == (32, 32, "")

    def draw(prompt: str, seed: int):
        values = {**defaults, "Prompt": prompt, "Steps": 1, "Seed (-1: random)": seed}
        return client.predict(*(values[p["label"]] for p in parameters), api_name="/txt2img")

    gallery = draw("a red circle", 1)[0]
    assert PIL.Image.open(gallery[0]["image"]).size == (32, 32)
    process = psutil.Process(server[2].pid)
    for seed in range(10):  # warm-up: caches, the first of each allocation size
        draw(f"a blue square {seed}", seed)
    warm = process.memory_info().rss
    for seed in range(30):
        draw(f"a green triangle number {seed}", seed)
    assert process.memory_info().rss <= warm * 1.03, (warm, process.memory_info().rss)
    with pytest.raises(Exception, match="413|too large|Request Entity"):
        draw("red " * 1_250_000, 1)  # 5 MB
    assert process.memory_info().rss <= warm * 1.03
