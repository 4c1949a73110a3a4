"""int8 weight quantization, zero-point (asymmetric) or absmax (symmetric).

* ``zero_point``: scale = (max - min) / 255 over the range widened to include 0, an integer zero point,
  uint8 codes: q = round((w - min) / (max - min) * 255).
* ``absmax``: scale = max|w| / 127, int8 codes in [-127, 127].

Per tensor, per output channel or per group of ``group_size`` input features.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from compress.calibration.engine import BlockWork
from compress.formats.integer import quantize_layer
from compress.int_methods import IntMethod
from compress.methods import MethodConfig, Needs
from compress.quant import IntScheme


class Int8Config(MethodConfig):
    scheme: Literal["zero_point", "absmax"] = Field("absmax", description="asymmetric (zero_point) or symmetric (absmax)")
    granularity: Literal["tensor", "channel", "group"] = Field("channel", description="one scale per tensor, row or group")
    group_size: int = Field(128, ge=1, description="input features per scale when granularity is group")

    def int_scheme(self) -> IntScheme:
        symmetric = self.scheme == "absmax"
        group = self.group_size if self.granularity == "group" else None
        return IntScheme(8, symmetric, self.granularity, group, restricted=symmetric)


class Int8(IntMethod):
    name = "int8"
    Config = Int8Config
    needs = Needs.NOTHING
    summary = "int8 weights, zero-point (uint8 + zero) or absmax (int8), per tensor/channel/group"

    def compress_block(self, work: BlockWork, config: Int8Config) -> None:
        scheme = config.int_scheme()
        for name, layer in list(work.targets.items()):
            work.replace(name, quantize_layer(layer, scheme, work.device))
