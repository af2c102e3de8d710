"""The one feature extractor of evaluation: frozen pooled backbone features of a dataset.

k-NN keeps them in fp32; the transfer suite stores them in fp16 (its feature cache, transfer.py).
Either way the forward runs in fp32 with eval-mode BatchNorm. Data-loading workers follow the
training rule (availability.resolve_workers): -1 is this machine's cores, so a 2-core machine
never starts more workers than it has cores.
"""
from __future__ import annotations

import os

import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.datasets import ImageFolder

from pipelines.batch import normalize_uint8
from pipelines.loaders.reference import val_transform
from trex_fast.availability import resolve_workers

AUTO_WORKERS = -1  # --num_workers default of every eval command: the machine's cores


def trust_help(files: str) -> str:
    """--trust_file's help in every eval command, naming the files it applies to."""
    return (f"DANGEROUS: load {files} with full pickle, which runs any code a crafted file "
            "holds; only for a file you trust (default: weights-only, which refuses it)")


def loader_workers(num_workers: int) -> int:
    """--num_workers of an eval command (one process): -1 = this machine's cores (1 to 16)."""
    return resolve_workers(num_workers, local_world_size=1)


def image_folder(root: str, image_size: int, flag: str) -> ImageFolder:
    """An ImageFolder with the val transform (Resize to 256/224 of the side, CenterCrop)."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"--{flag}={root!r}: no such ImageFolder directory")
    return ImageFolder(root, transform=val_transform(image_size))


@torch.no_grad()
def extract_features(net: torch.nn.Module, images: Dataset, device: torch.device,
                     batch_size: int, num_workers: int, dtype: torch.dtype = torch.float32,
                     desc: str = "features") -> tuple[torch.Tensor, torch.Tensor]:
    """Frozen pooled features [N, F] in `dtype` (fp32 compute, eval-mode BN) and labels [N]."""
    from tqdm import tqdm

    net.eval().to(device)
    loader = DataLoader(images, batch_size=batch_size, num_workers=loader_workers(num_workers),
                        pin_memory=device.type == "cuda")
    feats, labels = [], []
    for x, y in tqdm(loader, desc=desc, unit="batch", leave=False):
        x = normalize_uint8(x, device, torch.float32, channels_last=device.type == "cuda")
        feats.append(net(x).to(dtype).cpu())  # the .cpu() is the one host sync per batch
        labels.append(y)
    return torch.cat(feats), torch.cat(labels)
