"""Bad input to the command line and the web app, one row per case: the input, and the fragment of the one clear
message it must get. The CLI rows run `stablepipe.cli.main` in this process (exit status 2, one line on stderr, no
traceback); the web rows go to the app served on 127.0.0.1 by this module, as any client would send them."""

from __future__ import annotations

import http.client
import json
import socket
import urllib.parse
from pathlib import Path

import PIL.Image
import pytest
import torch
from PIL.PngImagePlugin import PngInfo

from stablepipe.cli import main


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A stablepipe cache with the demo model, and the files the rows name."""
    folder = tmp_path_factory.mktemp("bad-inputs")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("STABLEPIPE_CACHE", str(folder / "cache"))
        patch.setenv("HF_HUB_OFFLINE", "1")
        from stablepipe.builtin import builtin_model_path

        builtin = builtin_model_path()
        PIL.Image.new("RGB", (32, 32)).save(folder / "existing.png")
        PIL.Image.new("RGB", (32, 32)).save(folder / "plain.png")  # no infotext
        for name, text in (("bad-steps.png", "a cat\nSteps: many, Sampler: Euler, Seed: 1"),
                           ("bad-sampler.png", "a cat\nSteps: 2, Sampler: Magic 9000, Seed: 1, Size: 32x32")):
            info = PngInfo()
            info.add_text("parameters", text)
            PIL.Image.new("RGB", (32, 32)).save(folder / name, pnginfo=info)
        (folder / "existing.safetensors").write_bytes(b"keep me")
        with socket.socket() as taken:  # a port in use for the --port row
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            patch.setenv("TAKEN_PORT", str(taken.getsockname()[1]))
            yield {"dir": folder, "builtin": builtin, "port": taken.getsockname()[1]}


CLI_CASES = [  # (arguments; {dir}, {builtin} and {port} filled in) -> the message's fragment
    ("generate x --device bogus", "--device 'bogus' is not a device name"),
    ("generate x --device cuda", "no cuda device is available here"),
    ("generate x --device cuda:7", "no cuda device is available here"),
    ("generate x --clip-skip 100 --steps 1 --out {dir}/o", "--clip-skip 100: this text encoder has 2 layers"),
    ("generate x --clip-skip -1 --steps 1 --out {dir}/o", "--clip-skip -1: this text encoder has 2 layers"),
    ("generate x --width 100000", "--width 100000: give 8 to 8192 pixels"),
    ("generate x --height 0", "--height 0: give 8 to 8192 pixels"),
    ("generate x --width 30 --steps 1 --out {dir}/o", "width must be a positive multiple of 8"),
    ("generate x --seed -5", "--seed must be from 0 to"),
    ("generate x --num-images 0", "--num-images must be at least 1"),
    ("generate x --out {dir}/existing.png", "that file exists; pass --overwrite"),
    ("generate x --scheduler Nope --steps 1 --out {dir}/o", "unknown scheduler name 'Nope'"),
    ("generate x --model /no/such/model-folder", "neither a local folder"),
    ("generate", "give a PROMPT, or --from-png FILE"),
    ("generate --from-png {dir}/missing.png", "--from-png: no image file at"),
    ("generate --from-png {dir}/plain.png", "has no 'parameters' infotext"),
    ("generate --from-png {dir}/bad-steps.png", "the infotext's Steps is 'many', not a int number"),
    ("generate --from-png {dir}/bad-sampler.png", "its sampler 'Magic 9000' is not one stablepipe has"),
    ("img2img x --image {dir}/missing.png", "--image: no image file at"),
    ("inpaint x --image {dir}/existing.png --mask {dir}/missing.png", "--mask: no image file at"),
    ("convert {dir}/missing.ckpt {dir}/out", "is neither a .safetensors/.ckpt file nor a diffusers folder"),
    ("convert {builtin} {dir}/out.txt", "must end in .safetensors or .ckpt"),
    ("convert {builtin} {dir}/existing.safetensors", "target {dir}/existing.safetensors: that file exists"),
    ("convert {builtin} /proc/stablepipe/model.safetensors", "cannot write /proc/stablepipe/model.safetensors"),
    ("ui --host bogus.invalid", "--host bogus.invalid: cannot be resolved to an address"),
    ("ui --port 0", "--port must be from 1 to 65535"),
    ("ui --port {port}", "--port {port}: cannot listen on 127.0.0.1"),
]


@pytest.mark.parametrize("command, fragment", CLI_CASES, ids=[c for c, _ in CLI_CASES])
def test_cli_bad_input_gets_one_clear_line(files, capsys, monkeypatch, command, fragment):
    monkeypatch.setenv("STABLEPIPE_CACHE", str(files["dir"] / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    fill = {"dir": files["dir"], "builtin": files["builtin"], "port": files["port"]}
    status = main([part.format(**fill) for part in command.split()])
    errors = [line for line in capsys.readouterr().err.splitlines()
              if line.strip() and not line.startswith(("No --model given", "note:")) and "it/s]" not in line]
    assert status == 2 and len(errors) == 1, errors
    assert fragment.format(**fill) in errors[0] and errors[0].startswith("stablepipe "), errors[0]
    assert (files["dir"] / "existing.safetensors").read_bytes() == b"keep me"  # nothing overwritten


# ---- the web app -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def app(files):
    """The web app with the demo model, served in this process on 127.0.0.1 as a public app is configured (the
    Load boxes take Hub ids only)."""
    pytest.importorskip("gradio", reason='the web app needs the ui extra: pip install -e ".[ui,test]"')
    from stablepipe.ui.app import build_app, launch
    from stablepipe.ui.session import ModelManager

    manager = ModelManager(device=torch.device("cpu"), dtype=torch.float32)
    manager.load(str(files["builtin"]), label="builtin")
    manager.allow_paths = False
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    served = launch(build_app(manager, out_dir=files["dir"] / "ui"), host="127.0.0.1", port=port,
                    out_dir=files["dir"] / "ui", block=False)
    yield f"http://127.0.0.1:{port}"
    served.close()


def post(url: str, body: bytes, *, declared: int | None = None, chunked: bool = False) -> tuple[int, str]:
    """POST `body`; with `declared`, announce that many bytes and send none (the server answers on the headers);
    with `chunked`, stream the body in 256 KiB chunks until the server answers."""
    parts = urllib.parse.urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    connection.putrequest("POST", parts.path)
    connection.putheader("Content-Type", "application/json")
    if chunked:
        connection.putheader("Transfer-Encoding", "chunked")
    else:
        connection.putheader("Content-Length", str(declared if declared is not None else len(body)))
    connection.endheaders()
    try:
        if chunked:
            for start in range(0, len(body), 2**18):
                piece = body[start:start + 2**18]
                connection.send(b"%x\r\n%s\r\n" % (len(piece), piece))
            connection.send(b"0\r\n\r\n")
        elif declared is None:
            connection.send(body)
    except OSError:
        pass  # the server answered and closed before the whole body went: read its answer
    response = connection.getresponse()
    text = response.read().decode()
    connection.close()
    return response.status, text


BIG = 50 * 2**20
HTTP_CASES = [  # (path, body, how it is sent) -> (status, fragment)
    ("/gradio_api/call/nope", b'{"data": []}', {}, 404, "no such API endpoint"),
    ("/gradio_api/run/nope", b'{"data": []}', {}, 404, "no such API endpoint"),
    ("/gradio_api/queue/join", b'{"data": [], "fn_index": 999, "session_hash": "x"}', {}, 404,
     "no event with index 999"),
    ("/gradio_api/call/txt2img", b"", {"declared": BIG}, 413, "is 50.0 MiB; this server takes at most 1 MiB"),
    ("/gradio_api/call/txt2img", b'{"data": ["' + b"a" * 2**21, {"chunked": True}, 413,
     "the request body is more than 1."),
    ("/gradio_api/upload", b"", {"declared": BIG}, 413, "at most 32 MiB"),
]


@pytest.mark.parametrize("path, body, how, status, fragment", HTTP_CASES,
                         ids=[f"{c[0]}-{list(c[2]) or 'small'}" for c in HTTP_CASES])
def test_web_bad_request_gets_a_4xx_with_a_message(app, path, body, how, status, fragment):
    got, text = post(app + path, body, **how)
    assert got == status and fragment in json.loads(text)["detail"], (got, text[:300])
    assert post(app + "/gradio_api/call/nope", b'{"data": []}')[0] == 404  # and the server still answers


APP_CASES = [  # (endpoint, changes to the endpoint's defaults) -> the message's fragment
    ("/txt2img", {"Prompt": "a" * 10_001}, "Prompt is 10001 characters long; at most 10000"),
    ("/txt2img", {"Steps": 2.5}, "Steps must be a whole number, got 2.5"),
    ("/txt2img", {"Steps": 0}, "less than minimum value 1"),
    ("/txt2img", {"Width": 4096}, "greater than maximum value 2048"),
    ("/txt2img", {"Seed (-1: random)": 2**33}, "seed must be a whole number from 0 to 4294967295"),
    ("/load", {"text": "/etc"}, "'/etc' is not a Hub repo id (owner/name); loading from the server's files is off"),
    ("/load", {"text": "/no/such/folder"}, "is not a Hub repo id (owner/name); loading from the server's files is"),
    ("/load", {"text": "tests/conftest.py"}, "could not load 'tests/conftest.py': it is not a Hub repo this server"),
    ("/load", {"text": "no-such-owner/no-such-repo"}, "could not load 'no-such-owner/no-such-repo': it is not a Hub"),
]


@pytest.mark.parametrize("endpoint, changes, fragment", APP_CASES, ids=[f"{e}-{list(c)[0]}" for e, c, _ in APP_CASES])
def test_web_app_bad_input_is_said_in_the_page_without_paths(app, endpoint, changes, fragment):
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    client = Client(app, verbose=False)
    parameters = client.view_api(return_format="dict", print_info=False)["named_endpoints"][endpoint]["parameters"]
    values = [changes.get(p["label"] if p["label"] in changes else p["parameter_name"], p.get("parameter_default"))
              for p in parameters]
    with pytest.raises(AppError) as raised:
        client.predict(*values, api_name=endpoint)
    message = str(raised.value)
    assert fragment in message, message
    assert str(Path.cwd()) not in message and "/root" not in message and "/tmp" not in message  # no paths shown
