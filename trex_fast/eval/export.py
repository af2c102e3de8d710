"""A checkpoint's backbone as a torchvision state_dict (`python -m trex_fast.eval export`).

The file itself is written by trex_fast.models.weights.export_backbone, the one home of the
backbone file formats; this module only resolves the architecture.
"""
from __future__ import annotations

from dataclasses import dataclass

from trex_fast.checkpoint import load_checkpoint
from trex_fast.cli import flag, required
from trex_fast.eval.features import trust_help
from trex_fast.models.weights import export_backbone


@dataclass(frozen=True)
class ExportSettings:
    """`python -m trex_fast.eval export`: its flags."""
    checkpoint: str = required("a trex_fast checkpoint.pt (or any backbone file trex_fast "
                               "reads)")
    out: str = required("the .pth to write; loads into torchvision.models.<arch>() with only fc "
                        "missing")
    arch: str = flag("", "the architecture; default: the one recorded in the checkpoint")
    trust_file: bool = flag(False, trust_help("--checkpoint"))


def export(s: ExportSettings) -> dict:
    """Write the backbone; returns {'path': the file written, 'arch': its architecture}."""
    arch = s.arch or load_checkpoint(s.checkpoint, s.trust_file,
                                     flag="--checkpoint")["config"]["arch"]
    return {"path": export_backbone(s.checkpoint, s.out, arch, s.trust_file), "arch": arch}
