"""The work of the ``compress`` commands. Their options and help are declared in :mod:`compress_cli` (outside this
package, so that ``--help`` does not import torch), which calls the functions here, with the options as keyword
arguments, when a command runs. Library code logs; the command line prints.
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import click

from compress import distributed

if TYPE_CHECKING:
    from compress.recipe import Recipe

__all__ = ["apply_cmd", "eval_cmd", "export_cmd", "plugins_cmd", "push_cmd", "report_cmd", "validate_cmd"]


def _cwd_path(value: str | None) -> str | None:
    """A command-line path made absolute against the working directory (Hub ids are left alone)."""
    from compress.model import is_local_reference

    if value is None or not is_local_reference(value):
        return value
    return str(Path(value).expanduser().resolve())


def plugins_cmd() -> None:
    """``compress plugins``: the methods (importing each, to show what it needs, its summary, or why it is broken),
    then the storage formats and runtime features."""
    from compress.errors import PluginError
    from compress.formats import formats
    from compress.registry import registry
    from compress.runtime import features

    infos = registry.describe()
    width = max((len(i.name) for i in infos), default=4)
    for info in infos:
        if info.error:
            click.echo(f"{info.name:<{width}}  BROKEN  {info.distribution}: {info.error}")
        else:
            click.echo(f"{info.name:<{width}}  {info.needs:<11}  {info.summary}  [{info.distribution}]")
    for title, entries in (("formats", formats), ("runtime features", features)):
        listed = []
        for name in entries.names():
            try:
                entries.get(name)
                listed.append(f"{name} [{entries.declared_by(name)}]")
            except PluginError as exc:
                listed.append(f"{name} BROKEN: {exc}")
        click.echo(f"{title}: {', '.join(listed) or 'none'}")


def _overrides(model: str | None, calib: str | None, **extra: str | None) -> dict:
    values = {"model.path": _cwd_path(model), "calibration.dataset": _cwd_path(calib), **extra}
    return {k: v for k, v in values.items() if v is not None}


def validate_cmd(recipe: str, model: str | None, calib: str | None) -> None:
    """``compress validate``: check the recipe completely (the model on the meta device) and print the plan."""
    from compress.api import check_recipe

    checked = check_recipe(recipe, _overrides(model, calib), _sections())
    click.echo(f"{recipe}: OK for {checked.recipe.model.path}")
    click.echo(checked.plan.describe())


def _sections() -> dict:
    """The recipe sections the evaluation harness owns, checked with the rest of the recipe."""
    from compress.eval.spec import EvalSpec

    return {"eval": EvalSpec}


def _same_recipe(stored: dict | None, recipe: Recipe) -> bool:
    """Whether a checkpoint's stored recipe is ``recipe``, read with today's defaults (a field added since it
    was written does not make an old checkpoint a different recipe)."""
    from pydantic import ValidationError

    from compress.recipe import Recipe

    from compress.eval.spec import EvalSpec

    def canonical(data: dict) -> dict:
        data = Recipe.model_validate(data).to_dict()
        if data.get("eval") is not None:  # with the harness's defaults, as older checkpoints stored it
            data["eval"] = EvalSpec.model_validate(data["eval"]).model_dump(mode="json", exclude_none=True)
        return data

    if stored is None:
        return False
    try:
        return canonical(stored) == canonical(recipe.to_dict())
    except ValidationError:
        return False


def _check_resume(work_dir: Path, resume: bool) -> None:
    """Refuse to start over on top of an interrupted run's training checkpoints unless told which way to go."""
    from compress.errors import UsageError
    from compress.trainer import left_checkpoints

    left = left_checkpoints(work_dir)
    if left and not resume:
        raise UsageError(f"an interrupted run left training checkpoints in {work_dir} (the newest: {left[-1]}); "
                         "pass --resume to continue from them, or delete that folder to start over")
    if resume and not left:
        click.echo(f"--resume: no training checkpoint in {work_dir}; starting from the beginning")


def apply_cmd(recipe: str, model: str | None, calib: str | None, output: str | None, device: str | None,
              overwrite: bool, data: str | None = None, resume: bool = False) -> None:
    """``compress apply``: check the recipe, compress, write the checkpoint atomically (a no-op when the output
    holds this recipe's checkpoint of the same model), then run the recipe's eval: section. Training stages
    keep checkpoints in the work folder; ``resume`` continues from them, and without it they are not touched."""
    from compress.api import check_recipe, run_checked, run_streamed, streams
    from compress.checkpoint import recover_leftovers, save
    from compress.checkpoint_files import read_quantization_config
    from compress.errors import UsageError
    from compress.formats import storage_summary

    checked = check_recipe(recipe, _overrides(model, calib, **{"output": _cwd_path(output), "model.device": device,
                                                               "training.dataset": _cwd_path(data)}), _sections())
    target = Path(checked.recipe.output or _default_output(checked.recipe.model.path, recipe)).resolve()
    work_dir = target.parent / f".{target.name}.work"  # resumable or scratch state, until the checkpoint is written
    if not distributed.is_main():  # another process of `accelerate launch`: trains its share, writes nothing
        _help_the_main_process(checked, work_dir, resume)
        return
    if distributed.world_size() > 1 and not checked.plan.trains():
        click.echo(f"{distributed.world_size()} processes were launched, but the recipe has no training stage: "
                   "this process compresses alone and the others stop")
    recover_leftovers(target)  # an interrupted --overwrite's old checkpoint goes back first
    if target.exists() and not overwrite:
        stored = read_quantization_config(target) if (target / "config.json").exists() else None
        if stored is not None and _same_recipe(stored.get("recipe"), checked.recipe):
            click.echo(f"{target} is up to date (same recipe and model); use --overwrite to redo it")
            return
        raise UsageError(f"output {target} already exists and was not made by this recipe; pass --overwrite "
                         "to replace it, or choose another --output")
    start = time.perf_counter()
    _check_resume(work_dir, resume)
    if streams(checked):  # block by block from the checkpoint's files, written as it goes
        compressed, tokenizer = run_streamed(checked, target, overwrite, work_dir)
        elapsed = time.perf_counter() - start
    else:
        compressed, tokenizer = run_checked(checked, work_dir, resume)
        elapsed = time.perf_counter() - start
        save(compressed, target, tokenizer, recipe=checked.recipe.to_dict(), overwrite=overwrite)
    shutil.rmtree(work_dir, ignore_errors=True)
    click.echo(f"compressed in {elapsed:.1f} s; wrote {target}")
    click.echo(_peak_memory())
    click.echo(storage_summary(compressed))
    if checked.recipe.eval is not None:
        from compress.eval.runner import run_recipe_eval

        click.echo(run_recipe_eval(checked.recipe, target))


def _help_the_main_process(checked, work_dir: Path, resume: bool) -> None:
    """``compress apply`` in a process other than the main one: take part in the recipe's training stages (each
    process trains on its share of every batch) and leave the output, the work folder and the printing to the
    main process. A recipe without training has nothing to share: the process stops at once."""
    from compress.api import run_checked

    if checked.plan.trains():
        run_checked(checked, work_dir, resume)


def peak_rss() -> int:
    """The most resident memory this process has held, in bytes: Linux's VmHWM where there is one (getrusage's
    ru_maxrss survives exec, so a process started by a larger one would report its parent's peak), else
    ru_maxrss."""
    import resource

    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def _peak_memory() -> str:
    """The most memory this process has held: resident CPU memory, and GPU memory where CUDA was used."""
    import torch

    line = f"peak memory: {peak_rss() / 1e9:.2f} GB CPU (resident)"
    if torch.cuda.is_initialized():
        line += (f", {torch.cuda.max_memory_allocated() / 1e9:.2f} GB GPU allocated "
                 f"({torch.cuda.max_memory_reserved() / 1e9:.2f} GB reserved)")
    return line


def _split_list(value: str | None) -> list[str] | None:
    return None if value is None else [v.strip() for v in value.split(",") if v.strip()]


def eval_cmd(model: str, baseline: str | None, tasks: str | None, data: str | None, seq_len: int | None,
             stride: int | None, bos: bool, max_tokens: int | None, batch_size: int | None, prompts: str | None,
             draft: str | None, batch_sizes: str | None, speed_configs: str | None, prompt_len: int | None,
             new_tokens: int | None, repeats: int | None, kv_cache: str | None, kv_group_size: int | None,
             kv_residual: int | None, kv_prefill: int | None, json_path: str | None, output: str | None,
             device: str, dtype: str, no_fuse: bool) -> None:
    """``compress eval``: check the options, evaluate, print the summary and write the reports asked for."""
    from compress.errors import UsageError
    from compress.eval.report import summary
    from compress.eval.runner import evaluate, eval_spec, write_outputs
    from compress.model import check_device

    problem = check_device(device)  # before any model, config or text is read
    if problem:
        raise UsageError(problem)
    kv_options = {"group_size": kv_group_size, "residual": kv_residual, "prefill": kv_prefill}
    if kv_cache is None and any(v is not None for v in kv_options.values()):
        given = ", ".join(f"--kv-{k.replace('_', '-')}" for k, v in kv_options.items() if v is not None)
        raise UsageError(f"{given} set without --kv-cache: add --kv-cache fp8|int8|int4|int2, or drop them")
    spec = eval_spec({"kv_cache": None if kv_cache is None else {"scheme": kv_cache, **kv_options},
                      "tasks": _split_list(tasks), "data": _cwd_path(data), "seq_len": seq_len, "stride": stride,
                      "bos": bos or None, "max_tokens": max_tokens, "batch_size": batch_size,
                      "fuse": False if no_fuse else None,
                      "prompts": _cwd_path(prompts), "speculative": {"draft": _cwd_path(draft)},
                      "speed": {"batch_sizes": _split_list(batch_sizes), "configs": _split_list(speed_configs),
                                "prompt_len": prompt_len, "new_tokens": new_tokens, "repeats": repeats}})
    report = evaluate(_cwd_path(model), spec, _cwd_path(baseline), device, dtype)
    click.echo(summary(report))
    for path in write_outputs(report, json_path, output):
        click.echo(f"wrote {path}")


def report_cmd(reports: tuple[str, ...], output: str | None) -> None:
    """``compress report``: merge run reports; print the Markdown (without plots), or write every file to
    ``output``."""
    from compress.eval.report import load_reports, printable, write_document

    runs = load_reports(list(reports))
    if output is None:
        markdown, plots = printable(runs)
        click.echo(markdown)
        if plots:
            click.echo(f"{len(plots)} plot{'s' if len(plots) > 1 else ''} ({', '.join(p.lower() for p in plots)}) "
                       f"{'are' if len(plots) > 1 else 'is'} not printed: pass --output DIR to write them as PNG "
                       "files with report.md and report.html", err=True)
        return
    for path in write_document(runs, output):
        click.echo(f"wrote {path}")


def push_cmd(folder: str, repo_id: str, private: bool, revision: str | None, token: str | None, card: bool,
             reports: tuple[str, ...], base_model: str | None, dry_run: bool) -> None:
    """``compress push``: check the checkpoint, write its card, list what is sent, then send it in one commit
    (or stop there with ``dry_run``)."""
    from compress.push import plan_push, push

    plan = plan_push(_cwd_path(folder), repo_id, card, [_cwd_path(r) for r in reports] or None, base_model)
    click.echo(plan.describe())
    if dry_run:
        click.echo("dry run: nothing was sent")
        return
    url = push(plan, private, revision, token)
    click.echo(f"pushed {len(plan.files)} files to {repo_id} in one commit: {url}")


def export_cmd(folder: str, layout: str, output: str, overwrite: bool) -> None:
    """``compress export``: the checkpoint rewritten in ``layout``, atomically."""
    from compress.export import export

    written = export(_cwd_path(folder), layout, _cwd_path(output), overwrite)
    click.echo(f"wrote {written} ({layout})")


def _default_output(model_ref: str, recipe: str) -> str:
    return str(Path("compressed") / f"{Path(model_ref).name}-{Path(recipe).stem}")

