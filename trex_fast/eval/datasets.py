"""The transfer datasets by name, each read from its official on-disk layout and split.

Every dataset resolves to two labelled image lists, train and test, through the torchvision
class that reads its official layout (download=False), so that its split is the one the
dataset's authors published. Three have splits torchvision does not read; they follow the t-ReX
authors' transfer code (naver/trex, transfer/data/; Sariyildiz et al., ICLR 2023):
SUN397 reads the official partition 1 (Training_01.txt / Testing_01.txt) when it is on disk,
EuroSAT takes per class 810 test images and 540 val + the rest as train, and ImageNet-CoG reads
the benchmark's split file (cog_concepts_split_file.pkl) when it is on disk. Only where no
official split exists is the split drawn per class with a fixed seed, the same on every machine.
The splits and the authors' counts live in trex_fast.eval.splits. Each Labelled names its
split; docs/TRANSFER.md lists the split of every dataset next to the authors' counts.

`resolve_all` reads and checks every requested dataset before any feature is extracted: a
missing folder, split file or image fails at once, naming the dataset, the layout it expects and
the class that reads it. A name that is a directory is an ImageFolder root (train/ and test/ or
val/), as before.
"""
from __future__ import annotations

import os
import pickle
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torchvision.datasets as tvd
from torchvision.datasets.folder import default_loader

from trex_fast.eval import splits as splits
from trex_fast.eval.splits import Pairs, seeded_split


@dataclass(frozen=True)
class Labelled:
    """One dataset resolved: its train and test lists and the probe the paper assigns it."""
    name: str
    train: Pairs
    test: Pairs
    num_classes: int
    probe: str  # "lbfgs" (small datasets, raw features) or "sgd" (large, L2-normalised)
    split: str = "official"  # which split this is (recorded in transfer.json)


class DatasetNotReady(ValueError):
    """A requested dataset is missing or incomplete; the message says what to put where."""


class ImageList(torch.utils.data.Dataset):
    """(path, label) pairs as a Dataset of (transformed image, label)."""

    def __init__(self, pairs: Pairs, transform: Callable):
        self.pairs, self.transform = pairs, transform

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int):
        path, label = self.pairs[i]
        return self.transform(default_loader(path)), label


# ----------------------------------------------------------------------------- reading the lists
def _pairs(ds) -> Pairs:
    """The (path, label) list a torchvision dataset object holds (its indexing attributes in
    torchvision 0.26-0.29)."""
    for files, labels in (("_image_files", "_labels"), ("_images", "_labels")):
        if hasattr(ds, files):
            return [(str(p), int(y)) for p, y in zip(getattr(ds, files), getattr(ds, labels))]
    if hasattr(ds, "_samples"):  # StanfordCars
        return [(str(p), int(y)) for p, y in ds._samples]
    if hasattr(ds, "samples"):  # ImageFolder and its subclasses (EuroSAT)
        return [(str(p), int(y)) for p, y in ds.samples]
    raise TypeError(f"{type(ds).__name__}: no image list to read")


# ----------------------------------------------------------------------------- the datasets
def _aircraft(root):
    kw = dict(annotation_level="variant", download=False)
    return (_pairs(tvd.FGVCAircraft(root, split="trainval", **kw)),
            _pairs(tvd.FGVCAircraft(root, split="test", **kw)), "official trainval / test")


def _cars(root):
    return (_pairs(tvd.StanfordCars(root, split="train", download=False)),
            _pairs(tvd.StanfordCars(root, split="test", download=False)), "official train / test")


def _dtd(root):
    splits = {s: tvd.DTD(root, split=s, partition=1, download=False)
              for s in ("train", "val", "test")}
    if not splits["train"].classes == splits["val"].classes == splits["test"].classes:
        raise RuntimeError("train1.txt, val1.txt and test1.txt do not name the same classes")
    return (_pairs(splits["train"]) + _pairs(splits["val"]), _pairs(splits["test"]),
            "official partition 1: train1 + val1 / test1")


def _eurosat(root):
    n = splits.EUROSAT_PER_CLASS
    return (*splits.eurosat_split(_pairs(tvd.EuroSAT(root, download=False))),
            f"authors' per class: {n['test']} test, {n['val']} val + the rest train "
            f"(seed {splits.SPLIT_SEED})")


class _Flowers102(tvd.Flowers102):
    """Flowers102 with presence checks instead of md5 checks of the two label files, so that a
    re-saved copy of imagelabels.mat / setid.mat (same content, other bytes) reads too."""

    def _check_integrity(self):
        return self._images_folder.is_dir() and all(
            (self._base_folder / self._file_dict[k][0]).is_file() for k in ("label", "setid"))


def _flowers(root):
    return (_pairs(_Flowers102(root, split="train")) + _pairs(_Flowers102(root, split="val")),
            _pairs(_Flowers102(root, split="test")), "official train + val / test")


def _pets(root):
    return (_pairs(tvd.OxfordIIITPet(root, split="trainval", download=False)),
            _pairs(tvd.OxfordIIITPet(root, split="test", download=False)),
            "official trainval / test")


def _food(root):
    return (_pairs(tvd.Food101(root, split="train", download=False)),
            _pairs(tvd.Food101(root, split="test", download=False)), "official train / test")


def _sun(root):
    pairs, base = _pairs(tvd.SUN397(root, download=False)), os.path.join(root, "SUN397")
    folder = splits.sun_partition_folder(base)
    if folder is None:
        return (*seeded_split(pairs, splits.fifth), f"seeded 80/20 per class (seed "
                f"{splits.SPLIT_SEED}; no {splits.SUN397_PARTITION[0]} found)")
    train, test = (splits.listed_pairs(pairs, base, os.path.join(folder, f))
                   for f in splits.SUN397_PARTITION)
    return train, test, "official partition 1: Training_01 / Testing_01"


def _inat(version: str):
    """iNaturalist 2018/2019: images and classes through torchvision's INaturalist (class =
    numeric category folder); train and test = the official train<year>.json and
    val<year>.json (the test labels were never released)."""
    import json

    def read(root):
        base = os.path.join(root, "inaturalist")
        ds = tvd.INaturalist(base, version=version, download=False)
        by_file = {os.path.join(ds.all_categories[c], f): c for c, f in ds.index}
        out = []
        for split in ("train", "val"):
            with open(os.path.join(base, f"{split}{version}.json")) as f:
                names = [im["file_name"] for im in json.load(f)["images"]]
            # "train_val2018/Plantae/7477/x.jpg": torchvision renames train_val2018 to 2018
            rel = [os.path.join(*n.split("/")[1:]) for n in names]
            missing = [n for n in rel if n not in by_file]
            if missing:
                raise FileNotFoundError(f"{len(missing)} images of {split}{version}.json are "
                                        f"not in {ds.root}, e.g. {missing[0]}")
            out.append([(os.path.join(ds.root, n), by_file[n]) for n in rel])
        return (*out, f"official train{version}.json / val{version}.json")
    return read


def _cog(level: int):
    """ImageNet-CoG level L: its concepts (transfer_splits.cog_concepts), images from
    imagenet21k/<wnid>/; the split of the benchmark's imagenet_cog/cog_concepts_split_file.pkl
    when present, else seeded per concept."""
    def read(root):
        wnids, listing = splits.cog_concepts(root, level)
        split_file = os.path.join(root, "imagenet_cog", splits.COG_SPLIT_FILE)
        if os.path.isfile(split_file):
            return (*splits.cog_split_file(root, wnids, split_file),
                    f"official {splits.COG_SPLIT_FILE}")
        pairs = []
        for label, wnid in enumerate(wnids):
            folder = os.path.join(root, "imagenet21k", wnid)
            files = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
            if not files:
                raise FileNotFoundError(f"concept {wnid} of {listing}: no images in {folder}")
            pairs += [(os.path.join(folder, n), label) for n in files]
        return (*seeded_split(pairs, splits.cog_test),
                f"seeded, {splits.COG_TEST_PER_CONCEPT} test per concept (seed "
                f"{splits.SPLIT_SEED}; no {splits.COG_SPLIT_FILE} found)")
    return read


def _in1k(root):
    return _in1k_folders(os.path.join(root, "imagenet"))


def _in1k_folders(base):
    return (_pairs(tvd.ImageFolder(os.path.join(base, "train"))),
            _pairs(tvd.ImageFolder(os.path.join(base, "val"))), "official train / val")


@dataclass(frozen=True)
class Spec:
    reader: Callable[[str], tuple[Pairs, Pairs, str]]  # (train, test, the split's name)
    reads_with: str  # the class that reads the layout (named in errors)
    layout: str  # what must exist under --data_root
    probe: str


_INAT_LAYOUT = ("inaturalist/{y}/<supercategory>/<category id>/*.jpg (train_val{y}.tar.gz, "
                "its folder renamed {y}) + inaturalist/train{y}.json + inaturalist/val{y}.json")
_COG_LAYOUT = ("imagenet_cog/L{l}.txt (the level's IN-21K wnids, one per line; or "
               f"imagenet_cog/{splits.COG_LEVELS_FILE}) + "
               "imagenet21k/<wnid>/*.JPEG for each of them (+ imagenet_cog/"
               f"{splits.COG_SPLIT_FILE} for the official split)")
SPECS: dict[str, Spec] = {
    "aircraft": Spec(_aircraft, "torchvision.datasets.FGVCAircraft", "fgvc-aircraft-2013b/data/"
                     "{images/*.jpg, variants.txt, images_variant_trainval.txt, "
                     "images_variant_test.txt}", "lbfgs"),
    "cars": Spec(_cars, "torchvision.datasets.StanfordCars", "stanford_cars/{cars_train/, "
                 "cars_test/, devkit/cars_meta.mat, devkit/cars_train_annos.mat, "
                 "cars_test_annos_withlabels.mat}", "lbfgs"),
    "dtd": Spec(_dtd, "torchvision.datasets.DTD (partition 1)", "dtd/dtd/{images/<class>/*.jpg, "
                "labels/train1.txt, labels/val1.txt, labels/test1.txt}", "lbfgs"),
    "eurosat": Spec(_eurosat, "torchvision.datasets.EuroSAT", "eurosat/2750/<class>/*.jpg",
                    "lbfgs"),
    "flowers": Spec(_flowers, "torchvision.datasets.Flowers102",
                    "flowers-102/{jpg/image_%05d.jpg, imagelabels.mat, setid.mat}", "lbfgs"),
    "pets": Spec(_pets, "torchvision.datasets.OxfordIIITPet", "oxford-iiit-pet/{images/*.jpg, "
                 "annotations/trainval.txt, annotations/test.txt}", "lbfgs"),
    "food101": Spec(_food, "torchvision.datasets.Food101", "food-101/{images/<class>/*.jpg, "
                    "meta/train.json, meta/test.json}", "lbfgs"),
    "sun397": Spec(_sun, "torchvision.datasets.SUN397", "SUN397/{ClassName.txt, "
                   "<letter>/<class>/sun_*.jpg} (+ SUN397/Partitions/{Training_01,Testing_01}"
                   ".txt for the official split)", "lbfgs"),
    "inat2018": Spec(_inat("2018"), "torchvision.datasets.INaturalist (version 2018)",
                     _INAT_LAYOUT.format(y=2018), "sgd"),
    "inat2019": Spec(_inat("2019"), "torchvision.datasets.INaturalist (version 2019)",
                     _INAT_LAYOUT.format(y=2019), "sgd"),
    "in1k": Spec(_in1k, "torchvision.datasets.ImageFolder",
                 "imagenet/{train,val}/<wnid>/*.JPEG", "sgd"),
    **{f"cog_l{lv}": Spec(_cog(lv), "trex_fast.eval.datasets (ImageNet-CoG concept lists)",
                          _COG_LAYOUT.format(l=lv), "sgd") for lv in range(1, 6)},
}
PAPER_DATASETS = ("cog_l1", "cog_l2", "cog_l3", "cog_l4", "cog_l5", "aircraft", "cars", "dtd",
                  "eurosat", "flowers", "pets", "food101", "sun397")


def _image_folder(path: str) -> tuple[Pairs, Pairs, str]:
    test = "test" if os.path.isdir(os.path.join(path, "test")) else "val"
    train_ds = tvd.ImageFolder(os.path.join(path, "train"))
    test_ds = tvd.ImageFolder(os.path.join(path, test))
    if test_ds.classes != train_ds.classes:
        raise RuntimeError(f"train/ and {test}/ hold different class folders")
    return _pairs(train_ds), _pairs(test_ds), f"ImageFolder train/ / {test}/"


def is_path(entry: str) -> bool:
    return os.sep in entry or os.path.isdir(entry) or entry not in SPECS


def resolve(entry: str, data_root: str) -> Labelled:
    """One --datasets entry (a name in SPECS, or an ImageFolder root) read and checked."""
    if is_path(entry):
        name = os.path.basename(os.path.normpath(entry))
        return _read_checked(name, _image_folder, entry, "torchvision.datasets.ImageFolder",
                             "train/<class>/* and test/<class>/* (or val/)", "lbfgs")
    spec = SPECS[entry]
    return _read_checked(entry, spec.reader, data_root, spec.reads_with, spec.layout,
                         spec.probe)


def in1k_at(root: str) -> Labelled:
    """The `in1k` dataset (its reader, split and probe) read from an ImageNet root that holds
    train/ and val/ directly, e.g. a training run's own data (trex_fast.eval.final)."""
    spec = SPECS["in1k"]
    return _read_checked("in1k", _in1k_folders, root, spec.reads_with,
                         "train/<wnid>/*.JPEG and val/<wnid>/*.JPEG", spec.probe)


def _read_checked(name: str, reader: Callable, where: str, reads_with: str, layout: str,
                  kind: str) -> Labelled:
    try:
        train, test, split = reader(where)
        missing = [p for p, _ in train + test if not os.path.isfile(p)]
        if missing:
            raise FileNotFoundError(f"{len(missing)} listed images are missing, e.g. "
                                    f"{missing[0]}")
        if not train or not test:
            raise RuntimeError("the train or the test split is empty")
        unseen = sorted({y for _, y in test} - {y for _, y in train})
        if unseen:
            raise RuntimeError(f"test classes {unseen[:5]} have no training image")
    except (OSError, RuntimeError, KeyError, ValueError, IndexError,
            pickle.UnpicklingError) as e:
        reason = str(e).split(". You can use download=True")[0]  # we never download
        raise DatasetNotReady(
            f"dataset {name!r} under {os.path.abspath(where)} is missing or incomplete "
            f"({reason}); "
            f"expected layout: {layout}; read by {reads_with} with download=False") from None
    num_classes = max(y for _, y in train + test) + 1
    return Labelled(name, train, test, num_classes, kind, split)


def resolve_all(entries: list[str], data_root: str) -> list[Labelled]:
    """Every entry read and checked (nothing extracted yet); unknown names list the known.
    Every entry that is not ready is named, in one error, so that one rerun finds them all."""
    for entry in entries:
        if is_path(entry) and not os.path.isdir(entry) and os.sep not in entry:
            raise DatasetNotReady(f"--datasets: {entry!r} is neither a dataset name "
                                  f"({', '.join(SPECS)}) nor a directory")
    resolved, problems = [], []
    for entry in entries:
        try:
            resolved.append(resolve(entry, data_root))
        except DatasetNotReady as e:
            problems.append(str(e))
    splits.load_restricted.cache_clear()  # the CoG split file is large
    if len(problems) > 1:
        raise DatasetNotReady(f"{len(problems)} of the {len(entries)} datasets are not ready: "
                              + "; ".join(problems))
    if problems:
        raise DatasetNotReady(problems[0])
    return resolved
