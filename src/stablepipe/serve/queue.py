"""The run queue: one worker thread runs one pipeline call at a time, in order of arrival, and fills each call
with the waiting images that can share it (`batching.group_requests`' rule: equal `batch_key()`s).

A request is a `Job`: the images it asks for (one `ImageRequest` each) or one piece of work that runs alone
(the upscaler). Jobs wait in FIFO order; at most `max_queue` wait (not yet started), beyond that `submit`
raises `QueueFull`. A cancelled job (its client went away, or it ran out of time) leaves the queue; if it is
running and every image of the running call is cancelled, the call stops at the next step.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import math
import threading
import time
from collections.abc import Callable
from typing import Any

from stablepipe.batching import ImageRequest, PipeForTask, StepCallback, run_batch


class QueueFull(Exception):
    """More requests are waiting than `max_queue`; `retry_after` is a guess in seconds."""

    def __init__(self, waiting: int, retry_after: int):
        super().__init__(f"the server is busy: {waiting} requests are waiting (--max-queue); retry in "
                         f"{retry_after} s")
        self.retry_after = retry_after


@dataclasses.dataclass(eq=False)
class Job:
    """One client request waiting for its images (or for `work`'s result)."""

    requests: list[ImageRequest]
    work: Callable[[StepCallback], Any] | None = None  # runs alone; its result goes to `result`
    loop: asyncio.AbstractEventLoop | None = None
    future: asyncio.Future | None = None
    images: list[Any] = dataclasses.field(default_factory=list)
    result: Any = None
    error: BaseException | None = None
    next_index: int = 0  # the first image not started yet
    finished_count: int = 0
    started: bool = False
    cancelled: bool = False
    interrupted: bool = False  # A1111's interrupt: the images not started yet are dropped

    def __post_init__(self) -> None:
        self.images = [None] * len(self.requests)

    @property
    def waiting_images(self) -> int:
        return 0 if self.cancelled or self.interrupted else len(self.requests) - self.next_index

    @property
    def done(self) -> bool:
        if self.work is not None:
            return self.finished_count > 0 or self.error is not None
        return self.error is not None or self.finished_count >= (self.next_index if self.interrupted
                                                                else len(self.requests))


@dataclasses.dataclass
class Progress:
    """What /sdapi/v1/progress reports (A1111's `state`)."""

    job_timestamp: str = "0"
    sampling_step: int = 0
    sampling_steps: int = 0
    started: float = 0.0  # time.monotonic() of the running call; 0 when idle
    job_count: int = 0  # images (and pieces of work) waiting or running
    job_no: int = 0  # calls run so far
    interrupted: bool = False
    skipped: bool = False

    @property
    def fraction(self) -> float:
        return self.sampling_step / self.sampling_steps if self.sampling_steps else 0.0

    @property
    def eta(self) -> float:
        """Seconds left in the running call, from its pace so far."""
        if not self.started or not self.fraction:
            return 0.0
        elapsed = time.monotonic() - self.started
        return elapsed / self.fraction - elapsed


class RunQueue:
    """Jobs in, pipeline calls out, on one worker thread (`start()` / `stop()`)."""

    def __init__(self, pipe_for: Callable[[str], PipeForTask], *, max_queue: int, max_batch: int,
                 batch_wait: float = 0.0):
        self.pipe_for = pipe_for  # model name -> (task -> pipeline)
        self.max_queue, self.max_batch, self.batch_wait = max_queue, max_batch, batch_wait
        self.jobs: list[Job] = []
        self.progress = Progress()
        self.running: list[Job] = []
        self._stop_call = False
        self._closing = False
        self.call_sizes: collections.Counter[int] = collections.Counter()  # images per pipeline call -> calls
        self._seconds_per_call = 1.0  # running average, for Retry-After
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None

    # ---- clients ------------------------------------------------------------------------------------------

    def submit(self, job: Job, *, bounded: bool = True) -> Job:
        """Queue `job` (FIFO), or raise QueueFull. `bounded=False`: the next stage of a request that already
        had its place (the hires fix's second pass) is never refused."""
        with self._cond:
            waiting = sum(1 for j in self.jobs if not j.started)
            if bounded and waiting >= self.max_queue:
                calls = math.ceil((waiting + 1) / self.max_batch)
                raise QueueFull(waiting, max(1, math.ceil(self._seconds_per_call * calls)))
            self.jobs.append(job)
            self._cond.notify_all()
        return job

    def cancel(self, job: Job) -> None:
        """The client is gone: drop the job's waiting images; a running call with only cancelled images stops."""
        with self._cond:
            job.cancelled = True
            if job in self.jobs and not job.started:
                self.jobs.remove(job)

    def interrupt(self) -> None:
        """A1111's interrupt: stop the running call and drop the not-started images of its requests."""
        with self._cond:
            self._stop_call, self.progress.interrupted = bool(self.running), True
            for job in self.running:
                job.interrupted = True

    def skip(self) -> None:
        """A1111's skip: stop the running call; its requests' other images still run."""
        with self._cond:
            self._stop_call, self.progress.skipped = bool(self.running), True

    # ---- the worker ---------------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._work, name="stablepipe-serve-worker", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._closing, self._stop_call = True, True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=60)

    def _work(self) -> None:
        while True:
            call = self._next_call()
            if call is None:
                return
            started = time.monotonic()
            self._run(*call)
            self._seconds_per_call = 0.7 * self._seconds_per_call + 0.3 * (time.monotonic() - started)

    def _next_call(self) -> tuple[list[tuple[Job, int]], Job | None] | None:
        """Wait for work; take the first job's next image and every waiting image that can share its call
        (up to max_batch), or the first job's `work`. None when stopping."""
        with self._cond:
            while not self._closing and not any(j.waiting_images or (j.work and not j.started) for j in self.jobs):
                self._cond.wait()
            if self._closing:
                return None
            if self.batch_wait and len(self.jobs) == 1:
                self._cond.wait(self.batch_wait)  # let concurrent clients' requests join this call
            self.jobs = [j for j in self.jobs if not j.cancelled]
            head = next(j for j in self.jobs if j.waiting_images or (j.work and not j.started))
            if head.work is not None:
                head.started = True
                self._begin([head])
                return [], head
            members = self._gather(head.requests[head.next_index].batch_key())
            self._begin([job for job, _ in members])
            return members, None

    def _gather(self, key: Any) -> list[tuple[Job, int]]:
        """(job, image index) of the waiting images with `key`, in FIFO order, at most max_batch; marked started."""
        members: list[tuple[Job, int]] = []
        for job in self.jobs:
            while (job.work is None and job.waiting_images and len(members) < self.max_batch
                   and job.requests[job.next_index].batch_key() == key):
                members.append((job, job.next_index))
                job.next_index += 1
                job.started = True
            if len(members) >= self.max_batch:
                break
        return members

    def _begin(self, jobs: list[Job]) -> None:
        self.running = list(dict.fromkeys(jobs))
        self._stop_call = False
        self.progress = dataclasses.replace(
            self.progress, job_timestamp=time.strftime("%Y%m%d%H%M%S"), sampling_step=0, sampling_steps=0,
            started=time.monotonic(), interrupted=False, skipped=False,
            job_count=sum(j.waiting_images for j in self.jobs) + len(jobs),
        )

    def _on_step(self, done: int, total: int) -> bool:
        """The pipeline's step callback: record progress; True stops the call."""
        with self._cond:
            self.progress.sampling_step, self.progress.sampling_steps = done, total
            return self._stop_call or all(job.cancelled for job in self.running)

    def _run(self, members: list[tuple[Job, int]], work_job: Job | None) -> None:
        try:
            if work_job is not None:
                work_job.result = work_job.work(self._on_step)
                work_job.finished_count = 1
            else:
                requests = [job.requests[index] for job, index in members]
                self.call_sizes[len(requests)] += 1
                images = run_batch(self.pipe_for(requests[0].model), requests, callback=self._on_step)
                for (job, index), image in zip(members, images):
                    job.images[index] = image
                    job.finished_count += 1
        except Exception as err:  # noqa: BLE001 - handed to the request that caused it, the worker goes on
            for job in [work_job] if work_job else [job for job, _ in members]:
                job.error = err
        self._finish()

    def _finish(self) -> None:
        with self._cond:
            self.progress.job_no += 1
            self.progress.started, self.progress.sampling_step, self.progress.sampling_steps = 0.0, 0, 0
            finished = [job for job in self.running if job.done or job.cancelled]
            self.jobs = [job for job in self.jobs if job not in finished]
            self.running = []
        for job in finished:
            if job.loop is not None and job.future is not None:
                job.loop.call_soon_threadsafe(_resolve, job.future)


def _resolve(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)
