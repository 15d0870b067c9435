"""Errors a user can cause. The CLI catches :class:`ProtT5nvError` once and prints one line (exit 2)."""

from __future__ import annotations


class ProtT5nvError(Exception):
    """Base class of every error caused by input, configuration or files rather than by a bug."""


class InvalidSequenceError(ProtT5nvError, ValueError):
    """A sequence or FASTA record breaks the input policy (bad character, empty, duplicate id...). Where
    they are known, `record` (the id) and `position` (1-based residue) say where, for callers that report
    them as fields (the server) rather than reading them back from the message."""

    def __init__(self, message: str, *, record: str | None = None, position: int | None = None) -> None:
        super().__init__(message)
        self.record, self.position = record, position


class FastaFormatError(InvalidSequenceError):
    """The file is not FASTA (no header, sequence before the first header, no records)."""


class SequenceTooLongError(InvalidSequenceError):
    """One or more sequences exceed the model's maximum length under the `refuse` policy."""


class InputFileError(ProtT5nvError):
    """An input file cannot be opened (missing, a directory, no permission) or read to its end (truncated
    or damaged gzip data: the message names the line where the data ends)."""


class CheckpointError(ProtT5nvError):
    """A checkpoint cannot be found, read, or represented by this package."""


class ConfigError(ProtT5nvError, ValueError):
    """Inconsistent or unknown configuration settings."""


class StoreError(ProtT5nvError):
    """A data directory is missing, incomplete (interrupted preprocess) or inconsistent."""


class OutputError(ProtT5nvError):
    """An output that must not be written (it exists, or is an input) or cannot be (unwritable place)."""
