"""AWQ: activation-aware weight quantization (the searches are in ``search.py``).

Per decoder block:

1. the layer groups (layers reading the same input) and, for each, the op that can absorb a scaling of its
   input (found by :mod:`compress.calibration.absorbers`, for any architecture);
2. per group with an absorber, in execution order: the per-channel scale whose quantized group best
   preserves the group's own outputs on sample rows (or, with ``objective: block``, the block's output on the
   calibration inputs); it is folded into the absorber (divided) and
   the group's weights (multiplied), so inference costs nothing extra;
3. per layer: the clipping range of each weight group that best preserves its outputs once quantized (first
   each group alone, as the AWQ reference, then ``clip_passes`` rounds judging each group by its row's
   whole output error);
4. quantization to the packed ``int`` format (unless ``quantize: false``, which leaves scaled and clipped
   float weights for a following step such as GPTQ).

Groups with no absorber (e.g. o_proj under grouped-query attention, or a block with no norm before q/k/v)
are said so in the log and get clipping and quantization only.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Literal

import torch
from pydantic import Field

from compress import quant
from compress.calibration.absorbers import Absorber, find_absorbers, scale_inputs
from compress.calibration.engine import BlockWork
from compress.formats.integer import quantize_layer
from compress.int_methods import IntMethod, IntWeightConfig
from compress.linear import get_weight, linear_shape, set_weight
from compress.methods import Needs
from compress.states import KEEPS, LayerKind
from compress.plugins.awq.search import channel_weight_mean, clip_weight, output_error, scale_candidates

log = logging.getLogger(__name__)


class AWQConfig(IntWeightConfig):
    symmetric: bool = Field(False, description="fixed zero point (true) or a stored zero point per group (false)")
    grid: int = Field(20, ge=1, description="scale ratios tried per layer group")
    weight_exponents: list[float] | None = Field(
        None, description="also search the weight term's exponent over these values (default: 1 - ratio, the "
                          "AWQ reference's one-dimensional search)")
    clip: bool = Field(True, description="search each weight group's clipping range")
    clip_grid: int = Field(40, ge=1, description="clipping steps of 1/clip_grid tried (the AWQ reference: 20)")
    max_shrink: float = Field(0.5, gt=0, lt=1, description="largest fraction of a group's range clipped away")
    search_tokens: int = Field(65536, ge=1, description="calibration tokens the scale search runs the block on")
    clip_tokens: int = Field(4096, ge=1, description="input rows sampled per layer; the scale and clipping "
                                                     "searches judge output errors on them")
    clip_passes: int = Field(1, ge=0, description="rounds of the clipping search that then judge each weight group "
                                                  "by its row's whole output error, the other groups' included "
                                                  "(0: each group on its own, as the AWQ reference)")
    quantize: bool = Field(True, description="write packed int weights; false leaves scaled float weights for a "
                                             "following quantizer (e.g. gptq)")
    search_clip: bool = Field(True, description="quantize scale candidates with a searched clipping range "
                                                "(closer to the final weights) instead of min/max")
    fit_original: bool = Field(False, description="search scales against the uncompressed model's block outputs "
                                                  "instead of the block's float outputs on the compressed inputs")
    objective: Literal["block", "layers"] = Field(
        "layers", description="what a scale candidate is judged by: the error of the group's own layer outputs on "
                              "the sample rows (the AWQ paper's objective), or of the block's outputs on the "
                              "calibration tokens (about 3x slower, and no better on ref-a)")
    inputs: Literal["compressed", "original"] = Field(
        "compressed", description="calibrate each block on its inputs in the compressed model (earlier blocks "
                                  "quantized) or in the original one (as the AWQ reference code)")


class AWQ(IntMethod):
    name = "awq"
    Config = AWQConfig
    needs = Needs.CALIBRATION
    summary = "AWQ activation-aware scales and clipping, 2-8 bit group-wise, packed storage"

    def produces(self, config: AWQConfig) -> LayerKind | None:
        return LayerKind.FORMAT if config.quantize else KEEPS  # quantize: false scales float weights in place

    def writes(self, config: AWQConfig) -> dict | None:
        return super().writes(config) if config.quantize else None

    def needs_reference(self, config: AWQConfig) -> bool:
        return config.fit_original or config.inputs == "original"

    @torch.no_grad()
    def compress_block(self, work: BlockWork, config: AWQConfig) -> None:
        scheme = config.int_scheme()
        if config.inputs == "original":
            work = replace(work, inputs=work.reference.inputs)
        groups = work.linear_groups()
        absorbers = find_absorbers(work, groups)
        _report_missing(work, [g for g in groups if absorbers[g[0]] is None])
        stats = _input_statistics(work, groups, config.clip_tokens)
        limit = _batches_for(work, config.search_tokens)
        if config.objective == "layers":
            reference = []
        elif config.fit_original:
            reference = BlockWork(work.index, work.name, work.reference.block, {}, work.reference.inputs,
                                  work.device).forward(limit)
        else:
            reference = work.forward(limit)
        # A group is finished (clipped, quantized) as soon as no later group needs one of its layers to absorb
        # a scaling (up_proj absorbs down_proj's), so later searches see the earlier groups quantized.
        last_use = {absorbers[g[0]].name: k for k, g in enumerate(groups) if absorbers[g[0]] is not None}
        unfinished: list[list[str]] = []
        for k, group in enumerate(groups):
            absorber = absorbers[group[0]]
            if absorber is not None:
                layers = [work.targets[n] for n in group]
                produced, s = absorber.tie(_search_scale(work, layers, stats[group[0]], reference, limit, scheme,
                                                         config, absorber))
                absorber.scale_outputs(1 / produced)
                scale_inputs(layers, s)
                stats[group[0]] = stats[group[0]].scaled(s)
            unfinished.append(group)
            for done in [g for g in unfinished if all(last_use.get(n, -1) <= k for n in g)]:
                _finish(work, done, stats[done[0]].gram, scheme, config)
                unfinished.remove(done)


@dataclass(frozen=True)
class InputStats:
    """What AWQ needs of a group's inputs: mean |x| and mean x^2 per channel over every calibration token, and
    the second moments ``E[x x^T]`` of the sample rows (through which output errors on them are measured)."""

    mean_abs: torch.Tensor
    mean_sq: torch.Tensor
    gram: torch.Tensor

    def scaled(self, s: torch.Tensor) -> InputStats:
        """The statistics of x / s (the group's inputs once its absorber is divided by s)."""
        return InputStats(self.mean_abs / s, self.mean_sq / s**2, self.gram / (s[:, None] * s[None, :]))


def _input_statistics(work: BlockWork, groups: list[list[str]], rows: int) -> dict[str, InputStats]:
    """Per group (keyed by its first layer): statistics over every calibration token, and up to ``rows``
    input rows spread over the calibration set."""
    width = {g[0]: linear_shape(work.targets[g[0]])[0] for g in groups}
    abs_sum = {n: torch.zeros(w, device=work.device) for n, w in width.items()}
    sq_sum = {n: torch.zeros(w, device=work.device) for n, w in width.items()}
    kept: dict[str, list[torch.Tensor]] = {n: [] for n in width}
    counts = dict.fromkeys(width, 0)
    per_batch = max(1, rows // max(1, len(work.inputs.calls)))

    def see(name: str, x: torch.Tensor) -> None:
        flat = x.reshape(-1, x.shape[-1]).float()
        abs_sum[name] += flat.abs().sum(dim=0)
        sq_sum[name] += flat.pow(2).sum(dim=0)
        counts[name] += flat.shape[0]
        step = max(1, flat.shape[0] // per_batch)
        kept[name].append(flat[::step][:per_batch])

    work.collect_inputs({g[0]: work.targets[g[0]] for g in groups}, see)
    stats = {}
    for n in width:
        rows = torch.cat(kept[n])
        stats[n] = InputStats(abs_sum[n] / counts[n], sq_sum[n] / counts[n], rows.t() @ rows / rows.shape[0])
    return stats


def _search_scale(work: BlockWork, layers: list, stats: InputStats, reference: list[torch.Tensor], limit: int,
                  scheme: quant.IntScheme, config: AWQConfig, absorber: Absorber) -> torch.Tensor:
    """The input scale whose quantized group best preserves the block's outputs. Each candidate's weights are
    quantized with the clipping range of least activation-weighted error (``search_clip``), close to what
    the final clipping search will give, or with plain min/max."""
    originals = [get_weight(layer).clone() for layer in layers]
    w_mean = channel_weight_mean(torch.cat(originals), scheme)
    best, best_loss = torch.ones_like(stats.mean_abs), float("inf")
    for s in scale_candidates(stats.mean_abs, w_mean, config.grid, config.weight_exponents):
        s = absorber.tie(s)[1]  # a scale the absorbing op can carry
        for layer, w in zip(layers, originals):
            scaled = w.float() * s
            if config.search_clip:
                qp = quant.mse_qparams(scaled, scheme, w.dtype, grid=config.clip_grid, max_shrink=config.max_shrink,
                                       norm=2, importance=stats.mean_sq / s**2)
                set_weight(layer, quant.fake_quantize_weight(scaled, *qp, scheme) / s)
            else:
                set_weight(layer, quant.rtn_dequantized(scaled, scheme, w.dtype) / s)
        if config.objective == "layers":
            loss = sum(output_error(get_weight(layer).float() - w.float(), stats.gram)
                       for layer, w in zip(layers, originals))
        else:
            outputs = work.forward(limit)
            loss = sum((o.float() - r.float()).pow(2).mean().item() for o, r in zip(outputs, reference))
        if loss < best_loss:
            best, best_loss = s, loss
    for layer, w in zip(layers, originals):
        set_weight(layer, w)
    return best


def _finish(work: BlockWork, group: list[str], moments: torch.Tensor, scheme: quant.IntScheme,
            config: AWQConfig) -> None:
    """Clip (searching each weight group's range for inputs with second moments ``moments``) and quantize the
    group's layers."""
    for name in group:
        layer = work.targets[name]
        if config.clip:
            set_weight(layer, clip_weight(get_weight(layer), moments, scheme, config.clip_grid, config.max_shrink,
                                          config.clip_passes))
        if config.quantize:
            work.replace(name, quantize_layer(layer, scheme, work.device))


def _report_missing(work: BlockWork, groups: list[list[str]]) -> None:
    level = logging.WARNING if work.index == 0 else logging.INFO  # the first block speaks for the rest
    for group in groups:
        log.log(level, "awq: %s: no op before %s can absorb an input scaling (no norm or matching linear feeds "
                "it); these layers get clipping and quantization only", work.name,
                ", ".join(work.local(n) for n in group))


def _batches_for(work: BlockWork, tokens: int) -> int:
    total = 0
    for i in range(len(work.inputs.calls)):
        h = work.inputs.hidden(i)
        total += h.shape[0] * h.shape[1]
        if total >= tokens:
            return i + 1
    return len(work.inputs.calls)
