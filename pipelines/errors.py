"""The error of a file the project cannot use: its message is one line that names the file and
says what is wrong with it. The command lines report it without a traceback (trex_fast's
`BadFileError` is this class, so that pipelines/ needs nothing from trex_fast/)."""
from __future__ import annotations


class BadFileError(ValueError):
    """A data, metadata or weights file that is truncated, malformed or of another kind."""
