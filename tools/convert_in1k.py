"""Convert an ImageFolder-layout ImageNet into FFCV .beton files and DALI webdataset shards.

    python tools/convert_in1k.py --src=/data/imagenet --dst=/data/in1k_500

One pass decodes and re-encodes each image once, in parallel, and both formats store the result.
Killed at any point, the same command resumes; see docs/CONVERT.md for outputs and guarantees.
"""
from __future__ import annotations

import dataclasses
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipelines.convert.convert import convert  # noqa: E402
from pipelines.convert.options import ConvertError, ConvertOptions, make_options  # noqa: E402
from pipelines.convert.verify import verify as verify_outputs  # noqa: E402
from pipelines.errors import BadFileError  # noqa: E402
from trex_fast.cli import command, run_cli  # noqa: E402

PROGRAM = "convert_in1k"


def convert_in1k(raw: ConvertOptions) -> None:
    """Validate the options (make_options, the converter's own checks), convert, verify."""
    opts = make_options(**dataclasses.asdict(raw))
    try:
        convert(opts)
    except KeyboardInterrupt:
        print(f"\n{PROGRAM}: interrupted; rerun the same command to resume", file=sys.stderr)
        sys.exit(130)
    if opts.verify:
        problems = verify_outputs(opts)
        for line in problems:
            print(f"verify: {line}")
        print(f"verify: {'FAILED' if problems else 'OK'} ({opts.dst})")
        if problems:
            sys.exit(1)


# BadFileError: an unreadable <dst>/meta.json
main = command(ConvertOptions, convert_in1k, PROGRAM,
               "Convert <src>/{train,val} into <dst>/{train,val}.beton, <dst>/dali/ and "
               "<dst>/meta.json.", (ConvertError, BadFileError))

if __name__ == "__main__":
    run_cli(main)
