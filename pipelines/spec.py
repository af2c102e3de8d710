"""The one augmentation spec of RECIPE.md, shared by every pipeline.

Per image, decoded once: `global_crops` crops at `global_size` and `local_crops` at
`local_size`, each: RandomResizedCrop (scale per preset, ratio 3/4..4/3, bicubic), horizontal
flip, colour jitter (random order), grayscale, Gaussian blur, solarize (global only),
normalise. Pipelines differ in how they do it, never in these numbers.
"""
from __future__ import annotations

from dataclasses import dataclass

# ImageNet statistics, in [0, 1] units, RGB order.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Val transform (RECIPE.md "Evaluation"): Resize(256) then CenterCrop(224), scaled to the
# preset's global size.
VAL_RESIZE_RATIO = 256 / 224


@dataclass(frozen=True)
class CropSpec:
    """The augmentations of one resolution group (all global or all local crops)."""

    count: int  # crops per image
    size: int  # output side, pixels
    scale: tuple[float, float]  # RandomResizedCrop area fraction
    blur_p: float  # probability of Gaussian blur
    solarize_p: float  # probability of solarize
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    grayscale_p: float = 0.2
    blur_sigma: tuple[float, float] = (0.1, 2.0)  # pixels of the output crop
    solarize_threshold: int = 128  # of 255


@dataclass(frozen=True)
class MultiCropSpec:
    global_group: CropSpec
    local_group: CropSpec

    @property
    def groups(self) -> tuple[CropSpec, CropSpec]:
        return (self.global_group, self.local_group)


def multicrop_spec(cfg) -> MultiCropSpec:
    """The spec for a trex_fast Config (crop counts, sizes and scales are the knobs)."""
    return MultiCropSpec(
        global_group=CropSpec(cfg.global_crops, cfg.global_size, tuple(cfg.global_scale),
                              blur_p=0.2, solarize_p=0.2),
        local_group=CropSpec(cfg.local_crops, cfg.local_size, tuple(cfg.local_scale),
                             blur_p=0.5, solarize_p=0.0),
    )


def val_resize_size(global_size: int) -> int:
    return int(round(global_size * VAL_RESIZE_RATIO))
