"""What a run writes next to its checkpoints: config.json, env.json, metrics.jsonl, plots.

STYLE.md habit 9: every run records its resolved config, git revision, library versions and
device. metrics.jsonl gets one JSON object per epoch. Every file goes through pipelines.atomic.
"""
from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import subprocess
import sys

import torch

from pipelines import atomic
from trex_fast.config import Config, to_dict

METRICS_NAME = "metrics.jsonl"
FINAL_NAME = "final.json"  # the end of a run: both IN1K figures (trex_fast.eval.final)
HEAD_TOP1_FP32 = "in1k_head_top1_fp32"  # final.json: the training head, fp32
TENSORBOARD_DIR = "tensorboard"

# metrics.jsonl: one record per epoch. Its keys and their units live here, once: the writers
# (trex_fast.loop's epoch summary, trex_fast.train's record, trex_fast.data's counts,
# trex_fast.eval.in1k's val metrics) and the readers (plots, TensorBoard, resume's truncation,
# sweep reports, the eval CLI) name them through these constants; append_metrics refuses a key
# that is not declared here.
EPOCH, STEP, LR, ELAPSED_S = "epoch", "step", "lr", "elapsed_s"
TRAIN_LOSS, TRAIN_TOP1, TRAIN_GLOBAL_TOP1 = "train_loss", "train_top1", "train_global_top1"
SAMPLES_PER_S, CORRUPT_IMAGES = "samples_per_s", "corrupt_images"
VAL_TOP1, VAL_TOP5, VAL_LOSS, VAL_IMAGES = "val_top1", "val_top5", "val_loss", "val_images"
METRIC_UNITS = {
    EPOCH: "epochs completed (1 = the first)",
    STEP: "global steps done",
    LR: "learning rate of the epoch's last step",
    ELAPSED_S: "seconds of the run so far, resumed parts included",
    TRAIN_LOSS: "nats: cross-entropy over all crops, mean over the epoch's steps and ranks",
    TRAIN_TOP1: "percent of all crops (rows) whose top-1 is their label",
    TRAIN_GLOBAL_TOP1: "percent of images whose global crop 0 has top-1 = its label",
    SAMPLES_PER_S: "images per second over all ranks, training time only",
    CORRUPT_IMAGES: "images replaced after a failed decode, all ranks (FFCV only)",
    VAL_TOP1: "percent of val images, top-1",
    VAL_TOP5: "percent of val images, top-5",
    VAL_LOSS: "nats: cross-entropy, mean over val images",
    VAL_IMAGES: "val images evaluated (each once)",
}
# scikit-learn: where the transfer suite's L-BFGS probe stops depends on its version (1.4
# rescaled the objective), optuna: the search's sampler
_LIBRARIES = ("torch", "torchvision", "numpy", "pillow", "numba", "fire", "ffcv",
              "nvidia-dali-cuda130", "triton", "scikit-learn", "optuna")


def git_revision() -> str:
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        out = subprocess.run(["git", "-C", repo, "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", repo, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return out + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def library_versions() -> dict:
    versions = {"python": sys.version.split()[0]}
    for name in _LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return versions


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()


def write_run_info(out_dir: str, cfg: Config, device: torch.device, extra: dict) -> None:
    if cfg.tensorboard:  # a missing tensorboard fails here, before the first epoch
        _tensorboard_writer(out_dir)
    atomic.write_json(os.path.join(out_dir, "config.json"), {**to_dict(cfg), **extra})
    atomic.write_json(os.path.join(out_dir, "env.json"), {
        "git_revision": git_revision(), "libraries": library_versions(),
        "device": str(device), "device_name": device_name(device),
        "cuda": torch.version.cuda, "platform": platform.platform(),
        "world_size": int(os.environ.get("WORLD_SIZE", "1")),
    })


def read_metrics(out_dir: str) -> list[dict]:
    path = os.path.join(out_dir, METRICS_NAME)
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def in1k_head_top1(out_dir: str) -> float | None:
    """A run's IN1K top-1 with the training head: final.json's fp32 figure when the run ended
    with one, else the last validated epoch's val_top1 (bf16 on a GPU), else None."""
    path = os.path.join(out_dir, FINAL_NAME)
    if os.path.isfile(path):
        with open(path) as f:
            top1 = json.load(f).get(HEAD_TOP1_FP32)
        if top1 is not None:
            return top1
    vals = [r[VAL_TOP1] for r in read_metrics(out_dir) if r.get(VAL_TOP1) is not None]
    return vals[-1] if vals else None


def truncate_metrics(out_dir: str, completed_epochs: int) -> None:
    """On resume, drop records of epochs the checkpoint does not contain (they will rerun).
    Records are numbered by completed epochs: 1 is the first epoch."""
    kept = [r for r in read_metrics(out_dir) if r[EPOCH] <= completed_epochs]
    _write_metrics(out_dir, kept)


def _write_metrics(out_dir: str, records: list[dict]) -> None:
    text = "".join(json.dumps(r) + "\n" for r in records)
    atomic.write_bytes(os.path.join(out_dir, METRICS_NAME), text.encode())


def append_metrics(out_dir: str, record: dict) -> None:
    """Append one epoch's record; every key must be declared in METRIC_UNITS."""
    unknown = sorted(set(record) - METRIC_UNITS.keys())
    if unknown:
        raise ValueError(f"metrics.jsonl record with undeclared keys {unknown}: declare each "
                         "with its unit in trex_fast.runlog.METRIC_UNITS")
    # rewritten whole (a few KB): a kill mid-write never leaves a partial line
    _write_metrics(out_dir, [*read_metrics(out_dir), record])


_TB_WRITERS: dict = {}  # one event file per run directory and process


def _tensorboard_writer(out_dir: str):
    path = os.path.join(out_dir, TENSORBOARD_DIR)
    if path not in _TB_WRITERS:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise ImportError("--tensorboard=True needs the tensorboard package: pip install "
                              "'trex_fast[tensorboard]'") from e
        _TB_WRITERS[path] = SummaryWriter(path)
    return _TB_WRITERS[path]


def write_tensorboard(out_dir: str, record: dict) -> None:
    """One metrics.jsonl record as TensorBoard scalars at its global step (flushed)."""
    writer = _tensorboard_writer(out_dir)
    for key, value in record.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and key != STEP:
            writer.add_scalar(key, value, global_step=record[STEP])
    writer.flush()


def plot_metrics(out_dir: str) -> list[str]:
    """loss.png and accuracy.png from metrics.jsonl; returns the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(out_dir)
    if not records:
        return []
    epochs = [r[EPOCH] for r in records]
    paths = []
    for name, keys, ylabel in (("loss.png", (TRAIN_LOSS, VAL_LOSS), "cross-entropy"),
                               ("accuracy.png", (TRAIN_TOP1, VAL_TOP1), "top-1 (%)")):
        fig, ax = plt.subplots(figsize=(6, 4))
        for key in keys:
            points = [(e, r[key]) for e, r in zip(epochs, records) if r.get(key) is not None]
            if points:
                ax.plot(*zip(*points), marker="o", label=key)
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = os.path.join(out_dir, name)
        atomic.write_atomic(path, lambda f, fig=fig: fig.savefig(f, format="png", dpi=100))
        plt.close(fig)
        paths.append(path)
    return paths
