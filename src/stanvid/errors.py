"""Exceptions that stanvid raises for bad input.

Every one of them carries the file, key or field that is wrong in its message, so the CLI can print
the message alone (no traceback) and a library user can catch the specific kind.
"""


class StanvidError(Exception):
    """Base class: an input mistake the user can fix (the CLI prints the message without a traceback)."""


class ConfigError(StanvidError, ValueError):
    """A config value or key is invalid; the message names the field and the valid choices."""


class CheckpointError(StanvidError):
    """A checkpoint's keys or shapes do not fit the model; lists unmapped, missing and mis-shaped keys."""


class VideoReadError(StanvidError):
    """A video cannot be read (missing, empty, truncated, not a video, index out of range)."""


class DatasetError(StanvidError):
    """An annotation file is malformed: missing field, unknown video id, empty caption (names file and line)."""


class LockHeldError(StanvidError):
    """Another live process holds a folder's lock (`stanvid.locking`); the message names it."""


class VideoIndexError(StanvidError):
    """The index is missing, damaged, was built differently (model, root, segments), or a query does not fit it."""


class IndexedFileError(VideoIndexError):
    """An indexed video is gone (`gone`) or is no longer the file that was indexed (replaced, turned into a
    directory, a symbolic link now pointing elsewhere). The message names the file relative to the folder."""

    def __init__(self, message: str, gone: bool) -> None:
        super().__init__(message)
        self.gone = gone


class QueryError(VideoIndexError):
    """A query that cannot be answered: an unreadable image, a bad span, a bad weight, an unknown segment."""


class EmbedError(StanvidError):
    """A bad output path or format for `embed_videos`."""


class ClassifyError(StanvidError):
    """Bad labels, templates, inputs or output path for `classify`."""


class NonFiniteLossError(StanvidError, FloatingPointError):
    """A training loss came out NaN or infinite (fp32 or bf16, where no loss scaler can skip the step); the
    training loop names the step and the batch's video files, and leaves the last checkpoint as it was."""
