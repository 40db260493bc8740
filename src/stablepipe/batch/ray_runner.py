"""`stablepipe batch --ray`: the same run, its groups drawn by Ray actors (one pipeline set each, kept).

The driver reads the job file, sends each group with its input pictures' bytes to a free actor (Ray's
`ActorPool`, over `ray.wait`), and writes and records each result as it comes back, exactly as the one-machine
run does; workers share no disk with the driver. A worker process that dies is restarted by Ray and its
call retried (`max_restarts`, `max_task_retries`), so nothing is lost; a driver that dies leaves the manifest
of what was written, and `--resume` draws the rest. Actors take one GPU each when the cluster has GPUs.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from stablepipe.batch.draw import ModelOptions, Pipelines, draw_group, read_inputs
from stablepipe.batch.jobs import BatchJob
from stablepipe.batch.runner import BatchRun

RESTARTS = 4  # times Ray restarts a dead worker (and retries its call) before the run fails


class BatchWorker:
    """A Ray actor: loads the pipelines on first use and draws groups of jobs into PNG bytes."""

    def __init__(self, options: ModelOptions):
        self.pipes = Pipelines(options)

    def draw(self, jobs: Sequence[BatchJob], inputs: dict[str, bytes]) -> tuple[Sequence[BatchJob], list[bytes]]:
        return jobs, draw_group(self.pipes, jobs, inputs)

    def pid(self) -> int:
        return os.getpid()


def connect(address: str | None) -> Any:
    """Ray, connected to the cluster at `address` (None: RAY_ADDRESS, or a new local one)."""
    import ray

    if not ray.is_initialized():
        ray.init(address=address, log_to_driver=False)
    return ray


def start_workers(ray: Any, options: ModelOptions, workers: int | None, groups: int, say) -> list[Any]:
    """The actors: `workers` of them (default one per GPU, or per CPU without GPUs), never more than the cluster
    can place at once (an actor that cannot be placed would hold its groups forever) nor more than groups."""
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    capacity = gpus or int(resources.get("CPU", 1))
    if workers is not None and workers < 1:
        raise ValueError(f"--workers must be at least 1, got {workers}")
    count = workers or capacity
    if count > capacity:
        say(f"--workers {count}: the cluster has room for {capacity} (one {'GPU' if gpus else 'CPU'} each); "
            f"starting {capacity}")
        count = capacity
    actor = ray.remote(max_restarts=RESTARTS, max_task_retries=RESTARTS)(BatchWorker)
    placement = {"num_gpus": 1, "num_cpus": 1} if gpus else {"num_cpus": 1}
    return [actor.options(**placement).remote(options) for _ in range(min(count, max(groups, 1)))]


def run_on_ray(run: BatchRun, options: ModelOptions, *, address: str | None = None, workers: int | None = None,
               say=lambda message: None, quiet: bool = False) -> dict[str, Any]:
    """Draw every pending group of `run` on Ray actors; the driver writes and records the images."""
    from ray.util import ActorPool

    ray = connect(address)
    actors = start_workers(ray, options, workers, len(run.groups), say)
    say(f"Ray: {len(actors)} workers on {ray.cluster_resources().get('CPU', 0):.0f} CPUs, "
        f"{ray.cluster_resources().get('GPU', 0):.0f} GPUs")
    pool = ActorPool(actors)
    for group in run.groups:
        pool.submit(lambda worker, jobs: worker.draw.remote(jobs, read_inputs(jobs)), group)
    run.start_progress(quiet=quiet)
    drawn = 0
    try:
        while pool.has_next():
            jobs, files = pool.get_next_unordered()
            run.finish_group(jobs, files)
            drawn += len(jobs)
    except ray.exceptions.RayActorError as err:
        raise OSError(f"a Ray worker died more than {RESTARTS} times ({err.__class__.__name__}); the {drawn} images "
                      f"drawn are recorded in {run.manifest.path}: run the same command with --resume") from err
    finally:
        for worker in actors:
            ray.kill(worker)
    return run.report(drawn)
