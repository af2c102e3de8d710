"""Mini copies of each transfer dataset's official on-disk layout, made of real JPEGs.

Every writer puts `classes` classes with `train` + `test` images each under `root`, with the
file and folder names the torchvision class reads (download=False); the images are the demo
dataset's textures (pipelines.demo_data), so a probe on them beats chance. Each writer returns
the expected (train size, test size, number of classes) of the project's reader.
"""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from pipelines.demo_data import PATTERNS, make_image

_RNG_SEED = 7
# The authors' EuroSAT counts per class (810 test, 540 val) scaled down to this fixture's classes
# of 10 images; tests set trex_fast.eval.splits.EUROSAT_PER_CLASS to it.
EUROSAT_SMALL = {"test": 3, "val": 2}


def _jpeg(path: str, label: int, rng) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    make_image(label % len(PATTERNS), rng).save(path, quality=85)


def _lines(path: str, lines: list[str]) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write("".join(f"{line}\n" for line in lines))


def aircraft(root, classes=3, train=4, test=2):
    rng, base = np.random.default_rng(_RNG_SEED), os.path.join(root, "fgvc-aircraft-2013b", "data")
    names = [f"A3{c}0-{c}00" if c % 2 else f"Cessna 17{c}" for c in range(classes)]  # spaces too
    _lines(os.path.join(base, "variants.txt"), names)
    listing = {"trainval": [], "test": []}
    for c, name in enumerate(names):
        for i in range(train + test):
            image_id = f"{1000000 + 100 * c + i}"
            _jpeg(os.path.join(base, "images", f"{image_id}.jpg"), c, rng)
            listing["trainval" if i < train else "test"].append(f"{image_id} {name}")
    for split, lines in listing.items():
        _lines(os.path.join(base, f"images_variant_{split}.txt"), lines)
    return classes * train, classes * test, classes


def cars(root, classes=3, train=4, test=2):
    from scipy.io import savemat

    rng, base = np.random.default_rng(_RNG_SEED), os.path.join(root, "stanford_cars")
    os.makedirs(os.path.join(base, "devkit"), exist_ok=True)
    names = np.array([f"Make{c} Model {2010 + c}" for c in range(classes)], dtype=object)
    savemat(os.path.join(base, "devkit", "cars_meta.mat"), {"class_names": names[None, :]})
    record = [("fname", "O"), ("class", "O")]
    for split, count, mat in (("train", train, os.path.join("devkit", "cars_train_annos.mat")),
                              ("test", test, "cars_test_annos_withlabels.mat")):
        annotations = []
        for c in range(classes):
            for _ in range(count):
                fname = f"{len(annotations) + 1:05d}.jpg"
                _jpeg(os.path.join(base, f"cars_{split}", fname), c, rng)
                annotations.append((fname, np.uint8(c + 1)))  # classes are 1-based
        savemat(os.path.join(base, mat),
                {"annotations": np.array(annotations, dtype=record)[None, :]})
    return classes * train, classes * test, classes


def dtd(root, classes=3, train=4, test=2):
    rng, base = np.random.default_rng(_RNG_SEED), os.path.join(root, "dtd", "dtd")
    names = ["banded", "braided", "bubbly", "bumpy", "chequered"][:classes]
    splits = {"train": [], "val": [], "test": []}
    val = max(1, train // 4)  # train1 + val1 together make the training split
    for c, name in enumerate(names):
        for i in range(train + test):
            fname = f"{name}_{i:04d}.jpg"
            _jpeg(os.path.join(base, "images", name, fname), c, rng)
            split = "train" if i < train - val else "val" if i < train else "test"
            splits[split].append(f"{name}/{fname}")
    for split, lines in splits.items():
        _lines(os.path.join(base, "labels", f"{split}1.txt"), lines)
        _lines(os.path.join(base, "labels", f"{split}2.txt"), lines[::-1])  # other partitions
    return classes * train, classes * test, classes


def eurosat(root, classes=3, per_class=10):
    rng = np.random.default_rng(_RNG_SEED)
    names = ["AnnualCrop", "Forest", "HerbaceousVegetation", "Highway"][:classes]
    for c, name in enumerate(names):
        for i in range(per_class):
            _jpeg(os.path.join(root, "eurosat", "2750", name, f"{name}_{i + 1}.jpg"), c, rng)
    n_test = EUROSAT_SMALL["test"]
    return classes * (per_class - n_test), classes * n_test, classes


def flowers(root, classes=3, train=4, test=2):
    from scipy.io import savemat

    rng, base = np.random.default_rng(_RNG_SEED), os.path.join(root, "flowers-102")
    labels, ids = [], {"trnid": [], "valid": [], "tstid": []}
    val = max(1, train // 4)
    for c in range(classes):
        for i in range(train + test):
            labels.append(c + 1)  # 1-based
            image_id = len(labels)
            _jpeg(os.path.join(base, "jpg", f"image_{image_id:05d}.jpg"), c, rng)
            key = "trnid" if i < train - val else "valid" if i < train else "tstid"
            ids[key].append(image_id)
    savemat(os.path.join(base, "imagelabels.mat"), {"labels": np.array([labels], np.uint8)})
    savemat(os.path.join(base, "setid.mat"), {k: np.array([v], np.uint16) for k, v in ids.items()})
    return classes * train, classes * test, classes


def pets(root, classes=3, train=4, test=2):
    rng, base = np.random.default_rng(_RNG_SEED), os.path.join(root, "oxford-iiit-pet")
    breeds = ["Abyssinian", "american_bulldog", "Bengal", "beagle"][:classes]
    listing = {"trainval": [], "test": []}
    for c, breed in enumerate(breeds):
        species = 1 if breed[0].isupper() else 2  # cats are capitalised, dogs are not
        for i in range(train + test):
            image_id = f"{breed}_{i + 1}"
            _jpeg(os.path.join(base, "images", f"{image_id}.jpg"), c, rng)
            listing["trainval" if i < train else "test"].append(
                f"{image_id} {c + 1} {species} {i + 1}")
    for split, lines in listing.items():
        _lines(os.path.join(base, "annotations", f"{split}.txt"), lines)
    os.makedirs(os.path.join(base, "annotations", "trimaps"), exist_ok=True)
    return classes * train, classes * test, classes


def food101(root, classes=3, train=4, test=2):
    rng, base = np.random.default_rng(_RNG_SEED), os.path.join(root, "food-101")
    names = ["apple_pie", "baby_back_ribs", "baklava", "beef_carpaccio"][:classes]
    meta = {"train": {}, "test": {}}
    for c, name in enumerate(names):
        for i in range(train + test):
            image_id = f"{100000 + 10 * c + i}"
            _jpeg(os.path.join(base, "images", name, f"{image_id}.jpg"), c, rng)
            meta["train" if i < train else "test"].setdefault(name, []).append(
                f"{name}/{image_id}")
    os.makedirs(os.path.join(base, "meta"), exist_ok=True)
    for split, listing in meta.items():
        with open(os.path.join(base, "meta", f"{split}.json"), "w") as f:
            json.dump(listing, f)
    return classes * train, classes * test, classes


def sun397(root, classes=3, per_class=10):
    rng, base = np.random.default_rng(_RNG_SEED), os.path.join(root, "SUN397")
    names = ["/a/abbey", "/a/apartment_building/outdoor", "/b/bakery/shop", "/b/bar"][:classes]
    _lines(os.path.join(base, "ClassName.txt"), names)
    for c, name in enumerate(names):
        for i in range(per_class):
            _jpeg(os.path.join(base, *name.strip("/").split("/"), f"sun_a{c}b{i:03d}.jpg"), c,
                  rng)
    return classes * (per_class - 2), classes * 2, classes


def sun397_partitions(root, train=3, test=4, folder="Partitions"):
    """Training_01.txt / Testing_01.txt over a sun397() layout: per class, the first `train`
    images (by name) train, the next `test` test, the rest in neither. Returns the two lists
    of absolute paths."""
    base = os.path.join(root, "SUN397")
    with open(os.path.join(base, "ClassName.txt")) as f:
        names = [line.strip() for line in f if line.strip()]
    listed = {"Training": [], "Testing": []}
    for name in names:
        files = sorted(os.listdir(os.path.join(base, *name.strip("/").split("/"))))
        listed["Training"] += [f"{name}/{n}" for n in files[:train]]
        listed["Testing"] += [f"{name}/{n}" for n in files[train:train + test]]
    for split, lines in listed.items():
        _lines(os.path.join(base, folder, f"{split}_01.txt"), lines)
        _lines(os.path.join(base, folder, f"{split}_02.txt"), lines[::-1])  # other partitions
    return tuple([os.path.join(base, *line.strip("/").split("/")) for line in lines]
                 for lines in listed.values())


def inat(root, year="2018", classes=3, train=4, test=2):
    rng, base = np.random.default_rng(_RNG_SEED), os.path.join(root, "inaturalist")
    supers = ["Animalia", "Plantae"]
    split_images = {"train": [], "val": []}
    for c in range(classes):  # category ids 0..C-1 spread over the super-categories
        rel = f"{supers[c % 2]}/{c}"
        for i in range(train + test):
            fname = f"{c:02d}{i:02d}{'f' * 28}.jpg"
            _jpeg(os.path.join(base, year, rel, fname), c, rng)
            split = "train" if i < train else "val"
            split_images[split].append({"id": len(split_images[split]),
                                        "file_name": f"train_val{year}/{rel}/{fname}"})
    for split, images in split_images.items():
        with open(os.path.join(base, f"{split}{year}.json"), "w") as f:
            json.dump({"images": images, "annotations": [
                {"image_id": im["id"], "category_id": int(im["file_name"].split("/")[2])}
                for im in images]}, f)
    return classes * train, classes * test, classes


def cog(root, level=1, classes=3, per_class=10):
    rng = np.random.default_rng(_RNG_SEED)
    wnids = [f"n{9000000 + 1000 * level + c:08d}" for c in range(classes)]
    _lines(os.path.join(root, "imagenet_cog", f"L{level}.txt"), wnids)
    for c, wnid in enumerate(wnids):
        for i in range(per_class):
            _jpeg(os.path.join(root, "imagenet21k", wnid, f"{wnid}_{i}.JPEG"), c, rng)
    return classes * (per_class - 2), classes * 2, classes


def cog_split_file(root, levels=(1,), train=4, test=2):
    """The benchmark's cog_concepts_split_file.pkl over cog() layouts: per concept of the
    levels, `train` then `test` of its images (shuffled, as numpy string arrays like the
    original), the rest in neither; plus a concept of no level here. Returns the two lists of
    absolute paths, level after level."""
    import pickle

    rng, wnids = np.random.default_rng(_RNG_SEED), []
    for level in levels:
        with open(os.path.join(root, "imagenet_cog", f"L{level}.txt")) as f:
            wnids += [line.split()[0] for line in f if line.strip()]
    split, listed = {"n00000001": {"train": np.array(["n00000001/x.JPEG"]),
                                   "test": np.array(["n00000001/y.JPEG"])}}, ([], [])
    for wnid in wnids:
        files = [f"{wnid}/{n}" for n in rng.permutation(sorted(
            os.listdir(os.path.join(root, "imagenet21k", wnid))))]
        parts = files[:train], files[train:train + test]
        split[wnid] = {"train": np.array(parts[0]), "test": np.array(parts[1])}
        for out, part in zip(listed, parts):
            out.extend(os.path.join(root, "imagenet21k", n) for n in sorted(part))
    with open(os.path.join(root, "imagenet_cog", "cog_concepts_split_file.pkl"), "wb") as f:
        pickle.dump(split, f, protocol=2)
    return listed


WRITERS = {"aircraft": aircraft, "cars": cars, "dtd": dtd, "eurosat": eurosat,
           "flowers": flowers, "pets": pets, "food101": food101, "sun397": sun397,
           "inat2018": lambda root: inat(root, "2018"), "inat2019": lambda root: inat(root, "2019"),
           "cog_l1": lambda root: cog(root, 1), "cog_l5": lambda root: cog(root, 5)}


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    """Every supported layout, fabricated once under one data root."""
    root = str(tmp_path_factory.mktemp("transfer_root"))
    return root, {name: write(root) for name, write in WRITERS.items()}
