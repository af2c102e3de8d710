"""Every way a source file can be unusual, and what the converter does about it.

Real ImageNet holds CMYK and grayscale JPEGs, a PNG saved with a .JPEG name, images far larger
than any training crop, and downloads can add truncated, empty or unreadable files. Each case
is one `kind` below; every affected file gets one `Issue` per kind in meta.json and in the
printed summary, so nothing is dropped or altered silently.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

SKIPPED = "skipped"  # not in the outputs
REPAIRED = "repaired"  # in the outputs after a fix (colour conversion, rotation, ...)
NOTED = "noted"  # in the outputs unchanged apart from the usual resize

TINY_SIDE = 32  # px; a shorter side below this is noted (such images exist in ImageNet)
HUGE_PIXELS = 25_000_000  # above this an image is noted; JPEGs decode at reduced DCT scale

# kind -> (action, what it means); the single home of these descriptions.
KINDS: dict[str, tuple[str, str]] = {
    "empty": (SKIPPED, "zero-byte file"),
    "unreadable": (SKIPPED, "the file cannot be opened or read (permissions, I/O error)"),
    "not_image": (SKIPPED, "the bytes are not an image format Pillow recognises"),
    "truncated": (SKIPPED, "the image data ends early (incomplete download)"),
    "decode_error": (SKIPPED, "the decoder failed for another reason"),
    "too_large": (SKIPPED, "more pixels than the decoder limit, even at reduced DCT scale"),
    "ignored_extension": (SKIPPED, "not an image extension torchvision's ImageFolder accepts"),
    "outside_class": (SKIPPED, "a file directly in the split folder, outside any class folder"),
    "no_label": (SKIPPED, "flat val image without a row in --val_labels"),
    "unknown_class": (SKIPPED, "its label names a class that is not a train/ folder"),
    "wrong_extension": (REPAIRED, "another format saved under this name; decoded as what it is"),
    "cmyk": (REPAIRED, "CMYK image converted to RGB"),
    "grayscale": (REPAIRED, "single-channel image replicated to RGB"),
    "palette": (REPAIRED, "palette image converted to RGB"),
    "alpha": (REPAIRED, "alpha channel dropped (as torchvision's PIL loader does)"),
    "16bit": (REPAIRED, "16-bit samples scaled to 8 bits"),
    "other_mode": (REPAIRED, "unusual pixel mode converted to RGB"),
    "exif_rotated": (REPAIRED, "EXIF orientation applied to the pixels, then the tag dropped"),
    "tiny": (NOTED, f"shorter side below {TINY_SIDE} px; kept as is"),
    "huge": (NOTED, f"more than {HUGE_PIXELS:,} pixels; kept, resized like any image"),
}


@dataclass(frozen=True)
class Issue:
    """One unusual property of one source file."""

    split: str
    path: str  # relative to --src, '/'-separated
    kind: str
    detail: str = ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown issue kind {self.kind!r}; known: {sorted(KINDS)}")

    @property
    def action(self) -> str:
        return KINDS[self.kind][0]

    def to_json(self) -> dict:
        return {**asdict(self), "action": self.action}


def skipped_paths(issues: list[Issue]) -> set[tuple[str, str]]:
    """(split, path) of every file that is not in the outputs."""
    return {(i.split, i.path) for i in issues if i.action == SKIPPED}
