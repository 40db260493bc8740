"""Ray, for real, on this machine: batch jobs over Ray actors and the A1111 API on Ray Serve.

One local Ray cluster for the module (2 CPUs, no dashboard); every Ray process listens on the loopback
address only (tested). Workers, drivers and replicas are killed by PID with SIGKILL, as a crash would.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import PIL.Image
import psutil
import pytest

from stablepipe.batch.manifest import MANIFEST, read_records
from stablepipe.cli import main

# Ray on loopback only: without this, Ray resolves 127.0.0.1 to the machine's outside address and binds all
# interfaces; no usage statistics are sent anywhere. Ray reads these when it is imported, so they are set here,
# before the tests import it (and passed to the drivers the tests start).
RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}
os.environ.update(RAY_ENV)
LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}
JOBS = [{"prompt": f"picture {i}", "steps": 8, **({"seed": i} if i % 2 else {})} for i in range(10)]
BATCH_FLAGS = ["--dtype", "float32", "--device", "cpu", "--quiet", "--batch-size", "1"]


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray cluster owned by this process; yields its address for other drivers."""
    import ray

    def serve_replicas_on_loopback() -> None:
        """A worker setup hook (nested, so Ray ships it by value): Ray Serve 2.60 binds each replica's
        inter-deployment gRPC server to "[::]:0", all interfaces (ray/serve/_private/replica.py); here it binds
        127.0.0.1, like the rest of this cluster."""
        from ray.serve._private import replica

        bind = replica.add_port_to_grpc_server
        replica.add_port_to_grpc_server = lambda server, address: bind(server, address.replace("[::]", "127.0.0.1"))

    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False,
             runtime_env={"worker_process_setup_hook": serve_replicas_on_loopback})
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        from ray import serve

        serve.shutdown()
        ray.shutdown()


def ray_processes() -> list[psutil.Process]:
    return psutil.Process().children(recursive=True)


def processes_named(name: str) -> list[psutil.Process]:
    """Our Ray processes whose title (Ray sets it as the command line) starts with `name`."""
    found = []
    for process in ray_processes():
        try:
            if process.cmdline() and process.cmdline()[0].startswith(name):
                found.append(process)
        except psutil.Error:
            pass
    return found


def done_records(out: Path) -> list[dict]:
    return [r for r in read_records(out / MANIFEST) if r["kind"] == "done"] if (out / MANIFEST).exists() else []


def wait_for(condition, what: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def pixels(path: Path) -> np.ndarray:
    with PIL.Image.open(path) as image:
        return np.asarray(image, dtype=np.int16)


@pytest.fixture(scope="module")
def job_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("jobs") / "jobs.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in JOBS))
    return path


@pytest.fixture(scope="module")
def one_machine(job_file, sd1_folder, tmp_path_factory) -> Path:
    """The same job drawn without Ray, in this process (one torch thread, as each Ray worker has)."""
    out = tmp_path_factory.mktemp("local")
    assert main(["batch", str(job_file), "--out", str(out), "--model", str(sd1_folder), *BATCH_FLAGS]) == 0
    return out


def assert_same_pictures(out: Path, reference: Path) -> None:
    records = done_records(out)
    assert sorted(r["line"] for r in records) == list(range(1, len(JOBS) + 1))  # every image, once
    assert {p.name for p in out.iterdir()} == {MANIFEST, *(r["file"] for r in records)}  # nothing else
    for record in records:
        assert np.abs(pixels(out / record["file"]) - pixels(reference / record["file"])).max() == 0, record


# ---- batch ---------------------------------------------------------------------------------------------------


def test_a_killed_worker_loses_nothing_and_ray_draws_the_one_machine_pictures(
        ray_cluster, job_file, sd1_folder, one_machine, tmp_path):
    out = tmp_path / "ray"
    args = ["batch", str(job_file), "--out", str(out), "--model", str(sd1_folder), *BATCH_FLAGS,
            "--ray", ray_cluster, "--workers", "2", "--json"]
    status = []
    driver = threading.Thread(target=lambda: status.append(main(args)))
    driver.start()
    wait_for(lambda: len(done_records(out)) >= 1, "the first image")
    workers = processes_named("ray::BatchWorker")
    assert len(workers) == 2 and len(done_records(out)) < len(JOBS)
    victim = workers[0].pid
    os.kill(victim, signal.SIGKILL)
    driver.join(timeout=150)
    assert status == [0]
    assert_same_pictures(out, one_machine)
    assert victim not in {p.pid for p in ray_processes()}
    wait_for(lambda: not processes_named("ray::BatchWorker"), "the run's actors to end with it", timeout=30)


def test_a_killed_driver_resumes_with_only_the_missing_images(ray_cluster, job_file, sd1_folder, one_machine,
                                                              tmp_path, capsys):
    out = tmp_path / "ray"
    args = ["batch", str(job_file), "--out", str(out), "--model", str(sd1_folder), *BATCH_FLAGS,
            "--ray", ray_cluster, "--workers", "1"]
    driver = subprocess.Popen([shutil.which("stablepipe"), *args], env={**os.environ, **RAY_ENV},
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for(lambda: len(done_records(out)) >= 2 or driver.poll() is not None, "two images")
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait()
    assert driver.returncode == -signal.SIGKILL, driver.stderr.read().decode()
    before = {r["file"]: (out / r["file"]).stat().st_mtime_ns for r in done_records(out)}
    assert 2 <= len(before) < len(JOBS)
    assert main([*args, "--resume", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["drawn"] == len(JOBS) - report["already_done"] and report["already_done"] >= len(before)
    assert_same_pictures(out, one_machine)
    assert all((out / name).stat().st_mtime_ns == mtime for name, mtime in before.items())  # not redrawn


# ---- Ray Serve -------------------------------------------------------------------------------------------------

SERVE_STEPS, SIZE = 4, 32
RETRYABLE = {500, 502, 503, 504}  # 500: Ray's proxy, for a request that was running on a replica that died


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def serve_url(ray_cluster, sd1_folder):
    """The A1111 API of the tiny model in two Ray Serve replicas, on 127.0.0.1."""
    from ray import serve

    from stablepipe.serve import ModelSpec, ServeConfig
    from stablepipe.serve.ray_app import serve_on_ray

    config = ServeConfig(models=(ModelSpec(str(sd1_folder), "tiny"),), timeout=60, max_queue=32)
    port = free_port()
    serve_on_ray(config, replicas=2, port=port, block=False, say=lambda message: None)
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


def client(url: str, timeout: float = 60.0):
    """The real webuiapi client, with a time limit on every call (so a hang fails the test)."""
    import functools
    from urllib.parse import urlparse

    import webuiapi

    api = webuiapi.WebUIApi(host="127.0.0.1", port=urlparse(url).port)
    api.session.request = functools.partial(api.session.request, timeout=timeout)
    return api


def draw(api, seed: int):
    return api.txt2img(prompt=f"picture {seed % 3}", seed=seed, steps=SERVE_STEPS, width=SIZE, height=SIZE,
                       cfg_scale=7, sampler_name="Euler a")


def python_api_image(sd1_folder, seed: int) -> np.ndarray:
    import torch

    from stablepipe import EulerAncestralDiscreteScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(sd1_folder, requires_safety_checker=False)
    pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    image = pipe(f"picture {seed % 3}", num_inference_steps=SERVE_STEPS, guidance_scale=7, width=SIZE, height=SIZE,
                 generator=torch.Generator().manual_seed(seed)).images[0]
    return np.asarray(image, dtype=np.int16)


def replica_logs() -> list[Path]:
    import ray

    session = Path(ray._private.worker.global_worker.node.get_session_dir_path())
    return sorted((session / "logs" / "serve").glob("replica_*.log"))


def test_two_replicas_answer_the_a1111_api_concurrently(serve_url, sd1_folder):
    from concurrent.futures import ThreadPoolExecutor

    replicas = processes_named("ray::ServeReplica")
    assert len(replicas) == 2
    seeds = [21, 22, 23, 24, 21, 22, 23, 24]
    with ThreadPoolExecutor(len(seeds)) as pool:
        results = list(pool.map(lambda seed: draw(client(serve_url), seed), seeds))
    for seed, result in zip(seeds, results):
        assert result.info["seed"] == seed and result.image.size == (SIZE, SIZE)
    first = {seed: np.asarray(r.image, dtype=np.int16) for seed, r in zip(seeds[:4], results[:4])}
    for seed, result in zip(seeds[4:], results[4:]):
        assert np.abs(np.asarray(result.image, dtype=np.int16) - first[seed]).max() == 0  # the same on any replica
    assert np.abs(first[21] - python_api_image(sd1_folder, 21)).max() <= 1  # the Python API's picture

    def served() -> list[int]:  # the requests each replica logged as answered
        return [log.read_text().count("POST /sdapi/v1/txt2img 200") for log in replica_logs()]

    wait_for(lambda: sum(served()) == len(seeds), "the replicas' access logs", timeout=20)
    assert len([n for n in served() if n]) == 2, served()  # both replicas drew


def test_a_killed_replica_leaves_the_service_answering_and_no_request_lost(serve_url):
    """8 clients x 3 requests; one replica is killed after the first answers. Every request gets an answer with
    its own seed or a retryable error status, within the client's time limit; then the service answers."""
    from concurrent.futures import ThreadPoolExecutor

    outcomes: dict[int, object] = {}
    answered = threading.Event()

    def one_client(k: int) -> None:
        api = client(serve_url)
        for j in range(3):
            seed = 100 + 10 * k + j
            try:
                outcomes[seed] = draw(api, seed).info["seed"]
                answered.set()
            except RuntimeError as err:  # webuiapi: (status, body) for an answer that is not 200
                outcomes[seed] = err.args[0]

    victim = processes_named("ray::ServeReplica")[0]
    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(one_client, k) for k in range(8)]
        assert answered.wait(timeout=120)
        victim.kill()
        for future in futures:
            future.result(timeout=180)  # a client timing out or losing its connection raises here
    assert len(outcomes) == 24
    answers = {seed: got for seed, got in outcomes.items() if got == seed}
    errors = {seed: got for seed, got in outcomes.items() if seed not in answers}
    assert set(errors.values()) <= RETRYABLE, errors  # each refused request can be sent again
    assert len(answers) >= 12, outcomes
    assert draw(client(serve_url), 7).info["seed"] == 7  # still answering
    for seed in errors:
        assert draw(client(serve_url), seed).info["seed"] == seed  # and a retry is answered


def test_the_serve_run_config_file_is_valid_and_builds_the_app():
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from stablepipe.serve import ServeConfig
    from stablepipe.serve.ray_app import build_app, config_from_args

    path = Path(__file__).resolve().parents[1] / "src" / "stablepipe" / "serve" / "ray_serve.yaml"
    schema = ServeDeploySchema.parse_obj(yaml.safe_load(path.read_text()))
    app = schema.applications[0]
    assert app.import_path == "stablepipe.serve.ray_app:build_app" and app.deployments[0].name == "stablepipe"
    config = config_from_args(app.args)
    assert isinstance(config, ServeConfig) and config.max_batch == 8 and config.models[0].source == "builtin"
    assert type(build_app(app.args)).__name__ == "Application"
    with pytest.raises(ValueError, match="unknown stablepipe serve setting 'max_batches'"):
        config_from_args({"max_batches": 4})


def test_without_ray_serve_the_error_says_how_to_install_it(monkeypatch):
    from stablepipe.serve import ServeConfig
    from stablepipe.serve.ray_app import build_deployment

    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    with pytest.raises(ModuleNotFoundError, match=r'pip install "stablepipe\[ray\]"') as caught:
        build_deployment(ServeConfig())
    assert caught.value.name == "ray"  # what `stablepipe serve --ray` turns into its one-line message


def test_every_ray_process_listens_on_loopback_only(ray_cluster):
    listening = [c for c in psutil.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
    ours = {p.pid for p in ray_processes()}
    addresses = {(c.laddr.ip, c.pid) for c in listening if c.pid in ours}
    assert addresses and {ip for ip, _ in addresses} <= LOOPBACK, addresses
