"""`stablepipe serve`: the real `webuiapi` client against the server on 127.0.0.1; the images equal the Python API's."""

from __future__ import annotations

import base64
import contextlib
import copy
import gc
import io
import json
import socket
import threading
import time

import numpy as np
import PIL.Image
import pytest
import requests
import torch
from fixtures_sdxl import sdxl_folder  # noqa: F401  (fixture)

import stablepipe
from stablepipe.infotext import model_hash, parse_infotext
from stablepipe.serve import ModelSpec, ServeConfig, create_app
from stablepipe.serve.manager import ModelManager

webuiapi = pytest.importorskip("webuiapi")
uvicorn = pytest.importorskip("uvicorn")
pytest.importorskip("fastapi")

PROMPT = "a red circle, top left"
SIZE = dict(width=32, height=32)


@contextlib.contextmanager
def serving(app):
    """The app under uvicorn on 127.0.0.1 and a free port, in a thread; stopped at the end."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    try:
        yield port
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


@pytest.fixture(scope="module")
def folders(sd1_folder, sdxl_folder, tmp_path_factory):  # noqa: F811
    from fixtures_upscale import write_x4_folder

    return {"tiny": sd1_folder, "xl": sdxl_folder, "x4": write_x4_folder(tmp_path_factory.mktemp("x4"))}


@pytest.fixture(scope="module")
def manager(folders):
    config = ServeConfig(models=(ModelSpec(str(folders["tiny"]), "tiny"), ModelSpec(str(folders["xl"]), "xl")),
                         upscaler=ModelSpec(str(folders["x4"]), "SD x4"))
    loaded = ModelManager(config)
    loaded.load_all()
    return loaded


def limits(**overrides) -> ServeConfig:
    return ServeConfig(**{"models": (ModelSpec("unused", "tiny"),), "max_pixels": 64 * 64, "max_steps": 400,
                          "max_batch": 8, "max_body_bytes": 1024 * 1024, **overrides})


@pytest.fixture(scope="module")
def served(manager):
    app = create_app(limits(), manager=manager)
    with serving(app) as port:
        yield app, port


@pytest.fixture
def api(served, manager):
    manager.current = "tiny"
    return webuiapi.WebUIApi(host="127.0.0.1", port=served[1], sampler="Euler a", steps=4)


def python_api(folder, cls_name: str, scheduler: str, **kwargs):
    """The image the Python API draws (diffusers' way: from_pretrained, scheduler swapped, one generator)."""
    cls = getattr(stablepipe, cls_name)
    pipe = cls.from_pretrained(folder, safety_checker=None, requires_safety_checker=False) \
        if "XL" not in cls_name else cls.from_pretrained(folder)
    pipe.scheduler = getattr(stablepipe, scheduler).from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe(**kwargs).images[0]


def same(a, b) -> int:
    """Max difference of two uint8 images (batched calls may round one level differently from alone)."""
    return int(np.abs(np.asarray(a, np.int16) - np.asarray(b.convert("RGB"), np.int16)).max())


def picture(seed: int, size: int = 32) -> PIL.Image.Image:
    rng = np.random.default_rng(seed)
    return PIL.Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def mask_picture(size: int = 32) -> PIL.Image.Image:
    pixels = np.zeros((size, size), np.uint8)
    pixels[4:20, 8:28] = 255
    return PIL.Image.fromarray(pixels, mode="L")


# ---- drawing, against the Python API --------------------------------------------------------------------------


def test_txt2img_batch_equals_python_api_seed_by_seed(api, folders):
    result = api.txt2img(prompt=PROMPT, negative_prompt="blurry", seed=7, cfg_scale=6, batch_size=2, **SIZE)
    assert result.info["all_seeds"] == [7, 8] and result.info["seed"] == 7
    for image, seed in zip(result.images, (7, 8)):
        expected = python_api(folders["tiny"], "StableDiffusionPipeline", "EulerAncestralDiscreteScheduler",
                              prompt=PROMPT, negative_prompt="blurry", num_inference_steps=4, guidance_scale=6,
                              generator=torch.Generator().manual_seed(seed), **SIZE)
        assert same(image, expected) <= 1
    assert result.images[0].info["parameters"] == result.info["infotexts"][0]  # the PNG carries its infotext
    digest = model_hash(folders["tiny"])  # A1111's short hash of the served model, as the CLI writes it
    assert result.info["sd_model_hash"] == digest and len(digest) == 10
    assert result.info["infotexts"][1].splitlines()[-1] == (
        "Steps: 4, Sampler: Euler a, Schedule type: Automatic, CFG scale: 6, Seed: 8, Size: 32x32, "
        f"Model hash: {digest}, Model: tiny")
    assert parse_infotext(result.info["infotexts"][0])["Negative prompt"] == "blurry"


def test_random_seed_is_returned_and_redraws_the_same_image(api):
    first = api.txt2img(prompt=PROMPT, seed=-1, **SIZE)
    seed = first.info["seed"]
    assert 0 <= seed < 2**32 and first.info["all_seeds"] == [seed]
    assert same(api.txt2img(prompt=PROMPT, seed=seed, **SIZE).image, first.image) == 0


def test_img2img_ddim_honours_webuiapis_eta(api, folders):
    init = picture(1)
    result = api.img2img(images=[init], prompt=PROMPT, seed=3, sampler_name="DDIM", steps=5, denoising_strength=0.6,
                         cfg_scale=5, **SIZE)  # webuiapi sends eta=1.0: DDIM runs at eta 1
    expected = python_api(folders["tiny"], "StableDiffusionImg2ImgPipeline", "DDIMScheduler", prompt=PROMPT,
                          image=init, strength=0.6, num_inference_steps=5, guidance_scale=5, eta=1.0,
                          generator=torch.Generator().manual_seed(3))
    assert same(result.image, expected) <= 1
    assert "Denoising strength: 0.6" in result.info["infotexts"][0]


def test_inpainting_whole_picture_and_masked_area_only(api, folders):
    init, mask = picture(2), mask_picture()
    common = dict(prompt=PROMPT, seed=4, sampler_name="Euler", denoising_strength=0.8, mask_blur=0,
                  inpainting_fill=1, **SIZE)  # fill 1: A1111's "original" content, diffusers' inpainting
    whole = api.img2img(images=[init], mask_image=mask, inpaint_full_res=False, **common).image
    expected = python_api(folders["tiny"], "StableDiffusionInpaintPipeline", "EulerDiscreteScheduler",
                          prompt=PROMPT, image=init, mask_image=mask, strength=0.8, num_inference_steps=4,
                          guidance_scale=7, generator=torch.Generator().manual_seed(4), **SIZE)
    inside = np.asarray(mask) == 255
    assert np.abs(np.asarray(whole, np.int16) - np.asarray(expected, np.int16))[inside].max() <= 1
    assert np.array_equal(np.asarray(whole)[~inside], np.asarray(init)[~inside])  # the rest is pasted back
    inverted = api.img2img(images=[init], mask_image=PIL.ImageOps.invert(mask), inpainting_mask_invert=1,
                           inpaint_full_res=False, **common).image
    assert same(inverted, whole) == 0
    cropped = api.img2img(images=[init], mask_image=mask, inpaint_full_res=True, inpaint_full_res_padding=4,
                          **common).image
    expected = python_api(folders["tiny"], "StableDiffusionInpaintPipeline", "EulerDiscreteScheduler",
                          prompt=PROMPT, image=init, mask_image=mask, strength=0.8, num_inference_steps=4,
                          guidance_scale=7, padding_mask_crop=4, generator=torch.Generator().manual_seed(4), **SIZE)
    assert same(cropped, expected) <= 1


def test_upscaling_with_the_x4_upscaler(api, folders):
    small = picture(3, 16)
    result = api.extra_single_image(image=small, upscaler_1="SD x4", upscaling_resize=4)
    pipe = stablepipe.StableDiffusionUpscalePipeline.from_pretrained(folders["x4"])
    pipe.set_progress_bar_config(disable=True)
    expected = pipe(prompt="", image=small, num_inference_steps=20, generator=torch.Generator().manual_seed(0))
    assert result.image.size == (64, 64) and same(result.image, expected.images[0]) == 0


def test_no_upscaler_is_a_clear_error(manager):
    bare = copy.copy(manager)
    bare.upscaler = None
    with serving(create_app(limits(), manager=bare)) as port:
        image = base64.b64encode(png(picture(0, 8))).decode()
        answer = requests.post(f"http://127.0.0.1:{port}/sdapi/v1/extra-single-image",
                               json={"image": image, "upscaler_1": "SD x4"})
    assert answer.status_code == 422
    assert answer.json()["detail"][0]["loc"] == ["body", "upscaler_1"] and "--upscaler" in answer.text


def test_hires_fix_upscales_then_repaints(api, folders):
    result = api.txt2img(prompt=PROMPT, seed=9, enable_hr=True, hr_scale=2, hr_upscaler="Lanczos",
                         denoising_strength=0.5, **SIZE)
    assert result.image.size == (64, 64)
    first = python_api(folders["tiny"], "StableDiffusionPipeline", "EulerAncestralDiscreteScheduler", prompt=PROMPT,
                       num_inference_steps=4, guidance_scale=7, generator=torch.Generator().manual_seed(9), **SIZE)
    expected = python_api(folders["tiny"], "StableDiffusionImg2ImgPipeline", "EulerAncestralDiscreteScheduler",
                          prompt=PROMPT, image=first.resize((64, 64), PIL.Image.Resampling.LANCZOS), strength=0.5,
                          num_inference_steps=4, guidance_scale=7, generator=torch.Generator().manual_seed(9))
    assert same(result.image, expected) <= 1
    assert "Hires upscale: 2, Hires upscaler: Lanczos" in result.info["infotexts"][0]


def test_models_samplers_options_and_an_sdxl_model(api, folders):
    names = api.util_get_sampler_names()
    assert {"Euler a", "Euler", "DPM++ 2M", "DDIM", "UniPC"} <= set(names)
    assert {"automatic", "karras"} <= set(api.util_get_scheduler_names())
    assert api.util_get_model_names() == ["tiny", "xl"]
    expected = python_api(folders["xl"], "StableDiffusionXLPipeline", "EulerDiscreteScheduler", prompt=PROMPT,
                          num_inference_steps=4, guidance_scale=5, generator=torch.Generator().manual_seed(2), **SIZE)
    xl = dict(prompt=PROMPT, seed=2, sampler_name="Euler", cfg_scale=5, **SIZE)
    overridden = api.txt2img(override_settings={"sd_model_checkpoint": "xl"}, **xl).image
    assert same(overridden, expected) <= 1 and api.get_options()["sd_model_checkpoint"] == "tiny"
    api.util_set_model("xl")
    assert api.get_options()["sd_model_checkpoint"] == "xl"
    assert same(api.txt2img(**xl).image, overridden) == 0
    refused = api.session.post(f"{api.baseurl}/options", json={"sd_model_checkpoint": "/etc/passwd"})
    assert refused.status_code == 422 and "loaded: tiny, xl" in refused.text
    refused = api.session.post(f"{api.baseurl}/options", json={"show_progressbar": False})
    assert refused.status_code == 422 and refused.json()["detail"][0]["loc"] == ["body", "show_progressbar"]
    api.txt2img(override_settings={"sd_model_checkpoint": "tiny"}, override_settings_restore_afterwards=False, **xl)
    assert api.get_options()["sd_model_checkpoint"] == "tiny"  # kept, as A1111 does when asked not to restore


def test_automatic_schedule_is_the_samplers_a1111_default(api):
    """A1111 1.9+: DPM++ 2M SDE with the Automatic schedule runs on exponential sigmas, 'Uniform' on the model's own."""
    automatic = api.txt2img(prompt=PROMPT, seed=3, sampler_name="DPM++ 2M SDE", scheduler="Automatic", **SIZE)
    exponential = api.txt2img(prompt=PROMPT, seed=3, sampler_name="DPM++ 2M SDE", scheduler="Exponential", **SIZE)
    uniform = api.txt2img(prompt=PROMPT, seed=3, sampler_name="DPM++ 2M SDE", scheduler="Uniform", **SIZE)
    assert same(automatic.image, exponential.image) == 0 and same(automatic.image, uniform.image) > 0
    assert "Sampler: DPM++ 2M SDE, Schedule type: Exponential" in automatic.info["infotexts"][0]  # as drawn


def test_clip_skip_option_changes_the_picture(api, folders):
    """The server reads A1111's prompt syntax (`prompt_weighting`), where, as in A1111, clip skip applies to the
    negative prompt too; the Python API does the same with `pipe.prompt_weighting = True`."""
    skip = api.txt2img(prompt=PROMPT, seed=5, override_settings={"CLIP_stop_at_last_layers": 2}, **SIZE)
    pipe = stablepipe.StableDiffusionPipeline.from_pretrained(folders["tiny"], safety_checker=None,
                                                              requires_safety_checker=False)
    pipe.scheduler = stablepipe.EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.prompt_weighting = True
    expected = pipe(prompt=PROMPT, num_inference_steps=4, clip_skip=1, guidance_scale=7,
                    generator=torch.Generator().manual_seed(5), **SIZE).images[0]
    assert same(skip.image, expected) <= 1
    assert "Clip skip: 2" in skip.info["infotexts"][0] and skip.info["clip_skip"] == 2


def test_interrupt_returns_the_image_so_far_and_progress_reports(api, served):
    answers = []
    thread = threading.Thread(target=lambda: answers.append(api.txt2img(prompt=PROMPT, seed=1, steps=400, **SIZE)))
    thread.start()
    while (state := api.get_progress())["state"]["sampling_step"] < 2:
        time.sleep(0.02)
    assert state["state"]["sampling_steps"] == 400 and 0 < state["progress"] < 1
    api.interrupt()
    thread.join()
    assert answers[0].image.size == (32, 32) and answers[0].info["all_seeds"] == [1]
    assert served[0].state.stablepipe.queue.progress.interrupted
    assert api.get_progress()["progress"] == 0.0
    assert api.txt2img(prompt=PROMPT, seed=1, **SIZE).image.size == (32, 32)  # the next request runs in full


# ---- refusals ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("body, field", [
    ({"width": 4096}, "width"),
    ({"width": 30}, "width"),
    ({"steps": 401}, "steps"),
    ({"batch_size": 3, "n_iter": 3}, "batch_size"),
    ({"restore_faces": True}, "restore_faces"),
    ({"sampler_name": "Euler z"}, "sampler_name"),
    ({"sampler_name": "Euler a", "scheduler": "Karras"}, "scheduler"),
    ({"enable_hr": True, "hr_upscaler": "Latent"}, "hr_upscaler"),
    ({"styles": ["cinematic"]}, "styles"),
    ({"override_settings": {"sd_vae": "x.pt"}}, "override_settings"),
    ({"prompt": "a cat <lora:cat:1>"}, "prompt"),
    ({"save_images": True}, "save_images"),
    ({"distilled_cfg_scale": 3.5}, "distilled_cfg_scale"),
])
def test_what_cannot_be_honoured_is_a_422_naming_the_field(served, body, field):
    answer = requests.post(f"http://127.0.0.1:{served[1]}/sdapi/v1/txt2img", json={"prompt": "x", **SIZE, **body})
    assert answer.status_code == 422, answer.text
    assert answer.json()["detail"][0]["loc"][1] == field and answer.json()["detail"][0]["msg"]


def test_bad_images_unknown_routes_and_big_bodies(served):
    base = f"http://127.0.0.1:{served[1]}/sdapi/v1"
    answer = requests.post(f"{base}/img2img", json={"init_images": ["bm90IGFuIGltYWdl"], **SIZE})
    assert answer.status_code == 422 and answer.json()["detail"][0]["loc"] == ["body", "init_images", "0"]
    assert requests.get(f"{base}/no-such-route").status_code == 404
    too_big = requests.post(f"{base}/png-info", data=b"x" * (1536 * 1024), headers={"Content-Type": "text/plain"})
    assert too_big.status_code == 413
    info = requests.post(f"{base}/png-info", json={"image": base64.b64encode(png(picture(0, 8), "a\nSteps: 3, "
                                                                                 "Sampler: Euler, Seed: 2")).decode()})
    assert info.json()["parameters"]["Steps"] == "3" and info.json()["info"].startswith("a\n")


def png(image: PIL.Image.Image, infotext: str | None = None) -> bytes:
    from stablepipe.serve.images import png_bytes

    return png_bytes(image, infotext)


def test_auth_refuses_a_wrong_password_and_lets_the_right_one_in(manager):
    with serving(create_app(limits(api_auth=(("ann", "pw1"), ("bob", "pw2"))), manager=manager)) as port:
        url = f"http://127.0.0.1:{port}/sdapi/v1/sd-models"
        missing, wrong = requests.get(url), requests.get(url, auth=("bob", "pw1"))
        docs = requests.get(f"http://127.0.0.1:{port}/openapi.json")
        client = webuiapi.WebUIApi(host="127.0.0.1", port=port, username="bob", password="pw2")
        assert [m["title"] for m in client.get_sd_models()] == ["tiny", "xl"]
    assert missing.status_code == wrong.status_code == docs.status_code == 401
    assert missing.headers["WWW-Authenticate"].startswith("Basic")


def test_full_queue_answers_503_and_a_gone_client_frees_its_place(manager):
    app = create_app(limits(max_queue=1), manager=manager)
    queue = app.state.stablepipe.queue
    waiting = lambda: sum(1 for j in queue.jobs if not j.started)  # noqa: E731
    with serving(app) as port:
        url = f"http://127.0.0.1:{port}/sdapi/v1/txt2img"
        body = {"prompt": PROMPT, "seed": 1, **SIZE}
        long = threading.Thread(target=requests.post, args=(url,), kwargs={"json": {**body, "steps": 400}})
        long.start()
        while not queue.progress.sampling_step:
            time.sleep(0.02)
        with pytest.raises(requests.exceptions.ReadTimeout):  # waits, then its client gives up
            requests.post(url, json={**body, "steps": 2}, timeout=0.5)
        full = requests.post(url, json=body) if waiting() else None
        while waiting():
            time.sleep(0.02)  # the gone client's place is freed
        answers = []
        after = threading.Thread(target=lambda: answers.append(requests.post(url, json={**body, "steps": 2})))
        after.start()
        while not waiting():
            time.sleep(0.02)  # queued, not refused
        requests.post(f"http://127.0.0.1:{port}/sdapi/v1/interrupt")
        long.join()
        after.join()
    assert full is not None and full.status_code == 503 and int(full.headers["Retry-After"]) >= 1
    assert "--max-queue" in full.json()["detail"]
    assert answers[0].status_code == 200


def test_time_limit_answers_504_and_saved_images_get_generated_names(manager, tmp_path):
    app = create_app(limits(timeout=0.5, out_dir=str(tmp_path)), manager=manager)
    with serving(app) as port:
        url = f"http://127.0.0.1:{port}/sdapi/v1/txt2img"
        late = requests.post(url, json={"prompt": PROMPT, "steps": 400, **SIZE})
        saved = requests.post(url, json={"prompt": PROMPT, "seed": 11, "steps": 2, "save_images": True, **SIZE})
    assert late.status_code == 504 and "--timeout" in late.json()["detail"]
    files = list(tmp_path.rglob("*.png"))
    assert saved.status_code == 200 and len(files) == 1 and files[0].name.endswith("-00001-11.png")
    assert PIL.Image.open(files[0]).info["parameters"] == json.loads(saved.json()["info"])["infotexts"][0]


def test_serve_flags_make_the_config():
    from stablepipe.cli import build_parser
    from stablepipe.cli.serve import build_config, is_loopback

    args = build_parser().parse_args(["serve", "--model", "a=/models/a", "--model", "org/b", "--api-auth",
                                      "u:p,v:q", "--max-pixels", "0", "--max-batch", "4", "--dtype", "float32"])
    config = build_config(args)
    assert [m.label for m in config.models] == ["a", "b"] and config.api_auth == (("u", "p"), ("v", "q"))
    assert (config.max_pixels, config.max_batch, config.dtype, config.timeout) == (None, 4, "float32", 600)
    assert build_config(build_parser().parse_args(["serve"])).models[0].label == "demo"
    assert [is_loopback(h) for h in ("127.0.0.1", "::1", "localhost", "0.0.0.0", "192.168.1.2")] == [
        True, True, True, False, False]
    with pytest.raises(Exception, match="user:password"):
        build_config(build_parser().parse_args(["serve", "--api-auth", "nopassword"]))


# ---- load and fuzzing ---------------------------------------------------------------------------------------------


def test_load_eight_clients_sixty_requests_nothing_lost_or_mixed_up(manager):
    import psutil

    from stablepipe.batching import ImageRequest, run_batch

    app = create_app(limits(max_queue=64, batch_wait=0.05), manager=manager)
    queue = app.state.stablepipe.queue
    seeds = list(range(1000, 1060))
    prompts = {s: f"a {'red' if s % 2 else 'blue'} circle" for s in seeds}
    answers: dict[int, requests.Response] = {}
    with serving(app) as port:
        url = f"http://127.0.0.1:{port}/sdapi/v1/txt2img"

        def client(mine):
            with requests.Session() as session:
                for s in mine:
                    answers[s] = session.post(url, json={"prompt": prompts[s], "seed": s, "steps": 2, **SIZE})

        def load(some):
            threads = [threading.Thread(target=client, args=(some[i::8],)) for i in range(8)]
            [t.start() for t in threads]
            [t.join() for t in threads]

        load(seeds[:16])  # warm-up: the allocator's pools, the threads
        gc.collect()
        rss = psutil.Process().memory_info().rss
        answers.clear()
        load(seeds)
        gc.collect()
        after = psutil.Process().memory_info().rss
    assert sorted(answers) == seeds and {a.status_code for a in answers.values()} == {200}
    assert max(queue.call_sizes) > 1  # waiting requests shared calls
    pipe_for = manager.find("tiny").pipeline
    for s in seeds[::6]:  # each seed got its own image
        got = PIL.Image.open(io.BytesIO(base64.b64decode(answers[s].json()["images"][0])))
        alone = run_batch(pipe_for, [ImageRequest("txt2img", prompts[s], seed=s, steps=2, sampler="Euler",
                                                  guidance=7.0, model="tiny", prompt_weighting=True, **SIZE)])[0]
        assert same(alone, got) <= 1 and json.loads(answers[s].json()["info"])["seed"] == s
    assert after < 1.1 * rss, (rss, after)


def test_fuzzing_the_schema_gives_4xx_never_5xx(manager):
    import hypothesis
    import schemathesis
    from hypothesis import strategies as st

    app = create_app(limits(max_pixels=16 * 16, max_steps=2, max_batch=2, timeout=20), manager=manager)
    schema = schemathesis.openapi.from_dict(app.openapi())
    cases = st.one_of(schema.as_strategy(schemathesis.GenerationMode.NEGATIVE),
                      schema.as_strategy(schemathesis.GenerationMode.POSITIVE))
    statuses: list[int] = []
    with serving(app) as port, requests.Session() as session:

        @hypothesis.settings(max_examples=300, deadline=None, database=None, derandomize=True,
                             suppress_health_check=list(hypothesis.HealthCheck), phases=[hypothesis.Phase.generate])
        @hypothesis.given(cases)
        def check(case):
            answer = case.call(base_url=f"http://127.0.0.1:{port}", session=session, timeout=30)
            statuses.append(answer.status_code)
            assert answer.status_code < 500, (case.operation.label, case.body, answer.text[:500])
            if answer.status_code >= 400:
                assert answer.json()["detail"], answer.text

        check()
        assert requests.get(f"http://127.0.0.1:{port}/sdapi/v1/sd-models").status_code == 200
    assert len(statuses) >= 250 and sum(400 <= s < 500 for s in statuses) >= 100
