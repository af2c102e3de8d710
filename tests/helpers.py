"""Small shared builders for the tests: a tiny config, state and synthetic batches, and
the recipe's photometric ops through torchvision's functional API."""
import math
import os

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF

from pipelines.batch import MultiCropBatch
from trex_fast.build import build_state
from trex_fast.config import make_config
from trex_fast.distributed import DistInfo
from trex_fast.plan import make_plan

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository root
SINGLE = DistInfo(rank=0, world_size=1, local_rank=0, local_world_size=1)


def _forking(target, *args) -> None:
    """target(*args) in a spawned process whose own children fork: a spawned process inherits
    "spawn" as its start method, and a DatasetWriter's spawned workers import torch and ffcv
    again (~9 s a writer). Nothing has run numba in this fresh process, so forking is safe."""
    import multiprocessing

    multiprocessing.set_start_method("fork", force=True)
    target(*args)


def run_in_spawned_process(target, *args, timeout: float = 300) -> None:
    """Run target(*args) in a fresh (spawned) process: an FFCV DatasetWriter forked after
    Loaders ran can deadlock on numba's lock."""
    import multiprocessing

    proc = multiprocessing.get_context("spawn").Process(target=_forking, args=(target, *args))
    proc.start()
    proc.join(timeout)
    assert proc.exitcode == 0, f"{target.__name__} failed in its spawned process"


def tiny_config(**overrides):
    flags = dict(arch="resnet18", batch_size=4, global_size=32, local_size=16, local_crops=2,
                 memory_size=16, pr_hidden_dim=32, pr_bottleneck_dim=8, warmup_epochs=0,
                 epochs=2, lr=0.5, device="cpu", channels_last=False)
    flags.update(overrides)
    return make_config("demo", **flags)


def tiny_state(num_classes=5, steps_per_epoch=10, dist_info=SINGLE, **overrides):
    cfg = tiny_config(**overrides)
    return build_state(cfg, make_plan(cfg, dist_info, num_classes, steps_per_epoch))


def losses_by_impl(make_state, make_batch, steps: int = 3) -> dict[str, list[float]]:
    """Per-step losses of the same seeded run with loss_impl torch and triton."""
    from trex_fast.step import train_step

    losses = {}
    for impl in ("torch", "triton"):
        torch.manual_seed(0)
        state = make_state(loss_impl=impl)
        assert state.loss_impl == impl
        per_step = []
        for i in range(steps):
            train_step(state, make_batch(state.cfg, seed=i))
            per_step.append(state.metrics.read_and_reset()[0]["loss_sum"])
        losses[impl] = per_step
    return losses


def synthetic_batch(cfg, num_classes=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    b = cfg.batch_size
    return MultiCropBatch(
        global_crops=torch.randn(cfg.global_crops * b, 3, cfg.global_size, cfg.global_size,
                                 generator=g),
        local_crops=torch.randn(cfg.local_crops * b, 3, cfg.local_size, cfg.local_size,
                                generator=g),
        labels=torch.randint(0, num_classes, (b,), generator=g),
    )


JITTER_OPS = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)


def torchvision_photometric(image: np.ndarray, jitter=None, keys=(0, 1, 2, 3), gray=False,
                            blur_sigma=None, solarize_threshold=None) -> np.ndarray:
    """The recipe's photometric ops with torchvision's functional API on a float image, in
    pipelines/loaders/photometric_numba.py's conventions: jitter = [b, c, s, hue] in the order
    of the keys, grayscale, Gaussian blur (window 2 * ceil(3 sigma) + 1), rounding to uint8,
    solarize.
    HWC uint8 in, HWC float64 (integer values) out."""
    from pipelines.loaders.photometric_numba import order_of  # numba: imported by its tests only

    x = torch.from_numpy(image).permute(2, 0, 1).float() / 255
    if jitter is not None:
        for op in order_of(keys):
            x = JITTER_OPS[op](x, float(jitter[op]))
    if gray:
        x = TF.rgb_to_grayscale(x, num_output_channels=3)
    if blur_sigma is not None:
        k = 2 * math.ceil(3 * blur_sigma) + 1
        x = TF.gaussian_blur(x, [k, k], [blur_sigma, blur_sigma])
    x = (x * 255).round().to(torch.uint8)
    if solarize_threshold is not None:
        x = TF.solarize(x, solarize_threshold)
    return x.permute(1, 2, 0).numpy().astype(np.float64)


def assert_batch_contract(batch: MultiCropBatch, spec, settings) -> None:
    """The one batch contract (pipelines/batch.py) every producer must meet: crop-major groups
    [G*B, 3, Sg, Sg] and [L*B, 3, Sl, Sl] in the compute dtype, channels-last iff asked, on the
    training device, finite, and int64 labels [B] there too."""
    b = settings.batch_size
    assert isinstance(batch, MultiCropBatch) and batch.labels.shape == (b,)
    assert batch.labels.dtype == torch.int64 and batch.labels.device == settings.device
    for crops, group in ((batch.global_crops, spec.global_group),
                         (batch.local_crops, spec.local_group)):
        if group.count == 0:
            assert crops.shape[0] == 0
            continue
        assert crops.shape == (group.count * b, 3, group.size, group.size), crops.shape
        assert crops.dtype == settings.dtype and crops.device == settings.device
        assert crops.is_contiguous(memory_format=torch.channels_last) == settings.channels_last
        assert crops.is_contiguous() != settings.channels_last  # 3 channels: the two differ
        assert torch.isfinite(crops.float()).all()


class WritesMarker:
    """Unpickling this calls open(marker, "w"): the marker file exists iff the file ran code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))
