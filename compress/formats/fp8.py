"""The ``fp8`` storage format: float8 E4M3 weights with per-output-channel or per-tensor float32 scales,
and optionally float8 activations (scaled per token at run time, or by a static per-tensor scale measured
on calibration data).

On GPUs with FP8 matrix units (compute capability 8.9+: Ada, Hopper) a W8A8 layer runs through
``torch._scaled_mm``, its activations quantized in one Triton pass (``compress.kernels.fp8_activations``; the
same codes bit for bit as the PyTorch arithmetic here). Decode steps of up to 8 tokens take the 8-bit decode kernel instead
(``compress.kernels.gemv``). Elsewhere, and for weight-only layers, the weight is dequantized for the matmul, and the
activation quantization is reproduced numerically, so CPU results match what the GPU computes.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from compress.formats.base import CompressedLinear, KernelChoice
from compress.kernels import fp8_activations as activations
from compress.kernels import gemv
from compress.kernels.fp8_activations import FP8, FP8_MAX


def quantize_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x / scale`` saturated to the E4M3 range and rounded to E4M3."""
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)


def token_scales(x: torch.Tensor) -> torch.Tensor:
    """Per-row scales [M, 1] (float32) mapping each row's max |x| to the E4M3 maximum."""
    return (x.abs().amax(dim=-1, keepdim=True).float() / FP8_MAX).clamp(min=1e-12)


def scaled_mm_available(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


class Fp8Linear(CompressedLinear):
    """A linear layer with E4M3 weights (and optionally E4M3 activations)."""

    format = "fp8"
    rows_stack = True

    def __init__(self, in_features: int, out_features: int, per_channel: bool, activations: str, bias: bool,
                 dtype: torch.dtype, device: torch.device | str = "cpu"):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.per_channel, self.activations = per_channel, activations
        self.register_buffer("weight_fp8", torch.empty(out_features, in_features, dtype=FP8, device=device))
        self.register_buffer("weight_scale", torch.empty(out_features if per_channel else 1, 1, device=device))
        if activations == "static":
            self.register_buffer("input_scale", torch.empty(1, device=device))
        else:
            self.input_scale = None
        if bias:
            self.register_buffer("bias", torch.empty(out_features, dtype=dtype, device=device))
        else:
            self.bias = None
        self._fp8_matmul = False  # set for the device the layer is on (see _apply), not looked up per call

    def _apply(self, fn, recurse=True):
        # model.to(dtype) / .half() move the layer but keep its storage: E4M3 weights and float32 scales (a cast
        # would turn the weights into bf16 copies and round the scales). The bias follows the model's dtype.
        kept = {id(t) for t in (self.weight_fp8, self.weight_scale, self.input_scale) if t is not None}

        def apply_keeping_storage(t: torch.Tensor) -> torch.Tensor:
            out = fn(t)
            return t.to(out.device) if id(t) in kept and out.dtype != t.dtype else out

        result = super()._apply(apply_keeping_storage, recurse)
        self._fp8_matmul = self.activations != "none" and scaled_mm_available(self.weight_fp8.device)
        return result

    @classmethod
    @torch.no_grad()
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None, per_channel: bool, activations: str,
                    dtype: torch.dtype, input_scale: torch.Tensor | None = None) -> Fp8Linear:
        """Quantize a float [out, in] weight: its max |w| per row (or overall) maps to the E4M3 maximum."""
        out_f, in_f = weight.shape
        layer = cls(in_f, out_f, per_channel, activations, bias is not None, dtype, weight.device)
        w = weight.float()
        amax = w.abs().amax(dim=1, keepdim=True) if per_channel else w.abs().amax().view(1, 1)
        scale = (amax / FP8_MAX).clamp(min=1e-12)
        layer.weight_fp8.copy_(quantize_fp8(w, scale))
        layer.weight_scale.copy_(scale)
        if layer.input_scale is not None:
            layer.input_scale.copy_(input_scale.float().view(1))
        if bias is not None:
            layer.bias.copy_(bias.detach().to(dtype))
        layer._fp8_matmul = activations != "none" and scaled_mm_available(weight.device)
        return layer

    @classmethod
    def empty(cls, in_features: int, out_features: int, bias: bool, scheme: dict[str, Any], dtype: torch.dtype,
              device: torch.device | str = "meta") -> Fp8Linear:
        return cls(in_features, out_features, scheme["weights"] == "channel", scheme["activations"], bias, dtype,
                   device)

    def scheme(self) -> dict[str, Any]:
        return {"format": self.format, "weights": "channel" if self.per_channel else "tensor",
                "activations": self.activations}

    @classmethod
    def kernel(cls, scheme: dict[str, Any], in_features: int, out_features: int) -> KernelChoice:
        if scheme["activations"] == "none":
            return KernelChoice("triton-8bit")
        return KernelChoice("triton-8bit", "more tokens than a decode step: torch._scaled_mm on compute "
                            "capability 8.9 and later")

    def check_loaded(self) -> str | None:
        if not torch.isfinite(self.weight_scale).all() or not (self.weight_scale > 0).all():
            return "weight scales that are not finite and positive"
        return None

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return (self.weight_fp8.float() * self.weight_scale).to(dtype or torch.float32)

    def _quantized_input(self, x2: torch.Tensor, kernel: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """E4M3 codes of ``x2`` [M, K] and their scales [M, 1]: in one kernel pass where ``kernel`` and the
        kernel can run, else in PyTorch (which torch.compile fuses with its neighbours in a decode step)."""
        if kernel and activations.available(x2):
            return activations.quantize_rows(x2, self.input_scale)
        if self.activations == "static":
            xs = self.input_scale.view(1, 1).expand(x2.shape[0], 1).contiguous()
        else:
            xs = token_scales(x2)
        return quantize_fp8(x2, xs), xs

    def _weight_only_linear(self, x: torch.Tensor) -> torch.Tensor:
        """x times the dequantized weight; a decode step on CUDA reads the fp8 weight once (one kernel), more
        tokens multiply by the fp8 values and scale after the matmul (one conversion pass, no fp32 copy)."""
        if gemv.available(x):
            scales = self.weight_scale.view(-1).expand(self.out_features).contiguous()
            y = gemv.gemv_8bit(x.reshape(-1, self.in_features), self.weight_fp8, scales, None)
            y = y.reshape(*x.shape[:-1], self.out_features)
        else:
            y = F.linear(x, self.weight_fp8.to(x.dtype)) * self.weight_scale.view(-1).to(x.dtype)
        return y if self.bias is None else y + self.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.activations == "none":
            return self._weight_only_linear(x)
        x2 = x.reshape(-1, self.in_features)
        fp8_matmul = self._fp8_matmul and x.is_cuda and x.dtype == torch.bfloat16 and not gemv.available(x2)
        xq, xs = self._quantized_input(x2, kernel=fp8_matmul)
        if fp8_matmul:
            y = torch._scaled_mm(xq, self.weight_fp8.t(), scale_a=xs,
                                 scale_b=self.weight_scale.view(1, -1).expand(1, self.out_features).contiguous(),
                                 bias=self.bias, out_dtype=torch.bfloat16)
        else:  # the same arithmetic on dequantized activations (decode steps, CPUs, older GPUs)
            y = self._weight_only_linear((xq.float() * xs).to(x.dtype))
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, weights="
                f"{'channel' if self.per_channel else 'tensor'}, activations={self.activations}")
