"""Convert an ImageFolder-layout ImageNet into FFCV .beton files and DALI webdataset shards.

    python tools/convert_in1k.py --src=/data/imagenet --dst=/data/in1k_500

One pass decodes and re-encodes each image once, in parallel, and both formats store the result.
Killed at any point, the same command resumes; see docs/CONVERT.md for outputs and guarantees.
"""
from __future__ import annotations

import inspect
import sys
from dataclasses import MISSING, fields

import fire

from pipelines.convert.convert import convert
from pipelines.convert.options import ConvertError, ConvertOptions, make_options
from pipelines.convert.verify import verify as verify_outputs
from pipelines.errors import BadFileError


def main(src=None, dst=None, formats=None, splits=None, max_resolution=None,
         val_max_resolution=None, jpeg_quality=None, write_mode=None, compress_probability=None,
         smart_threshold=None, shard_size=None, val_labels=None, classes=None,
         limit_per_class=None, on_error=None, seed=None, train_order=None, chunk_size=None,
         num_workers=None, overwrite=None, verify=None, check_disk=None) -> None:
    """Convert <src>/{train,val} into <dst>/{train,val}.beton, <dst>/dali/ and <dst>/meta.json.

    Args:
        src: ImageNet root holding train/<wnid>/*.JPEG and val/ (class folders, or flat files
            with --val_labels). Labels are the sorted train/ folder names, as ImageFolder.
        dst: output folder; created if missing.
        formats: comma-separated subset of ffcv,dali.
        splits: comma-separated subset of train,val.
        max_resolution: images are resized so the longer side is at most this many px.
        val_max_resolution: the same for val (default: max_resolution); 0 keeps val at full
            resolution, as the source JPEG bytes where no repair is needed (docs/CONVERT.md).
        jpeg_quality: JPEG quality (1-100) of the re-encoded images.
        write_mode: FFCV storage, one of jpg, raw, smart, proportion (DALI always gets JPEG).
        compress_probability: with write_mode=proportion, the probability that an image is
            stored as JPEG (seeded by --seed and the image's position).
        smart_threshold: with write_mode=smart, raw RGB size in bytes above which an image is
            stored as JPEG instead of raw. Required for smart.
        shard_size: samples per DALI tar shard.
        val_labels: LOC_val_solution.csv, for a flat val/ folder.
        classes: file with one wnid per line: convert only these classes (e.g. ImageNet-100);
            labels are indices into the sorted subset.
        limit_per_class: keep only the first N files of each class (sorted order), per split.
        on_error: skip leaves undecodable files out and lists them in meta.json;
            fail stops at the first one.
        seed: seed of all randomness (write_mode=proportion, train_order=shuffled).
        train_order: shuffled writes the train split in a random order seeded by --seed (the
            webdataset convention: DALI's shuffle buffer then mixes classes); source keeps
            ImageFolder's class-sorted order. val is always in ImageFolder order.
        chunk_size: images per resumable work unit.
        num_workers: decode+encode processes; default all cores; 0 runs in this process.
        overwrite: delete this tool's earlier outputs in dst and convert again.
        verify: afterwards, re-read the outputs and check counts and labels against src.
        check_disk: estimate the space needed up front and stop if it does not fit.
    """
    given = {k: v for k, v in locals().items() if v is not None}
    try:
        opts = make_options(**given)
        convert(opts)
        problems = verify_outputs(opts) if opts.verify else []
    except (ConvertError, BadFileError) as e:  # BadFileError: an unreadable <dst>/meta.json
        print(f"convert_in1k: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("\nconvert_in1k: interrupted; rerun the same command to resume", file=sys.stderr)
        sys.exit(130)
    if opts.verify:
        for line in problems:
            print(f"verify: {line}")
        print(f"verify: {'FAILED' if problems else 'OK'} ({opts.dst})")
        if problems:
            sys.exit(1)


def _show_defaults(fn):
    """Let --help show ConvertOptions' defaults (their one home) instead of the None sentinels."""
    shown = {f.name: ",".join(f.default) if isinstance(f.default, tuple) else f.default
             for f in fields(ConvertOptions) if f.default is not MISSING}
    params = inspect.signature(fn).parameters.values()
    fn.__signature__ = inspect.Signature([p.replace(default=shown.get(p.name, p.default))
                                          for p in params])
    return fn


_show_defaults(main)

if __name__ == "__main__":
    fire.Fire(main)
