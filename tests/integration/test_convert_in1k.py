"""tools/convert_in1k.py: bad files, FFCV and DALI round trips, resume after kill -9, determinism.

The source is tests/_in1k_fixture.py's tiny tree (3 classes, 5+2 images each, plus one file of
every bad kind). Conversions run in this process with num_workers=0 unless a test is about
worker processes or killing the converter.
"""
from __future__ import annotations

import contextlib
import errno
import io
import math
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image, ImageOps

from pipelines.convert import beton as beton_layout
from pipelines.convert import convert as convert_mod
from pipelines.convert import images
from pipelines.convert.convert import convert
from pipelines.convert.options import ConvertError, make_options
from pipelines.convert.shards import check_shard
from pipelines.convert.sources import scan
from pipelines.convert.verify import verify
from pipelines.errors import BadFileError
from tests._in1k_fixture import BAD_FILES, SKIPPED, WNIDS, make_flat_val, make_tree
from tests.helpers import REPO

TOOL = Path(REPO) / "tools" / "convert_in1k.py"
MAX_RES = 128
SMALL = {"max_resolution": MAX_RES, "chunk_size": 4, "shard_size": 5}
MEAN_ABS_ERR = 4.0  # per image, 0-255 scale: JPEG q90 of smooth images is ~1; a bug is >> 10


def _run(src: Path, dst: Path, **kw) -> dict:
    opts = make_options(src=str(src), dst=str(dst), **{**SMALL, "num_workers": 0, **kw})
    with contextlib.redirect_stdout(io.StringIO()):
        return convert(opts)


def _deny_noperm(monkeypatch: pytest.MonkeyPatch) -> None:
    """Root reads a chmod-000 file anyway: make open() fail for it as it does for other users."""
    def fake_open(path, *args, **kwargs):
        if str(path).endswith("bad_noperm.JPEG"):
            raise PermissionError(13, "Permission denied", str(path))
        return open(path, *args, **kwargs)

    if os.geteuid() == 0:
        monkeypatch.setattr(images, "open", fake_open, raising=False)


def _all_bytes(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    return make_tree(tmp_path_factory.mktemp("in1k") / "src")


@pytest.fixture(scope="module")
def converted(tree, tmp_path_factory):
    dst = tmp_path_factory.mktemp("out") / "in1k"
    opts = make_options(src=str(tree), dst=str(dst), num_workers=0, **SMALL)
    printed = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(printed):
        _deny_noperm(mp)
        meta = convert(opts)
    return opts, meta, printed.getvalue()


def _kept_samples(opts, meta, split):
    skipped = {i["path"] for i in meta["issues"] if i["action"] == "skipped"}
    return [s for s in scan(opts).splits[split].samples if s.path not in skipped]


def _reference(src: Path, rel: str) -> np.ndarray:
    """Upright RGB of a source file resized like the converter should, by other means (PIL BOX)."""
    with Image.open(src / rel) as im:
        rgb = ImageOps.exif_transpose(im).convert("RGB")
    scale = min(1.0, MAX_RES / max(rgb.size))
    size = (max(1, round(rgb.width * scale)), max(1, round(rgb.height * scale)))
    return np.asarray(rgb.resize(size, Image.Resampling.BOX))


def _pil_reference_is_exact(rel: str) -> bool:
    # PIL's convert("RGB") clips 16-bit gray to 255; test_repairs_... checks that file instead.
    return "png16gray" not in rel


# ---------------------------------------------------------------- sources and bad files


def test_order_and_labels_match_torchvision_imagefolder(tree):
    """--train_order=source and val: ImageFolder's exact list. The default shuffled train order:
    the same (path, label) pairs in an order set by --seed, not class-sorted."""
    from torchvision.datasets import ImageFolder

    def listed(split, **kw):
        plan = scan(make_options(src=str(tree), dst=str(tree.parent / "unused"), **kw))
        return [(s.path, s.label) for s in plan.splits[split].samples], plan

    for split in ("train", "val"):
        folder = ImageFolder(str(tree / split))
        expected = [(Path(p).relative_to(tree).as_posix(), y) for p, y in folder.samples]
        ordered, plan = listed(split, train_order="source")
        assert ordered == expected
        assert plan.classes == tuple(folder.classes) == WNIDS
        shuffled, _ = listed(split)
        if split == "val":
            assert shuffled == expected
            continue
        assert sorted(shuffled) == sorted(expected) and shuffled != expected
        assert shuffled == listed(split)[0] != listed(split, seed=1)[0]
        labels = [y for _, y in shuffled]
        assert labels != sorted(labels)


def test_every_bad_kind_is_reported_not_dropped(converted):
    opts, meta, printed = converted
    first = f"train/{WNIDS[0]}"
    for name, kinds in BAD_FILES.items():
        found = {i["kind"]: i["action"] for i in meta["issues"] if i["path"] == f"{first}/{name}"}
        assert set(found) == set(kinds), name
        assert (set(found.values()) == {"skipped"}) == (name in SKIPPED), name
        for kind in kinds:
            assert kind in printed
    n_train = len(scan(opts).splits["train"].samples)
    assert meta["source_counts"] == {"train": n_train, "val": 6}
    assert meta["counts"] == {"train": n_train - len(SKIPPED - {"notes.txt"}), "val": 6}
    assert meta["classes"] == list(WNIDS)
    assert meta["options"]["max_resolution"] == MAX_RES and meta["version"]


def test_on_error_fail_stops_naming_the_file(tree, tmp_path, monkeypatch):
    _deny_noperm(monkeypatch)
    with pytest.raises(ConvertError, match=r"bad_\w+\.JPEG.*--on_error=skip"):
        _run(tree, tmp_path / "out", on_error="fail")
    assert not (tmp_path / "out" / "meta.json").exists()


def test_repairs_give_the_expected_pixels(converted, tree):
    """CMYK, grayscale, PNG, RGBA, 48-bit PNG, EXIF-rotated and tiny files: stored upright RGB."""
    opts, meta, _ = converted
    decoded = dict(_read_shards(opts, meta))
    for name in ("bad_cmyk", "bad_gray", "bad_png", "bad_rgba", "bad_png48", "bad_exif",
                 "bad_tiny", "bad_palette", "bad_huge"):
        rel = f"train/{WNIDS[0]}/{name}.JPEG"
        ref = _reference(tree, rel)
        assert decoded[rel].shape == ref.shape, name  # bad_exif: width and height swapped
        assert np.abs(decoded[rel].astype(float) - ref).mean() < MEAN_ABS_ERR + 2, name
    gray16 = decoded[f"train/{WNIDS[0]}/bad_png16gray.JPEG"]
    green = _reference(tree, f"train/{WNIDS[0]}/bad_gray.JPEG")  # same channel, stored 8-bit
    assert np.abs(gray16.astype(float) - green).mean() < MEAN_ABS_ERR + 2  # >> 8, not clipped


def _read_shards(opts, meta):
    """(source path, decoded RGB) from the tar shards, read with tarfile and PIL."""
    samples = _kept_samples(opts, meta, "train")
    shards = sorted((Path(opts.dst) / "dali" / "train").glob("*.tar"))
    jpegs = []
    for shard in shards:
        with tarfile.open(shard) as tar:
            jpegs += [tar.extractfile(m).read() for m in tar if m.name.endswith(".jpg")]
    assert len(jpegs) == len(samples)
    for sample, data in zip(samples, jpegs, strict=True):
        yield sample.path, np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


# ---------------------------------------------------------------- round trips


@pytest.mark.ffcv
def test_ffcv_round_trip(converted, tree):
    from ffcv.fields.basics import IntDecoder
    from ffcv.fields.rgb_image import CenterCropRGBImageDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.pipeline.compiler import Compiler
    from ffcv.reader import Reader

    opts, meta, _ = converted
    for split in ("train", "val"):
        samples = _kept_samples(opts, meta, split)
        path = str(Path(opts.dst) / f"{split}.beton")
        reader = Reader(path)
        refs = [_reference(tree, s.path) for s in samples]
        assert reader.num_samples == meta["counts"][split] == len(samples)
        assert reader.metadata["f1"].tolist() == [s.label for s in samples]
        sizes = list(zip(reader.metadata["f0"]["width"], reader.metadata["f0"]["height"],
                         strict=True))
        assert sizes == [(r.shape[1], r.shape[0]) for r in refs]
        assert max(max(wh) for wh in sizes) <= MAX_RES
        was_enabled = Compiler.is_enabled
        Compiler.set_enabled(False)  # skip numba's ~18 s compile of the first batch
        try:
            loader = Loader(path, batch_size=4, num_workers=1, order=OrderOption.SEQUENTIAL,
                            drop_last=False, pipelines={
                                "image": [CenterCropRGBImageDecoder((32, 32), ratio=1.0)],
                                "label": [IntDecoder()]})
            # Copied per batch: FFCV reuses its output buffers. Exhausted: an abandoned FFCV
            # iterator can abort the process at exit.
            batches = [(np.array(x), np.array(y).reshape(-1)) for x, y in loader]
        finally:
            Compiler.set_enabled(was_enabled)
        crops = np.concatenate([x for x, _ in batches])
        labels = np.concatenate([y for _, y in batches])
        assert labels.tolist() == [s.label for s in samples]
        for crop, ref, sample in zip(crops, refs, samples, strict=True):
            if not _pil_reference_is_exact(sample.path):
                continue
            side = min(ref.shape[:2])
            top, left = (ref.shape[0] - side) // 2, (ref.shape[1] - side) // 2
            want = cv2.resize(ref[top:top + side, left:left + side], (32, 32),
                              interpolation=cv2.INTER_AREA)
            assert np.abs(crop.astype(float) - want).mean() < MEAN_ABS_ERR + 2


@pytest.mark.dali
def test_dali_round_trip(converted, tree):
    from nvidia.dali import fn, pipeline_def, types

    opts, meta, _ = converted
    for split in ("train", "val"):
        samples = _kept_samples(opts, meta, split)
        shard_dir = Path(opts.dst) / "dali" / split
        tars = sorted(str(p) for p in shard_dir.glob("*.tar"))
        assert len(tars) == math.ceil(len(samples) / SMALL["shard_size"])

        @pipeline_def(batch_size=4, num_threads=1, device_id=None)
        def read(tars=tars):
            jpg, cls = fn.readers.webdataset(
                paths=tars, index_paths=[t[:-4] + ".idx" for t in tars], ext=["jpg", "cls"],
                missing_component_behavior="error", random_shuffle=False, name="reader")
            return fn.decoders.image(jpg, device="cpu", output_type=types.RGB), cls

        pipe = read()
        pipe.build()
        assert pipe.epoch_size("reader") == len(samples)
        images_out, labels = [], []
        while len(images_out) < len(samples):
            imgs, cls = pipe.run()
            images_out += [np.array(imgs.at(i)) for i in range(len(imgs))]
            labels += [int(bytes(np.array(cls.at(i)))) for i in range(len(cls))]
        assert labels[: len(samples)] == [s.label for s in samples]
        for sample, img in zip(samples, images_out, strict=False):
            ref = _reference(tree, sample.path)
            assert img.shape == ref.shape, sample.path
            if _pil_reference_is_exact(sample.path):
                assert np.abs(img.astype(float) - ref).mean() < MEAN_ABS_ERR, sample.path


@pytest.mark.dali
def test_dali_index_matches_wds2idx(converted, tmp_path):
    from wds2idx import IndexCreator  # DALI's own index tool, installed with nvidia-dali

    opts, _, _ = converted
    for tar in sorted((Path(opts.dst) / "dali").rglob("*.tar")):
        theirs = tmp_path / "theirs.idx"
        with IndexCreator(str(tar), str(theirs), verbose=False) as creator:
            creator.create_index()
        assert theirs.read_text() == tar.with_suffix(".idx").read_text()


@pytest.mark.ffcv
def test_beton_layout_matches_ffcv_types():
    from ffcv.fields import IntField, RGBImageField
    from ffcv.types import (
        ALLOC_TABLE_TYPE,
        CURRENT_VERSION,
        TYPE_ID_HANDLER,
        FieldDescType,
        HeaderType,
        get_metadata_type,
    )

    beton = beton_layout
    assert beton.HEADER_TYPE == HeaderType and beton.FIELD_DESC_TYPE == FieldDescType
    assert beton.ALLOC_TABLE_TYPE == ALLOC_TABLE_TYPE and beton.FFCV_VERSION == CURRENT_VERSION
    assert beton.METADATA_TYPE == get_metadata_type([RGBImageField(), IntField()])
    assert beton.FIELD_TYPE_IDS == tuple({v: k for k, v in TYPE_ID_HANDLER.items()}[f]
                                         for f in (RGBImageField, IntField))


@pytest.mark.ffcv
def test_both_formats_hold_the_same_jpeg_bytes_and_verify_passes(converted):
    opts, _, _ = converted
    assert verify(opts) == []  # also compares sample i's bytes across the two formats


@pytest.mark.ffcv
def test_verify_catches_wrong_labels(converted, tmp_path):
    opts, meta, _ = converted
    bad = tmp_path / "copy"
    shutil.copytree(opts.dst, bad)
    shard = bad / "dali" / "val" / "shard-000000.tar"
    data = shard.read_bytes()
    pos = data.index(b"00000002.cls") + 512  # header block, then the label text
    shard.write_bytes(data[:pos] + b"0" + data[pos + 1:])  # label 1 -> 0, same length
    problems = verify(make_options(**{**opts.__dict__, "dst": str(bad)}))
    assert any("val dali sample 2: label 0, source label 1" in p for p in problems), problems


# ---------------------------------------------------------------- resume and determinism


def _cli(src: Path, dst: Path, workers: int, *extra: str) -> list[str]:
    return [sys.executable, str(TOOL), f"--src={src}", f"--dst={dst}", f"--num_workers={workers}",
            f"--max_resolution={MAX_RES}", "--chunk_size=2", "--shard_size=5", *extra]


def test_kill_and_resume_is_byte_identical(tmp_path):
    # 80 images per class: one worker needs ~1.5 s after its third chunk, so the
    # kill below reliably lands mid-run.
    tree = make_tree(tmp_path / "src", per_class=80)
    reference = tmp_path / "uninterrupted"
    subprocess.run(_cli(tree, reference, 2), check=True, capture_output=True)
    dst = tmp_path / "killed"
    proc = subprocess.Popen(_cli(tree, dst, 1), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    chunks = dst / ".work" / "train"
    deadline = time.monotonic() + 120
    while not (chunks.is_dir() and len(list(chunks.glob("chunk_*.pkl"))) >= 3):
        assert proc.poll() is None and time.monotonic() < deadline, "no chunk before exit"
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)  # the converter and its worker, as kill -9 of a job
    proc.wait()
    assert not (dst / "meta.json").exists() and not (dst / "train.beton").exists()
    n_chunks = math.ceil(len(scan(make_options(src=str(tree), dst=str(dst))).splits["train"]
                             .samples) / 2)
    assert 3 <= len(list(chunks.glob("chunk_*.pkl"))) < n_chunks
    # What a kill during the writing phase leaves behind must not leak into the result.
    (dst / "train.beton.partial").write_bytes(b"half a beton")
    (dst / "dali" / "train.partial").mkdir(parents=True)
    (dst / "dali" / "train.partial" / "shard-000000.tar").write_bytes(b"half a tar")
    resumed = subprocess.run(_cli(tree, dst, 2), check=True, capture_output=True, text=True)
    assert "resuming" in resumed.stdout
    assert _all_bytes(dst) == _all_bytes(reference)
    assert not (dst / ".work").exists()


@pytest.mark.ffcv  # for verify()
def test_same_bytes_for_any_worker_count_and_seeded_randomness(tree, tmp_path):
    classes = tmp_path / "classes.txt"
    classes.write_text("\n".join(WNIDS[1:]) + "\n")  # the clean classes only
    kw = {"classes": str(classes), "write_mode": "proportion", "compress_probability": 0.5}
    _run(tree, tmp_path / "w0", num_workers=0, **kw)
    _run(tree, tmp_path / "w2", num_workers=2, **kw)
    _run(tree, tmp_path / "seed1", num_workers=0, seed=1, **kw)
    assert _all_bytes(tmp_path / "w0") == _all_bytes(tmp_path / "w2")
    beton = (tmp_path / "w0" / "train.beton").read_bytes()
    assert beton != (tmp_path / "seed1" / "train.beton").read_bytes()
    start = beton_layout.HEADER_TYPE.itemsize + 2 * beton_layout.FIELD_DESC_TYPE.itemsize
    records = np.frombuffer(beton, beton_layout.METADATA_TYPE, count=10, offset=start)
    assert set(records["f0"]["mode"].tolist()) == {0, 1}  # p=0.5 gave both JPEG and raw
    opts = make_options(src=str(tree), dst=str(tmp_path / "w0"), **kw, **SMALL)
    assert verify(opts) == []


# ---------------------------------------------------------------- options and destinations


def test_flat_val_with_csv_matches_folder_val(tree, tmp_path):
    flat_root, csv_path = make_flat_val(tree, tmp_path / "flat")
    _run(tree, tmp_path / "folders", splits="val")
    _run(flat_root, tmp_path / "flat_out", splits="val", val_labels=str(csv_path))
    for name in ("val.beton", "dali/val/shard-000000.tar", "dali/val/shard-000001.idx"):
        assert (tmp_path / "folders" / name).read_bytes() == \
            (tmp_path / "flat_out" / name).read_bytes()


def test_subsets_by_class_file_and_limit(tree, tmp_path):
    classes = tmp_path / "classes.txt"
    classes.write_text(f"# an ImageNet-100 style list\n{WNIDS[2]}\n{WNIDS[1]}\n")
    meta = _run(tree, tmp_path / "sub", classes=str(classes), limit_per_class=2)
    assert meta["classes"] == [WNIDS[1], WNIDS[2]]
    assert meta["counts"] == {"train": 4, "val": 4}
    plan = scan(make_options(src=str(tree), dst="x", classes=str(classes), limit_per_class=2,
                             train_order="source"))
    assert [s.label for s in plan.splits["train"].samples] == [0, 0, 1, 1]
    assert plan.splits["train"].samples[0].path == f"train/{WNIDS[1]}/{WNIDS[1]}_0.JPEG"


def test_complete_output_is_kept_unless_overwrite(tree, tmp_path):
    classes = tmp_path / "classes.txt"
    classes.write_text(WNIDS[1] + "\n")
    kw = {"classes": str(classes), "limit_per_class": 2}
    _run(tree, tmp_path / "o", **kw)
    beton = tmp_path / "o" / "train.beton"
    before = beton.stat().st_mtime_ns
    _run(tree, tmp_path / "o", **kw)
    assert beton.stat().st_mtime_ns == before
    with pytest.raises(ConvertError, match=r"max_resolution: 128 -> 96.*--overwrite"):
        _run(tree, tmp_path / "o", **kw, max_resolution=96)
    meta = _run(tree, tmp_path / "o", **kw, max_resolution=96, overwrite=True)
    assert meta["options"]["max_resolution"] == 96 and beton.stat().st_mtime_ns != before


def test_foreign_files_in_dst_are_not_replaced(tree, tmp_path):
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "val.beton").write_bytes(b"someone else's")
    with pytest.raises(ConvertError, match="val.beton exists.*--overwrite"):
        _run(tree, tmp_path / "o")


def test_disk_space_is_checked_up_front(tree, tmp_path, monkeypatch):
    monkeypatch.setattr(convert_mod.shutil, "disk_usage",
                        lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(ConvertError, match="not enough free disk space.*--check_disk=False"):
        _run(tree, tmp_path / "o")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("flag, value, message", [
    ("formats", "ffcv,foo", "accepted values are ffcv, dali"),
    ("write_mode", "fast", "accepted values are jpg, raw, smart, proportion"),
    ("max_resolution", "big", "expected an integer between 16 and 65535"),
    ("jpeg_quality", 101, "expected an integer between 1 and 100"),
    ("compress_probability", 1.5, r"expected a number in \[0, 1\]"),
    ("on_error", "ignore", "accepted values are skip, fail"),
    ("classes", "/no/such/file", "no such file"),
])
def test_bad_options_name_the_flag(tree, flag, value, message):
    with pytest.raises(ConvertError, match=f"--{flag}=.*{message}"):
        make_options(src=str(tree), dst="out", **{flag: value})


def test_layout_errors_say_what_is_accepted(tree, tmp_path):
    with pytest.raises(ConvertError, match="smart_threshold"):
        make_options(src=str(tree), dst="out", write_mode="smart")
    with pytest.raises(ConvertError, match="train/<wnid>"):
        scan(make_options(src=str(tmp_path), dst="out"))
    flat_root, _ = make_flat_val(tree, tmp_path / "flat")
    with pytest.raises(ConvertError, match="--val_labels"):
        scan(make_options(src=str(flat_root), dst="out"))


def test_cli_reports_errors_without_traceback(tree, tmp_path):
    out = subprocess.run(_cli(tree, tmp_path / "o", 0, "--formats=foo"), capture_output=True,
                         text=True)
    assert out.returncode == 2
    assert "accepted values are ffcv, dali" in out.stderr and "Traceback" not in out.stderr


def test_permission_error_is_reported_as_unreadable(tree, monkeypatch):
    _deny_noperm(monkeypatch)
    spec = convert_mod.encode_spec(make_options(src=str(tree), dst="out"), "train")
    rel = f"train/{WNIDS[0]}/bad_noperm.JPEG"
    encoded, issues = images.convert_file(str(tree / rel), rel, "train", 0, spec)
    assert encoded is None and [i.kind for i in issues] == ["unreadable"]
    assert "Permission denied" in issues[0].detail


def test_one_converter_per_destination(tree, tmp_path):
    from pipelines.convert.work import WorkDir

    with WorkDir(tmp_path / "o").locked(), pytest.raises(ConvertError, match="another"):
        _run(tree, tmp_path / "o")


def test_an_unexpected_failure_is_one_issue_not_a_crash(tree, monkeypatch):
    def broken(im, note):
        raise ValueError("conversion not supported")

    monkeypatch.setattr(images, "_to_rgb", broken)
    spec = convert_mod.encode_spec(make_options(src=str(tree), dst="out"), "train")
    rel = f"train/{WNIDS[1]}/{WNIDS[1]}_0.JPEG"
    encoded, issues = images.convert_file(str(tree / rel), rel, "train", 0, spec)
    assert encoded is None and [(i.kind, i.action) for i in issues] == [("decode_error",
                                                                          "skipped")]
    assert "conversion not supported" in issues[0].detail


class _Crafted:
    """Unpickling this calls open(marker, "w"): what a crafted chunk file could do."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_chunk_files_unpickle_only_their_own_records(tmp_path):
    import pickle

    from pipelines.convert import work

    marker = tmp_path / "ran"
    chunk = tmp_path / "chunk_0.pkl"
    with open(chunk, "wb") as f:
        pickle.dump(_Crafted(str(marker)), f)
    with pytest.raises(pickle.UnpicklingError, match="may hold only .* not (io|builtins).open"):
        work.read_summary(chunk)
    with pytest.raises(pickle.UnpicklingError):
        list(work.iter_records([chunk]))
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------
# issue #26: a destination inside the source, real differences, empty classes, file system
# errors, the .beton pages in the space estimate
# ---------------------------------------------------------------------------------------------
def _clean_class(tree: Path, tmp_path: Path) -> dict:
    classes = tmp_path / "classes.txt"
    classes.write_text(WNIDS[1] + "\n")
    return {"classes": str(classes)}


@pytest.mark.parametrize("inside", [".", "train", f"train/{WNIDS[0]}/out", "val/x"])
def test_dst_inside_src_is_refused(tree, inside):
    with pytest.raises(ConvertError, match="--dst=.* is inside --src=.*outside --src"):
        make_options(src=str(tree), dst=str(tree / inside))


def test_a_refused_rerun_names_only_real_differences(tree, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(tree / "train" / WNIDS[1], src / "train" / WNIDS[1])
    kw = {**_clean_class(tree, tmp_path), "splits": "train"}
    _run(src, tmp_path / "o", **kw)
    with pytest.raises(ConvertError) as changed:
        _run(src, tmp_path / "o", **kw, jpeg_quality=80)
    assert "jpeg_quality: 90 -> 80" in str(changed.value)
    assert "formats" not in str(changed.value) and "splits" not in str(changed.value)
    first = next((src / "train" / WNIDS[1]).iterdir())
    shutil.copy(first, first.with_name("extra.JPEG"))  # same options, one more source file
    with pytest.raises(ConvertError, match="made from other source files; choose another"):
        _run(src, tmp_path / "o", **kw)


@pytest.mark.parametrize("content", [None, "notes.txt"])
def test_an_empty_class_folder_is_refused_as_imagefolder_does(tree, tmp_path, content):
    src = tmp_path / "src"
    shutil.copytree(tree, src, ignore=shutil.ignore_patterns("bad_noperm.JPEG"))
    (src / "train" / "n99999999").mkdir()
    if content:
        (src / "train" / "n99999999" / content).write_text("no image")
    with pytest.raises(ConvertError, match=r"train: 1 class folder\(s\) hold no image file "
                                           r"\(n99999999;.*ImageFolder refuses"):
        scan(make_options(src=str(src), dst=str(tmp_path / "o")))


@pytest.mark.parametrize("code, words", [(errno.EROFS, "Read-only file system"),
                                         (errno.ENOSPC, "No space left on device")])
def test_a_read_only_or_full_dst_is_one_line_naming_the_path(tree, tmp_path, monkeypatch,
                                                             code, words):
    dst = tmp_path / "o"

    def failing_write(path, *args, **kwargs):
        raise OSError(code, os.strerror(code), str(path))

    monkeypatch.setattr(convert_mod, "write_beton", failing_write)
    with pytest.raises(ConvertError) as e:
        _run(tree, dst, **_clean_class(tree, tmp_path))
    message = str(e.value)
    assert "\n" not in message and words in message
    assert str(dst / "train.beton.partial") in message and "rerun the same command" in message


def test_the_space_estimate_counts_beton_pages(converted):
    opts, meta, _ = converted
    outputs = Path(opts.dst)
    written = sum(p.stat().st_size for p in outputs.rglob("*") if p.is_file())
    estimate = convert_mod.estimate_bytes(opts, scan(opts), ["train", "val"])
    assert written <= estimate <= 1.5 * written  # two 8 MiB pages per .beton dominate here
    for split in ("train", "val"):
        data = (outputs / f"{split}.beton").read_bytes()
        header = np.frombuffer(data[:beton_layout.HEADER_TYPE.itemsize], beton_layout.HEADER_TYPE)
        table = np.frombuffer(data[int(header["alloc_table_ptr"][0]):],
                              beton_layout.ALLOC_TABLE_TYPE)
        page_size = int(header["page_size"][0])
        predicted = beton_layout.beton_size(len(table), table["size"].mean(), page_size)
        assert len(data) <= predicted <= len(data) + page_size


# ---------------------------------------------------------------------------------------------
# issue #26: a cut .beton, a cut shard and a broken meta.json are named before any loader runs
# ---------------------------------------------------------------------------------------------
def _cut_copy(path: Path, keep: int, out: Path) -> Path:
    out.write_bytes(path.read_bytes()[:keep])
    return out


def test_a_truncated_beton_is_named_before_the_loader(converted, tmp_path):
    opts, _, _ = converted
    whole = Path(opts.dst) / "train.beton"
    beton_layout.check_beton(str(whole))  # the whole file passes
    size = whole.stat().st_size
    for keep, says in [(10, "shorter than the FFCV header"), (size // 2, "allocation table at"),
                       (size - 24, "truncated or damaged"), (size - 7, "allocation table at")]:
        cut = _cut_copy(whole, keep, tmp_path / f"cut_{keep}.beton")
        with pytest.raises(BadFileError, match=f"^{cut}: .*{says}"):
            beton_layout.check_beton(str(cut))
    notes = tmp_path / "notes.beton"
    notes.write_bytes(b"x" * 100)
    with pytest.raises(BadFileError, match="not an FFCV .beton"):
        beton_layout.check_beton(str(notes))


def test_a_truncated_dali_shard_is_named(converted, tmp_path):
    opts, _, _ = converted
    tar = Path(opts.dst) / "dali" / "train" / "shard-000000.tar"
    index = tar.with_suffix(".idx")
    check_shard(str(tar), str(index))
    cut = _cut_copy(tar, tar.stat().st_size // 2, tmp_path / tar.name)
    with pytest.raises(BadFileError, match=f"^{cut}: truncated: .* its index {index} puts"):
        check_shard(str(cut), str(index))


def test_an_invalid_meta_json_is_named_in_one_line(converted, tmp_path):
    from trex_fast.data import count_classes

    opts, _, _ = converted
    dst = tmp_path / "o"
    shutil.copytree(opts.dst, dst)
    for text, says in [('{"classes": [', "not valid JSON"),
                       ("[1, 2]", "expected the converter's JSON object, found list")]:
        (dst / "meta.json").write_text(text)
        for read in (lambda: count_classes(str(dst), "ffcv"),
                     lambda: _run(Path(opts.src), dst)):
            with pytest.raises(BadFileError, match=f"^{dst / 'meta.json'}: {says}") as e:
                read()
            assert "\n" not in str(e.value)


# ---------------------------------------------------------------------------------------------
# issue #25: val at full resolution, as the source JPEG bytes where no repair is needed
# ---------------------------------------------------------------------------------------------
def _shard_jpegs(folder: Path) -> list[bytes]:
    jpegs = []
    for tar in sorted(folder.glob("*.tar")):
        with tarfile.open(tar) as t:
            jpegs += [t.extractfile(m).read() for m in t.getmembers() if m.name.endswith(".jpg")]
    return jpegs


def test_val_max_resolution_0_keeps_val_as_the_source(tmp_path):
    src = make_tree(tmp_path / "src", per_class=1, val_per_class=2, bad=False, seed=3)
    rng = np.random.default_rng(1)
    big = src / "val" / WNIDS[0] / "ILSVRC2012_val_big.JPEG"  # over the train cap
    big.write_bytes(_in1k_jpeg(rng, 150, 300))
    gray = src / "val" / WNIDS[1] / "ILSVRC2012_val_gray.JPEG"  # needs a repair
    gray.write_bytes(_in1k_jpeg(rng, 140, 90, gray=True))
    kw = {"formats": "dali", "max_resolution": 64, "jpeg_quality": 50}
    meta = _run(src, tmp_path / "full", **kw, val_max_resolution=0)
    sources = [p for d in sorted((src / "val").iterdir()) for p in sorted(d.iterdir())]
    stored = _shard_jpegs(tmp_path / "full" / "dali" / "val")
    assert len(stored) == len(sources) == meta["counts"]["val"]
    for path, data in zip(sources, stored, strict=True):
        original = Image.open(path)
        assert Image.open(io.BytesIO(data)).size == original.size, path.name
        assert (data == path.read_bytes()) == (path != gray), path.name  # gray: re-encoded
    assert max(Image.open(p).size[0] for p in sources) > 64
    assert all(max(Image.open(io.BytesIO(d)).size) <= 64  # train keeps its cap
               for d in _shard_jpegs(tmp_path / "full" / "dali" / "train"))
    opts = make_options(src=str(src), dst=str(tmp_path / "full"), **{**SMALL, **kw},
                        val_max_resolution=0)
    assert verify(opts) == []
    # the default caps val too and keeps the fingerprint of conversions made before the option
    assert "val_max_resolution" not in make_options(src=str(src), dst="o").output_options()
    _run(src, tmp_path / "capped", **kw)
    assert all(max(Image.open(io.BytesIO(d)).size) <= 64
               for d in _shard_jpegs(tmp_path / "capped" / "dali" / "val"))


def _in1k_jpeg(rng: np.random.Generator, height: int, width: int, gray: bool = False) -> bytes:
    from tests._in1k_fixture import jpeg_bytes, smooth_image

    rgb = smooth_image(rng, height, width)
    return jpeg_bytes(rgb[:, :, 0] if gray else rgb)


@pytest.mark.parametrize("value", [8, -1, 70000, "full", 1.5, True])
def test_a_bad_val_max_resolution_names_the_flag(tree, value):
    with pytest.raises(ConvertError, match=r"--val_max_resolution=.*expected 0 \(no cap"):
        make_options(src=str(tree), dst="out", val_max_resolution=value)
