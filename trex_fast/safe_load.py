"""The one way trex_fast reads a torch file back: weights-only, unless the user trusts the file.

torch.load(weights_only=False) is Python's pickle: a crafted file runs arbitrary code the
moment it is opened (issue #18). Every reader (checkpoints, backbones, the feature cache) goes
through `load_file`, which unpickles with torch's weights-only unpickler: tensors, containers,
numbers, strings and the few extra classes a reader allows for the duration of that one load.
A file that needs any other global is refused before anything in it is built, with a one-line
`UnsafeFileError` that names the file and the globals. `trust_file=True` (the `--trust_file`
flag) is the old full-pickle load, for a file the user trusts. An empty, truncated or foreign
file is an `UnreadableFileError`, one line naming it; both are `BadFileError`s, the class the
command lines report in one line.
"""
from __future__ import annotations

import argparse
import os
import pickle
import pickletools
import re
import sys

import torch

from pipelines.errors import BadFileError

# The authors' t-ReX release: the ResNet-50 files are plain state_dicts (no global beyond
# torch's own); the full checkpoints are {"model", "optimizer", "epoch", "args",
# "fp16_scaler"?} where args is the training script's argparse.Namespace, whose values are
# strings, numbers, booleans, lists and None (no global either).
RELEASE_GLOBALS: tuple = (argparse.Namespace,)

_TRUST_HINT = ("if you trust this file, --trust_file=True loads it with full pickle (which can "
               "run code)")


class UnsafeFileError(BadFileError):
    """A file needs globals a weights-only load does not allow; one line naming file and globals."""


class UnreadableFileError(BadFileError):
    """A file that is empty, truncated or not a torch file at all."""


def _unsafe_globals(path: str) -> list[str]:
    """The globals of a torch.save zip file outside the allowed set (a static scan of the
    pickle opcodes: nothing is built). Empty for the legacy format, which cannot be scanned."""
    try:
        return sorted(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except (ValueError, RuntimeError):  # not a zip archive: the unpickler below decides
        return []


def _reason(error: pickle.UnpicklingError) -> str:
    """The useful part of torch's weights-only error: the global it refused, when named."""
    text = str(error)
    named = re.search(r"GLOBAL (\S+) was not an allowed global", text)
    if named:
        return f"it needs the Python global {named.group(1)}"
    called = re.search(r"unrecognized function (.+?)(?: which belongs|$)", text, re.MULTILINE)
    if called:
        return f"it calls {called.group(1)}"
    detail = text.split("WeightsUnpickler error:")[-1].strip().splitlines()
    return detail[0] if detail else "the weights-only unpickler refused it"


def _refusal(path: str, reason: str) -> UnsafeFileError:
    return UnsafeFileError(f"{path}: refused to load: {reason}, which weights-only loading does "
                           f"not allow (a crafted file runs code this way); {_TRUST_HINT}")


def _unreadable(path: str, error: Exception) -> UnreadableFileError:
    """What torch.load raises for a cut or foreign file (EOFError, a miniz RuntimeError, a
    KeyError of the unpickler...) as one line naming the file."""
    detail = (str(error).strip().splitlines() or [""])[0].split(". ")[0][:160]
    return UnreadableFileError(
        f"{path}: cannot be read: truncated or not a torch file ({os.path.getsize(path)} bytes; "
        f"{type(error).__name__}{': ' + detail if detail else ''})")


_PICKLE_OPCODES = {ord(op.code) for op in pickletools.opcodes}


def _is_refusal(error: pickle.UnpicklingError) -> bool:
    """The weights-only unpickler's refusal, as opposed to bytes that are no pickle at all
    (its "Unsupported operand" names any byte it does not run, a pickle opcode or not)."""
    text = str(error)
    operand = re.search(r"Unsupported operand (\d+)", text)
    if operand:
        return int(operand.group(1)) in _PICKLE_OPCODES
    return "Weights only load failed" in text


def _torch_load(path: str, weights_only: bool):
    try:
        return torch.load(path, map_location="cpu", weights_only=weights_only)
    except pickle.UnpicklingError as e:
        if weights_only and _is_refusal(e):
            raise _refusal(path, _reason(e)) from None
        raise _unreadable(path, e) from None
    except (EOFError, RuntimeError, KeyError, IndexError, ValueError) as e:
        # (an OSError, e.g. a permission, already names the file and says what is wrong)
        raise _unreadable(path, e) from None


def load_file(path: str, trust_file: bool = False, allowed: tuple = ()):
    """torch.load(path) onto the CPU, weights-only with `allowed` classes (scoped to this load).

    trust_file=True (exactly True: a mistyped flag must not turn the check off) loads with
    full pickle, for a file the user trusts. An empty, truncated or foreign file raises
    UnreadableFileError naming it."""
    if not isinstance(trust_file, bool):
        raise ValueError(f"--trust_file={trust_file!r}: expected True or False")
    if os.path.isfile(path) and os.path.getsize(path) == 0:
        raise UnreadableFileError(f"{path}: cannot be read: the file is empty (0 bytes), not "
                                  "a torch file")
    if trust_file:
        print(f"[trex_fast] warning: --trust_file=True: loading {path} with full pickle",
              file=sys.stderr, flush=True)
        return _torch_load(path, weights_only=False)
    with torch.serialization.safe_globals(list(allowed)):
        unsafe = _unsafe_globals(path)
        if unsafe:  # refuse before the unpickler builds anything
            plural = "s" if len(unsafe) > 1 else ""
            raise _refusal(path, f"it needs the Python global{plural} {', '.join(unsafe)}")
        return _torch_load(path, weights_only=True)
