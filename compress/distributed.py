"""Several processes of one run (``accelerate launch`` or ``torchrun``): which one this is, and what only one does.

A launcher starts the same command in every process and says which is which through the environment (``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``). Every process compresses the model the same way and takes its share of each
training batch (:mod:`compress.trainer`); only the main process (rank 0) writes checkpoints, prints and logs what
goes well, so an output is written once and a crash of any process leaves the output as it was.
"""

from __future__ import annotations

import os


def _env(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    return int(value) if value.strip().isdigit() else default


def rank() -> int:
    """This process's place among the run's processes (0 without a launcher)."""
    return _env("RANK", 0)


def world_size() -> int:
    """How many processes run this command (1 without a launcher)."""
    return _env("WORLD_SIZE", 1)


def local_rank() -> int:
    """This process's place among those on this machine: the GPU it uses."""
    return _env("LOCAL_RANK", rank())


def is_main() -> bool:
    """Whether this process writes, prints and logs for the run."""
    return rank() == 0


def process_device(name: str) -> str:
    """``cuda`` without an index means this process's own GPU (``cuda:LOCAL_RANK``) when several processes run."""
    if name == "cuda" and world_size() > 1:
        return f"cuda:{local_rank()}"
    return name


def describe() -> str:
    """``process 2 of 4``, for messages of a process other than the main one."""
    return f"process {rank()} of {world_size()}"
