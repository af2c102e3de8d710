"""meta.json (what was written, from what, with which options) and the printed summary.

meta.json holds nothing that depends on the machine or the clock (no timings, no worker count),
so an interrupted-and-resumed run writes the same bytes as an uninterrupted one.
"""
from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path
from typing import TextIO

from pipelines.errors import BadFileError

from .atomic import write_bytes_atomic
from .issues import KINDS
from .options import TOOL_VERSION, ConvertOptions

SUMMARY_EXAMPLES = 3  # paths printed per issue kind; meta.json lists them all


def output_paths(dst: Path, split: str) -> dict[str, Path]:
    return {"ffcv": dst / f"{split}.beton", "dali": dst / "dali" / split}


def build_meta(opts: ConvertOptions, classes: tuple[str, ...], fingerprint: str,
               splits: dict[str, dict]) -> dict:
    """`splits` maps split -> its done record (counts, issues, shards, page_size)."""
    issues = [issue for record in splits.values() for issue in record["issues"]]
    kinds = Counter(issue["kind"] for issue in issues)
    outputs: dict[str, dict] = {}
    if "ffcv" in opts.formats:
        outputs["ffcv"] = {split: {"file": f"{split}.beton", "page_size": rec["page_size"],
                                   "fields": {"image": "RGBImageField", "label": "IntField"}}
                           for split, rec in splits.items()}
    if "dali" in opts.formats:
        outputs["dali"] = {split: {"dir": f"dali/{split}", "shards": rec["shards"],
                                   "components": {"jpg": "JPEG", "cls": "label, ASCII decimal"}}
                           for split, rec in splits.items()}
    return {
        "tool": "tools/convert_in1k.py",
        "version": TOOL_VERSION,
        "fingerprint": fingerprint,
        "options": opts.output_options(),
        "classes": list(classes),
        "counts": {split: rec["count"] for split, rec in splits.items()},
        "source_counts": {split: rec["source_count"] for split, rec in splits.items()},
        "outputs": outputs,
        "issue_counts": {kind: {"count": kinds[kind], "action": KINDS[kind][0],
                                "meaning": KINDS[kind][1]} for kind in sorted(kinds)},
        "issues": issues,
    }


def write_meta(dst: Path, meta: dict) -> None:
    write_bytes_atomic(dst / "meta.json", (json.dumps(meta, indent=1) + "\n").encode())


def load_meta(dst: Path) -> dict:
    """<dst>/meta.json, the one reader of it; a file that is not the converter's JSON object
    is a BadFileError naming it."""
    path = dst / "meta.json"
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadFileError(f"{path}: not valid JSON ({e}); tools/convert_in1k.py writes it "
                           "last: rerun the conversion") from None
    if not isinstance(meta, dict):
        raise BadFileError(f"{path}: expected the converter's JSON object, found "
                           f"{type(meta).__name__}; rerun tools/convert_in1k.py")
    return meta


def print_summary(meta: dict, dst: Path, out: TextIO | None = None) -> None:
    out = out or sys.stdout  # looked up per call, so redirect_stdout works
    print(f"\n== {dst}", file=out)
    for split, count in meta["counts"].items():
        print(f"{split}: {count} images written of {meta['source_counts'][split]} source files, "
              f"{len(meta['classes'])} classes", file=out)
    if not meta["issues"]:
        print("no unusual files", file=out)
    for kind, info in meta["issue_counts"].items():
        print(f"{info['action']:>8} {info['count']:>6} {kind}: {info['meaning']}", file=out)
        examples = [i for i in meta["issues"] if i["kind"] == kind][:SUMMARY_EXAMPLES]
        for issue in examples:
            detail = f" ({issue['detail']})" if issue["detail"] else ""
            print(f"{'':>16}{issue['path']}{detail}", file=out)
    print(f"all issues: {dst / 'meta.json'}", file=out)
