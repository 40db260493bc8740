"""Batch jobs: a JSONL file of requests drawn into a folder, resumable, on one machine or a Ray cluster.

    jobs.py        the job file: one request per line, checked up front, stable ids and derived seeds
    manifest.py    the output folder: atomic image writes and the manifest of what is done
    draw.py        the pipelines of a worker, and a group of jobs -> PNG files (shared by both runners)
    runner.py      the one-machine run (progress bar, resume)
    ray_runner.py  the same run over Ray actors (`--ray`)
"""

from stablepipe.batch.draw import ModelOptions
from stablepipe.batch.jobs import BatchJob, JobFileError, read_jobs
from stablepipe.batch.runner import BatchRun, run_local

__all__ = ["BatchJob", "BatchRun", "JobFileError", "ModelOptions", "read_jobs", "run_local"]
