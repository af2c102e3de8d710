"""Which pipeline reads the data, decided once, and the loaders it builds.

`--data` is an ImageFolder root (train/ and val/), a directory converted by
tools/convert_in1k.py (train.beton, dali/), or empty for the built-in demo dataset.
"""
from __future__ import annotations

import os

from pipelines.batch import LoaderSettings
from pipelines.reference import ReferenceTrainData, ReferenceValData
from pipelines.spec import multicrop_spec
from trex_fast import demo_data
from trex_fast.config import Config


def resolve_data_root(cfg: Config) -> str:
    if not cfg.data:
        return demo_data.ensure_demo_dataset()
    root = os.path.expanduser(cfg.data)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"--data={cfg.data!r}: no such directory")
    return root


def resolve_pipeline(cfg: Config, root: str) -> str:
    if cfg.pipeline != "auto":
        return cfg.pipeline
    if os.path.isfile(os.path.join(root, "train.beton")):
        return "ffcv"
    if os.path.isdir(os.path.join(root, "dali")):
        return "dali"
    return "reference"


def _check_imagefolder(root: str) -> None:
    for split in ("train", "val"):
        if not os.path.isdir(os.path.join(root, split)):
            raise FileNotFoundError(
                f"--data={root!r} has no {split}/ folder: the reference pipeline reads an "
                "ImageFolder root with train/<class>/*.JPEG and val/<class>/*.JPEG")


def build_data(cfg: Config, root: str, settings: LoaderSettings):
    """(train data, val data): train yields MultiCropBatch per step via .epoch(epoch, start)."""
    pipeline = resolve_pipeline(cfg, root)
    if pipeline == "ffcv":
        from trex_fast import availability

        availability.require("ffcv", availability.has_ffcv(), "ffcv")
        from pipelines.ffcv_multicrop import FfcvTrainData, FfcvValData  # imports ffcv

        # decode on the device when it is a GPU (nvJPEG), else in the loader's workers
        decode = cfg.decode if cfg.decode != "auto" else (
            "gpu" if settings.device.type == "cuda" else "cpu")
        train = FfcvTrainData(os.path.join(root, "train.beton"), multicrop_spec(cfg), settings,
                              decode=decode)
        val = FfcvValData(os.path.join(root, "val.beton"), cfg.global_size, settings,
                          decode=decode)
        return train, val
    if pipeline == "dali":
        from trex_fast import availability

        availability.require("nvidia-dali", availability.has_dali(), "dali")
        from pipelines.dali_multicrop import DaliTrainData, DaliValData  # imports nvidia.dali

        train = DaliTrainData(os.path.join(root, "dali", "train"), multicrop_spec(cfg), settings)
        val = DaliValData(os.path.join(root, "dali", "val"), cfg.global_size, settings)
        return train, val
    if pipeline != "reference":
        raise NotImplementedError(f"--pipeline={pipeline!r}: accepted values are auto, "
                                  "reference, ffcv, dali")
    _check_imagefolder(root)
    train = ReferenceTrainData(os.path.join(root, "train"), multicrop_spec(cfg), settings)
    val = ReferenceValData(os.path.join(root, "val"), cfg.global_size, settings)
    return train, val
