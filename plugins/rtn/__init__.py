"""Round-to-nearest k-bit group-wise weight quantization: the baseline every smarter method must beat.

Each group of ``group_size`` input features gets a min/max scale (optionally with the clipping range
searched for the least error), and every weight is rounded to its nearest level.
"""

from __future__ import annotations

from pydantic import Field

from compress import quant
from compress.calibration.engine import BlockWork
from compress.formats.integer import quantize_layer
from compress.int_methods import IntMethod, IntWeightConfig
from compress.linear import get_weight
from compress.methods import Needs


class RTNConfig(IntWeightConfig):
    clip_search: bool = Field(False, description="search each group's clipping range for the least error")


class RTN(IntMethod):
    name = "rtn"
    Config = RTNConfig
    needs = Needs.NOTHING
    summary = "round-to-nearest 2-8 bit, group-wise, symmetric or asymmetric, packed storage"

    def compress_block(self, work: BlockWork, config: RTNConfig) -> None:
        scheme = config.int_scheme()
        for name, layer in list(work.targets.items()):
            scale = zero = None
            if config.clip_search:
                w = get_weight(layer).to(work.device)
                scale, zero = quant.mse_qparams(w, scheme, layer.weight.dtype)
            work.replace(name, quantize_layer(layer, scheme, work.device, scale=scale, zero=zero))
