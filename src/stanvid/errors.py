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
