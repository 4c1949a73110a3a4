"""One hierarchy of errors a person can act on.

Every error names what failed, where (recipe path, module name, file), the value received and what to
do. The CLI prints these as one clean block and exits with ``exit_code``: 2 for problems with what the
user gave (recipe, arguments, files), 1 for failures while running. Anything that is not a
``CompressError`` is a bug in compress and keeps its traceback.
"""

from __future__ import annotations

from dataclasses import dataclass


def listed(problems: list[str], limit: int = 5) -> str:
    """``problems`` for a message: the first ``limit`` joined by semicolons, then how many more there are."""
    return "; ".join(problems[:limit]) + (f"; and {len(problems) - limit} more" if len(problems) > limit else "")


class CompressError(Exception):
    """Base of every error compress raises on purpose."""

    exit_code = 1


class UsageError(CompressError):
    """Something the user gave (a path, a flag, a file) cannot be used."""

    exit_code = 2


class DataError(UsageError):
    """Calibration or evaluation data that cannot be read or is too small."""


class PluginError(UsageError):
    """A method that is unknown, or installed but failing to import."""


class CheckpointError(CompressError):
    """A checkpoint that cannot be written or read back."""

    exit_code = 2


class CalibrationError(CompressError):
    """A failure while compressing with calibration data (numerics, memory, shapes)."""


@dataclass(frozen=True)
class Problem:
    """One problem found in a recipe: where (a path such as ``stages[0].steps[1].args.bits``) and what."""

    where: str
    message: str

    def __str__(self) -> str:
        return f"{self.where}: {self.message}" if self.where else self.message


class RecipeError(UsageError):
    """A recipe with one or more problems; all of them are listed at once."""

    def __init__(self, problems: list[Problem], source: str = "recipe"):
        self.problems = list(problems)
        self.source = source
        count = len(self.problems)
        head = f"{source}: {count} problem{'s' if count != 1 else ''}"
        super().__init__(head + "\n" + "\n".join(f"  {p}" for p in self.problems))
