"""The backbone registry: every trunk trex_fast trains, and the facts the rest of the code asks.

An `--arch` is a torchvision ResNet by its name (`resnet50`, RECIPE.md's trunk) or any timm
model as `timm/<name>` (`timm/vit_small_patch16_224`, `timm/convnext_tiny`). A family of
backbones is one `Family` entry in FAMILIES, which says for each of its names:

- the module: images [N, 3, H, W] -> pooled features [N, feature_dim] (classifier head removed;
  a ViT returns its class token, or the mean of its patch tokens with global_pool=avg);
- the parameters without weight decay (torchvision: ndim < 2, the recipe's rule; timm: ndim < 2
  and the model's own `no_weight_decay()`: position embeddings, class and register tokens);
- whether channels-last memory helps it (convolutions yes, token models no);
- the library's bare model (head included) that exported weights load into.

timm is imported here only when a `timm/` name is asked for: the core imports without it.
"""
from __future__ import annotations

import difflib
import inspect
from dataclasses import dataclass

import torch
import torch.nn as nn

TIMM_PREFIX = "timm/"
TORCHVISION_ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101")
GLOBAL_POOLS = ("default", "token", "avg")


class ArchError(ValueError):
    """An --arch (or a backbone option) this registry cannot train; the message names it."""


@dataclass(frozen=True)
class BackboneOptions:
    """The Config knobs a backbone is built with."""

    drop_path: float = 0.0  # stochastic depth rate at the last block (timm's drop_path_rate)
    global_pool: str = "default"  # default | token (class token) | avg (mean of the tokens)

    @classmethod
    def of(cls, cfg) -> BackboneOptions:
        """A trex_fast.config.Config's backbone knobs (read by name: models/ does not import
        the config, which imports this registry)."""
        return cls(drop_path=cfg.drop_path, global_pool=cfg.global_pool)


DEFAULT_OPTIONS = BackboneOptions()


@dataclass
class Backbone:
    module: nn.Module  # [N, 3, H, W] -> [N, feature_dim]
    feature_dim: int


def _small_ndim(module: nn.Module) -> set[str]:
    """RECIPE.md's rule: biases and norm gammas/betas (ndim < 2) are not decayed."""
    return {name for name, p in module.named_parameters() if p.ndim < 2}


# ---------------------------------------------------------------------------------------------
# torchvision ResNets: the paper's trunks
# ---------------------------------------------------------------------------------------------
class TorchvisionFamily:
    name = "torchvision"

    def owns(self, arch: str) -> bool:
        return not arch.startswith(TIMM_PREFIX)

    def check(self, arch: str, options: BackboneOptions, sizes: tuple[int, ...] = ()) -> None:
        """(sizes: a ResNet pools any crop size.)"""
        if arch not in TORCHVISION_ARCHS:
            raise ArchError(f"--arch={arch!r}: accepted values are "
                            f"{', '.join(TORCHVISION_ARCHS)}, or timm/<name> for a timm model")
        if options.drop_path:
            raise ArchError(f"--drop_path={options.drop_path}: torchvision {arch} has no "
                            "stochastic depth; accepted: 0 (drop_path is for timm models)")
        if options.global_pool not in ("default", "avg"):
            raise ArchError(f"--global_pool={options.global_pool!r}: torchvision {arch} "
                            "pools by average only; accepted: default, avg")

    def reference(self, arch: str) -> nn.Module:
        import torchvision

        return getattr(torchvision.models, arch)(weights=None)  # zero_init_residual=False

    def build(self, arch: str, options: BackboneOptions) -> Backbone:
        self.check(arch, options)
        net = self.reference(arch)
        feature_dim = net.fc.in_features
        net.fc = nn.Identity()
        return Backbone(net, feature_dim)

    def channels_last(self, arch: str) -> bool:
        return True  # cuDNN's fastest convolutions take NHWC (DESIGN.md)

    def no_decay(self, module: nn.Module) -> set[str]:
        return _small_ndim(module)

    def head(self, arch: str) -> str:
        return "fc"


# ---------------------------------------------------------------------------------------------
# timm: any model that returns a pooled feature at both crop sizes
# ---------------------------------------------------------------------------------------------
def _timm():
    try:
        import timm
    except ImportError:
        raise ArchError("--arch=timm/...: timm is not installed; pip install "
                        "'trex_fast[models]'") from None
    return timm


class TimmFamily:
    name = "timm"

    def owns(self, arch: str) -> bool:
        return arch.startswith(TIMM_PREFIX)

    def _model_name(self, arch: str) -> str:
        name = arch[len(TIMM_PREFIX):]
        timm = _timm()
        if not timm.is_model(name):
            close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
            hint = f"close matches: {', '.join(TIMM_PREFIX + c for c in close)}" if close else \
                "no close match; `timm.list_models('*vit*')` lists the names"
            raise ArchError(f"--arch={arch!r}: timm has no model {name!r}; {hint}")
        return name

    def _kwargs(self, name: str, options: BackboneOptions) -> dict:
        """create_model's arguments for a backbone: no head, position embeddings resized to
        each crop's grid (DINO's multi-crop through a ViT), stochastic depth, pooling."""
        accepted = self._accepted(name)
        kwargs: dict = {"num_classes": 0}
        if "dynamic_img_size" in accepted:
            kwargs["dynamic_img_size"] = True
        if options.drop_path:
            if "drop_path_rate" not in accepted:
                raise ArchError(f"--drop_path={options.drop_path}: timm {name} has no "
                                "stochastic depth (no drop_path_rate); accepted: 0")
            kwargs["drop_path_rate"] = options.drop_path
        if options.global_pool != "default":
            kwargs["global_pool"] = options.global_pool
        return kwargs

    def _accepted(self, name: str) -> set[str]:
        """The keyword arguments the model's class takes (a build on the meta device: no
        memory, no init cost)."""
        with torch.device("meta"):
            model = _timm().create_model(name, num_classes=0)
        return set(inspect.signature(type(model).__init__).parameters)

    def check(self, arch: str, options: BackboneOptions, sizes: tuple[int, ...] = ()) -> None:
        """Refuse, before any work, a model this recipe cannot train: the forward at each crop
        size must return one pooled feature per image (run on the meta device: no compute)."""
        name = self._model_name(arch)
        try:
            with torch.device("meta"):
                model = _timm().create_model(name, **self._kwargs(name, options))
        except (TypeError, ValueError, AssertionError) as e:
            raise ArchError(f"--arch={arch!r} with --global_pool={options.global_pool!r}: "
                            f"timm refuses it ({e})") from None
        dim = getattr(model, "num_features", None)
        if not isinstance(dim, int):
            raise ArchError(f"--arch={arch!r}: the model has no num_features (the pooled "
                            "feature size the projector needs)")
        for size in sizes:
            self._check_forward(arch, model, dim, size)

    def _check_forward(self, arch: str, model: nn.Module, dim: int, size: int) -> None:
        try:
            out = model(torch.empty(2, 3, size, size, device="meta"))
        except Exception as e:  # noqa: BLE001 - any failure means this size cannot be trained
            raise ArchError(f"--arch={arch!r}: the model cannot take {size} px crops (every "
                            f"crop size must run through the same weights): "
                            f"{type(e).__name__}: {str(e).splitlines()[0]}") from None
        if tuple(out.shape) != (2, dim):
            raise ArchError(f"--arch={arch!r}: at {size} px the model returns features of shape "
                            f"{tuple(out.shape)[1:]}, not one pooled [{dim}] vector per image")

    def reference(self, arch: str) -> nn.Module:
        return _timm().create_model(self._model_name(arch))

    def build(self, arch: str, options: BackboneOptions) -> Backbone:
        name = self._model_name(arch)
        model = _timm().create_model(name, **self._kwargs(name, options))
        return Backbone(model, model.num_features)

    def channels_last(self, arch: str) -> bool:
        """Token models (a patch embedding, then attention over [N, T, C]) gain nothing from
        channels-last; convolutional trunks do."""
        with torch.device("meta"):
            model = _timm().create_model(self._model_name(arch), num_classes=0)
        return not hasattr(model, "patch_embed")

    def no_decay(self, module: nn.Module) -> set[str]:
        """ndim < 2, and what the model names in no_weight_decay() (pos_embed, cls_token, ...),
        a parameter or a module whose parameters all stay undecayed."""
        named = set(module.no_weight_decay()) if hasattr(module, "no_weight_decay") else set()
        return _small_ndim(module) | {
            name for name, _ in module.named_parameters()
            if name in named or any(name.startswith(f"{n}.") for n in named)}

    def head(self, arch: str) -> str:
        with torch.device("meta"):
            model = _timm().create_model(self._model_name(arch))
        return model.pretrained_cfg["classifier"]


FAMILIES = (TimmFamily(), TorchvisionFamily())


def family(arch: str):
    return next(f for f in FAMILIES if f.owns(arch))


def check_backbone(arch: str, options: BackboneOptions = DEFAULT_OPTIONS,
          sizes: tuple[int, ...] = ()) -> None:
    """Raise ArchError naming what is wrong with this backbone; the crop sizes are checked for
    timm models (a torchvision ResNet pools any size)."""
    family(arch).check(arch, options, sizes)


def build_backbone(arch: str, options: BackboneOptions = DEFAULT_OPTIONS) -> Backbone:
    return family(arch).build(arch, options)


def no_decay(arch: str, module: nn.Module) -> set[str]:
    """Names of `module`'s parameters (a backbone built for `arch`) that get no weight decay."""
    return family(arch).no_decay(module)


def channels_last(arch: str) -> bool:
    """Whether channels-last memory helps this backbone (the crops and the model use it)."""
    return family(arch).channels_last(arch)


def reference_model(arch: str) -> nn.Module:
    """The library's own bare model of `arch`, head included: what exported weights load into
    with only the head missing."""
    return family(arch).reference(arch)


def head_prefix(arch: str) -> str:
    """The classifier head's name in the reference model (`fc`, `head`)."""
    return family(arch).head(arch)
