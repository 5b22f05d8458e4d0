"""Exceptions raised by fmcib; all derive from FmcibError."""

from __future__ import annotations

__all__ = [
    "FmcibError",
    "TableError",
    "ImageReadError",
    "SeedError",
    "WeightsError",
    "UnknownModelError",
]


class FmcibError(Exception):
    """Base class of every error fmcib raises on purpose.

    ``cli`` is the same message for command-line users, where it differs (options named as flags,
    ``--coords ras``, instead of Python keywords); the ``fmcib`` command prints it.
    """

    def __init__(self, message: str = "", cli: str | None = None) -> None:
        super().__init__(message)
        self.cli = cli

    def __reduce__(self) -> tuple[type, tuple[str, str | None]]:
        # keep ``cli`` when an error travels between processes (a torchrun rank reports it to the others)
        return type(self), (str(self), self.cli)


class TableError(FmcibError, ValueError):
    """The seeds table is unusable as a whole (missing columns, unreadable file)."""


class ImageReadError(FmcibError, OSError):
    """An image or DICOM series could not be read, or is not a 3D scalar volume."""


class SeedError(FmcibError, ValueError):
    """A seed point is missing, not finite, or lies outside its image."""


class WeightsError(FmcibError, RuntimeError):
    """Weights could not be found, downloaded, verified or loaded strictly."""


class UnknownModelError(FmcibError, ValueError):
    """A model name is not in the registry."""
