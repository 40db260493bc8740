"""A batch run on one machine: the jobs not done yet, drawn group by group, each image written atomically and
then recorded in the manifest, with a progress bar (images/s and time left)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from stablepipe.batch.draw import ModelOptions, Pipelines, draw_group, read_inputs
from stablepipe.batch.jobs import BatchJob, read_jobs
from stablepipe.batch.manifest import Manifest, write_atomic


@dataclasses.dataclass
class BatchRun:
    """One run over a job file: its manifest, the jobs still to draw in groups, and the progress bar."""

    manifest: Manifest
    jobs: list[BatchJob]
    groups: list[list[BatchJob]]
    redrawn: list[str]  # ids recorded as done whose files were missing or damaged
    progress: Any = None

    @classmethod
    def prepare(cls, jobs_file: str | Path, out: str | Path, options: ModelOptions, *, resume: bool = False,
                defaults: Mapping[str, Any] | None = None, batch_size: int = 4) -> BatchRun:
        """Read and check every line, open the manifest (resuming: check what it says is done), and group
        the jobs left into batches of at most `batch_size` that share a UNet call."""
        from stablepipe.batching import group_requests

        if batch_size < 1:
            raise ValueError(f"--batch-size must be at least 1, got {batch_size}")
        jobs = read_jobs(jobs_file, defaults=defaults)
        job_record = {"jobs_file": str(Path(jobs_file).resolve()), "model": options.identity()}
        manifest = Manifest.open(out, job_record, resume=resume)
        redrawn = manifest.verify()
        pending = manifest.pending(jobs)
        return cls(manifest, jobs, group_requests(pending, max_batch=batch_size), redrawn)

    @property
    def pending_count(self) -> int:
        return sum(len(group) for group in self.groups)

    def start_progress(self, *, quiet: bool) -> None:
        from tqdm.auto import tqdm

        self.progress = tqdm(total=self.pending_count, unit="img", desc="batch", disable=quiet, smoothing=0.1)

    def finish_group(self, jobs: Sequence[BatchJob], files: Sequence[bytes]) -> None:
        """Write each image into place, then record it (in that order: a record always names a whole file)."""
        for job, data in zip(jobs, files):
            write_atomic(self.manifest.folder / job.file_name, data)
            self.manifest.record_done(job.id, job.line, job.file_name, job.seed)
            if self.progress is not None:
                self.progress.update(1)

    def report(self, drawn: int) -> dict[str, Any]:
        """What `--json` prints: every image of the job file (drawn now or before) and the counts."""
        if self.progress is not None:
            self.progress.close()
        done = self.manifest.done
        files = [{"path": str(self.manifest.folder / done[j.id]["file"]), "seed": j.seed, "line": j.line, "id": j.id}
                 for j in self.jobs if j.id in done]
        return {"files": files, "drawn": drawn, "already_done": len(files) - drawn, "redrawn": self.redrawn,
                "manifest": str(self.manifest.path)}


def run_local(run: BatchRun, options: ModelOptions, *, say=lambda message: None, quiet: bool = False) -> dict:
    """Draw every pending group in this process, one pipeline set loaded once."""
    pipes = Pipelines(options, say)
    run.start_progress(quiet=quiet)
    drawn = 0
    for group in run.groups:
        run.finish_group(group, draw_group(pipes, group, read_inputs(group)))
        drawn += len(group)
    return run.report(drawn)
