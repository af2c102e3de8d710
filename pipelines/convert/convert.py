"""The conversion, phase by phase: scan, check the destination, encode (resumable), write, report.

Resume contract: every final name (train.beton, dali/train/, meta.json) appears by rename only
when complete; <dst>/.work holds the fingerprint of the arguments and sources plus the finished
chunks. A rerun with the same arguments reuses them; other arguments are refused, never mixed.
"""
from __future__ import annotations

import errno
import functools
import hashlib
import json
import os
import resource
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from .atomic import replace_durably, write_bytes_atomic
from .beton import beton_size, page_size_for, write_beton
from .images import EncodeSpec
from .options import SPLITS, TOOL_VERSION, ConvertError, ConvertOptions
from .report import build_meta, load_meta, output_paths, print_summary, write_meta
from .shards import ShardWriter
from .sources import SourcePlan, scan
from .work import (
    ChunkTask,
    WorkDir,
    failure_error,
    first_failure,
    iter_records,
    make_tasks,
    read_summary,
    run_encode,
)

DISK_MARGIN = 1.1  # the space estimate is rough; ask for 10% more


def fingerprint(opts: ConvertOptions, plan: SourcePlan) -> str:
    blob = json.dumps({"version": TOOL_VERSION, "options": opts.output_options(),
                       "sources": plan.digest()}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def encode_spec(opts: ConvertOptions, split: str) -> EncodeSpec:
    return EncodeSpec(max_resolution=opts.resolution(split), jpeg_quality=opts.jpeg_quality,
                      write_mode=opts.write_mode, compress_probability=opts.compress_probability,
                      smart_threshold=opts.smart_threshold, seed=opts.seed,
                      want_ffcv="ffcv" in opts.formats, want_dali="dali" in opts.formats,
                      keep_source=opts.keeps_source(split))


def convert(opts: ConvertOptions, timings: dict | None = None) -> dict:
    """Run (or resume) the conversion described by `opts`; return the meta.json content.

    `timings`, if given, receives the wall time of the phases (encode_s, write_s), the CPU time
    of the encode phase over all processes (encode_cpu_s) and the number of images encoded by
    this run (encoded), for benchmarks; meta.json never holds timings. A file system error (a
    read-only or full --dst) is a ConvertError naming the path: one line, resumable.
    """
    try:
        return _convert(opts, {} if timings is None else timings)
    except OSError as e:
        raise _os_error(e, opts) from None


def _os_error(e: OSError, opts: ConvertOptions) -> ConvertError:
    where = e.filename or opts.dst
    reason = e.strerror or str(e)
    hint = {errno.ENOSPC: "free some space (or choose another --dst)",
            errno.EDQUOT: "free some space (or choose another --dst)",
            errno.EROFS: "choose a writable --dst",
            errno.EACCES: "choose a --dst you can write to"}.get(e.errno, "fix it")
    return ConvertError(f"{where}: {reason}; {hint}, then rerun the same command: finished work "
                        "is kept and resumed")


def _convert(opts: ConvertOptions, timings: dict) -> dict:
    plan = scan(opts)
    dst = Path(opts.dst)
    fp = fingerprint(opts, plan)
    if _prepare_dst(dst, opts, fp) == "complete":
        print(f"{dst} already holds this conversion (pass --overwrite to rebuild it)")
        WorkDir(dst).remove()  # a kill after meta.json was written can leave it behind
        meta = load_meta(dst)
        print_summary(meta, dst)
        return meta
    work = WorkDir(dst)
    todo = [name for name in plan.splits if not work.done_path(name).exists()]
    if opts.check_disk:
        check_disk(dst, opts, plan, todo)
    with work.locked():
        meta = _run(opts, plan, fp, work, todo, timings)
    work.remove()
    print_summary(meta, dst)
    return meta


def _run(opts: ConvertOptions, plan: SourcePlan, fp: str, work: WorkDir, todo: list[str],
         timings: dict) -> dict:
    """Encode what is missing, write what is missing, then meta.json; return its content."""
    dst = Path(opts.dst)
    work.begin(fp, opts.output_options())
    tasks = {name: make_tasks(work, name, opts.src, plan.splits[name].samples,
                              encode_spec(opts, name), opts.chunk_size) for name in todo}
    start, start_cpu = time.perf_counter(), _cpu_seconds()
    timings["encoded"] = _encode_all([t for ts in tasks.values() for t in ts], opts)
    timings["encode_s"] = time.perf_counter() - start
    timings["encode_cpu_s"] = _cpu_seconds() - start_cpu  # workers count once they have exited
    records = {name: _finish_split(work, dst, opts, plan, name, tasks.get(name))
               for name in plan.splits}
    timings["write_s"] = time.perf_counter() - start - timings["encode_s"]
    print(f"encoded {timings['encoded']} images in {timings['encode_s']:.1f} s, "
          f"wrote the outputs in {timings['write_s']:.1f} s")
    meta = build_meta(opts, plan.classes, fp, records)
    write_meta(dst, meta)
    return meta


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (user + system)."""
    own, children = (resource.getrusage(who) for who in
                     (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _prepare_dst(dst: Path, opts: ConvertOptions, fp: str) -> str:
    """'complete', 'resume' or 'fresh'; raise if dst holds something this run must not touch."""
    if dst.exists() and not dst.is_dir():
        raise ConvertError(f"--dst={dst}: exists and is not a directory")
    if opts.overwrite:
        remove_outputs(dst)
    if (dst / "meta.json").is_file():
        meta = load_meta(dst)
        if meta.get("fingerprint") == fp:
            return "complete"
        raise ConvertError(f"{dst} already holds a conversion made {_differences(meta, opts)}; "
                           "choose another --dst or pass --overwrite to replace it")
    unfinished = WorkDir(dst).plan()
    if unfinished is not None and unfinished["fingerprint"] == fp:
        return "resume"
    if unfinished is not None:
        raise ConvertError(f"{dst}/.work holds an unfinished conversion made "
                           f"{_differences(unfinished, opts)}: rerun it with its own arguments to "
                           "resume it, or pass --overwrite to start over")
    found = [p for s in SPLITS for p in output_paths(dst, s).values() if p.exists()]
    if found:
        raise ConvertError(f"{found[0]} exists, but {dst} has no meta.json or .work/ from this "
                           "tool; pass --overwrite to replace it")
    return "fresh"


def _differences(meta: dict, opts: ConvertOptions) -> str:
    old, new = meta.get("options", {}), opts.output_options()
    changed = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in new if old.get(k) != new.get(k)]
    return f"with other options ({'; '.join(changed)})" if changed else "from other source files"


def remove_outputs(dst: Path) -> None:
    """Delete everything this tool may have written under dst (only its own names)."""
    for split in SPLITS:
        for path in output_paths(dst, split).values():
            for p in (path, partial_name(path)):
                if p.is_dir():
                    shutil.rmtree(p)
                elif p.exists():
                    p.unlink()
    (dst / "meta.json").unlink(missing_ok=True)
    WorkDir(dst).remove()
    if (dst / "dali").is_dir() and not any((dst / "dali").iterdir()):
        (dst / "dali").rmdir()


def partial_name(path: Path) -> Path:
    return path.with_name(path.name + ".partial")


def _encode_all(tasks: list[ChunkTask], opts: ConvertOptions) -> int:
    """Encode the chunks that are not on disk yet; return how many images that took."""
    pending = [t for t in tasks if not Path(t.out_path).exists()]
    total = sum(len(t.samples) for t in tasks)
    done = total - sum(len(t.samples) for t in pending)
    if done:
        print(f"resuming: {done} of {total} images already encoded")
    with tqdm(total=total, initial=done, unit="img", desc="decode+encode", smoothing=0.1,
              dynamic_ncols=True) as bar:
        run_encode(pending, opts.workers, opts.on_error == "fail", bar)
    return total - done


def _finish_split(work: WorkDir, dst: Path, opts: ConvertOptions, plan: SourcePlan, name: str,
                  tasks: list[ChunkTask] | None) -> dict:
    """Write the split's outputs from its chunks (unless already there); return its record."""
    if tasks is None:  # finished by an earlier run
        return json.loads(work.done_path(name).read_text())
    summaries = [read_summary(Path(t.out_path)) for t in tasks]
    failures = [i for i in map(first_failure, summaries) if i is not None]
    if opts.on_error == "fail" and failures:
        raise failure_error(failures[0])
    count = sum(s.n_encoded for s in summaries)
    page_size = page_size_for(max((s.max_ffcv_bytes for s in summaries), default=0))
    _write_outputs(dst, opts, name, [Path(t.out_path) for t in tasks], count, page_size)
    issues = list(plan.splits[name].issues) + [i for s in summaries for i in s.issues]
    record = {"source_count": len(plan.splits[name].samples), "count": count,
              "page_size": page_size, "shards": -(-count // opts.shard_size),
              "issues": [i.to_json() for i in sorted(issues, key=lambda i: (i.path, i.kind))]}
    write_bytes_atomic(work.done_path(name), json.dumps(record).encode())
    work.drop_chunks(name)
    return record


def _write_outputs(dst: Path, opts: ConvertOptions, name: str, chunks: list[Path], count: int,
                   page_size: int) -> None:
    """Write the split's missing outputs from the chunk files, each renamed when complete."""
    final = output_paths(dst, name)
    jobs = []
    if "ffcv" in opts.formats and not final["ffcv"].exists():
        jobs.append(functools.partial(_write_beton_file, final["ffcv"], chunks, count, page_size))
    if "dali" in opts.formats and not final["dali"].exists():
        jobs.append(functools.partial(_write_shard_dir, final["dali"], chunks, opts.shard_size))
    # One thread per writer: both spend their time in write(2) and fsync, which release the GIL.
    with tqdm(total=count * len(jobs), unit="img", desc=f"write {name}",
              dynamic_ncols=True) as bar, ThreadPoolExecutor(max(1, len(jobs))) as pool:
        for future in [pool.submit(job, bar) for job in jobs]:
            future.result()


def _fresh_partial(final: Path) -> Path:
    """The temporary name of `final`, cleared of what a killed run may have left there."""
    partial = partial_name(final)
    if partial.is_dir():
        shutil.rmtree(partial)
    elif partial.exists():
        partial.unlink()
    return partial


def _write_beton_file(final: Path, chunks: list[Path], count: int, page_size: int,
                      bar: tqdm) -> None:
    partial = _fresh_partial(final)
    write_beton(partial, iter_records(chunks), count, page_size, bar)
    replace_durably(partial, final)


def _write_shard_dir(final: Path, chunks: list[Path], shard_size: int, bar: tqdm) -> None:
    partial = _fresh_partial(final)
    shards = ShardWriter(partial, shard_size)
    for label, enc in iter_records(chunks):
        shards.add(label, enc.jpeg)
        bar.update(1)
    shards.close()
    replace_durably(partial, final)


def estimate_bytes(opts: ConvertOptions, plan: SourcePlan, splits: list[str]) -> int:
    """Disk space the conversion of `splits` needs at its peak (work files and outputs), with
    DISK_MARGIN; each .beton counted page by page (beton_size), since its padding dominates
    small splits."""
    raw_share = {"jpg": 0.0, "raw": 1.0, "smart": 1.0,
                 "proportion": 1.0 - opts.compress_probability}[opts.write_mode]
    total = 0.0
    for name in splits:
        samples = plan.splits[name].samples
        if not samples:
            continue
        step = max(1, len(samples) // 200)  # stat a deterministic spread, not every file
        sampled = [os.path.join(opts.src, s.path) for s in samples[::step]]
        sizes = [_size(path) for path in sampled]
        jpeg = sum(sizes) / len(sizes)  # re-encoded ImageNet JPEGs stay close to the source
        pixels, largest = _stored_pixels(opts, name, sampled if raw_share else [])
        raw = raw_share * pixels * 3
        page_size = page_size_for(largest * 3 if raw_share else 0)
        ffcv = "ffcv" in opts.formats
        dali = jpeg if "dali" in opts.formats else 0.0
        # Until a split is written, its chunk files hold the JPEG (and raw pixels) once more.
        work = (raw if ffcv else 0.0) + (jpeg if dali or (ffcv and raw_share < 1) else 0.0)
        total += len(samples) * (work + dali)
        if ffcv:
            total += beton_size(len(samples), raw + (1.0 - raw_share) * jpeg, page_size)
    return int(DISK_MARGIN * total)


def _stored_pixels(opts: ConvertOptions, split: str, sampled: list[str]) -> tuple[float, int]:
    """(mean, largest) pixels of a stored image of the split: a 4:3 image at the cap, or for
    an uncapped split the sizes in the sampled files' headers."""
    side = opts.resolution(split)
    if not opts.keeps_source(split) or not sampled:
        return side * side * 0.75, side * side
    areas = [_header_pixels(path) for path in sampled]
    return sum(areas) / len(areas), max(areas)


def check_disk(dst: Path, opts: ConvertOptions, plan: SourcePlan, splits: list[str]) -> None:
    """Refuse to start when the estimated work files plus outputs do not fit."""
    images = sum(len(plan.splits[name].samples) for name in splits)
    if not images:
        return
    need = estimate_bytes(opts, plan, splits)
    probe = dst if dst.exists() else next(p for p in dst.parents if p.exists())
    free = shutil.disk_usage(probe).free
    print(f"disk: about {need / 1e9:.2f} GB needed for {images} images, "
          f"{free / 1e9:.2f} GB free at {probe}")
    if need > free:
        raise ConvertError(
            f"not enough free disk space at {probe}: about {need / 1e9:.1f} GB needed "
            f"({images} images: the work files and the {'+'.join(opts.formats)} outputs, "
            f".beton pages included), {free / 1e9:.1f} GB free. Free some space, "
            "choose another --dst, or pass --check_disk=False to skip this estimate")


def _header_pixels(path: str) -> int:
    try:
        with Image.open(path) as im:  # reads the header only
            return im.size[0] * im.size[1]
    except Exception:  # a bad file is skipped by the conversion; count it as empty here
        return 0


def _size(path: str) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return 0
