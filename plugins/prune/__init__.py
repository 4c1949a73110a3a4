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
from compress.solvers.hessian import block_hessians, original_target
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

    def mask_pattern(self, config: PruneConfig) -> str:
        return str(config.pattern)

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
    summary = "prune the smallest weights of each layer, unstructured or N:M; stored sparse (unstructured: dense speed)"

    def compress_block(self, work: BlockWork, config: PruneConfig) -> None:
        for name, layer in work.targets.items():
            w = get_weight(layer).to(work.device)
            keep = select_mask(w.abs().float(), config.pattern, config.sparsity_of(name, layer), per_row=False)
            self._masked(work, name, w, keep)


class ActivationPruneConfig(PruneConfig):
    owl: bool = Field(False, description="outlier-weighed sparsity per block (OWL, Yin et al.): blocks with more "
                                         "outlier |W| x ||x|| keep more weights, the average kept as asked "
                                         "(unstructured only; one extra calibration pass)")
    owl_lambda: float = Field(0.08, gt=0, lt=0.5, description="OWL: the most a block's sparsity moves from the "
                                                              "average, either way")
    owl_threshold: float = Field(5.0, gt=0, description="OWL: an outlier is above this many times its block's mean")

    @model_validator(mode="after")
    def _owl_unstructured(self) -> ActivationPruneConfig:
        if self.owl and self.pattern.structured:
            raise ValueError(f"owl sets a sparsity per block, which {self.pattern} fixes: use it unstructured")
        return self


def input_norms(work: BlockWork, groups: list[list[str]]) -> dict[str, torch.Tensor]:
    """The L2 norm of each input channel over the calibration tokens, per group (keyed by its first layer), on one
    pass over the block's inputs."""
    leaders = {g[0]: work.targets[g[0]] for g in groups}
    sums = {n: torch.zeros(linear_shape(layer)[0], device=work.device) for n, layer in leaders.items()}

    def see(name: str, x: torch.Tensor) -> None:
        sums[name] += x.reshape(-1, x.shape[-1]).float().pow(2).sum(dim=0)

    work.collect_inputs(leaders, see)
    return {n: total.sqrt() for n, total in sums.items()}


class ActivationPruner(Pruner):
    """A pruner that sees the calibration inputs (Wanda, SparseGPT), and so can allocate sparsity with OWL."""

    needs = Needs.CALIBRATION
    Config = ActivationPruneConfig

    def before_stage(self, config: ActivationPruneConfig, survey) -> ActivationPruneConfig:
        if not config.owl:
            return config
        ratios: dict[str, float] = {}

        def outliers(work: BlockWork) -> None:
            groups = work.linear_groups()
            norms = input_norms(work, groups)
            scores = torch.cat([(get_weight(work.targets[n]).float().abs().to(work.device) * norms[g[0]]).flatten()
                                for g in groups for n in g])
            ratios[work.name] = float((scores > config.owl_threshold * scores.mean()).float().mean())

        survey(outliers)
        sparsity = owl_sparsity(ratios, 0.5 if config.sparsity is None else config.sparsity, config.owl_lambda)
        log.info("%s: OWL sparsity per block: %s", self.name, ", ".join(f"{s:.3f}" for s in sparsity.values()))
        per_block = {f"{block}.*": s for block, s in sparsity.items()}
        return config.model_copy(update={"layer_sparsity": {**config.layer_sparsity, **per_block}})


def owl_sparsity(ratios: dict[str, float], sparsity: float, lam: float) -> dict[str, float]:
    """OWL's sparsity per block from its outlier ratio: densities spread over [-lam, lam] around 1 - ``sparsity``
    in the order of the ratios (more outliers, fewer weights pruned), their mean kept."""
    values = torch.tensor(list(ratios.values()), dtype=torch.float64)
    spread = values.max() - values.min()
    scaled = (values - values.min()) / spread * 2 * lam if spread > 0 else torch.zeros_like(values)
    density = scaled - scaled.mean() + (1 - sparsity)
    return {block: float(1 - d) for block, d in zip(ratios, density)}


class WandaConfig(ActivationPruneConfig):
    rescale: bool = Field(False, description="scale each row's kept weights by the factor that best gives the row's "
                                             "unpruned outputs on the calibration inputs (one number a row; the "
                                             "mask is Wanda's)")


class Wanda(ActivationPruner):
    name = "wanda"
    Config = WandaConfig
    summary = "Wanda: prune the smallest |W| x input norm per row, unstructured or N:M, OWL; stored sparse"

    def compress_block(self, work: BlockWork, config: WandaConfig) -> None:
        groups = work.linear_groups()
        # one pass: every layer of the block judged on the same inputs
        hessians = block_hessians(work, groups, False) if config.rescale else None
        norms = ({g[0]: h.H.diagonal().sqrt() for g, h in zip(groups, hessians)} if hessians
                 else input_norms(work, groups))  # with the second moments, their diagonal: the same ranking
        for index, group in enumerate(groups):
            norm = norms[group[0]]
            for name in group:
                layer = work.targets[name]
                w = get_weight(layer).to(work.device)
                keep = select_mask(w.abs().float() * norm, config.pattern, config.sparsity_of(name, layer))
                if hessians:
                    w = rescaled_rows(w.float(), keep, hessians[index].H)
                self._masked(work, name, w, keep)


def rescaled_rows(weight: torch.Tensor, keep: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """``weight`` [out, in] pruned by ``keep``, each row scaled by a = (w H p) / (p H p), p the pruned row:
    the one factor that makes the pruned row's outputs closest to the full row's on inputs whose second moments are
    ``H``. A row pruned to zero output energy keeps a = 1."""
    pruned = weight * keep
    HP = pruned @ H
    num, den = (weight * HP).sum(1), (pruned * HP).sum(1)
    scale = torch.where(den > 0, num / den.clamp(min=torch.finfo(den.dtype).tiny), torch.ones_like(den))
    return pruned * scale[:, None]


class SparseGPTConfig(ActivationPruneConfig):
    damp: float = Field(0.01, gt=0, lt=1, description="damping added to H, as a fraction of its mean diagonal")
    block_size: int = Field(128, ge=1, description="columns per lazy batch update (and per unstructured mask)")
    fit_original: bool = Field(False, description="fit the uncompressed model's layer outputs on its own inputs "
                                                  "(GPTAQ's asymmetric objective, as gptq's option)")


class SparseGPT(ActivationPruner):
    name = "sparsegpt"
    Config = SparseGPTConfig
    summary = "SparseGPT: prune with second-order updates of the kept weights, unstructured or N:M, OWL; stored sparse"

    def needs_reference(self, config: SparseGPTConfig) -> bool:
        return config.fit_original

    def compress_block(self, work: BlockWork, config: SparseGPTConfig) -> None:
        for group in work.linear_groups():  # each group's inputs collected after the earlier groups were pruned
            hessian = block_hessians(work, [group], config.fit_original)[0]
            weights = {name: get_weight(work.targets[name]).to(work.device) for name in group}
            if config.fit_original:  # the weights that best give the uncompressed block's outputs, stacked
                references = [get_weight(work.reference.block.get_submodule(work.local(n))).to(work.device)
                              for n in group]
                targets = original_target(torch.cat(list(weights.values())), hessian, torch.cat(references),
                                          config.damp, ", ".join(group))
                weights = dict(zip(group, targets.split([w.shape[0] for w in weights.values()])))
            for name, w in weights.items():
                pruned, keep = sparsegpt(w, hessian.H, config.pattern, config.sparsity_of(name, work.targets[name]),
                                         config.damp, config.block_size, name)
                self._masked(work, name, pruned, keep)

