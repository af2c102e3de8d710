"""Transfer evaluation: datasets by name from their official layouts, the Optuna-searched
probes with seeds, the feature cache, and the reports (issue #16)."""
import collections
import os
import shutil

import pytest

from tests import _transfer_fixture as fixture
from trex_fast.transfer_data import DatasetNotReady, resolve, resolve_all, seeded_split


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    """Every supported layout, fabricated once under one data root."""
    root = str(tmp_path_factory.mktemp("transfer_root"))
    return root, {name: write(root) for name, write in fixture.WRITERS.items()}


@pytest.mark.parametrize("name", list(fixture.WRITERS))
def test_each_official_layout_reads_with_its_classes_and_split(layouts, name):
    root, expected = layouts
    data = resolve(name, root)
    n_train, n_test, classes = expected[name]
    assert (len(data.train), len(data.test), data.num_classes) == (n_train, n_test, classes)
    # every class in both splits, in the right proportion; no image in both
    assert collections.Counter(y for _, y in data.test) == {c: n_test // classes
                                                            for c in range(classes)}
    assert collections.Counter(y for _, y in data.train) == {c: n_train // classes
                                                             for c in range(classes)}
    assert not {p for p, _ in data.train} & {p for p, _ in data.test}
    assert data.probe == ("sgd" if name.startswith(("inat", "cog")) else "lbfgs")


def test_labels_follow_the_images_class(layouts):
    """The label of an image is its class (files of one class share their folder or name)."""
    root, _ = layouts
    for name, key in (("food101", lambda p: p.split(os.sep)[-2]),
                      ("pets", lambda p: os.path.basename(p).rsplit("_", 1)[0]),
                      ("sun397", lambda p: os.path.dirname(p))):
        data = resolve(name, root)
        owner = {}
        for path, label in data.train + data.test:
            assert owner.setdefault(key(path), label) == label, name
        assert len(owner) == data.num_classes


def test_seeded_split_ignores_listing_order_and_depends_on_the_seed():
    pairs = [(f"/x/{c}/{i}.jpg", c) for c in range(3) for i in range(10)]
    a = seeded_split(pairs, lambda n: 2)
    assert a == seeded_split(pairs[::-1], lambda n: 2)
    assert a != seeded_split(pairs, lambda n: 2, seed=1)
    assert len(a[1]) == 6 and len(a[0]) == 24


@pytest.mark.parametrize("name, remove, named", [
    ("pets", "oxford-iiit-pet/annotations/test.txt", "OxfordIIITPet"),
    ("flowers", "flowers-102/setid.mat", "Flowers102"),
    ("aircraft", "fgvc-aircraft-2013b/data/images/1000101.jpg", "FGVCAircraft"),
    ("cars", "stanford_cars/devkit/cars_meta.mat", "StanfordCars"),
    ("inat2018", "inaturalist/val2018.json", "INaturalist"),
    ("cog_l1", "imagenet_cog/L1.txt", "ImageNet-CoG"),
])
def test_missing_or_incomplete_dataset_names_dataset_layout_and_class(layouts, tmp_path, name,
                                                                      remove, named):
    root, _ = layouts
    broken = tmp_path / "root"
    shutil.copytree(root, broken)
    os.remove(broken / remove)
    with pytest.raises(DatasetNotReady) as err:
        resolve_all(["dtd", name], str(broken))
    message = str(err.value)
    assert f"dataset {name!r}" in message and named in message
    assert "expected layout:" in message and "download=False" in message


def test_unknown_name_and_absent_dataset_fail_clearly(tmp_path):
    with pytest.raises(DatasetNotReady, match="neither a dataset name"):
        resolve_all(["flowerz"], str(tmp_path))
    with pytest.raises(DatasetNotReady, match="'food101'.*food-101/.*Food101"):
        resolve_all(["food101"], str(tmp_path))


def test_imagefolder_paths_still_work(tmp_path):
    from trex_fast.demo_data import write_dataset

    write_dataset(str(tmp_path / "tex"), train_per_class=3, val_per_class=1)
    data = resolve(str(tmp_path / "tex"), "unused")
    assert (data.name, len(data.train), len(data.test), data.num_classes) == ("tex", 24, 8, 8)
