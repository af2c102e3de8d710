"""Which source files are converted, in which order, with which labels.

Labels and order follow torchvision's ImageFolder exactly: classes are the sorted folder names
of train/ (label = index), files are walked in sorted order and kept by extension. A flat val/
folder (ILSVRC2012_val_*.JPEG) takes its labels from LOC_val_solution.csv and is ordered by
(label, file name), so it converts to the same bytes as the same images sorted into folders.
With --train_order=shuffled (the default) the train list is then permuted, seeded by --seed:
webdataset shards must not be class-sorted, since a reader's shuffle buffer only mixes samples
that are near each other in the stream.
"""
from __future__ import annotations

import csv
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .issues import Issue
from .options import ConvertError, ConvertOptions

# torchvision.datasets.folder.IMG_EXTENSIONS, compared lower-case as ImageFolder does.
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


@dataclass(frozen=True, slots=True)  # slots: 1.3M of these for full ImageNet
class Sample:
    index: int  # position in the split as written; seeds this image's randomness
    path: str  # relative to --src, '/'-separated
    label: int


@dataclass(frozen=True)
class SplitSource:
    name: str
    samples: tuple[Sample, ...]
    issues: tuple[Issue, ...]  # files seen but not taken (wrong extension, no label)


@dataclass(frozen=True)
class SourcePlan:
    classes: tuple[str, ...]
    splits: dict[str, SplitSource]

    def digest(self) -> str:
        """Hash of the class list and every (path, label): part of the resume fingerprint."""
        h = hashlib.sha256("\n".join(self.classes).encode())
        for name, split in self.splits.items():
            h.update(f"\n[{name}]".encode())
            for s in split.samples:
                h.update(f"\n{s.path}\t{s.label}".encode())
        return h.hexdigest()


def scan(opts: ConvertOptions) -> SourcePlan:
    root = Path(opts.src)
    if not root.is_dir():
        raise ConvertError(f"--src={opts.src}: not a directory")
    all_classes = _class_folders(root)
    classes = _select_classes(all_classes, opts.classes)
    splits = {name: _scan_split(root, name, classes, all_classes, opts) for name in opts.splits}
    return SourcePlan(classes=classes, splits=splits)


def _class_folders(root: Path) -> tuple[str, ...]:
    train = root / "train"
    if not train.is_dir():
        raise ConvertError(f"--src={root}: expected {train}/<wnid>/*.JPEG (ImageFolder layout); "
                           "the class list is read from train/")
    classes = tuple(sorted(e.name for e in os.scandir(train) if e.is_dir()))
    if not classes:
        raise ConvertError(f"{train} holds no class folders")
    return classes


def _select_classes(all_classes: tuple[str, ...], class_file: str | None) -> tuple[str, ...]:
    if class_file is None:
        return all_classes
    lines = Path(class_file).read_text().splitlines()
    wanted = {ln.split("#")[0].strip() for ln in lines} - {""}
    unknown = sorted(wanted - set(all_classes))
    if unknown:
        raise ConvertError(f"--classes={class_file}: {unknown[:5]} are not folders under train/")
    if not wanted:
        raise ConvertError(f"--classes={class_file}: no class names (one wnid per line)")
    return tuple(sorted(wanted))  # labels are indices into the sorted subset, as ImageFolder


def _scan_split(root: Path, name: str, classes: tuple[str, ...], all_classes: tuple[str, ...],
                opts: ConvertOptions) -> SplitSource:
    split_dir = root / name
    if not split_dir.is_dir():
        hint = " (or --splits=train)" if name == "val" else ""
        raise ConvertError(f"--src={root}: no {name}/ folder{hint}")
    has_folders = any(e.is_dir() for e in os.scandir(split_dir))
    if has_folders:
        found, issues = _list_folders(root, name, classes, all_classes, opts.classes is None)
    elif opts.val_labels is not None and name == "val":
        found, issues = _list_flat(root, name, classes, all_classes, opts.val_labels)
    else:
        raise ConvertError(f"{split_dir} has no class folders; for a flat val folder pass "
                           "--val_labels=LOC_val_solution.csv")
    found = _limit(found, opts.limit_per_class)
    if name == "train" and opts.train_order == "shuffled":
        found = [found[i] for i in np.random.default_rng(opts.seed).permutation(len(found))]
    samples = tuple(Sample(i, path, label) for i, (path, label) in enumerate(found))
    return SplitSource(name=name, samples=samples, issues=tuple(issues))


def _rel(root: Path, path: str) -> str:
    return Path(os.path.relpath(path, root)).as_posix()


def _list_folders(root: Path, name: str, classes: tuple[str, ...], all_classes: tuple[str, ...],
                  strict: bool) -> tuple[list[tuple[str, int]], list[Issue]]:
    split_dir = root / name
    issues = [Issue(name, _rel(root, e.path), "outside_class")
              for e in sorted(os.scandir(split_dir), key=lambda e: e.name) if not e.is_dir()]
    extra = sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and e.name not in classes)
    if strict and extra:
        raise ConvertError(f"{split_dir}: folders {extra[:5]} are not class folders of train/ "
                           f"({len(all_classes)} classes)")
    found: list[tuple[str, int]] = []
    for label, wnid in enumerate(classes):
        for dirpath, _, fnames in sorted(os.walk(split_dir / wnid, followlinks=True)):
            for fname in sorted(fnames):
                rel = _rel(root, os.path.join(dirpath, fname))
                if fname.lower().endswith(IMG_EXTENSIONS):
                    found.append((rel, label))
                else:
                    issues.append(Issue(name, rel, "ignored_extension"))
    _refuse_empty_classes(split_dir, classes, found)
    return found, issues


def _refuse_empty_classes(split_dir: Path, classes: tuple[str, ...],
                          found: list[tuple[str, int]]) -> None:
    """A class folder without an image file: torchvision's ImageFolder, which the reference
    pipeline reads the same source with, refuses it ("Found no valid file"), so the converter
    does too rather than keep a class no image of the split carries."""
    labelled = {label for _, label in found}
    empty = [wnid for label, wnid in enumerate(classes)
             if label not in labelled and (split_dir / wnid).is_dir()]
    if empty:
        raise ConvertError(f"{split_dir}: {len(empty)} class folder(s) hold no image file "
                           f"({', '.join(empty[:5])}{', ...' if len(empty) > 5 else ''}; "
                           f"extensions {', '.join(IMG_EXTENSIONS)}), which torchvision's "
                           "ImageFolder refuses too: add images or remove the folders")


def _read_val_labels(csv_path: str) -> dict[str, str]:
    """ImageId -> wnid from LOC_val_solution.csv (first token of PredictionString)."""
    labels = {}
    with open(csv_path, newline="") as f:
        for row in csv.reader(f):
            if len(row) < 2 or row[0] == "ImageId" or not row[1].split():
                continue
            labels[row[0].strip()] = row[1].split()[0]
    if not labels:
        raise ConvertError(f"--val_labels={csv_path}: no 'ImageId,wnid ...' rows found")
    return labels


def _list_flat(root: Path, name: str, classes: tuple[str, ...], all_classes: tuple[str, ...],
               csv_path: str) -> tuple[list[tuple[str, int]], list[Issue]]:
    wnids = _read_val_labels(csv_path)
    index = {wnid: i for i, wnid in enumerate(classes)}
    issues: list[Issue] = []
    found: list[tuple[str, int]] = []
    for fname in sorted(os.listdir(root / name)):
        rel = f"{name}/{fname}"
        wnid = wnids.get(fname.split(".")[0])
        if not fname.lower().endswith(IMG_EXTENSIONS):
            issues.append(Issue(name, rel, "ignored_extension"))
        elif wnid is None:
            issues.append(Issue(name, rel, "no_label", f"{fname.split('.')[0]} not in csv"))
        elif wnid in index:
            found.append((rel, index[wnid]))
        elif wnid not in all_classes:
            issues.append(Issue(name, rel, "unknown_class", wnid))
        # else: a class left out by --classes, like its train/ folder
    found.sort(key=lambda item: (item[1], item[0]))
    return found, issues


def _limit(found: list[tuple[str, int]], limit: int | None) -> list[tuple[str, int]]:
    """Keep the first `limit` files of each class (in the split's order)."""
    if limit is None:
        return found
    taken: dict[int, int] = {}
    kept = []
    for path, label in found:
        if taken.get(label, 0) < limit:
            taken[label] = taken.get(label, 0) + 1
            kept.append((path, label))
    return kept
