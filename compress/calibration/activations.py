"""The calibration activations of the block being compressed: where they live, and how they are split.

A decoder block's calibration inputs are the arguments it is called with, one call per batch. They live on the
execution device when they fit there beside the block's work, and in CPU memory otherwise (each call is moved to
the device when it runs, and its output moved back): :func:`choose_store` decides, and says why in the log. When
the device runs out of memory anyway, :meth:`BlockInputs.halved` gives the same samples in batches half as large,
which the engine retries the block with.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

log = logging.getLogger(__name__)

GiB = 2**30
HEADROOM = 1 * GiB  # left free on the device beyond the estimate (kernels' workspaces, the allocator's slack)
BLOCK_WORK = 4  # the device holds about this many copies of a block while it is compressed (the block, the
#                 uncompressed reference some methods keep, second-moment matrices and solver workspaces)


def moved(value: Any, device: torch.device) -> Any:
    """``value`` (a tensor, or tuples / lists / dicts of them and of other values) with its tensors on ``device``."""
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=True) if value.device != device else value
    if isinstance(value, (tuple, list)):
        return type(value)(moved(v, device) for v in value)
    if isinstance(value, dict):
        return {k: moved(v, device) for k, v in value.items()}
    return value


def _halves(value: Any, batch: int) -> tuple[Any, Any]:
    """``value`` split in two along its batch dimension: a tensor of two or more dimensions whose first is
    ``batch`` is split, anything else (a mask broadcast over the batch, positions, flags) goes to both halves."""
    if isinstance(value, torch.Tensor) and value.dim() >= 2 and value.shape[0] == batch:
        first = (batch + 1) // 2
        return value[:first], value[first:]
    if isinstance(value, (tuple, list)):
        pairs = [_halves(v, batch) for v in value]
        return type(value)(a for a, _ in pairs), type(value)(b for _, b in pairs)
    if isinstance(value, dict):
        pairs = {k: _halves(v, batch) for k, v in value.items()}
        return {k: a for k, (a, _) in pairs.items()}, {k: b for k, (_, b) in pairs.items()}
    return value, value


def _bytes(value: Any, seen: set[int] | None = None) -> int:
    """The bytes of the distinct tensors in ``value``."""
    seen = set() if seen is None else seen
    if isinstance(value, torch.Tensor):
        key = value.untyped_storage().data_ptr()
        if key in seen:
            return 0
        seen.add(key)
        return value.untyped_storage().nbytes()
    if isinstance(value, (tuple, list)):
        return sum(_bytes(v, seen) for v in value)
    if isinstance(value, dict):
        return sum(_bytes(v, seen) for v in value.values())
    return 0


@dataclass
class BlockInputs:
    """The positional and keyword arguments one decoder block is called with, one entry per batch, stored on
    ``store`` (the execution device, or the CPU when they do not fit there)."""

    calls: list[tuple[tuple, dict]]
    hidden_key: int | str = 0  # where the hidden states are: a position in args or a keyword
    store: torch.device = torch.device("cpu")

    def hidden(self, i: int) -> torch.Tensor:
        args, kwargs = self.calls[i]
        return args[self.hidden_key] if isinstance(self.hidden_key, int) else kwargs[self.hidden_key]

    def on(self, device: torch.device, limit: int | None = None) -> Iterator[tuple[tuple, dict]]:
        """The calls (the first ``limit``), each moved to ``device`` as its turn comes."""
        for args, kwargs in self.calls if limit is None else self.calls[:limit]:
            yield moved(args, device), moved(kwargs, device)

    def with_hidden(self, hidden: list[torch.Tensor]) -> BlockInputs:
        """The same calls with new hidden states (the previous block's outputs), kept where these calls are."""
        calls = []
        for (args, kwargs), h in zip(self.calls, hidden):
            h = moved(h, self.store)
            if isinstance(self.hidden_key, int):
                args = args[: self.hidden_key] + (h,) + args[self.hidden_key + 1 :]
            else:
                kwargs = {**kwargs, self.hidden_key: h}
            calls.append((args, kwargs))
        return BlockInputs(calls, self.hidden_key, self.store)

    @property
    def tokens(self) -> int:
        return sum(self.hidden(i).shape[0] * self.hidden(i).shape[1] for i in range(len(self.calls)))

    @property
    def batch(self) -> int:
        """The most samples in one call."""
        return max(self.hidden(i).shape[0] for i in range(len(self.calls)))

    @property
    def nbytes(self) -> int:
        return _bytes(self.calls)

    def halved(self) -> BlockInputs:
        """The same samples in the same order, each call of two or more samples split in two."""
        calls = []
        for i, call in enumerate(self.calls):
            batch = self.hidden(i).shape[0]
            calls.extend(_halves(call, batch) if batch > 1 else [call])
        return BlockInputs(calls, self.hidden_key, self.store)


def choose_store(setting: str, device: torch.device, first_call: tuple[tuple, dict], calls: int, copies: int,
                 block: nn.Module) -> torch.device:
    """Where the calibration activations live: ``setting`` ``device`` or ``cpu`` as asked; ``auto``: on ``device``
    when ``copies`` copies of ``calls`` calls like ``first_call`` fit in its free memory beside the work on a block
    like ``block``, else in CPU memory. The choice is logged with its figures."""
    if device.type == "cpu" or setting == "device":
        return device
    if setting == "cpu":
        log.info("calibration activations are kept in CPU memory (calibration.activations: cpu)")
        return torch.device("cpu")
    need = _bytes(first_call) * calls * copies
    free, _ = torch.cuda.mem_get_info(device)
    free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)  # torch's cache is free too
    block_bytes = sum(t.numel() * t.element_size() for t in (*block.parameters(), *block.buffers()))
    room = free - BLOCK_WORK * block_bytes - HEADROOM
    if need <= room:
        log.info("calibration activations (%.2f GiB) are kept on %s (%.1f GiB free)", need / GiB, device, free / GiB)
        return device
    log.warning("calibration activations (%.2f GiB) do not fit on %s beside a block's work (%.1f GiB free, about "
                "%.1f GiB of it for the block): they are kept in CPU memory and each batch is moved as it runs, "
                "which is slower; fewer calibration samples or a shorter seq_len keep them on the device",
                need / GiB, device, free / GiB, (BLOCK_WORK * block_bytes + HEADROOM) / GiB)
    return torch.device("cpu")
