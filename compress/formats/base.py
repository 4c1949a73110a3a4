"""What a stored format is: an ``nn.Module`` that replaces a linear layer, owns its storage (its buffers), its
forward, its fusion rule and its exports, and can be built empty from the per-layer scheme a checkpoint records.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from collections.abc import Iterator
from typing import Any, ClassVar

import torch
import torch.nn as nn

from compress.errors import CheckpointError


def learning(*tensors: torch.Tensor) -> bool:
    """Whether autograd wants the gradient of one of ``tensors`` (quantization scales a training stage tunes): the
    fused kernels have no backward pass, so a layer then computes with PyTorch's arithmetic instead."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


@dataclass(frozen=True)
class KernelChoice:
    """How a layer of some format, scheme and shape runs a decode step on CUDA: ``kernel`` names the fast path, or
    is None where the layer falls back to dequantize-then-matmul; ``note`` says why (or what else to know)."""

    kernel: str | None
    note: str = ""


class CompressedLinear(nn.Module, ABC):
    """Base of stored compressed linear layers (the module that replaces an nn.Linear / Conv1D).

    A format is registered under the ``compress.formats`` entry-point group with ``format`` as its name.
    """

    format: ClassVar[str]
    in_features: int
    out_features: int
    #: The fusion rule: whether layers of this format that read the same input may be fused
    #: (``compress.fuse_projections``) by stacking their buffers, because every buffer whose first dimension is
    #: ``out_features`` holds one row an output, in order. Off unless a format says so (a format may store a
    #: weight transposed).
    rows_stack: ClassVar[bool] = False

    @classmethod
    @abstractmethod
    def empty(cls, in_features: int, out_features: int, bias: bool, scheme: dict[str, Any],
              dtype: torch.dtype, device: torch.device | str = "meta") -> CompressedLinear:
        """A layer with the right buffers (unfilled) for ``scheme``, ready for ``load_state_dict``."""

    @abstractmethod
    def scheme(self) -> dict[str, Any]:
        """The per-module entry stored in the checkpoint: enough to rebuild the layer with ``empty``."""

    @classmethod
    def kernel(cls, scheme: dict[str, Any], in_features: int, out_features: int) -> KernelChoice:
        """The decode kernel a layer of ``scheme`` and this shape takes on CUDA (asked at plan time, before any
        weight exists); formats with fast paths override it."""
        return KernelChoice(None, f"format {cls.format!r} has no decode kernel")

    @classmethod
    def storage_note(cls, scheme: dict[str, Any], in_features: int, out_features: int) -> str | None:
        """Anything a user should know about how a layer of ``scheme`` and this shape is stored (asked at plan
        time and shown by ``compress validate``), or None."""
        return None

    def sparsity(self) -> float:
        """The fraction of this layer's weights stored as pruned (not stored at all): 0 unless a sparse format
        says otherwise."""
        return 0.0

    @property
    def weight(self) -> torch.Tensor:
        """The dense weight [out, in] this layer computes with (a fresh tensor: writing to it changes nothing).

        Read-only, for code that inspects ``layer.weight`` (transformers' weight init on load, user code).
        """
        return self.dequantized_weight()

    @abstractmethod
    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight this layer computes with, as a dense [out, in] tensor."""

    def forward_with_correction(self, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                                scratch: torch.Tensor) -> torch.Tensor | None:
        """``self(x) + x A^T B^T`` (a low-rank correction, ``A`` [rank, in], ``B`` [out, rank]) by this format's own
        kernel in one launch, or None where it has none for ``x`` (the ``corrected`` format then adds the product
        itself). ``scratch``: zeros the kernel may use and must leave zero
        (:func:`compress.kernels.cuda_int4.correction_scratch`)."""
        return None

    def check_loaded(self) -> str | None:
        """After loading: what in the stored tensors contradicts the scheme the checkpoint declares (codes out of
        range, non-finite scales), or None. Shapes are checked by the loader."""
        return None

    def after_load(self) -> None:
        """Called once the stored tensors are loaded (and checked): a format that computes with another form of
        them (a sparse layer unpacked to a dense weight) builds it here."""

    # -- exports to other checkpoint layouts ---------------------------------------------------------------

    def export_layouts(self) -> tuple[str, ...]:
        """The checkpoint layouts this layer can be written in besides its own. Every format has ``dense``;
        a format adds the layouts of serving engines by overriding this and :meth:`export`."""
        return ("dense",)

    def export(self, layout: str) -> dict[str, torch.Tensor]:
        """This layer's tensors in ``layout``, named as that layout names them (``dense``: ``weight`` [out, in]
        in the scales' dtype, and ``bias``)."""
        if layout == "dense":
            tensors = {"weight": self.dequantized_weight()}
            bias = getattr(self, "bias", None)
            if bias is not None:
                tensors["bias"] = bias.detach().clone()
            return tensors
        raise CheckpointError(f"format {self.format!r} cannot be exported as {layout!r}; it exports: "
                              f"{', '.join(self.export_layouts())}")


def layer_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Every module of ``model`` with its qualified name, as ``named_modules`` gives them, except those inside a
    compressed layer: a format that holds another (a correction beside a quantized layer) is one layer, its parts
    its storage."""
    seen: set[int] = set()

    def visit(module: nn.Module, prefix: str) -> Iterator[tuple[str, nn.Module]]:
        if id(module) in seen:
            return
        seen.add(id(module))
        yield prefix, module
        if not isinstance(module, CompressedLinear):
            for name, child in module.named_children():
                yield from visit(child, f"{prefix}.{name}" if prefix else name)

    yield from visit(model, "")


def compressed_modules(model: nn.Module) -> Iterator[tuple[str, CompressedLinear]]:
    """The compressed layers of ``model`` with their qualified names (the outer one where a format holds
    another)."""
    return ((name, m) for name, m in layer_modules(model) if isinstance(m, CompressedLinear))


def storage_summary(model: nn.Module) -> str:
    """One line: bytes of the compressed layers' weights as stored (with scales, zero points, sparse positions;
    without bias) against the same weights dense in the model's own dtype; for a model without compressed layers
    (a smaller student, say), its parameter count and bytes."""
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.bfloat16)
    width = torch.finfo(dtype).bits // 8
    stored = dense = count = 0
    for _, module in compressed_modules(model):
        stored += sum(t.numel() * t.element_size() for n, t in module.state_dict().items() if not n.endswith("bias"))
        dense += module.in_features * module.out_features * width
        count += 1
    if not count:
        tensors = [*model.parameters(), *model.buffers()]
        return (f"no compressed layers; {sum(t.numel() for t in model.parameters()) / 1e6:.2f} M parameters, "
                f"{sum(t.numel() * t.element_size() for t in tensors) / 1e6:.2f} MB")
    return (f"{count} compressed layers: {stored / 1e6:.2f} MB of weights, {stored / dense:.3f}x their "
            f"{dense / 1e6:.2f} MB dense in {str(dtype).removeprefix('torch.')}")
