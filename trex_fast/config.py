"""The run configuration: one frozen dataclass, the presets of RECIPE.md, and validation.

Every field is a CLI flag of `python -m trex_fast.train` (its help text is the field's
`help` metadata). Values derived from these (number of crops, global batch, scaled LR,
iterations, number of classes) are computed where needed, never configured.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass

from trex_fast.cli import FlagError, check_choice, check_names, coerce, flags_help
from trex_fast.models.registry import GLOBAL_POOLS, ArchError, BackboneOptions, check_backbone

OPTIMIZERS = ("sgd", "adamw")
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
LOSS_IMPLS = ("auto", "torch", "triton")
PIPELINES = ("auto", "reference", "ffcv", "dali")
DECODES = ("auto", "cpu", "gpu")
ONOFF_AUTO = ("auto", "on", "off")
FINAL_PROBES = ("off", "in1k")


class ConfigError(FlagError):
    """A flag has a wrong name, type or value; the message names it and what is accepted."""


# Each field's role on resume (trex_fast.checkpoint.check_resumable derives its lists from these):
MATCH = "must match"  # the run would differ from an uninterrupted one: a change is refused
SCHEDULE = "schedule"  # the LR schedule: a change is refused unless --reschedule=True
FREE = "free"  # may change (speed, I/O, logging), or is checked through its RunPlan fact
RESUME_ROLES = (MATCH, SCHEDULE, FREE)


def _f(default, help: str, resume: str):
    """A Config field: a CLI flag (trex_fast.cli.flag) with its resume role."""
    return dataclasses.field(default=default, metadata={"help": help, "resume": resume})


def role_field(resume: str, **kwargs):
    """A dataclass field carrying only its resume role (the RunPlan's fields)."""
    return dataclasses.field(metadata={"resume": resume}, **kwargs)


def check_resume_roles(cls) -> None:
    """Every field of the dataclass `cls` declares one of RESUME_ROLES (called at import, so
    a field added without one stops the import, naming it)."""
    for f in dataclasses.fields(cls):
        role = f.metadata.get("resume")
        if role not in RESUME_ROLES:
            raise TypeError(f"{cls.__name__}.{f.name}: resume role {role!r}; declare one of "
                            f"{', '.join(map(repr, RESUME_ROLES))} with the field")


def fields_with_role(cls, role: str) -> tuple[str, ...]:
    """The names of cls's fields whose resume role is `role`, in declaration order."""
    return tuple(f.name for f in dataclasses.fields(cls) if f.metadata["resume"] == role)


@dataclass(frozen=True)
class Config:
    """Every field is declared with `_f(default, help, resume role)`. The role says what
    resuming a checkpoint does when the flag changed: MATCH refuses, SCHEDULE refuses unless
    --reschedule=True, FREE accepts (flags that only change speed or I/O, and flags whose
    effect is checked through the resolved RunPlan: batch_size as global_batch, precision,
    pipeline). A new field must declare its role: a field without one fails at import."""

    # ---- what to train -------------------------------------------------------------
    preset: str = _f("trex", "recipe preset: trex, trex_star, plain (cosine classifier), "
                             "demo (small, CPU), or the ViT recipes trex_vit_s, trex_vit_b "
                             "(docs/VIT.md); flags given explicitly override it. Default: "
                             "demo without --data, trex with it", FREE)
    arch: str = _f("resnet50", "backbone: a torchvision ResNet (resnet18, resnet34, resnet50, "
                               "resnet101) or any timm model as timm/<name>, e.g. "
                               "timm/vit_small_patch16_224 (trex_fast.models.registry)", MATCH)
    drop_path: float = _f(0.0, "stochastic depth rate of a timm backbone (drop_path_rate); 0 = "
                               "none (torchvision ResNets have none)", MATCH)
    global_pool: str = _f("default", f"backbone feature, one of {GLOBAL_POOLS}: default = the "
                                     "model's own (ViT: the class token; convnets: the average), "
                                     "token (class token) or avg (mean of the tokens/positions)",
                          MATCH)
    # ---- optimisation (RECIPE.md: SGD, warm-up + cosine, per-iteration) -------------
    optimizer: str = _f("sgd", f"one of {OPTIMIZERS}: sgd (the recipe's, with --momentum) or "
                               "adamw (betas 0.9, 0.999; the ViT presets, docs/VIT.md)", MATCH)
    epochs: int = _f(100, "training epochs", SCHEDULE)
    batch_size: int = _f(64, "images per process per step (global batch = this x world size)", FREE)
    lr: float = _f(0.1, "base learning rate per 256 images; scaled by global batch / 256", SCHEDULE)
    weight_decay: float = _f(1e-4, "weight decay; none on biases, norms (ndim < 2), position "
                                   "embeddings and class tokens (the backbone registry's set)",
                             MATCH)
    momentum: float = _f(0.9, "SGD momentum (no Nesterov); unused by adamw", MATCH)
    warmup_epochs: float = _f(10.0, "linear warm-up from 0, in epochs (per-iteration)", SCHEDULE)
    min_lr: float = _f(1e-6, "learning rate at the last step of the cosine schedule", SCHEDULE)
    clip_grad: float = _f(0.0, "clip the global gradient norm to this value; 0 = no clipping "
                               "(the recipe's)", MATCH)
    # ---- projector (thrown away after training) -------------------------------------
    pr_hidden_layers: int = _f(3, "hidden [Linear -> BN -> GELU] layers (t-ReX 3, t-ReX* 1)", MATCH)
    pr_hidden_dim: int = _f(2048, "width of the projector's hidden layers", MATCH)
    pr_bottleneck_dim: int = _f(256, "projector output dim (memory-bank feature size)", MATCH)
    pr_input_l2_norm: bool = _f(True, "L2-normalise the backbone feature before the projector",
                                MATCH)
    # ---- classifier: memory-bank prototypes (OCM) or cosine classifier ---------------
    memory_size: int = _f(8192, "memory-bank slots shared by all classes; 0 = learned cosine "
                                "classifier (the plain preset)", MATCH)
    clf_tau: float = _f(0.1, "temperature dividing the cosine logits", MATCH)
    ema_momentum: float = _f(0.999, "momentum of the EMA network that fills the memory", MATCH)
    # ---- multi-crop ------------------------------------------------------------------
    global_crops: int = _f(1, "global crops per image", MATCH)
    local_crops: int = _f(8, "local crops per image", MATCH)
    global_size: int = _f(224, "global crop side in pixels", MATCH)
    local_size: int = _f(96, "local crop side in pixels", MATCH)
    global_scale: tuple[float, float] = _f((0.25, 1.0), "RandomResizedCrop area scale of the "
                                           "global crops, as min,max in (0, 1]", MATCH)
    local_scale: tuple[float, float] = _f((0.05, 0.25), "RandomResizedCrop area scale of the "
                                          "local crops, as min,max in (0, 1]", MATCH)
    # ---- speed -------------------------------------------------------------------------
    precision: str = _f("auto", f"one of {PRECISIONS}; auto = bf16 on CUDA, fp32 on CPU", FREE)
    channels_last: bool = _f(True, "channels-last memory format for the model and the crops", FREE)
    compile: bool = _f(False, "torch.compile the backbone", FREE)
    loss_impl: str = _f("auto", f"one of {LOSS_IMPLS}; auto = fused Triton kernel on CUDA", FREE)
    sync_bn: str = _f("auto", f"SyncBatchNorm under DDP, one of {ONOFF_AUTO}; auto = on with "
                              "CUDA (as the reference), off on CPU (gloo has no SyncBN)", FREE)
    # ---- data and run -------------------------------------------------------------------
    seed: int = _f(0, "seed of weights, data order and augmentations", MATCH)
    data: str = _f("", "ImageFolder root with train/ and val/, or a converted directory; "
                       "empty = the built-in demo dataset (made once, cached)", FREE)
    pipeline: str = _f("auto", f"one of {PIPELINES}; auto = ffcv if the data directory holds "
                               ".beton files, dali if it holds dali/, else reference", FREE)
    decode: str = _f("auto", f"FFCV JPEG decode, one of {DECODES}; auto = gpu (batched "
                             "decode_jpeg on the device) with CUDA, cpu (in the loader) else", FREE)
    device: str = _f("auto", "auto, cpu, cuda or cuda:N (torchrun sets the rank's GPU)", FREE)
    num_workers: int = _f(-1, "data-loading workers per process; -1 = CPU cores / processes", FREE)
    output_dir: str = _f("", "where config, metrics, plots and checkpoints go; empty = "
                             "runs/<preset>. Rerunning with the same directory resumes", FREE)
    log_every: int = _f(50, "steps between reads of the on-device metrics (the only host sync)",
                        FREE)
    eval_every: int = _f(1, "epochs between validations (0 = only after the last epoch)", FREE)
    val_images: str = _f("", "ImageFolder of the original IN1K val JPEGs (<wnid>/*.JPEG, the "
                             "run's classes) for the end-of-run head top-1 in fp32; empty = "
                             "<data>/val if it is one, else the val/ of the converter's source "
                             "named in <data>/meta.json, else the run's own val data "
                             "(final.json says which)", FREE)
    final_probe: str = _f("off", f"one of {FINAL_PROBES}: in1k = also run the transfer suite's "
                                 "linear probe on frozen IN1K features at the end (costly: "
                                 "features of all train/ images next to the original val "
                                 "folder, 30 trials x 3 seeds)", FREE)
    tensorboard: bool = _f(False, "also write each epoch's metrics as TensorBoard events in "
                                  "output_dir/tensorboard (needs the tensorboard extra)", FREE)
    resume: str = _f("", "checkpoint to resume from; empty = the newest checkpoint of "
                         "output_dir that loads, if any", FREE)
    reschedule: bool = _f(False, "on resume, accept a change of epochs, warmup_epochs, lr or "
                                 "min_lr (the LR schedule is recomputed: the run then differs "
                                 "from an uninterrupted one; the LR before and after is printed)",
                           FREE)
    fresh_start: bool = _f(False, "when output_dir holds checkpoints but none of them loads "
                                  "(e.g. truncated), start from step 0 and replace them at the "
                                  "first save; default: stop, naming them, and touch nothing", FREE)
    checkpoint_every_min: float = _f(20.0, "also checkpoint mid-epoch, at the first metric read "
                                           "after this many minutes (no extra host sync); 0 = "
                                           "only at epoch ends", FREE)
    keep_checkpoints: int = _f(3, "checkpoints kept in output_dir, newest first (checkpoint.pt, "
                                  "then checkpoint-step<N>.pt)", FREE)
    trust_file: bool = _f(False, "DANGEROUS: load the checkpoint to resume from with full "
                                 "pickle, which runs any code a crafted file holds; only for a "
                                 "file you trust that weights-only loading refuses (e.g. one "
                                 "written before trex_fast stored RNG states as tensors)", FREE)
    profile_steps: int = _f(0, "instead of training: time this many steps with real data, with "
                               "synthetic data and of the loader alone, print whether the run "
                               "is data- or compute-bound, write bottleneck.json, exit", FREE)
    stop_at_step: int = _f(0, "save a checkpoint and exit after this global step (0 = run to "
                              "the end); for splitting a run across time-limited jobs", FREE)


PRESETS: dict[str, dict] = {
    "trex": {},
    "trex_star": dict(pr_hidden_layers=1, global_scale=(0.40, 1.0), local_scale=(0.05, 0.40)),
    "plain": dict(memory_size=0),
    # Small enough to train to well above chance on 2 CPU cores in a few minutes.
    "demo": dict(
        arch="resnet18", epochs=4, batch_size=32, lr=0.4, warmup_epochs=1.0,
        pr_hidden_dim=512, memory_size=1024, global_size=64, local_size=32, local_crops=4,
        log_every=10,
    ),
    # The project's own ViT recipes (RECIPE.md "Beyond the paper"; reasons in docs/VIT.md):
    # t-ReX's projector, memory and crops, a timm ViT trunk, AdamW as in DINO and DeiT.
    "trex_vit_s": dict(arch="timm/vit_small_patch16_224", optimizer="adamw", lr=5e-4,
                       weight_decay=0.05, drop_path=0.1, clip_grad=3.0),
    "trex_vit_b": dict(arch="timm/vit_base_patch16_224", optimizer="adamw", lr=2.5e-4,
                       weight_decay=0.05, drop_path=0.1, clip_grad=3.0),
}

check_resume_roles(Config)
FIELDS = {f.name: f for f in dataclasses.fields(Config)}
_HINTS = typing.get_type_hints(Config)


def _coerce(name: str, value):
    """Check one flag's type (fire has parsed it as a Python literal) and normalise it."""
    return coerce(name, _HINTS[name], value, ConfigError)


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    check_choice(name, value, choices, ConfigError)


def _check(cond: bool, name: str, value, accepted: str) -> None:
    if not cond:
        raise ConfigError(f"--{name}={value!r}: must be {accepted}")


def validate(cfg: Config) -> Config:
    """Reject impossible values before any work; returns cfg for chaining."""
    _check_choice("preset", cfg.preset, tuple(PRESETS))
    _check_choice("optimizer", cfg.optimizer, OPTIMIZERS)
    _check_choice("global_pool", cfg.global_pool, GLOBAL_POOLS)
    _check_choice("precision", cfg.precision, PRECISIONS)
    _check_choice("loss_impl", cfg.loss_impl, LOSS_IMPLS)
    _check_choice("pipeline", cfg.pipeline, PIPELINES)
    _check_choice("decode", cfg.decode, DECODES)
    _check_choice("sync_bn", cfg.sync_bn, ONOFF_AUTO)
    _check_choice("final_probe", cfg.final_probe, FINAL_PROBES)
    dev = cfg.device
    _check(dev in ("auto", "cpu", "cuda") or (dev.startswith("cuda:") and dev[5:].isdigit()),
           "device", dev, "auto, cpu, cuda or cuda:N")
    for name in ("epochs", "batch_size", "pr_bottleneck_dim", "pr_hidden_dim", "global_crops",
                 "log_every"):
        _check(getattr(cfg, name) >= 1, name, getattr(cfg, name), ">= 1")
    for name in ("pr_hidden_layers", "local_crops", "eval_every", "stop_at_step", "seed",
                 "memory_size", "profile_steps"):
        _check(getattr(cfg, name) >= 0, name, getattr(cfg, name), ">= 0")
    _check(cfg.batch_size >= 2, "batch_size", cfg.batch_size, ">= 2 (BatchNorm needs 2 images)")
    _check(cfg.checkpoint_every_min >= 0, "checkpoint_every_min", cfg.checkpoint_every_min,
           ">= 0")
    _check(cfg.keep_checkpoints >= 1, "keep_checkpoints", cfg.keep_checkpoints, ">= 1")
    _check(cfg.num_workers >= -1, "num_workers", cfg.num_workers, ">= 0, or -1 for auto")
    _check(cfg.lr > 0, "lr", cfg.lr, "> 0")
    _check(0 <= cfg.min_lr <= cfg.lr, "min_lr", cfg.min_lr, f"in [0, lr={cfg.lr}]")
    _check(cfg.weight_decay >= 0, "weight_decay", cfg.weight_decay, ">= 0")
    _check(0 <= cfg.momentum < 1, "momentum", cfg.momentum, "in [0, 1)")
    _check(0 <= cfg.warmup_epochs <= cfg.epochs, "warmup_epochs", cfg.warmup_epochs,
           f"in [0, epochs={cfg.epochs}]")
    _check(cfg.clf_tau > 0, "clf_tau", cfg.clf_tau, "> 0")
    _check(0 <= cfg.ema_momentum <= 1, "ema_momentum", cfg.ema_momentum, "in [0, 1]")
    _check(cfg.global_size >= 16, "global_size", cfg.global_size, ">= 16")
    _check(16 <= cfg.local_size <= cfg.global_size, "local_size", cfg.local_size,
           f"in [16, global_size={cfg.global_size}]")
    for name in ("global_scale", "local_scale"):
        lo, hi = getattr(cfg, name)
        _check(0 < lo <= hi <= 1, name, (lo, hi), "min,max with 0 < min <= max <= 1")
    _check(cfg.memory_size == 0 or cfg.memory_size >= cfg.batch_size, "memory_size",
           cfg.memory_size, f"0 or >= the global batch (batch_size={cfg.batch_size} x processes)")
    _check(cfg.clip_grad >= 0, "clip_grad", cfg.clip_grad, ">= 0 (0 = no clipping)")
    _check(0 <= cfg.drop_path < 1, "drop_path", cfg.drop_path, "in [0, 1)")
    sizes = (cfg.global_size, cfg.local_size) if cfg.local_crops else (cfg.global_size,)
    try:  # last: a timm model is checked at the crop sizes, on the meta device
        check_backbone(cfg.arch, BackboneOptions.of(cfg), sizes)
    except ArchError as e:
        raise ConfigError(str(e)) from None
    return cfg


def default_preset(data: str) -> str:
    """No data means the built-in demo dataset, which only the demo preset suits."""
    return "trex" if data else "demo"


def make_config(preset: str | None = None, **flags) -> Config:
    """Preset defaults, then explicit flags; unknown names and bad values raise ConfigError."""
    if preset is None:
        preset = default_preset(flags.get("data", ""))
    _check_choice("preset", preset, tuple(PRESETS))
    check_names(flags, FIELDS, ConfigError)
    values = {**PRESETS[preset], **flags}
    values = {name: _coerce(name, value) for name, value in values.items()}
    return validate(Config(preset=preset, **values))


RECIPE_GLOBAL_BATCH = 256  # images per step: 4 GPUs x 64 in the reference (RECIPE.md)
RECIPE_PRESETS = ("trex", "trex_star", "plain")  # the recipe's presets; demo is not the recipe


def global_batch(cfg: Config, world_size: int) -> int:
    """Images per optimisation step over all processes (--batch_size is per process)."""
    return cfg.batch_size * world_size


def check_world(cfg: Config, world_size: int) -> None:
    """Checks that need the number of processes (known only after torchrun starts us)."""
    total = global_batch(cfg, world_size)
    _check(cfg.memory_size == 0 or cfg.memory_size >= total, "memory_size",
           cfg.memory_size, f"0 or >= the global batch {total} "
           f"(batch_size={cfg.batch_size} x {world_size} processes)")


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def help_text() -> str:
    """One line per flag, for the CLI's --help (preset's default depends on --data)."""
    return flags_help(Config, hidden_defaults=("preset",))
