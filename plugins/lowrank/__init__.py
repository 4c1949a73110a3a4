"""Low-rank decomposition: each targeted layer replaced by two thin factors (the ``factored`` format) holding a
fraction ``ratio`` of its parameters.

``mode: whitened`` (the default) truncates the SVD of the weight times the Cholesky factor of the layer's input
second moments (SVD-LLM), so truncation minimises the error of the layer's outputs on the calibration data rather
than of its weights; ``mode: svd`` truncates the weight's own SVD and needs no data. As with GPTQ, a block's layers
are taken group by group in execution order (q/k/v; o; gate/up; down), each group's inputs collected after the
earlier groups were factored, and later blocks see the factored blocks' outputs. The algorithm is
:mod:`compress.solvers.lowrank`.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import torch
import torch.nn as nn
from pydantic import Field, model_validator

from compress.calibration.engine import BlockWork
from compress.errors import Problem
from compress.formats.factored import FactoredLinear, rank_for
from compress.linear import get_bias, get_weight, linear_shape
from compress.methods import Method, MethodConfig, Needs
from compress.solvers.hessian import block_hessians, damped_factors, original_target
from compress.solvers.lowrank import allocate_ranks, factor
from compress.states import LayerKind

log = logging.getLogger(__name__)


class LowRankConfig(MethodConfig):
    mode: Literal["whitened", "svd"] = Field("whitened", description="whitened: output-aware (needs calibration "
                                                                     "data); svd: plain truncated SVD")
    ratio: float | None = Field(None, gt=0, lt=1, description="fraction of the layers' parameters the factors keep "
                                                             "(0.8 when neither rank nor energy is given)")
    rank: int | None = Field(None, ge=1, description="every layer at this rank")
    energy: float | None = Field(None, gt=0, le=1, description="each layer at the smallest rank keeping this fraction "
                                                               "of its (whitened) spectrum's energy, at most the "
                                                               "largest rank smaller than the dense layer")
    damp: float = Field(0.01, gt=0, lt=1, description="damping added to the inputs' second moments before "
                                                      "whitening, as a fraction of their mean diagonal")
    allocation: Literal["global", "uniform"] = Field(
        "global", description="global: ranks spread across the layers by their spectra, the ratio met by all of them "
                              "together; uniform: each layer keeps the ratio")
    fit_original: bool = Field(True, description="whitened: fit the uncompressed model's layer outputs (on its own "
                                                 "inputs) rather than the layer's outputs on the compressed model's "
                                                 "inputs, as GPTQ's fit_original")
    ranks: dict[str, int] = Field(default_factory=dict, description="rank of each layer by qualified name (filled by "
                                                                    "the global allocation; given ones are kept)")

    @model_validator(mode="before")
    @classmethod
    def _one_budget(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        given = [name for name in ("ratio", "rank", "energy") if data.get(name) is not None]
        if len(given) > 1:
            raise ValueError(f"give one of ratio, rank and energy, not {' and '.join(given)}")
        return data if given else {**data, "ratio": 0.8}


def _names(names: list[str], limit: int = 3) -> str:
    return ", ".join(names[:limit]) + (", ..." if len(names) > limit else "")


class LowRank(Method):
    name = "lowrank"
    Config = LowRankConfig
    needs = Needs.CALIBRATION
    summary = "low-rank factors (whitened SVD as SVD-LLM, or plain SVD) keeping a fraction of each layer's parameters"

    def needs_for(self, config: LowRankConfig) -> Needs:
        return Needs.NOTHING if config.mode == "svd" else Needs.CALIBRATION

    def produces(self, config: LowRankConfig) -> LayerKind:
        return LayerKind.FORMAT

    def writes(self, config: LowRankConfig) -> dict[str, Any]:
        # a rank, or a uniform ratio, gives each layer's rank before any weight is read (compress validate shows it);
        # the global allocation chooses them from the calibration data as the stage begins, energy as each layer is
        # factored, and both log them
        if config.rank is not None:
            return {"format": FactoredLinear.format, "rank": config.rank}
        if config.ratio is not None and config.allocation == "uniform":
            return {"format": FactoredLinear.format, "ratio": config.ratio}
        return {"format": FactoredLinear.format}

    def check_targets(self, targets: dict[str, nn.Module], config: LowRankConfig) -> list[Problem]:
        if config.rank is not None:
            return self._check_rank(targets, config.rank)
        if config.energy is not None:
            return []
        if config.allocation == "global":
            shapes = [linear_shape(layer) for layer in targets.values()]
            if config.ratio * sum(i * o for i, o in shapes) >= sum(i + o for i, o in shapes):
                return []
            return [Problem("ratio", f"{config.ratio} of the parameters of the {len(shapes)} layers is less than one "
                            "rank for each of them: raise the ratio")]
        tiny = sorted(n for n, layer in targets.items()
                      if n not in config.ranks and rank_for(*linear_shape(layer), config.ratio) == 0)
        if not tiny:
            return []
        return [Problem("ratio", f"{config.ratio} of the parameters is less than one rank of {len(tiny)} layers "
                        f"({', '.join(tiny[:3])}{', ...' if len(tiny) > 3 else ''}): raise the ratio, or ignore "
                        "those layers in the step")]

    @staticmethod
    def _check_rank(targets: dict[str, nn.Module], rank: int) -> list[Problem]:
        shapes = {n: linear_shape(layer) for n, layer in targets.items()}
        problems = []
        big = sorted(n for n, (i, o) in shapes.items() if rank > min(i, o))
        if big:
            problems.append(Problem("rank", f"{rank} is larger than min(in_features, out_features) of {len(big)} "
                                    f"layers ({_names(big)}; the smallest is {min(min(shapes[n]) for n in big)}): "
                                    "lower the rank, or ignore those layers"))
        dense = sorted(n for n, (i, o) in shapes.items() if rank * (i + o) >= i * o and n not in big)
        if dense:
            problems.append(Problem("rank", f"at rank {rank} the factors of {len(dense)} layers ({_names(dense)}) "
                                    "are not smaller than the layers (rank x (in + out) >= in x out): lower the rank, "
                                    "or ignore those layers to keep them dense"))
        return problems

    def before_stage(self, config: LowRankConfig, survey) -> LowRankConfig:
        if config.ratio is None or config.allocation == "uniform":
            return config
        spectra: dict[str, tuple[int, int, torch.Tensor]] = {}

        def measure(work: BlockWork) -> None:  # nothing changes in a survey: every group's inputs in one pass
            groups = [[name] for name in work.targets] if config.mode == "svd" else work.linear_groups()
            hessians = [None] * len(groups) if config.mode == "svd" else block_hessians(work, groups, False)
            for group, hessian in zip(groups, hessians):
                for name in group:
                    weight = get_weight(work.targets[name]).float().to(work.device)
                    if hessian is not None:
                        weight = weight @ damped_factors(hessian.H, config.damp, name)[0]
                    spectra[name] = (*linear_shape(work.targets[name]), torch.linalg.svdvals(weight).pow(2).cpu())

        survey(measure)
        ranks = {**allocate_ranks(spectra, config.ratio), **config.ranks}
        kept = sum(ranks[n] * (i + o) for n, (i, o, _) in spectra.items()) / sum(i * o for i, o, _ in spectra.values())
        log.info("%s: ranks for %d layers keep %.4f of their parameters (asked %g); per layer: %s", self.name,
                 len(ranks), kept, config.ratio, ", ".join(f"{n} {r}" for n, r in ranks.items()))
        return config.model_copy(update={"ranks": ranks})

    @staticmethod
    def _groups(work: BlockWork, config: LowRankConfig, cross: bool = False):
        """The block's layer groups in order, each with its inputs' second moments (whitened; collected when the
        group's turn comes, after the earlier groups were replaced; with ``cross``, paired with the uncompressed
        block's inputs) or None (svd)."""
        if config.mode == "svd":
            for name in list(work.targets):
                yield [name], None
            return
        for group in work.linear_groups():
            yield group, block_hessians(work, [group], cross)[0]

    def needs_reference(self, config: LowRankConfig) -> bool:
        return config.fit_original and config.mode == "whitened"

    def compress_block(self, work: BlockWork, config: LowRankConfig) -> None:
        for group, hessian in self._groups(work, config, self.needs_reference(config)):
            weights = [get_weight(work.targets[name]).to(work.device).float() for name in group]
            if hessian is not None and hessian.C is not None:  # the weights that best give the original outputs
                originals = [get_weight(work.reference.block.get_submodule(work.local(name))).to(work.device)
                             for name in group]
                weights = original_target(torch.cat(weights), hessian, torch.cat(originals), config.damp,
                                          ", ".join(group)).split([w.shape[0] for w in weights])
            for name, target in zip(group, weights):
                layer = work.targets[name]
                in_f, out_f = linear_shape(layer)
                if config.rank is not None:  # check_targets refused ranks that do not make a layer smaller
                    rank = config.rank
                elif config.energy is not None:  # up to the largest rank still smaller than the layer
                    rank = (in_f * out_f - 1) // (in_f + out_f)
                else:  # at least 1: check_targets refused uniform ratios below one rank, the allocation gives each one
                    rank = config.ranks.get(name) or rank_for(in_f, out_f, config.ratio)
                A, B = factor(target, rank, None if hessian is None else hessian.H, config.damp, name, config.energy)
                if config.energy is not None:
                    log.info("%s: %s at rank %d of %d%s", self.name, name, A.shape[0], min(in_f, out_f),
                             " (capped: the largest rank whose factors are smaller than the layer)"
                             if A.shape[0] == rank else "")
                work.replace(name, FactoredLinear.from_factors(A, B, get_bias(layer), get_weight(layer).dtype))
