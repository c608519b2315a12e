"""Project exceptions. Each message names the object (table, column, offset, file) and says what to do."""


class PlatformError(Exception):
    """Base class of every error the platform raises on purpose."""


class DatasetError(PlatformError):
    """The raw data set is missing, unreachable or fails its integrity check (row, user or item counts)."""


class TableNotFoundError(PlatformError):
    """A Delta or Parquet table that a step reads has not been written yet."""

    def __init__(self, table: str, path: str, producer: str) -> None:
        super().__init__(f"table {table!r} not found at {path}; run {producer} first")
        self.table, self.path, self.producer = table, path, producer


class VocabularyError(PlatformError):
    """An id or index does not fit the vocabulary the model was built with."""


class EventError(PlatformError, ValueError):
    """A raw event is malformed. ``reason`` is the short code written to the quarantine table."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


class DeviceUnavailableError(PlatformError):
    """A run asked for a device (``use_gpu``) that this process or cluster cannot give it."""

    def __init__(self, cause: str, fix: str) -> None:
        super().__init__(f"use_gpu=True (RECSYS_TRAIN__USE_GPU / --use-gpu) but {cause}; {fix}")
        self.cause, self.fix = cause, fix


class ConfigError(PlatformError, ValueError):
    """The configuration cannot be read: a ``RECSYS_*`` environment variable or the YAML file (``RECSYS_CONFIG``)
    names an unknown key, holds a value of the wrong type, is not a mapping, or the file is missing.

    ``source`` names where the value came from (``environment variable RECSYS_...`` or ``configuration file
    <path>, line N``), ``problem`` what is wrong, ``fix`` what to do; ``also`` holds further problems found in the
    same read, one line each in the message.
    """

    def __init__(self, source: str, problem: str, fix: str, also: tuple["ConfigError", ...] = ()) -> None:
        super().__init__("\n".join([f"{source}: {problem}; {fix}", *(str(e) for e in also)]))
        self.source, self.problem, self.fix, self.also = source, problem, fix, also
