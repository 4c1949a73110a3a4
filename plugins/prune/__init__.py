"""Pruning: magnitude, Wanda and SparseGPT, unstructured or N:M (2:4).

The three methods share everything but the choice of which weights go: their options (``sparsity``,
``structure``, per-layer ``layer_sparsity``), the mask rules (:mod:`compress.sparsity`) and the state they leave
(a masked layer, whose mask later steps keep: GPTQ after a pruner quantizes the pruned weights to exact zeros).
That is why they are one folder, each method a few lines over the shared part, and SparseGPT's sweep in a file of
its own (``sparsegpt.py``) over the column sweep it shares with GPTQ (:mod:`compress.solvers`).

- ``magnitude`` (data-free): the smallest |W| of each layer go.
- ``wanda`` (Sun et al., arXiv 2306.11695): the smallest |W| x ||x||, ||x|| being the L2 norm of each input channel
  over the calibration tokens, compared within each output row.
- ``sparsegpt``: see ``sparsegpt.py``; the kept weights are updated to make up for the pruned ones.
"""

from __future__ import annotations

import logging

import torch
from pydantic import Field, field_validator, model_validator

from compress.calibration.engine import BlockWork
from compress.errors import Problem
from compress.linear import get_weight, linear_shape, set_weight
from compress.methods import Method, MethodConfig, Needs
from compress.plugins.prune.sparsegpt import sparsegpt
from compress.solvers.hessian import block_hessians
from compress.sparsity import Pattern, parse_pattern, select_mask
from compress.states import LayerKind
from compress.targets import matches

log = logging.getLogger(__name__)


class PruneConfig(MethodConfig):
    sparsity: float | None = Field(None, gt=0, lt=1, description="fraction of each layer's weights pruned "
                                   "(default 0.5; with N:M it is 1 - N/M and may be left out)")
    structure: str = Field("unstructured", description="unstructured, or N:M such as 2:4 (N weights kept in "
                                                         "every M consecutive weights of a row)")
    layer_sparsity: dict[str, float] = Field(default_factory=dict, description="sparsity per layer pattern "
                                             "(as in targets; the first that matches wins), unstructured only")

    @field_validator("structure")
    @classmethod
    def _structure(cls, value: str) -> str:
        parse_pattern(value)
        return value

    @field_validator("layer_sparsity")
    @classmethod
    def _layer_sparsity(cls, value: dict[str, float]) -> dict[str, float]:
        bad = {k: v for k, v in value.items() if not 0 < v < 1}
        if bad:
            raise ValueError(f"each sparsity must be between 0 and 1 (exclusive): {bad}")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> PruneConfig:
        pattern = self.pattern
        if pattern.structured and self.sparsity is not None and abs(self.sparsity - pattern.sparsity) > 1e-9:
            raise ValueError(f"structure {pattern} prunes {pattern.sparsity:g} of the weights, but sparsity is "
                             f"{self.sparsity:g}: leave sparsity out with N:M")
        if pattern.structured and self.layer_sparsity:
            raise ValueError(f"layer_sparsity applies to unstructured pruning only (structure is {pattern})")
        return self

    @property
    def pattern(self) -> Pattern:
        return parse_pattern(self.structure)

    def sparsity_of(self, name: str, layer: torch.nn.Module) -> float:
        """The sparsity of layer ``name``: N:M's, else the first matching ``layer_sparsity``, else ``sparsity``."""
        pattern = self.pattern
        if pattern.structured:
            return pattern.sparsity
        for key, value in self.layer_sparsity.items():
            if matches(key, name, layer):
                return value
        return 0.5 if self.sparsity is None else self.sparsity


class Pruner(Method):
    """What the three pruners share: the config, the state they leave, the checks, and applying a mask."""

    Config = PruneConfig

    def produces(self, config: PruneConfig) -> LayerKind:
        return LayerKind.MASKED

    def check_targets(self, targets: dict[str, torch.nn.Module], config: PruneConfig) -> list[Problem]:
        pattern = config.pattern
        if not pattern.structured:
            return []
        ragged = sorted(n for n, layer in targets.items() if linear_shape(layer)[0] % pattern.m)
        if not ragged:
            return []
        return [Problem("structure", f"{pattern} needs in_features divisible by {pattern.m}; {len(ragged)} "
                        f"layers are not ({', '.join(ragged[:3])}{', ...' if len(ragged) > 3 else ''}): ignore them "
                        "in the step, or prune them unstructured in another step")]

    @staticmethod
    def _masked(work: BlockWork, name: str, weight: torch.Tensor, keep: torch.Tensor) -> None:
        layer = work.targets[name]
        set_weight(layer, torch.where(keep, weight, 0).to(get_weight(layer).dtype))
        work.set_mask(name, keep)


class Magnitude(Pruner):
    name = "magnitude"
    needs = Needs.NOTHING
    summary = "prune the smallest weights of each layer, unstructured or N:M (2:4); stored sparse"

    def compress_block(self, work: BlockWork, config: PruneConfig) -> None:
        for name, layer in work.targets.items():
            w = get_weight(layer).to(work.device)
            keep = select_mask(w.abs().float(), config.pattern, config.sparsity_of(name, layer), per_row=False)
            self._masked(work, name, w, keep)


class Wanda(Pruner):
    name = "wanda"
    needs = Needs.CALIBRATION
    summary = "Wanda: prune the smallest |W| x input norm in each row, unstructured or N:M; stored sparse"

    def compress_block(self, work: BlockWork, config: PruneConfig) -> None:
        groups = work.linear_groups()
        leaders = {g[0]: work.targets[g[0]] for g in groups}
        sums = {n: torch.zeros(linear_shape(layer)[0], device=work.device) for n, layer in leaders.items()}

        def see(name: str, x: torch.Tensor) -> None:
            sums[name] += x.reshape(-1, x.shape[-1]).float().pow(2).sum(dim=0)

        work.collect_inputs(leaders, see)  # one pass: every layer of the block judged on the same inputs
        for group in groups:
            norm = sums[group[0]].sqrt()
            for name in group:
                layer = work.targets[name]
                w = get_weight(layer).to(work.device)
                keep = select_mask(w.abs().float() * norm, config.pattern, config.sparsity_of(name, layer))
                self._masked(work, name, w, keep)


class SparseGPTConfig(PruneConfig):
    damp: float = Field(0.01, gt=0, lt=1, description="damping added to H, as a fraction of its mean diagonal")
    block_size: int = Field(128, ge=1, description="columns per lazy batch update (and per unstructured mask)")
    fit_original: bool = Field(False, description="fit the uncompressed model's layer outputs on its own inputs "
                                                  "(GPTAQ's asymmetric objective, as gptq's option)")


class SparseGPT(Pruner):
    name = "sparsegpt"
    Config = SparseGPTConfig
    needs = Needs.CALIBRATION
    summary = "SparseGPT: prune with second-order updates of the kept weights, unstructured or N:M; stored sparse"

    def needs_reference(self, config: SparseGPTConfig) -> bool:
        return config.fit_original

    def compress_block(self, work: BlockWork, config: SparseGPTConfig) -> None:
        for group in work.linear_groups():  # each group's inputs collected after the earlier groups were pruned
            hessian = block_hessians(work, [group], config.fit_original)[0]
            for name in group:
                layer = work.targets[name]
                w = get_weight(layer).to(work.device)
                reference = None
                if config.fit_original:
                    reference = get_weight(work.reference.block.get_submodule(work.local(name))).to(work.device)
                pruned, keep = sparsegpt(w, hessian.H, config.pattern, config.sparsity_of(name, layer), config.damp,
                                         config.block_size, name, hessian.C, reference)
                self._masked(work, name, pruned, keep)

