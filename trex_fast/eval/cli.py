"""`python -m trex_fast.eval <command>`: evaluate backbones (RECIPE.md "Evaluation").

    in1k    top-1/top-5 on an ImageFolder val split with the training head of a trex_fast
            checkpoint (Resize + CenterCrop, scaled to the run's global size); for a linear
            probe on frozen features instead: transfer --probe_kind=sgd --datasets=<IN1K root>
    knn     weighted k-NN top-1 (k=20, T=0.07) on frozen L2-normalised backbone features
    transfer  the paper's transfer protocol (Optuna-searched linear probes, seeds averaged) on
            datasets by name in their official layouts or ImageFolder roots: the per-dataset
            top-1 and mean log-odds table, JSON, CSV and the trade-off plot (eval/transfer.py)
    export  a trex_fast checkpoint's backbone as model.safetensors (or .pth), or as a folder
            with config.json and a model card (--format=hf)

Backbones load from trex_fast checkpoints, backbone.pth, torchvision state_dicts or released
files with `module.` / `model.` / `encoder.` prefixes (trex_fast.models.weights). Every file loads
weights-only: one that would run code is refused with a one-line error naming it, unless
--trust_file=True (dangerous: full pickle) is given for a file the user trusts.

Each command is a function of its settings dataclass that returns its result (in1k.py, knn.py,
transfer.py, export.py); this module is the only one that prints them.
"""
from __future__ import annotations

import json

from trex_fast.availability import UnavailableError
from trex_fast.checkpoint import NotACheckpointError
from trex_fast.cli import command, run_cli
from trex_fast.eval.datasets import DatasetNotReady
from trex_fast.eval.export import ExportError, ExportSettings, export
from trex_fast.eval.in1k import In1kSettings, evaluate_in1k
from trex_fast.eval.knn import KnnSettings, evaluate_knn
from trex_fast.eval.report import markdown
from trex_fast.eval.transfer import TransferSettings, evaluate_transfer, summary
from trex_fast.models.registry import ArchError
from trex_fast.safe_load import BadFileError

PROGRAM = "trex_fast.eval"
# A user's error (a refused, unreadable, missing or foreign file, a backbone of another --arch,
# an unusable device, a missing dataset): one line, exit 2.
USER_ERRORS = (BadFileError, FileNotFoundError, NotACheckpointError, UnavailableError,
               DatasetNotReady, ArchError, ExportError)


def _in1k(s: In1kSettings) -> None:
    print(json.dumps(evaluate_in1k(s)))


def _knn(s: KnnSettings) -> None:
    print(json.dumps(evaluate_knn(s)))


def _dataset_done(result: dict) -> None:
    print(f"[transfer] {result['dataset']}: top-1 {result['top1_mean']:.2f} "
          f"+- {result['top1_std']:.2f} over {len(result['top1_per_seed'])} seeds", flush=True)


def _transfer(s: TransferSettings) -> None:
    outcome = evaluate_transfer(s, _dataset_done)
    if outcome.not_plotted:
        print("[transfer] not on the plot (no IN1K top-1; give --in1k_top1 or a JSON with "
              f"in1k_top1): {', '.join(outcome.not_plotted)}", flush=True)
    print(markdown(outcome.report), end="")
    print(f"wrote {', '.join(outcome.paths)}")
    print(json.dumps(summary(outcome.report)))


def _export(s: ExportSettings) -> None:
    result = export(s)
    print(f"wrote {result['path']} ({result['arch']}, {result['format']})")


def _command(settings, run, doc: str):
    return command(settings, run, PROGRAM, doc, USER_ERRORS)


COMMANDS = {
    "in1k": _command(In1kSettings, _in1k, "Top-1/top-5 with the training head (memory "
                     "prototypes or cosine classifier); prints one JSON line."),
    "knn": _command(KnnSettings, _knn, "Weighted k-NN top-1 on frozen backbone features; prints "
                    "one JSON line."),
    "transfer": _command(TransferSettings, _transfer, "The paper's transfer protocol: per "
                         "dataset, frozen 2048-d (pre-projector) features, an Optuna TPE search "
                         "of the linear probe on a 20 % per-class split, a refit on train + val "
                         "scored on test, averaged over seeds; the table, JSON, CSV and "
                         "trade-off plot; the last line is one JSON object."),
    "export": _command(ExportSettings, _export, "Write the backbone of a trex_fast checkpoint "
                       "as shareable weights: model.safetensors, a torch .pth, or an hf folder "
                       "with a model card."),
}


def main(argv: list[str] | None = None) -> None:
    run_cli(COMMANDS, argv)
