"""The output folder of a batch job: images written atomically, and a manifest of the ones done.

`manifest.jsonl` holds a first `job` record (the job file and model settings), then one `done` record per
image, appended and fsynced only after the image's file has been renamed into place. So a file named in the
manifest is always whole; a run killed at any point leaves at most temp files (removed on the next start), a
last record cut short (dropped), and images not yet recorded (checked and adopted on resume, never drawn
twice). A resume checks every recorded file against its size and sha256 and rewrites the manifest (atomically)
with the records that hold, each image once.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

MANIFEST = "manifest.jsonl"
TEMP_SUFFIX = ".tmp"


def write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that `path` is either absent or whole: a temp file in the same folder,
    fsynced, renamed over `path`, and the folder fsynced so the rename survives a crash."""
    temp = path.with_name(f".{path.name}.{os.getpid()}{TEMP_SUFFIX}")
    with open(temp, "wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temp, path)
    fsync_folder(path.parent)


def fsync_folder(folder: Path) -> None:
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def remove_temp_files(folder: Path) -> int:
    """Delete the temp files a killed run left behind; returns how many there were."""
    stale = list(folder.glob(f".*{TEMP_SUFFIX}"))
    for path in stale:
        path.unlink(missing_ok=True)
    return len(stale)


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class Manifest:
    """What a batch job's output folder holds: `done` maps a request id to its record."""

    def __init__(self, folder: Path, job: Mapping[str, Any], done: dict[str, dict[str, Any]]):
        self.folder, self.job, self.done = folder, dict(job), done

    @property
    def path(self) -> Path:
        return self.folder / MANIFEST

    @classmethod
    def open(cls, folder: str | Path, job: Mapping[str, Any], *, resume: bool) -> Manifest:
        """The manifest of `folder`: a new one, or with `resume` the existing one (its `job` record must
        match `job`). Temp files of a killed run are removed either way."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        remove_temp_files(folder)
        path = folder / MANIFEST
        if not path.exists():
            manifest = cls(folder, {"kind": "job", **job, "created": time.time()}, {})
            manifest.append(manifest.job)
            return manifest
        records = read_records(path)
        done_count = sum(r.get("kind") == "done" for r in records)
        if not resume:
            raise FileExistsError(f"{folder} already holds a batch job ({done_count} images done): pass --resume "
                                  "to draw the missing ones, or give another --out folder")
        recorded_job = records[0] if records and records[0].get("kind") == "job" else {"kind": "job", **job}
        check_same_job(recorded_job, job, folder)
        done = {r["id"]: r for r in records if r.get("kind") == "done"}
        return cls(folder, recorded_job, done)

    def append(self, record: Mapping[str, Any]) -> None:
        """Append one record and fsync it (so a record, once appended, survives a crash)."""
        with open(self.path, "a", encoding="utf-8") as file:
            file.write(json.dumps(record, separators=(",", ":")) + "\n")
            file.flush()
            os.fsync(file.fileno())

    def record_done(self, job_id: str, line: int, file_name: str, seed: int, *, adopted: bool = False) -> None:
        """Record an image whose file is already in place (call only after the rename)."""
        path = self.folder / file_name
        record = {"kind": "done", "id": job_id, "line": line, "file": file_name, "seed": seed,
                  "bytes": path.stat().st_size, "sha256": file_digest(path), "time": time.time()}
        if adopted:
            record["adopted"] = True
        self.append(record)
        self.done[job_id] = record

    def verify(self) -> list[str]:
        """Forget every done record whose file is missing or not the bytes recorded (it will be drawn again),
        and rewrite the manifest (atomically) with the records that hold, once each; returns the ids dropped."""
        bad = [job_id for job_id, record in self.done.items() if not file_matches(self.folder, record)]
        for job_id in bad:
            del self.done[job_id]
        lines = [self.job, *self.done.values()]
        write_atomic(self.path, "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in lines).encode())
        return bad

    def pending(self, jobs: Iterable[Any]) -> list[Any]:
        """The jobs not done, adopting any whose file is in place but was not recorded (killed between the
        rename and the record): a file is only ever renamed into place whole, and it names its request id."""
        missing = []
        for job in jobs:
            if job.id in self.done:
                continue
            if written_for(self.folder / job.file_name, job.id):
                self.record_done(job.id, job.line, job.file_name, job.seed, adopted=True)
            else:
                missing.append(job)
        return missing


def read_records(path: Path) -> list[dict[str, Any]]:
    """The manifest's records; a last line cut short by a kill (no newline yet) is left out."""
    data = path.read_bytes()
    complete = data[: data.rfind(b"\n") + 1]
    return [json.loads(line) for line in complete.decode("utf-8").splitlines() if line.strip()]


def check_same_job(recorded: Mapping[str, Any], job: Mapping[str, Any], folder: Path) -> None:
    """A resume must use the model settings the job started with, or its images would mix two models (the
    job file may change: a changed line has a new id, so it is drawn as a new image)."""
    for key, value in job.items():
        if key == "model" and key in recorded and recorded[key] != value:
            raise ValueError(f"{folder / MANIFEST} was made with {key}={recorded[key]!r}, this run has {value!r}: "
                             "resume with the same settings, or give another --out folder")


def file_matches(folder: Path, record: Mapping[str, Any]) -> bool:
    path = folder / record["file"]
    return path.is_file() and path.stat().st_size == record["bytes"] and file_digest(path) == record["sha256"]


def written_for(path: Path, job_id: str) -> bool:
    """True when `path` is a whole PNG written for request `job_id` (its `stablepipe` text names the id)."""
    import PIL.Image

    if not path.is_file():
        return False
    try:
        with PIL.Image.open(path) as picture:
            picture.load()
            settings = json.loads(picture.text.get("stablepipe", "{}"))
    except (OSError, ValueError, SyntaxError):
        return False
    return settings.get("id") == job_id
