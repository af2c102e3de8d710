"""The resumable, parallel decode+encode pass: fixed chunks of images, each persisted atomically.

Each split's samples are cut into fixed chunks in source order. A worker converts a whole chunk
and writes <dst>/.work/<split>/chunk_<id>.pkl (write-then-rename), so after a kill the finished
chunks are reused and only the missing ones are redone. A chunk file holds two pickles: a small
ChunkSummary (read alone to plan the writers) and then the encoded records.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import multiprocessing as mp
import os
import pickle
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from .atomic import write_atomic, write_bytes_atomic
from .images import Encoded, EncodeSpec, configure_process, convert_file
from .issues import KINDS, SKIPPED, Issue
from .options import ConvertError
from .sources import Sample

PICKLE_PROTOCOL = 5


@dataclass(frozen=True)
class ChunkTask:
    split: str
    chunk_id: int
    src_root: str
    samples: tuple[Sample, ...]
    spec: EncodeSpec
    out_path: str


@dataclass(frozen=True)
class ChunkSummary:
    split: str
    chunk_id: int
    n_samples: int  # source files in the chunk
    n_encoded: int  # of which converted (the rest are skipped, each with an Issue)
    issues: tuple[Issue, ...]
    max_ffcv_bytes: int  # largest stored FFCV sample, sizes the .beton page


class WorkDir:
    """<dst>/.work: plan.json (the fingerprint), chunk files, and one done file per split."""

    def __init__(self, dst: Path):
        self.root = dst / ".work"

    @property
    def plan_file(self) -> Path:
        return self.root / "plan.json"

    def plan(self) -> dict | None:
        """{"fingerprint": ..., "options": ...} of the unfinished run, if there is one."""
        if not self.plan_file.is_file():
            return None
        return json.loads(self.plan_file.read_text())

    def begin(self, fingerprint: str, options: dict) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        plan = {"fingerprint": fingerprint, "options": options}
        if self.plan() != plan:
            write_bytes_atomic(self.plan_file, json.dumps(plan).encode())

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold an exclusive lock on the work dir: one converter per --dst at a time."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / "lock", "w") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released by the OS on kill -9
            except BlockingIOError:
                raise ConvertError(f"another convert_in1k is writing to {self.root.parent}; "
                                   "wait for it or stop it first") from None
            yield

    def chunk_path(self, split: str, chunk_id: int) -> Path:
        return self.root / split / f"chunk_{chunk_id:06d}.pkl"

    def done_path(self, split: str) -> Path:
        return self.root / f"{split}.done.json"

    def drop_chunks(self, split: str) -> None:
        shutil.rmtree(self.root / split, ignore_errors=True)

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def make_tasks(work: WorkDir, split: str, src_root: str, samples: tuple[Sample, ...],
               spec: EncodeSpec, chunk_size: int) -> list[ChunkTask]:
    (work.root / split).mkdir(parents=True, exist_ok=True)
    return [ChunkTask(split, cid, src_root, samples[start:start + chunk_size], spec,
                      str(work.chunk_path(split, cid)))
            for cid, start in enumerate(range(0, len(samples), chunk_size))]


def encode_chunk(task: ChunkTask) -> ChunkSummary:
    """Worker entry point: convert every image of the chunk and persist the chunk file."""
    records: list[tuple[int, Encoded]] = []
    issues: list[Issue] = []
    for s in task.samples:
        encoded, found = convert_file(os.path.join(task.src_root, s.path), s.path, task.split,
                                      s.index, task.spec)
        issues.extend(found)
        if encoded is not None:
            records.append((s.label, encoded))
    largest = max((len(e.ffcv_bytes) for _, e in records if e.ffcv_bytes), default=0)
    summary = ChunkSummary(task.split, task.chunk_id, len(task.samples), len(records),
                           tuple(issues), largest)

    def dump(f) -> None:
        pickle.dump(summary, f, protocol=PICKLE_PROTOCOL)
        pickle.dump(records, f, protocol=PICKLE_PROTOCOL)

    write_atomic(Path(task.out_path), dump)
    return summary


class _ChunkUnpickler(pickle.Unpickler):
    """Unpickles chunk files with exactly the classes they hold: a chunk file in a work dir
    someone else prepared cannot run code (pickle's globals are otherwise any callable)."""

    ALLOWED = {(ChunkSummary.__module__, "ChunkSummary"), (Issue.__module__, "Issue"),
               (Encoded.__module__, "Encoded")}

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"a chunk file may hold only ChunkSummary, Issue and "
                                         f"Encoded records, not {module}.{name}")
        return super().find_class(module, name)


def read_summary(path: Path) -> ChunkSummary:
    with open(path, "rb") as f:
        return _ChunkUnpickler(f).load()


def iter_records(paths: list[Path]) -> Iterator[tuple[int, Encoded]]:
    """(label, Encoded) of every converted image, in source order."""
    for path in paths:
        with open(path, "rb") as f:
            _ChunkUnpickler(f).load()  # the summary (its own pickle: a fresh memo each)
            yield from _ChunkUnpickler(f).load()


def first_failure(summary: ChunkSummary) -> Issue | None:
    return next((i for i in summary.issues if i.action == SKIPPED), None)


def failure_error(issue: Issue) -> ConvertError:
    return ConvertError(f"{issue.split}: {issue.path}: {issue.kind} ({KINDS[issue.kind][1]}"
                        f"{'; ' + issue.detail if issue.detail else ''}). --on_error=fail stops "
                        "here; --on_error=skip leaves such files out and lists them in meta.json")


def run_encode(tasks: list[ChunkTask], num_workers: int, fail_fast: bool,
               progress: tqdm) -> None:
    """Convert the given chunks with `num_workers` processes (0: in this process)."""
    if num_workers == 0:
        configure_process()
        for task in tasks:
            _account(encode_chunk(task), fail_fast, progress)
        return
    # spawn: a forked child would inherit whatever locks (numba, FFCV, threads) the parent holds.
    with mp.get_context("spawn").Pool(num_workers, initializer=configure_process) as pool:
        for summary in pool.imap_unordered(encode_chunk, tasks):
            _account(summary, fail_fast, progress)


def _account(summary: ChunkSummary, fail_fast: bool, progress: tqdm) -> None:
    progress.update(summary.n_samples)
    issue = first_failure(summary)
    if fail_fast and issue is not None:
        raise failure_error(issue)
