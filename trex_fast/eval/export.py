"""`python -m trex_fast.eval export`: weights users can share (issue #24): a backbone as
`model.safetensors`, and a folder with
`config.json`, `model.safetensors` and a `README.md` model card (`export --format=hf`).

The tensors are the registry's backbone (trex_fast.models.registry): they load into
`timm.create_model(name)` for `timm/<name>`, or into `torchvision.models.<arch>()` for a ResNet,
with only the classifier head missing. The model card states the arch, the recipe knobs, the
epochs trained, the IN1K top-1 with the training head (metrics.jsonl of the run) and the
transfer results (a transfer.json of `python -m trex_fast.eval transfer`) when the run has
them, and the paper's citation.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch

from pipelines import atomic
from trex_fast.checkpoint import load_checkpoint
from trex_fast.cli import check_choice, flag, required
from trex_fast.eval.features import trust_help
from trex_fast.models.net import build_backbone
from trex_fast.models.registry import TIMM_PREFIX, head_prefix
from trex_fast.models.weights import SAFETENSORS, backbone_state, export_backbone
from trex_fast.runlog import in1k_head_top1

FORMATS = ("auto", "safetensors", "pth", "hf")
CITATION = """@inproceedings{sariyildiz2023trex,
  title     = {No Reason for No Supervision: Improved Generalization in Supervised Models},
  author    = {Sariyildiz, Mert Bulent and Kalantidis, Yannis and Alahari, Karteek and
               Larlus, Diane},
  booktitle = {International Conference on Learning Representations (ICLR)},
  year      = {2023}
}"""
# the Config knobs a model card lists as the recipe
RECIPE_KNOBS = ("preset", "optimizer", "lr", "weight_decay", "warmup_epochs", "batch_size",
                "drop_path", "clip_grad", "global_pool", "pr_hidden_layers", "pr_hidden_dim",
                "pr_bottleneck_dim", "memory_size", "clf_tau", "ema_momentum", "global_crops",
                "local_crops", "global_size", "local_size", "global_scale", "local_scale")


class ExportError(ValueError):
    """A bad export request; the message names the flag and what is accepted."""


def resolve_format(fmt: str, out: str) -> str:
    """auto: a torch file for an out ending in .pth / .pt, safetensors otherwise."""
    check_choice("format", fmt, FORMATS, ExportError)
    if fmt != "auto":
        return fmt
    return "pth" if out.endswith((".pth", ".pt")) else "safetensors"


def write_safetensors(state: dict[str, torch.Tensor], path: str, arch: str) -> str:
    """The backbone's tensors as one safetensors file (atomically), the arch in its metadata."""
    from safetensors.torch import save

    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    atomic.write_bytes(path, save(tensors, metadata={"format": "pt", "arch": arch}))
    return path


# ---------------------------------------------------------------------------------------------
# the hf folder
# ---------------------------------------------------------------------------------------------
def _transfer_report(path: str) -> dict | None:
    path = os.path.join(path, "transfer.json") if os.path.isdir(path) else path
    if not path or not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def run_facts(ckpt: dict, run_dir: str, transfer: str = "") -> dict:
    """What the model card states, from a checkpoint and the run folder it sits in: the config,
    epochs and step, the IN1K top-1 with the training head (runlog.in1k_head_top1: final.json's
    fp32 figure, else the last epoch's), and the transfer report (the
    --transfer file or folder, else <run_dir>/transfer/transfer.json) when there is one."""
    cfg = ckpt["config"]
    return {"arch": cfg["arch"], "epochs": ckpt["epoch"], "step": ckpt["step"],
            "recipe": {k: cfg[k] for k in RECIPE_KNOBS if k in cfg},
            "in1k_top1": in1k_head_top1(run_dir),
            "transfer": _transfer_report(transfer or os.path.join(run_dir, "transfer"))}


def hf_config(facts: dict, feature_dim: int) -> dict:
    """config.json: timm's hub fields (architecture, num_features, global_pool) for a timm
    model, the library and head for any, and the run's facts."""
    arch = facts["arch"]
    library = "timm" if arch.startswith(TIMM_PREFIX) else "torchvision"
    pool = facts["recipe"].get("global_pool", "default")
    config = {"architecture": arch.removeprefix(TIMM_PREFIX), "library": library,
              "num_classes": 0, "num_features": feature_dim, "missing_head": head_prefix(arch),
              "trex_fast": facts}
    if pool != "default":
        config["global_pool"] = pool
    return config


def _transfer_lines(report: dict | None) -> list[str]:
    if not report:
        return ["Transfer: not evaluated for this run."]
    lines = ["| dataset | top-1 (%) |", "|---|---|"]
    lines += [f"| {r['dataset']} | {r['top1_mean']:.2f} |" for r in report["datasets"]]
    if report.get("log_odds_mean") is not None:
        lines.append(f"\nMean transfer log-odds: {report['log_odds_mean']:.3f}")
    return lines


def _load_lines(arch: str) -> list[str]:
    if arch.startswith(TIMM_PREFIX):
        make = f'timm.create_model("{arch.removeprefix(TIMM_PREFIX)}", num_classes=0)'
        return ["import timm", "from safetensors.torch import load_file", "",
                f"model = {make}", 'model.load_state_dict(load_file("model.safetensors"))']
    return ["import torchvision", "from safetensors.torch import load_file", "",
            f"model = torchvision.models.{arch}()",
            'model.load_state_dict(load_file("model.safetensors"), strict=False)  # fc missing']


def model_card(facts: dict) -> str:
    """README.md of the hf folder."""
    arch, recipe = facts["arch"], facts["recipe"]
    in1k = facts["in1k_top1"]
    knobs = "\n".join(f"- {k}: {v}" for k, v in recipe.items())
    return "\n".join([
        "---", "tags: [image-classification, t-rex, trex_fast]", "---",
        f"# {arch}, trained with the t-ReX recipe", "",
        "A backbone trained by trex_fast with t-ReX's multi-crop, expendable projector and "
        "memory-bank class prototypes (Sariyildiz et al., ICLR 2023). The projector and the "
        "prototypes are not included: the file holds the backbone only.", "",
        f"- arch: {arch}", f"- epochs: {facts['epochs']} ({facts['step']} steps)",
        "- IN1K val top-1 with the training head: "
        + (f"{in1k:.2f} %" if in1k is not None else "not evaluated"), "",
        "## Recipe", knobs, "", "## Transfer", *_transfer_lines(facts["transfer"]), "",
        "## Load", "```python", *_load_lines(arch), "```", "",
        "## Citation", "```bibtex", CITATION, "```", ""])


def write_hf(folder: str, state: dict[str, torch.Tensor], facts: dict, feature_dim: int) -> str:
    """The shareable folder: config.json, model.safetensors, README.md (each file atomic)."""
    os.makedirs(folder, exist_ok=True)
    write_safetensors(state, os.path.join(folder, SAFETENSORS), facts["arch"])
    atomic.write_json(os.path.join(folder, "config.json"), hf_config(facts, feature_dim))
    atomic.write_bytes(os.path.join(folder, "README.md"), model_card(facts).encode())
    return folder


def export_weights(checkpoint: str, out: str, arch: str = "", fmt: str = "auto",
                   transfer: str = "", trust_file: bool = False) -> tuple[str, str, str]:
    """`python -m trex_fast.eval export`: the checkpoint's backbone written as `fmt` at `out`;
    arch defaults to the checkpoint's. Returns (path written, arch, format)."""
    fmt = resolve_format(fmt, out)
    ckpt = load_checkpoint(checkpoint, trust_file, flag="--checkpoint") if (
        fmt == "hf" or not arch) else None
    arch = arch or ckpt["config"]["arch"]
    if fmt == "pth":
        return export_backbone(checkpoint, out, arch, trust_file), arch, fmt
    state = backbone_state(checkpoint, arch, trust_file)
    if fmt == "safetensors":
        return write_safetensors(state, out, arch), arch, fmt
    facts = run_facts(ckpt, os.path.dirname(os.path.abspath(checkpoint)), transfer)
    return write_hf(out, state, facts, build_backbone(arch)[1]), arch, fmt


@dataclass(frozen=True)
class ExportSettings:
    """`python -m trex_fast.eval export`: its flags."""
    checkpoint: str = required("a trex_fast checkpoint.pt (or any backbone file trex_fast "
                               "reads)")
    out: str = flag("model.safetensors", "the file (safetensors, pth) or folder (hf) to write; "
                    "loads into timm.create_model(<name>) or torchvision.models.<arch>() with "
                    "only the head missing")
    arch: str = flag("", "the architecture; default: the one recorded in the checkpoint")
    format: str = flag("auto", "auto (pth for an --out ending in .pth/.pt, else safetensors), "
                       "safetensors, pth, or hf (a folder: config.json, model.safetensors, "
                       "README.md model card)")
    transfer: str = flag("", "hf: the transfer.json (or its folder) whose results the model "
                         "card states; default: <run>/transfer/transfer.json when present")
    trust_file: bool = flag(False, trust_help("--checkpoint"))


def export(s: ExportSettings) -> dict:
    """Write the backbone; returns {'path': what was written, 'arch': ..., 'format': ...}."""
    written, arch, fmt = export_weights(s.checkpoint, s.out, s.arch, s.format, s.transfer,
                                        s.trust_file)
    return {"path": written, "arch": arch, "format": fmt}
