"""The splits of the transfer datasets that torchvision does not read, as the t-ReX authors
evaluate them (naver/trex, transfer/data/; Sariyildiz et al., "No Reason for No Supervision",
ICLR 2023): SUN397's official partition 1, EuroSAT's per-class counts, ImageNet-CoG's split
file; and the seeded split used only where no official split is on disk. Also the image counts
the authors' loaders assert (AUTHORS_COUNTS), which the report prints next to ours.
trex_fast.eval.datasets reads the datasets with these.
"""
from __future__ import annotations

import collections
import functools
import os
import pickle
from collections.abc import Callable

import numpy as np

Pairs = list[tuple[str, int]]  # (image path, label)

SPLIT_SEED = 0  # the seeded splits: EuroSAT's, and SUN397's and CoG's without split files
SEEDED_TEST_FRACTION = 0.2  # SUN397 without partition files: a fifth of each class is test
COG_TEST_PER_CONCEPT = 50  # ImageNet-CoG without split file: 50 test images per concept
# EuroSAT, the authors' per-class counts (after Feng et al., ICLR 2022: 13,500 / 5,400 / 8,100):
# test, then val; the rest is train. The authors probe on train + val (18,900), as we do.
EUROSAT_PER_CLASS = {"test": 810, "val": 540}
SUN397_PARTITION = ("Training_01.txt", "Testing_01.txt")  # official partition 1
COG_SPLIT_FILE = "cog_concepts_split_file.pkl"  # the ImageNet-CoG benchmark's (naver/cog)
COG_LEVELS_FILE = "cog_levels_mapping_file.pkl"  # its concepts of the five levels

# The images the authors' loaders assert per split (naver/trex, transfer/data/*.py):
# (train, val folded into train for the probe or None, test). One home for these numbers.
AUTHORS_COUNTS: dict[str, tuple[int, int | None, int]] = {
    "aircraft": (3334, 3333, 3333), "cars": (8144, None, 8041), "dtd": (1880, 1880, 1880),
    "eurosat": (13500, 5400, 8100), "flowers": (1020, 1020, 6149), "pets": (3680, None, 3669),
    "food101": (75750, None, 25250), "sun397": (19850, None, 19850),
    "inat2018": (437513, None, 24426), "inat2019": (265213, None, 3030),
    "in1k": (1281167, None, 50000),
    "cog_l1": (1118804, None, 50000), "cog_l2": (1115788, None, 50000),
    "cog_l3": (1095203, None, 50000), "cog_l4": (1107128, None, 50000),
    "cog_l5": (1091654, None, 50000),
}


def seeded_split(pairs: Pairs, test_count: Callable[[int], int],
                 seed: int = SPLIT_SEED) -> tuple[Pairs, Pairs]:
    """Per class, the paths sorted then shuffled with `seed`; the first test_count(n) are test.
    Independent of the order the files were listed in."""
    rng = np.random.default_rng(seed)
    by_class: dict[int, list[str]] = {}
    for path, label in pairs:
        by_class.setdefault(label, []).append(path)
    train, test = [], []
    for label in sorted(by_class):
        paths = sorted(by_class[label])
        order = rng.permutation(len(paths))
        n_test = test_count(len(paths))
        test += [(paths[i], label) for i in order[:n_test]]
        train += [(paths[i], label) for i in order[n_test:]]
    return train, test


def fifth(n: int) -> int:
    return max(1, int(round(SEEDED_TEST_FRACTION * n))) if n > 1 else 0


def cog_test(n: int) -> int:
    return min(COG_TEST_PER_CONCEPT, fifth(n))


def eurosat_split(pairs: Pairs) -> tuple[Pairs, Pairs]:
    """The authors' EuroSAT split: per class, sorted then shuffled (SPLIT_SEED), the first
    810 images test, the next 540 val, the rest train; train + val is returned as train (the
    probe searches on its own 20 % of it, as the authors do)."""
    counts = collections.Counter(label for _, label in pairs)
    needed = EUROSAT_PER_CLASS["test"] + EUROSAT_PER_CLASS["val"]
    short = {label: n for label, n in counts.items() if n <= needed}
    if short:
        raise RuntimeError(f"classes {sorted(short)[:5]} have {min(short.values())} images; "
                           f"the authors' split takes {EUROSAT_PER_CLASS['test']} test + "
                           f"{EUROSAT_PER_CLASS['val']} val per class (27,000 images in all)")
    return seeded_split(pairs, lambda n: EUROSAT_PER_CLASS["test"])


def sun_partition_folder(base: str) -> str | None:
    """Where Training_01.txt and Testing_01.txt are: SUN397/Partitions/ or SUN397/ itself."""
    for folder in (os.path.join(base, "Partitions"), base):
        if all(os.path.isfile(os.path.join(folder, f)) for f in SUN397_PARTITION):
            return folder
    return None


def listed_pairs(pairs: Pairs, base: str, listing: str) -> Pairs:
    """The pairs a split file names, one image per line relative to `base` ("/a/abbey/x.jpg")."""
    by_name = {os.path.relpath(path, base).replace(os.sep, "/"): (path, label)
               for path, label in pairs}
    with open(listing) as f:
        names = [line.strip().strip("/") for line in f if line.strip()]
    missing = [n for n in names if n not in by_name]
    if missing:
        raise FileNotFoundError(f"{len(missing)} images of {listing} are not in {base}, "
                                f"e.g. {missing[0]}")
    return [by_name[n] for n in names]


class ArraysOnly(pickle.Unpickler):
    """Unpickles dicts, lists and numpy arrays, nothing else (the split file is a download)."""

    def find_class(self, module, name):
        if (module.split(".")[0], name) in {("numpy", "_reconstruct"), ("numpy", "ndarray"),
                                            ("numpy", "dtype"), ("numpy", "scalar"),
                                            ("_codecs", "encode")}:  # protocol-2 bytes
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a CoG split file")


@functools.lru_cache(maxsize=1)  # the levels share one load; transfer_data.resolve_all empties it
def load_restricted(path: str, stamp: tuple[int, int]):
    """The file unpickled by ArraysOnly; `stamp` (mtime, size) keys the cache."""
    with open(path, "rb") as f:
        return ArraysOnly(f).load()


def cog_split_file(root: str, wnids: list[str], path: str) -> tuple[Pairs, Pairs]:
    """The benchmark's split: {wnid: {"train": [file, ...], "test": [...]}}, files relative to
    the IN-21K folder; each concept's files sorted."""
    info = os.stat(path)
    by_concept = load_restricted(path, (info.st_mtime_ns, info.st_size))
    absent = [w for w in wnids if w not in by_concept]
    if absent:
        raise KeyError(f"{len(absent)} concepts are not in {path}, e.g. {absent[0]}")
    out = ([], [])
    for label, wnid in enumerate(wnids):
        for pairs, split in zip(out, ("train", "test")):
            pairs += [(os.path.join(root, "imagenet21k", str(name).strip("/\\")), label)
                      for name in sorted(by_concept[wnid][split])]
    return out


def cog_concepts(root: str, level: int) -> tuple[list[str], str]:
    """(the level's IN-21K wnids, the file they come from): imagenet_cog/L<level>.txt (one wnid
    per line, first token) if present, else the level's entry of the benchmark's
    cog_levels_mapping_file.pkl (a list of five lists), sorted as the authors do."""
    listing = os.path.join(root, "imagenet_cog", f"L{level}.txt")
    mapping = os.path.join(root, "imagenet_cog", COG_LEVELS_FILE)
    if not os.path.isfile(listing) and os.path.isfile(mapping):
        with open(mapping, "rb") as f:
            return sorted(str(w) for w in ArraysOnly(f).load()[level - 1]), mapping
    with open(listing) as f:
        return [line.split()[0] for line in f if line.strip()], listing
