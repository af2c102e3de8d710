"""Transfer evaluation: datasets by name from their official layouts, the Optuna-searched
probes with seeds, the feature cache, and the reports (issue #16)."""
import collections
import os
import shutil

import pytest

from tests import _transfer_fixture as fixture
from trex_fast.eval.datasets import DatasetNotReady, resolve, resolve_all, seeded_split


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny probe fits run faster on one thread than on a shared machine's several."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def small_eurosat(monkeypatch):
    """The authors' EuroSAT counts per class, scaled down to the fixture's 10 images a class."""
    from trex_fast.eval import splits as transfer_splits

    monkeypatch.setattr(transfer_splits, "EUROSAT_PER_CLASS", fixture.EUROSAT_SMALL)


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


# ----------------------------------------------------------------------------- the authors' splits
@pytest.mark.parametrize("folder", ["Partitions", ""])
def test_sun397_reads_official_partition_1_when_present(tmp_path, folder):
    root = str(tmp_path)
    fixture.sun397(root, per_class=10)
    train, test = fixture.sun397_partitions(root, train=3, test=4, folder=folder)
    data = resolve("sun397", root)
    assert [p for p, _ in data.train] == train and [p for p, _ in data.test] == test
    assert collections.Counter(y for _, y in data.train) == {0: 3, 1: 3, 2: 3}
    assert collections.Counter(y for _, y in data.test) == {0: 4, 1: 4, 2: 4}
    assert data.split == "official partition 1: Training_01 / Testing_01"
    for path, label in data.train + data.test:  # labels follow the class folder
        assert os.path.basename(os.path.dirname(path)) == ["abbey", "outdoor", "shop"][label]
    for name in ("Training_01.txt", "Testing_01.txt"):  # without them: the seeded split
        os.remove(os.path.join(root, "SUN397", folder, name))
    seeded = resolve("sun397", root)
    assert (len(seeded.train), len(seeded.test)) == (24, 6) and "seeded" in seeded.split


def test_sun397_partition_naming_a_missing_image_fails(tmp_path):
    root = str(tmp_path)
    fixture.sun397(root, per_class=10)
    train, _ = fixture.sun397_partitions(root)
    os.remove(train[0])
    with pytest.raises(DatasetNotReady, match="'sun397'.*images of .*Training_01.txt"):
        resolve("sun397", root)


def test_eurosat_takes_the_authors_test_and_val_counts_per_class(layouts, monkeypatch):
    from trex_fast.eval import splits as transfer_splits

    root, _ = layouts
    data = resolve("eurosat", root)
    assert collections.Counter(y for _, y in data.test) == {0: 3, 1: 3, 2: 3}
    assert collections.Counter(y for _, y in data.train) == {0: 7, 1: 7, 2: 7}  # 2 val + 5
    assert "3 test, 2 val" in data.split
    monkeypatch.setattr(transfer_splits, "EUROSAT_PER_CLASS", {"test": 810, "val": 540})
    with pytest.raises(DatasetNotReady, match="810 test \\+ 540 val per class"):
        resolve("eurosat", root)  # 10 images a class cannot be the authors' split


def test_cog_follows_the_benchmarks_split_file(tmp_path):
    root = str(tmp_path)
    fixture.cog(root, level=1, classes=3, per_class=10)
    train, test = fixture.cog_split_file(root, levels=(1,), train=4, test=2)
    data = resolve("cog_l1", root)
    assert [p for p, _ in data.train] == train and [p for p, _ in data.test] == test
    assert collections.Counter(y for _, y in data.train) == {0: 4, 1: 4, 2: 4}
    assert data.split == "official cog_concepts_split_file.pkl"
    os.remove(tmp_path / "imagenet_cog" / "cog_concepts_split_file.pkl")
    seeded = resolve("cog_l1", root)  # without it: the seeded split, all images used
    assert (len(seeded.train), len(seeded.test)) == (24, 6) and "seeded" in seeded.split


def test_cog_split_file_is_read_once_for_all_levels(tmp_path, monkeypatch):
    from trex_fast.eval import splits as transfer_splits

    root, loads = str(tmp_path), []
    for level in (1, 5):
        fixture.cog(root, level=level, classes=3, per_class=10)
    train, test = fixture.cog_split_file(root, levels=(1, 5), train=4, test=2)

    class Counting(transfer_splits.ArraysOnly):
        def load(self):
            loads.append(1)
            return super().load()

    monkeypatch.setattr(transfer_splits, "ArraysOnly", Counting)
    l1, l5 = resolve_all(["cog_l1", "cog_l5"], root)
    assert len(loads) == 1
    assert [p for p, _ in l1.train + l5.train] == train
    assert [p for p, _ in l1.test + l5.test] == test
    resolve_all(["cog_l1"], root)  # a new run reads the file again
    assert len(loads) == 2


def test_cog_concepts_from_the_benchmarks_levels_file(tmp_path):
    import pickle

    root = str(tmp_path)
    fixture.cog(root, level=2, classes=3, per_class=10)
    listing = tmp_path / "imagenet_cog" / "L2.txt"
    wnids = listing.read_text().split()
    listing.unlink()
    with open(tmp_path / "imagenet_cog" / "cog_levels_mapping_file.pkl", "wb") as f:
        pickle.dump([["n1"], wnids[::-1], [], [], []], f)  # the authors sort each level
    data = resolve("cog_l2", root)
    assert data.num_classes == 3 and len(data.train) + len(data.test) == 30
    for path, label in data.train + data.test:
        assert os.path.basename(os.path.dirname(path)) == wnids[label]


def test_cog_split_file_may_hold_only_arrays(tmp_path):
    import pickle

    root = str(tmp_path)
    fixture.cog(root, level=1)
    with open(tmp_path / "imagenet_cog" / "cog_concepts_split_file.pkl", "wb") as f:
        pickle.dump({"n1": collections.OrderedDict()}, f)  # any class but arrays is refused
    with pytest.raises(DatasetNotReady, match="not allowed in a CoG split file"):
        resolve("cog_l1", root)


def test_split_counts_record_the_search_split():
    import torch

    from trex_fast.eval.datasets import Labelled
    from trex_fast.eval.probes import per_class_split
    from trex_fast.eval.transfer import split_counts

    train = [(f"/t/{c}_{i}.jpg", c) for c in range(3) for i in range(11)]
    data = Labelled("d", train, [("/x.jpg", 0)] * 5, 3, "lbfgs", "some split")
    n_val = len(per_class_split(torch.tensor([y for _, y in train]))[1])
    assert 0 < n_val < 33
    assert split_counts(data) == {"split": "some split", "n_train": 33 - n_val,
                                  "n_val": n_val, "n_test": 5}


def test_log_odds_mean_leaves_in1k_out_as_the_authors_summary():
    from trex_fast.eval.probes import log_odds
    from trex_fast.eval.report import markdown
    from trex_fast.eval.transfer import log_odds_mean

    rows = [{"dataset": d, "log_odds": log_odds(t), "top1_mean": t} for d, t in
            (("in1k", 78.0), ("dtd", 70.0), ("pets", 90.0))]
    assert log_odds_mean(rows) == pytest.approx((log_odds(70.0) + log_odds(90.0)) / 2)
    assert log_odds_mean(rows[:1]) is None
    report = {"label": "m", "seeds": 1, "trials": 1, "image_size": 32,
              "log_odds_mean": log_odds_mean(rows), "log_odds_datasets": ["dtd", "pets"],
              "in1k_probe_top1": 78.0, "datasets": [
                  {**r, "probe": "sgd", "classes": 2, "split": "s", "n_train": 1, "n_val": 1,
                   "n_test": 1, "top1_std": 0.0} for r in rows]}
    table = markdown(report)
    assert "| in1k (not in the mean) |" in table and "IN1K linear probe top-1: 78.00" in table
    assert f"mean log-odds (2 transfer datasets)** | | | | | | | | **" \
           f"{log_odds_mean(rows):.3f}**" in table
    assert "| dtd | sgd | 2 | s | 1 / 1 / 1 | 1,880 + 1,880 / 1,880 |" in table


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


def test_every_missing_dataset_is_named_in_one_error(tmp_path):
    with pytest.raises(DatasetNotReady) as err:
        resolve_all(["food101", "pets"], str(tmp_path))
    message = str(err.value)
    assert message.startswith("2 of the 2 datasets are not ready")
    assert "'food101'" in message and "'pets'" in message and "\n" not in message


def test_imagefolder_paths_still_work(tmp_path):
    from pipelines.demo_data import write_dataset

    write_dataset(str(tmp_path / "tex"), train_per_class=3, val_per_class=1)
    data = resolve(str(tmp_path / "tex"), "unused")
    assert (data.name, len(data.train), len(data.test), data.num_classes) == ("tex", 24, 8, 8)


# ----------------------------------------------------------------------------- the search
def _blobs(n_per_class=20, classes=3, dim=8, seed=0):
    import torch

    centres = torch.randn(classes, dim, generator=torch.Generator().manual_seed(5)) * 2.0
    y = torch.arange(classes).repeat_interleave(n_per_class)
    return centres[y] + torch.randn(len(y), dim, generator=torch.Generator().manual_seed(seed)), y


@pytest.mark.parametrize("kind, bounds", [
    ("lbfgs", {"C": (1e-5, 1e6)}), ("sgd", {"lr": (0.1, 100.0), "wd": (1e-12, 1e-4)})])
def test_optuna_search_is_seeded_reproducible_and_in_bounds(kind, bounds):
    from trex_fast.eval.probes import search

    x, y = _blobs()
    kw = dict(kind=kind, num_classes=3, trials=6, sgd_epochs=3)
    first, again, other = search(x, y, seed=0, **kw), search(x, y, seed=0, **kw), search(
        x, y, seed=1, **kw)
    assert first == again  # same seed: same trials, same scores, same best
    assert [p for p, _ in first["trials"]] != [p for p, _ in other["trials"]]
    assert len(first["trials"]) == 6
    for params, score in first["trials"]:
        assert set(params) == set(bounds)
        assert all(lo <= params[k] <= hi for k, (lo, hi) in bounds.items())
        assert 0.0 <= score <= 100.0
    assert first["val_top1"] == max(s for _, s in first["trials"])
    assert first["best"] == next(p for p, s in first["trials"] if s == first["val_top1"])


def test_search_ranges_span_the_log_range():
    """TPE's start-up trials are log-uniform: over 12 trials C spans many decades."""
    import math

    from trex_fast.eval.probes import search

    x, y = _blobs()
    cs = [p["C"] for p, _ in search(x, y, "lbfgs", 3, trials=12, seed=3)["trials"]]
    assert math.log10(max(cs)) - math.log10(min(cs)) > 3


def test_probe_refits_on_train_plus_val_and_scores_test():
    from trex_fast.eval.probes import fit_lbfgs, probe

    x, y = _blobs()
    test_x, test_y = _blobs(seed=9)
    result = probe(x, y, test_x, test_y, kind="lbfgs", trials=4, seed=2)
    refit = fit_lbfgs(x, y, result["C"])  # all of train, the searched C
    assert result["top1"] == pytest.approx(refit.top1(test_x, test_y))
    assert result["seed"] == 2 and result["top1"] > 60.0  # chance is 33 %


def test_missing_dataset_fails_before_the_backbone_is_read(tmp_path):
    """Phase 1 comes first: the error names the dataset even though --backbone is absent."""
    from trex_fast.eval.transfer import TransferSettings, evaluate_transfer

    with pytest.raises(DatasetNotReady, match="'pets'.*OxfordIIITPet"):
        evaluate_transfer(TransferSettings(str(tmp_path / "no_such_backbone.pth"), ("pets",),
                                           data_root=str(tmp_path)))


def _tiny_net():
    import torch

    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, stride=2), torch.nn.ReLU(),
                               torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())


def test_feature_cache_is_fp16_weights_only_and_follows_the_image_list(layouts, tmp_path):
    import torch

    from trex_fast.eval.datasets import ImageList
    from trex_fast.eval.transfer import cached_features, transfer_transform
    from trex_fast.safe_load import load_file

    root, _ = layouts
    data = resolve("flowers", root)
    images = ImageList(data.train, transfer_transform(32))
    cache, cpu = str(tmp_path / "f.pt"), torch.device("cpu")
    feats, labels, hit = cached_features(_tiny_net(), images, cache, cpu, 5, 0)
    assert not hit and feats.dtype == torch.float16 and feats.shape == (len(data.train), 16)
    assert labels.tolist() == [y for _, y in data.train]
    saved = load_file(cache)  # weights-only
    assert saved["features"].dtype == torch.float16 and torch.equal(saved["features"], feats)
    again, _, hit = cached_features(None, images, cache, cpu, 5, 0)  # no net needed
    assert hit and torch.equal(again, feats)
    fewer = ImageList(data.train[:-1], transfer_transform(32))  # another listing: re-extracted
    other, _, hit = cached_features(_tiny_net(), fewer, cache, cpu, 5, 0)
    assert not hit and other.shape[0] == len(data.train) - 1


def test_auto_probe_follows_the_papers_assignment(layouts, tmp_path):
    """CoG gets the SGD probe (lr, wd searched), a small dataset L-BFGS (C searched)."""
    import torch

    from trex_fast.eval.transfer import TransferSettings, run_transfer

    root, _ = layouts
    entries = ["cog_l1", "pets"]
    settings = TransferSettings(trials=2, seeds=1, sgd_epochs=2, image_size=32, batch_size=8,
                                num_workers=0, cache_dir=str(tmp_path / "cache"))
    report = run_transfer(_tiny_net(), "tiny", entries, resolve_all(entries, root), settings,
                          torch.device("cpu"))
    cog, pets = report["datasets"]
    for r, data in zip(report["datasets"], resolve_all(entries, root)):
        assert r["split"] == data.split and r["n_test"] == len(data.test)
        assert r["n_train"] + r["n_val"] == len(data.train) and r["n_val"] > 0
    assert cog["probe"] == "sgd" and set(cog["per_seed"][0]) >= {"lr", "wd", "top1"}
    assert pets["probe"] == "lbfgs" and "C" in pets["per_seed"][0]
    assert sorted(os.listdir(tmp_path / "cache" / "tiny")) == [
        "cog_l1_test_32px.pt", "cog_l1_train_32px.pt", "pets_test_32px.pt",
        "pets_train_32px.pt"]


def test_compare_entries_and_points_without_in1k(tmp_path):
    import json

    from trex_fast.eval.report import write_outputs

    run_dir = tmp_path / "run_b"
    run_dir.mkdir()
    (run_dir / "transfer.json").write_text(json.dumps({"label": "b", "in1k_top1": 77.0,
                                                       "log_odds_mean": 1.0}))
    report = {"label": "a", "in1k_top1": None, "log_odds_mean": 0.7, "seeds": 1, "trials": 1,
              "image_size": 32, "log_odds_datasets": ["d"], "datasets": [{
                  "dataset": "d", "probe": "lbfgs", "classes": 2, "split": "s", "n_train": 3,
                  "n_val": 1, "n_test": 2, "train_images": 4, "test_images": 2,
                  "top1_mean": 66.7, "top1_std": 0.0, "log_odds": 0.7}]}
    paths, not_plotted = write_outputs(str(tmp_path / "out"), report, [str(run_dir)])
    assert all(os.path.getsize(p) > 0 for p in paths)
    assert not_plotted == ["a"]  # 'a' has no IN1K top-1 (the CLI prints "not on the plot")
    with pytest.raises(FileNotFoundError, match="--compare"):
        write_outputs(str(tmp_path / "out"), report, [str(tmp_path / "nope.json")])


