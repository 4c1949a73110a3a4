"""The training loop every training method runs on (distillation, QLoRA), built on Hugging Face ``accelerate``.

A method gives :func:`fit` its :class:`~compress.train.TrainContext` and a loss function; the loop does the rest
the recipe's ``training:`` section asks for (:class:`~compress.recipe.TrainingSpec`): AdamW over the trainable
tensors with a linear warm-up and a cosine decay, gradient accumulation and clipping, autocast mixed precision and
gradient checkpointing, the held-out loss at the start, every ``eval_every`` steps and at the end, a progress bar
(or a log line every 10% where the output is not a terminal), masks of pruned layers re-applied after every step,
checkpoints every ``save_every`` steps, resumption from the last of them, and a clear stop on a NaN or infinite loss.

The data order is a function of the step alone (each pass over the windows is a permutation drawn from the seed and
the pass), so a resumed run sees the batches an uninterrupted one would. Under ``accelerate launch`` each process
takes its share of every batch, and the model is wrapped for data parallelism while it trains.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from compress.errors import CompressError, UsageError
from compress.train import TrainContext

log = logging.getLogger(__name__)

#: ``loss_fn(model, batch) -> (loss, parts)``: the scalar to minimise and the named figures it is made of.
LossFn = Callable[[nn.Module, dict[str, torch.Tensor]], tuple[torch.Tensor, dict[str, float]]]
KEEP_CHECKPOINTS = 2


class TrainingError(CompressError):
    """A training stage that cannot go on (a NaN or infinite loss); the message names the step and the last
    good checkpoint."""


@dataclass
class TrainReport:
    """What a training stage did: steps, tokens, time, and the held-out loss before and after."""

    steps: int
    tokens: int
    seconds: float
    eval_before: float | None
    eval_after: float | None
    losses: list[float] = field(default_factory=list)  # the training loss of each step run here
    step_seconds: list[float] = field(default_factory=list)  # wall-clock time of each step run here

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    def describe(self) -> str:
        """One line: steps, tokens, time, rate and the held-out loss before and after."""
        held = " -> ".join("-" if v is None else f"{v:.4f}" for v in (self.eval_before, self.eval_after))
        return (f"{self.steps} steps, {self.tokens} tokens in {self.seconds:.0f} s ({self.tokens_per_second:.0f} "
                f"tokens/s); held-out loss {held}")


def total_steps(context: TrainContext) -> int:
    """The optimizer steps a stage runs: ``steps``, else ``tokens`` over the tokens a step, else one pass over
    the training windows."""
    spec = context.settings
    per_step = spec.batch_size * spec.grad_accum * context.data.seq_len
    if spec.steps is not None:
        return spec.steps
    tokens = spec.tokens if spec.tokens is not None else context.data.input_ids.numel()
    return max(1, math.ceil(tokens / per_step))


def learning_rate_factor(step: int, total: int, warmup: float, min_lr: float) -> float:
    """The schedule at ``step`` (0-based) of ``total``, as a fraction of the peak rate: linear from 1/(w+1) to 1 over
    the first ``w = round(warmup * total)`` steps, then a cosine from 1 down to ``min_lr`` at the last step."""
    w = round(warmup * total)
    if step < w:
        return (step + 1) / (w + 1)
    span = max(1, total - w - 1)
    progress = min(1.0, (step - w) / span)
    return min_lr + (1 - min_lr) * 0.5 * (1 + math.cos(math.pi * progress))


def _accelerator(device: torch.device, mixed_precision: str):
    from accelerate import Accelerator

    guard = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
    with guard:
        return Accelerator(cpu=device.type == "cpu", mixed_precision=mixed_precision)


def _precision(setting: str, model: nn.Module, trained: dict[str, nn.Parameter]) -> str:
    """accelerate's mixed_precision for ``setting``; auto: the dtype of the model's frozen weights, when half."""
    if setting != "auto":
        return setting
    dtype = next((p.dtype for n, p in model.named_parameters() if n not in trained and p.is_floating_point()),
                 torch.float32)
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "no")


def _release(accelerator) -> None:
    """Forget the accelerate state of this stage, so a later stage may ask for another precision or device (a
    distributed run keeps its process group)."""
    from accelerate.state import AcceleratorState

    accelerator.free_memory()
    AcceleratorState._reset_state(reset_partial_state=False)


def _sample_order(samples: int, seed: int, passes: dict[int, torch.Tensor], position: int) -> int:
    """The window at ``position`` of the endless sequence of passes (each a permutation from ``seed`` and the pass)."""
    index, offset = divmod(position, samples)
    if index not in passes:
        passes.clear()  # only the current pass (and the next) are ever needed
        passes[index] = torch.randperm(samples, generator=torch.Generator().manual_seed(seed * 1_000_003 + index))
    return int(passes[index][offset])


def _checkpoints(folder: Path | None) -> list[Path]:
    if folder is None or not folder.is_dir():
        return []
    return sorted(folder.glob("step-*.pt"))


def last_checkpoint(folder: Path | None) -> Path | None:
    """The newest checkpoint a training stage left in ``folder`` (None when there is none)."""
    found = _checkpoints(folder)
    return found[-1] if found else None


def left_checkpoints(work_dir: Path) -> list[Path]:
    """The newest checkpoint of every training stage (``stage-N``) in a run's work folder, by stage."""
    stages = sorted(work_dir.glob("stage-*"), key=lambda p: (len(p.name), p.name)) if work_dir.is_dir() else []
    return [found for stage in stages if (found := last_checkpoint(stage)) is not None]


def _fingerprint(context: TrainContext, total: int) -> dict:
    return {"settings": context.settings.model_dump(mode="json"), "trainable": list(context.trainable),
            "total": total}


def _save(folder: Path, step: int, params: dict[str, nn.Parameter], optimizer, fingerprint: dict) -> Path:
    """Write ``step-N.pt`` atomically (a temporary file renamed), then drop all but the newest few."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"step-{step:07d}.pt"
    partial = folder / f".{path.name}.partial"
    state = {"step": step, "params": {n: p.detach().cpu() for n, p in params.items()},
             "optimizer": optimizer.state_dict(), "rng": torch.get_rng_state(), "fingerprint": fingerprint}
    torch.save(state, partial)
    os.replace(partial, path)
    for old in _checkpoints(folder)[:-KEEP_CHECKPOINTS]:
        old.unlink()
    return path


def _load(path: Path, params: dict[str, nn.Parameter], optimizer, fingerprint: dict) -> int:
    state = torch.load(path, map_location="cpu", weights_only=False)
    if state["fingerprint"] != fingerprint:
        raise UsageError(f"{path} was written by a training stage with other settings or other trainable tensors; "
                         "resume only with the recipe that wrote it, or delete the folder to start over")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(state["params"][name])
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"])
    return state["step"]


@torch.no_grad()
def evaluate(model: nn.Module, loss_fn: LossFn, context: TrainContext, device: torch.device, autocast) -> float | None:
    """The mean loss over the held-out windows (None when there are none)."""
    if context.held_out is None or context.held_out.samples == 0:
        return None
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for batch in context.held_out.input_batches(context.settings.batch_size, device):
        with autocast():
            loss, _ = loss_fn(model, batch)
        total += float(loss) * batch["input_ids"].shape[0]
        count += batch["input_ids"].shape[0]
    model.train(was_training)
    return total / count


def _groups(params: list[nn.Parameter], spec) -> list[dict]:
    """The optimizer's parameter groups: one at ``lr``, or with ``lr_relative`` one a tensor at ``lr`` times its
    root mean square before training (a tensor of zeros at ``lr``)."""
    if not spec.lr_relative:
        return [{"params": params, "lr": spec.lr}]
    rms = [float(p.detach().float().pow(2).mean().sqrt()) for p in params]
    return [{"params": [p], "lr": spec.lr * (r if r > 0 else 1.0)} for p, r in zip(params, rms)]


def _optimizer(kind: str, params: list[nn.Parameter], spec, device: torch.device, label: str):
    """AdamW, or bitsandbytes' paged 8-bit AdamW where it runs (CUDA); elsewhere AdamW, said in the log."""
    groups = _groups(params, spec)
    if kind == "paged_adamw_8bit":
        if device.type == "cuda":
            import bitsandbytes as bnb

            return bnb.optim.PagedAdamW8bit(groups, lr=spec.lr, weight_decay=spec.weight_decay)
        log.info("%s: paged 8-bit AdamW needs CUDA; training on %s with AdamW", label, device)
    return torch.optim.AdamW(groups, lr=spec.lr, weight_decay=spec.weight_decay)


def fit(context: TrainContext, loss_fn: LossFn, label: str = "train", optimizer: str = "adamw") -> TrainReport:
    """Train ``context.trainable`` to lower ``loss_fn`` (see the module doc) with ``optimizer`` (``adamw`` or
    ``paged_adamw_8bit``; ``training.optimizer`` overrides it); the model is changed in place and left on the
    device it came from. Raises :class:`TrainingError` on a non-finite loss."""
    spec = context.settings
    params = context.trainable_parameters()
    if not params:
        raise UsageError(f"{label}: nothing to train: the step's targets and the kinds it trains select no tensor")
    model, teacher = context.model, context.teacher
    home = next(model.parameters()).device
    accelerator = _accelerator(context.device, _precision(spec.mixed_precision, model, params))
    device = accelerator.device
    try:
        model.to(device)
        if teacher is not None:
            teacher.to(device)
        masks = {n: m.to(device) for n, m in context.masks.items()}
        optimizer = accelerator.prepare_optimizer(
            _optimizer(spec.optimizer or optimizer, list(params.values()), spec, device, label))
        total = total_steps(context)
        fingerprint = _fingerprint(context, total)
        start = 0
        if context.resume and (found := last_checkpoint(context.checkpoint_dir)) is not None:
            start = _load(found, params, optimizer, fingerprint)
            log.info("%s: resumed from %s (step %d of %d)", label, found, start, total)
        else:
            torch.manual_seed(spec.seed)
        schedule = torch.optim.lr_scheduler.LambdaLR(  # counts from the step training starts at
            optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer,
            lambda step: learning_rate_factor(start + step, total, spec.warmup, spec.min_lr))
        if spec.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        running = accelerator.prepare_model(model) if accelerator.num_processes > 1 else model
        report = _loop(running, loss_fn, context, accelerator, optimizer, schedule, params, masks, start, total,
                       fingerprint, label)
    finally:
        if spec.gradient_checkpointing:
            model.gradient_checkpointing_disable()
        model.to(home)
        if teacher is not None:
            teacher.to(home)
        _release(accelerator)
    return report


def _loop(model, loss_fn, context, accelerator, optimizer, schedule, params, masks, start, total, fingerprint,
          label) -> TrainReport:
    spec = context.settings
    device = accelerator.device
    data = context.data
    world, rank = accelerator.num_processes, accelerator.process_index
    step_tokens = spec.batch_size * spec.grad_accum * data.seq_len * world
    passes: dict[int, torch.Tensor] = {}
    eval_before = evaluate(model, loss_fn, context, device, accelerator.autocast)
    if eval_before is not None:
        log.info("%s: held-out loss %.4f before training", label, eval_before)
    model.train()
    losses: list[float] = []
    times: list[float] = []
    began = time.perf_counter()
    bar = tqdm(total=total, initial=start, desc=label, unit="step", disable=None)
    every = max(1, total // 10)
    with contextlib.closing(bar):
        for step in range(start, total):
            step_began = time.perf_counter()
            step_loss, parts = 0.0, {}
            for micro in range(spec.grad_accum):
                first = ((step * spec.grad_accum + micro) * world + rank) * spec.batch_size
                rows = [_sample_order(data.samples, spec.seed, passes, first + i) for i in range(spec.batch_size)]
                with accelerator.autocast():
                    loss, parts = loss_fn(model, data.take(rows).model_inputs(device))
                seen = _mean_over_processes(accelerator, loss.detach())  # every process stops on one's NaN
                if not torch.isfinite(seen).all():
                    raise TrainingError(_nonfinite_message(label, step, total, float(seen), parts, context))
                accelerator.backward(loss / spec.grad_accum)
                step_loss += float(seen) / spec.grad_accum
            if spec.clip is not None:
                accelerator.clip_grad_norm_(list(params.values()), spec.clip)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            with torch.no_grad():
                for name, mask in masks.items():
                    params[name].mul_(mask)
            losses.append(step_loss)
            times.append(time.perf_counter() - step_began)
            done = step + 1
            rate = (done - start) * step_tokens / max(time.perf_counter() - began, 1e-9)
            bar.set_postfix(loss=f"{step_loss:.4f}", tok_s=f"{rate:,.0f}", refresh=False)
            bar.update(1)
            if bar.disable and (done % every == 0 or done == total):
                log.info("%s: step %d of %d, loss %.4f, %.0f tokens/s, %.0f s", label, done, total, step_loss, rate,
                         time.perf_counter() - began)
            if spec.eval_every and done % spec.eval_every == 0 and done < total:
                held = evaluate(model, loss_fn, context, device, accelerator.autocast)
                if held is not None:
                    log.info("%s: step %d, held-out loss %.4f", label, done, held)
            if context.checkpoint_dir is not None and accelerator.is_main_process and (
                    done % spec.save_every == 0 or done == total):
                _save(context.checkpoint_dir, done, params, optimizer, fingerprint)
    seconds = time.perf_counter() - began
    eval_after = evaluate(model, loss_fn, context, device, accelerator.autocast)
    if eval_after is not None:
        log.info("%s: held-out loss %.4f after %d steps (%.4f before)", label, eval_after, total, eval_before)
    return TrainReport(total - start, (total - start) * step_tokens, seconds, eval_before, eval_after, losses, times)


def _mean_over_processes(accelerator, value: torch.Tensor) -> torch.Tensor:
    """``value`` averaged over the processes of a launched run (itself in a single process): the loss every
    process logs and checks, so that a NaN in one stops them all with the same message."""
    if accelerator.num_processes == 1:
        return value
    return accelerator.reduce(value.float().reshape(1), reduction="mean")[0]


def _nonfinite_message(label: str, step: int, total: int, loss: float, parts: dict[str, float],
                       context: TrainContext) -> str:
    detail = ", ".join(f"{k} {v:.4g}" for k, v in parts.items())
    last = last_checkpoint(context.checkpoint_dir)
    where = (f"the last good checkpoint is {last} (kept): after lowering training.lr, `compress apply ... --resume` "
             "continues from it" if last is not None else
             f"no checkpoint was written before it (training.save_every: {context.settings.save_every})")
    return (f"{label}: the loss became {loss} at step {step + 1} of {total}" + (f" ({detail})" if detail else "")
            + f"; training stopped, and {where}. A lower training.lr, a clip, or float32 weights usually help")
