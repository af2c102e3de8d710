"""Assemble a TrainState from a Config and its RunPlan: model, EMA, memory, optimiser,
schedule, DDP."""
from __future__ import annotations

import warnings

import torch
import torch.nn as nn

from trex_fast.config import Config
from trex_fast.memory import MemoryBank, make_ema
from trex_fast.models.net import build_model
from trex_fast.optim import LRSchedule, build_optimizer
from trex_fast.plan import RunPlan
from trex_fast.step import TrainState


def set_math_policy() -> dict[str, object]:
    """The fp32 numerics and cuDNN autotuning of CUDA runs, set explicitly (issue #14).

    Process-wide flags, set where the training state is built on a CUDA device:
    - fp32 matmuls stay IEEE fp32. Under bf16/fp16 autocast the network's matmuls run in the
      low precision anyway; the fp32 ones left are the reference loss, the specification that
      the fused kernel (IEEE fp32 dots in fp32 mode) is compared with, and --precision=fp32.
    - fp32 convolutions use TF32 (10-bit mantissa, fp32 range and accumulation), PyTorch's
      default made explicit: they are the bulk of a --precision=fp32 step.
    - cudnn.benchmark: the crop shapes are fixed (G x global_size, L x local_size), so each
      convolution's algorithm is autotuned once, in the first steps, and reused.
    The fp32_precision settings are used where this torch has them (2.14 does), the legacy
    allow_tf32 flags otherwise; both say the same thing. Returns what it set.
    """
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    if hasattr(matmul, "fp32_precision") and hasattr(getattr(cudnn, "conv", None),
                                                     "fp32_precision"):
        matmul.fp32_precision = "ieee"
        cudnn.conv.fp32_precision = "tf32"
    else:
        matmul.allow_tf32 = False
        cudnn.allow_tf32 = True
    cudnn.benchmark = True
    return {"matmul_fp32": "ieee", "conv_fp32": "tf32", "cudnn_benchmark": True}


def build_state(cfg: Config, plan: RunPlan) -> TrainState:
    """The training state of the run `plan` describes (trex_fast.plan), freshly initialised."""
    device, num_classes = plan.torch_device, plan.num_classes
    if device.type == "cuda":
        set_math_policy()
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    online = build_model(cfg, num_classes)
    if plan.sync_bn:
        online = nn.SyncBatchNorm.convert_sync_batchnorm(online)
    memory_format = torch.channels_last if plan.channels_last else torch.contiguous_format
    online = online.to(device, memory_format=memory_format)

    ema, memory = None, None
    if cfg.memory_size > 0:
        ema = make_ema(online)  # an exact copy, outside DDP: no buffer broadcast per step
        generator = torch.Generator().manual_seed(cfg.seed + 1)  # same memory on every rank
        memory = MemoryBank(cfg.memory_size, cfg.pr_bottleneck_dim, num_classes,
                            generator=generator).to(device)

    online_ddp: nn.Module = online
    if plan.world_size > 1:
        device_ids = [device.index] if device.type == "cuda" else None
        with warnings.catch_warnings():  # torch 2.14 deprecates the name; 2.11 lacks the new one
            warnings.filterwarnings("ignore", message=".*broadcast_buffers.*")
            # No buffer broadcast per step: BN statistics are SyncBN's on CUDA and rank-local
            # on CPU; the EMA network and the memory live outside DDP.
            online_ddp = nn.parallel.DistributedDataParallel(online, device_ids=device_ids,
                                                             broadcast_buffers=False)
    if cfg.compile:
        online_ddp = torch.compile(online_ddp)

    return TrainState(
        cfg=cfg, plan=plan, online=online, online_ddp=online_ddp, ema=ema, memory=memory,
        optimizer=build_optimizer(online, cfg),
        scaler=torch.amp.GradScaler(device.type, enabled=plan.precision == "fp16"),
        schedule=LRSchedule.from_plan(cfg, plan),
    )
