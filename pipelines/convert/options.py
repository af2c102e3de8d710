"""The converter's settings: one frozen dataclass, validated once, with messages that name the flag.

`output_options()` is the subset that decides the output bytes; it goes into meta.json and into
the fingerprint that lets a rerun resume (or refuse) safely. Runtime-only settings (workers,
--overwrite, --verify, the disk check) are left out so a resume may change them.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

TOOL_VERSION = "1.1.0"  # bump when the output bytes for the same options change

FORMATS = ("ffcv", "dali")
SPLITS = ("train", "val")
WRITE_MODES = ("jpg", "raw", "smart", "proportion")
ON_ERROR = ("skip", "fail")
TRAIN_ORDERS = ("shuffled", "source")
RUNTIME_ONLY = ("dst", "num_workers", "overwrite", "verify", "check_disk")
MAX_SIDE = 65535  # px: FFCV stores image sizes as uint16


class ConvertError(Exception):
    """A problem with the inputs or the destination, reported to the user without a traceback."""


def _flag(default, help: str):
    """A field that is a flag of tools/convert_in1k.py: its help text is the --help line."""
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class ConvertOptions:
    src: str = field(metadata={"help": "ImageNet root holding train/<wnid>/*.JPEG and val/ "
                                       "(class folders, or flat files with --val_labels). "
                                       "Labels are the sorted train/ folder names, as "
                                       "ImageFolder"})
    dst: str = field(metadata={"help": "output folder; created if missing"})
    formats: tuple[str, ...] = _flag(FORMATS, "comma-separated subset of ffcv,dali")
    splits: tuple[str, ...] = _flag(SPLITS, "comma-separated subset of train,val")
    max_resolution: int = _flag(500, "images are resized so the longer side is at most this "
                                     "many px")
    val_max_resolution: int | None = _flag(None, "the same for val; default (None) "
                                                 "max_resolution; 0 keeps val at full resolution, "
                                                 "as the source JPEG bytes where no repair is "
                                                 "needed (docs/CONVERT.md): the headline IN1K "
                                                 "figure's images")
    jpeg_quality: int = _flag(90, "JPEG quality (1-100) of the re-encoded images")
    write_mode: str = _flag("jpg", "FFCV storage, one of jpg, raw, smart, proportion (DALI "
                                   "always gets JPEG)")
    compress_probability: float = _flag(0.5, "with write_mode=proportion, the probability that "
                                             "an image is stored as JPEG (seeded by --seed and "
                                             "the image's position)")
    smart_threshold: int | None = _flag(None, "with write_mode=smart, raw RGB size in bytes "
                                              "above which an image is stored as JPEG instead "
                                              "of raw. Required for smart")
    shard_size: int = _flag(2500, "samples per DALI tar shard")
    val_labels: str | None = _flag(None, "LOC_val_solution.csv, for a flat val/ folder")
    classes: str | None = _flag(None, "file with one wnid per line: convert only these classes "
                                      "(e.g. ImageNet-100); labels are indices into the sorted "
                                      "subset")
    limit_per_class: int | None = _flag(None, "keep only the first N files of each class "
                                              "(sorted order), per split")
    on_error: str = _flag("skip", "skip leaves undecodable files out and lists them in "
                                  "meta.json; fail stops at the first one")
    seed: int = _flag(0, "seed of all randomness (write_mode=proportion, train_order=shuffled)")
    train_order: str = _flag("shuffled", "shuffled writes the train split in a random order "
                                         "seeded by --seed (the webdataset convention: DALI's "
                                         "shuffle buffer then mixes classes); source keeps "
                                         "ImageFolder's class-sorted order. val is always in "
                                         "ImageFolder order")
    chunk_size: int = _flag(256, "images per resumable work unit")
    num_workers: int | None = _flag(None, "decode+encode processes; default (None) all cores; 0 "
                                          "runs in this process")
    overwrite: bool = _flag(False, "delete this tool's earlier outputs in dst and convert again")
    verify: bool = _flag(False, "afterwards, re-read the outputs and check counts and labels "
                                "against src")
    check_disk: bool = _flag(True, "estimate the space needed up front and stop if it does not "
                                   "fit")

    def output_options(self) -> dict:
        """Everything that decides the output bytes (the fingerprint's and meta.json's view),
        as meta.json holds them (JSON values: tuples are lists), so the two compare equal."""
        kept = {k: v for k, v in asdict(self).items() if k not in RUNTIME_ONLY}
        if kept["val_max_resolution"] is None:  # conversions made before it keep their
            del kept["val_max_resolution"]      # fingerprint: None changes no byte
        return json.loads(json.dumps(kept))

    def resolution(self, split: str) -> int:
        """The longer-side cap of the split's images (MAX_SIDE for an uncapped val)."""
        if split != "val" or self.val_max_resolution is None:
            return self.max_resolution
        return self.val_max_resolution or MAX_SIDE

    def keeps_source(self, split: str) -> bool:
        """Whether the split stores the source's own JPEG bytes where no repair is needed."""
        return split == "val" and self.val_max_resolution == 0

    @property
    def workers(self) -> int:
        if self.num_workers is None:
            return os.cpu_count() or 1
        return self.num_workers


def _as_names(flag: str, value: object, accepted: tuple[str, ...]) -> tuple[str, ...]:
    # fire turns "--formats=ffcv,dali" into a tuple and "--formats=ffcv" into a str.
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, (tuple, list)) or not items:
        raise ConvertError(f"--{flag}={value!r}: expected a comma-separated subset of {accepted}")
    names = tuple(str(x).strip() for x in items)
    bad = [n for n in names if n not in accepted]
    if bad or len(set(names)) != len(names):
        raise ConvertError(f"--{flag}={value!r}: accepted values are {', '.join(accepted)}")
    return tuple(n for n in accepted if n in names)  # canonical order


def _check_int(flag: str, value: object, low: int, high: int | None = None) -> None:
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= low
    if not ok or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f">= {low}"
        raise ConvertError(f"--{flag}={value!r}: expected an integer {bound}")


def _check_val_cap(value: object) -> None:
    if value is None or (type(value) is int and (value == 0 or 16 <= value <= MAX_SIDE)):
        return
    raise ConvertError(f"--val_max_resolution={value!r}: expected 0 (no cap: val kept as the "
                       f"source) or an integer between 16 and {MAX_SIDE}")


def _check_choice(flag: str, value: object, accepted: tuple[str, ...]) -> None:
    if value not in accepted:
        raise ConvertError(f"--{flag}={value!r}: accepted values are {', '.join(accepted)}")


def _existing_file(flag: str, value: object) -> str | None:
    if value is None:
        return None
    path = Path(str(value)).expanduser()
    if not path.is_file():
        raise ConvertError(f"--{flag}={value}: no such file")
    return str(path.resolve())


def make_options(**kwargs: object) -> ConvertOptions:
    """Validate raw CLI values and return the options; raise ConvertError naming the bad flag."""
    known = {f.name for f in fields(ConvertOptions)}
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise ConvertError(f"unknown option(s) {unknown}; known: {sorted(known)}")
    for flag in ("src", "dst"):
        if not kwargs.get(flag):
            raise ConvertError(f"--{flag} is required")
    kw = dict(kwargs)
    kw["src"] = str(Path(str(kw["src"])).expanduser().resolve())
    kw["dst"] = str(Path(str(kw["dst"])).expanduser().resolve())
    _check_dst_outside_src(kw["src"], kw["dst"])
    kw["formats"] = _as_names("formats", kw.get("formats", FORMATS), FORMATS)
    kw["splits"] = _as_names("splits", kw.get("splits", SPLITS), SPLITS)
    kw["val_labels"] = _existing_file("val_labels", kw.get("val_labels"))
    kw["classes"] = _existing_file("classes", kw.get("classes"))
    opts = ConvertOptions(**kw)
    _validate_numbers(opts)
    # 1 and 1.0 must give the same fingerprint.
    return replace(opts, compress_probability=float(opts.compress_probability))


def _check_dst_outside_src(src: str, dst: str) -> None:
    """Outputs inside the source would become part of it (under train/, a new class folder)."""
    if Path(dst).is_relative_to(src):
        raise ConvertError(f"--dst={dst} is inside --src={src}: the outputs would become part "
                           "of the source it reads; choose a --dst outside --src")


def _validate_numbers(opts: ConvertOptions) -> None:
    _check_int("max_resolution", opts.max_resolution, 16, MAX_SIDE)
    _check_val_cap(opts.val_max_resolution)
    _check_int("jpeg_quality", opts.jpeg_quality, 1, 100)
    _check_int("shard_size", opts.shard_size, 1)
    _check_int("chunk_size", opts.chunk_size, 1)
    _check_int("seed", opts.seed, 0)
    if opts.limit_per_class is not None:
        _check_int("limit_per_class", opts.limit_per_class, 1)
    if opts.num_workers is not None:
        _check_int("num_workers", opts.num_workers, 0)
    _check_choice("write_mode", opts.write_mode, WRITE_MODES)
    _check_choice("on_error", opts.on_error, ON_ERROR)
    _check_choice("train_order", opts.train_order, TRAIN_ORDERS)
    p = opts.compress_probability
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
        raise ConvertError(f"--compress_probability={p!r}: expected a number in [0, 1]")
    if opts.write_mode == "smart":
        if opts.smart_threshold is None:
            raise ConvertError("--write_mode=smart needs --smart_threshold=<raw bytes>: images "
                               "whose raw RGB size exceeds it are stored as JPEG")
        _check_int("smart_threshold", opts.smart_threshold, 0)
    for flag in ("overwrite", "verify", "check_disk"):
        if not isinstance(getattr(opts, flag), bool):
            raise ConvertError(f"--{flag}={getattr(opts, flag)!r}: expected True or False")
