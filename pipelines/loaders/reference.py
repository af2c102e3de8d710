"""torchvision/PIL multi-crop with RECIPE.md's exact augmentation over an ImageFolder.

The executable spec the fast pipelines are compared with, the baseline of the benchmarks, and
the fallback when FFCV/DALI are absent. Each image is decoded once; its crops are made by
torchvision's own transforms on the PIL image in worker processes and leave as uint8;
normalisation happens on the training device (pipelines.batch).

Randomness is a function of (seed, epoch, sample index) only, not of the worker that happens
to load the sample, so a resumed run sees exactly the augmentations it would have seen.
"""
from __future__ import annotations

import atexit
import signal
import weakref
from collections.abc import Iterator

import torch
import torchvision.transforms as T
from PIL import Image, ImageFilter
from torch.utils.data import DataLoader, Dataset
from torchvision.datasets import ImageFolder

from pipelines.batch import (  # noqa: F401 (LoaderSettings: re-exported for callers)
    EpochSampler,
    LoaderSettings,
    MultiCropBatch,
    Uint8MultiCrops,
    derived_seed,
    normalize_uint8,
)
from pipelines.spec import CropSpec, MultiCropSpec, val_resize_size

BICUBIC = T.InterpolationMode.BICUBIC


class RandomGaussianBlur:
    """With probability p, PIL Gaussian blur with sigma ~ U(sigma_min, sigma_max) (PIL's
    radius is the standard deviation). Draws from torch's RNG like torchvision's transforms."""

    def __init__(self, p: float, sigma: tuple[float, float]):
        self.p, self.sigma = p, sigma

    def __call__(self, img: Image.Image) -> Image.Image:
        if self.p <= 0 or torch.rand(1).item() >= self.p:
            return img
        lo, hi = self.sigma
        sigma = lo + (hi - lo) * torch.rand(1).item()
        return img.filter(ImageFilter.GaussianBlur(radius=sigma))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(p={self.p}, sigma={self.sigma})"


def crop_transform(group: CropSpec) -> T.Compose:
    """One crop of a group, in the recipe's order: crop, flip, jitter, gray, blur, solarize."""
    ops = [
        T.RandomResizedCrop(group.size, scale=group.scale, ratio=group.ratio,
                            interpolation=BICUBIC),
        T.RandomHorizontalFlip(group.flip_p),
        T.RandomApply([T.ColorJitter(group.brightness, group.contrast, group.saturation,
                                     group.hue)], p=group.jitter_p),  # random order inside
        T.RandomGrayscale(group.grayscale_p),
        RandomGaussianBlur(group.blur_p, group.blur_sigma),
    ]
    if group.solarize_p > 0:
        ops.append(T.RandomSolarize(group.solarize_threshold, p=group.solarize_p))
    ops.append(T.PILToTensor())  # uint8 [3, size, size]
    return T.Compose(ops)


def load_rgb(path: str) -> Image.Image:
    with open(path, "rb") as f:
        return Image.open(f).convert("RGB")  # the one decode of this image in this step


class MultiCropDataset(Dataset):
    """Indexed by (epoch, index); returns (global crops, local crops, label), uint8 tensors."""

    def __init__(self, root: str, spec: MultiCropSpec, seed: int):
        self.folder = ImageFolder(root)
        self.spec, self.seed = spec, seed
        self.transforms = [crop_transform(g) for g in spec.groups]

    def __len__(self) -> int:
        return len(self.folder.samples)

    def __getitem__(self, key: tuple[int, int]):
        epoch, index = key
        path, label = self.folder.samples[index]
        image = load_rgb(path)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derived_seed(self.seed, epoch, index))
            crops = [[tf(image) for _ in range(g.count)]
                     for tf, g in zip(self.transforms, self.spec.groups)]
        return crops[0], crops[1], label


def ignore_stop_signals(worker_id: int) -> None:
    """Workers leave SIGINT/SIGTERM to the main process, which saves a checkpoint and then shuts
    them down (Ctrl-C and schedulers signal the whole process group; a worker killed first
    would crash the loader before the checkpoint). A worker whose parent dies exits anyway
    (PyTorch's worker watchdog). So a worker ends only by end_workers (issue #26)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def end_workers(iterator) -> None:
    """End a DataLoader iterator's worker processes now: PyTorch's own shutdown (a stop on each
    index queue, then terminate()), then SIGKILL for a worker still busy with a batch, since
    ours ignore SIGTERM. Left to interpreter exit, multiprocessing's exit handler would
    terminate() them and join forever (issue #26). Idempotent; a no-op without workers."""
    shutdown = getattr(iterator, "_shutdown_workers", None)
    if shutdown is None:  # num_workers=0, or never iterated
        return
    shutdown()
    for worker in iterator._workers:
        if worker.is_alive():
            worker.kill()
        worker.join()


# Every reference loader with workers, ended at interpreter exit even when something still
# references it (a traceback's frames, a module that pinned them): registered after
# multiprocessing's own exit handler, so it runs before it.
_LIVE: weakref.WeakSet = weakref.WeakSet()
atexit.register(lambda: [data.close() for data in list(_LIVE)])


def collate_multicrop(samples) -> Uint8MultiCrops:
    """Per-sample crop lists -> crop-major stacks [crop_0 of all B | crop_1 of all B | ...]."""
    def crop_major(group: int) -> torch.Tensor:
        n_crops = len(samples[0][group])
        if n_crops == 0:
            return torch.empty(0, 3, 1, 1, dtype=torch.uint8)
        return torch.stack([s[group][c] for c in range(n_crops) for s in samples])

    labels = torch.tensor([s[2] for s in samples], dtype=torch.long)
    return Uint8MultiCrops(crop_major(0), crop_major(1), labels)


class ReferenceTrainData:
    """Train batches as MultiCropBatch on the device, epoch by epoch."""

    def __init__(self, root: str, spec: MultiCropSpec, settings: LoaderSettings):
        self.settings = settings
        self.dataset = MultiCropDataset(root, spec, settings.seed)
        self.sampler = EpochSampler(len(self.dataset), settings.batch_size, settings.seed,
                                    settings.rank, settings.world_size)
        self.loader = DataLoader(
            self.dataset, batch_size=settings.batch_size, sampler=self.sampler,
            collate_fn=collate_multicrop, num_workers=settings.num_workers,
            pin_memory=settings.device.type == "cuda", drop_last=True,
            persistent_workers=settings.num_workers > 0, worker_init_fn=ignore_stop_signals,
            # the iterator's base seed from a generator of its own, not the global torch RNG:
            # the model draws from that one (a ViT's drop path), and a resumed run builds its
            # iterator after the RNG is restored, which would shift every draw (issue #24)
            generator=torch.Generator())
        _LIVE.add(self)

    @property
    def steps_per_epoch(self) -> int:
        return self.sampler.steps_per_epoch

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[MultiCropBatch]:
        s = self.settings
        self.sampler.set_epoch(epoch, start_step)
        for crops in self.loader:
            yield crops.to_batch(s.device, s.dtype, s.channels_last)

    def close(self) -> None:
        """End the workers (persistent: they live in the loader's one iterator)."""
        end_workers(self.loader._iterator)


def val_transform(global_size: int) -> T.Compose:
    return T.Compose([T.Resize(val_resize_size(global_size)), T.CenterCrop(global_size),
                      T.PILToTensor()])


class ReferenceValData:
    """Val images (Resize + CenterCrop), sharded across ranks without padding so that every
    image is counted exactly once; yields (normalised images, labels) on the device."""

    def __init__(self, root: str, global_size: int, settings: LoaderSettings):
        self.settings = settings
        folder = ImageFolder(root, transform=val_transform(global_size))
        shard = list(range(settings.rank, len(folder), settings.world_size))
        self.num_images = len(folder)
        self.loader = DataLoader(torch.utils.data.Subset(folder, shard),
                                 batch_size=settings.batch_size,
                                 num_workers=settings.num_workers,
                                 pin_memory=settings.device.type == "cuda",
                                 worker_init_fn=ignore_stop_signals,
                                 generator=torch.Generator())  # as the train loader's
        self._iterator = None  # the pass in progress (its workers), for close()
        _LIVE.add(self)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        s = self.settings
        self._iterator = iter(self.loader)
        for images, labels in self._iterator:
            yield (normalize_uint8(images, s.device, s.dtype, s.channels_last),
                   labels.to(s.device, non_blocking=True))

    def close(self) -> None:
        """End the workers of a pass that did not finish (a finished one has ended them)."""
        end_workers(self._iterator)
