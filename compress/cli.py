"""The ``compress`` command line. Library code logs; this module prints."""

from __future__ import annotations

import functools
import logging
import shutil
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import click

from compress.errors import CompressError

if TYPE_CHECKING:
    from compress.recipe import Recipe

log = logging.getLogger("compress")


def _setup_logging(verbose: int) -> None:
    level = logging.WARNING if verbose < 0 else logging.INFO if verbose == 0 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("httpx", "urllib3", "filelock", "matplotlib", "ContinuousBatchingLogger"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _friendly_errors(fn):
    """Print CompressErrors as one clean block with their exit code; --debug keeps the traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        ctx = click.get_current_context()
        try:
            return fn(*args, **kwargs)
        except CompressError as exc:
            if ctx.obj.get("debug"):
                raise
            click.echo(f"error: {exc}", err=True)
            ctx.exit(exc.exit_code)

    return wrapper


def _cwd_path(value: str | None) -> str | None:
    """A command-line path made absolute against the working directory (Hub ids are left alone)."""
    from compress.model import is_local_reference

    if value is None or not is_local_reference(value):
        return value
    return str(Path(value).expanduser().resolve())


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--debug", is_flag=True, help="Show full tracebacks for errors.")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug logs).")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors in the log.")
@click.version_option(package_name="compress-llm")
@click.pass_context
def cli(ctx: click.Context, debug: bool, verbose: int, quiet: bool) -> None:
    """Make Hugging Face language models smaller and faster.

    \b
    A recipe (YAML) lists compression steps; `compress apply` runs it and writes a checkpoint that
    `compress.load(dir)` or transformers' `from_pretrained` (after `import compress`) loads.
    Exit codes: 0 success, 1 a failure while running, 2 a problem with what was given.
    """
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug
    _setup_logging(-1 if quiet else verbose)


@cli.command("plugins")
@click.pass_context
@_friendly_errors
def plugins_cmd(ctx: click.Context) -> None:
    """List the installed compression methods (built-in and third-party), then the storage formats and
    runtime features."""
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


def _recipe_options(fn):
    fn = click.option("--calib", metavar="DATA", help="Calibration data (a .txt/.jsonl/.parquet file or a "
                      "datasets id); overrides the recipe's calibration.dataset.")(fn)
    fn = click.option("--model", "model", metavar="M", help="Model (Hub id or local directory); overrides "
                      "the recipe's model.path.")(fn)
    fn = click.argument("recipe", type=click.Path(dir_okay=False))(fn)
    return fn


def _overrides(model: str | None, calib: str | None, **extra: str | None) -> dict:
    values = {"model.path": _cwd_path(model), "calibration.dataset": _cwd_path(calib), **extra}
    return {k: v for k, v in values.items() if v is not None}


@cli.command("validate")
@_recipe_options
@click.pass_context
@_friendly_errors
def validate_cmd(ctx: click.Context, recipe: str, model: str | None, calib: str | None) -> None:
    """Check RECIPE completely without loading weights: the file, each step's arguments, the steps
    together, and the model's structure (on the meta device). Prints which layers each step compresses."""
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


@cli.command("apply")
@_recipe_options
@click.option("--output", "-o", metavar="DIR", help="Where to write the checkpoint (default: the recipe's "
              "output, else ./compressed/<model>-<recipe>).")
@click.option("--device", metavar="D", help="Execution device: auto, cpu, cuda, cuda:N (default: recipe's, else auto).")
@click.option("--overwrite", is_flag=True, help="Replace an existing checkpoint at the output.")
@click.pass_context
@_friendly_errors
def apply_cmd(ctx: click.Context, recipe: str, model: str | None, calib: str | None, output: str | None,
              device: str | None, overwrite: bool) -> None:
    """Compress a model with RECIPE and write the checkpoint.

    \b
    The recipe is checked completely before any weight is loaded. Writing is atomic: a failed or killed
    run leaves nothing at the output. Running the same recipe again on the same model is a no-op.
    """
    from compress.api import check_recipe, run_checked
    from compress.checkpoint import read_quantization_config, save
    from compress.errors import UsageError
    from compress.formats import storage_summary

    checked = check_recipe(recipe, _overrides(model, calib, **{"output": _cwd_path(output), "model.device": device}),
                           _sections())
    target = Path(checked.recipe.output or _default_output(checked.recipe.model.path, recipe))
    if target.exists() and not overwrite:
        stored = read_quantization_config(target) if (target / "config.json").exists() else None
        if stored is not None and _same_recipe(stored.get("recipe"), checked.recipe):
            click.echo(f"{target} is up to date (same recipe and model); use --overwrite to redo it")
            return
        raise UsageError(f"output {target} already exists and was not made by this recipe; pass --overwrite "
                         "to replace it, or choose another --output")
    start = time.perf_counter()
    work_dir = target.parent / f".{target.name}.train"  # training stages' resumable state, until the checkpoint is written
    compressed, tokenizer = run_checked(checked, work_dir)
    elapsed = time.perf_counter() - start
    save(compressed, target, tokenizer, recipe=checked.recipe.to_dict(), overwrite=overwrite)
    shutil.rmtree(work_dir, ignore_errors=True)
    click.echo(f"compressed in {elapsed:.1f} s; wrote {target}")
    click.echo(storage_summary(compressed))
    if checked.recipe.eval is not None:
        from compress.eval.runner import run_recipe_eval

        click.echo(run_recipe_eval(checked.recipe, target))


def _split_list(value: str | None) -> list[str] | None:
    return None if value is None else [v.strip() for v in value.split(",") if v.strip()]


@cli.command("eval")
@click.argument("model")
@click.option("--baseline", metavar="M", help="The original model to compare against (Hub id or directory).")
@click.option("--tasks", metavar="LIST", help="Comma-separated, from ppl, kl, samples, memory, speed, speculative "
              "(default: ppl,kl,samples,memory; kl needs --baseline).")
@click.option("--data", metavar="DATA", help="Evaluation text: a file (read as is, e.g. wiki.test.raw), a "
              ".jsonl/.parquet file, or DATASET_ID[:CONFIG[:SPLIT]] (default: WikiText-2 raw test, joined "
              "with blank lines).")
@click.option("--seq-len", type=int, metavar="N", help="Perplexity window (default: min(2048, the model's context)).")
@click.option("--stride", type=int, metavar="N", help="Sliding windows that score their last N tokens "
              "(default: non-overlapping windows).")
@click.option("--bos", is_flag=True, help="Prepend the BOS token to every window.")
@click.option("--max-tokens", type=int, metavar="N", help="Evaluate the first N tokens of the text only.")
@click.option("--batch-size", type=int, metavar="N", help="Windows per forward pass (default 8).")
@click.option("--prompts", metavar="FILE", help="Prompts for the samples task, one a line (default: a built-in set).")
@click.option("--draft", metavar="M", help="A draft model for the speculative task (same tokenizer).")
@click.option("--batch-sizes", metavar="LIST", help="Speed task batch sizes (default 1,8,32).")
@click.option("--speed-configs", metavar="LIST", help="Speed task configurations, from no-cache, dynamic, static, "
              "static-compile, compiled-step, compiled-verify (default no-cache,dynamic,static-compile).")
@click.option("--prompt-len", type=int, metavar="N", help="Speed task prompt tokens (default 128).")
@click.option("--new-tokens", type=int, metavar="N", help="Speed task new tokens (default 256; 64 without a KV cache).")
@click.option("--repeats", type=int, metavar="N", help="Speed task timed runs, median reported (default 3).")
@click.option("--json", "json_path", metavar="FILE", help="Write the machine-readable report here.")
@click.option("--output", "-o", metavar="DIR", help="Write report.json, report.md and report.html here.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--dtype", type=click.Choice(["auto", "float32", "float16", "bfloat16"]), default="auto",
              show_default=True, help="Compute dtype (auto: the checkpoint's).")
@click.option("--no-fuse", is_flag=True, help="Run the models as they are, without fusing the layers that read "
              "the same input (q/k/v, gate/up: compress.fuse_projections, done by default).")
@click.pass_context
@_friendly_errors
def eval_cmd(ctx: click.Context, model: str, baseline: str | None, tasks: str | None, data: str | None,
             seq_len: int | None, stride: int | None, bos: bool, max_tokens: int | None, batch_size: int | None,
             prompts: str | None, draft: str | None, batch_sizes: str | None, speed_configs: str | None,
             prompt_len: int | None, new_tokens: int | None, repeats: int | None, json_path: str | None,
             output: str | None, device: str, dtype: str, no_fuse: bool) -> None:
    """Evaluate MODEL (a Hub id, a model directory or a compress checkpoint), against --baseline.

    \b
    Perplexity (stated protocol), KL divergence and greedy agreement with the baseline, outputs side by
    side, memory (disk, weights by dtype, KV cache, peak), generation speed and speculative decoding.
    Example:
      compress eval compressed/w4 --baseline ORIGINAL --data wiki.test.raw --json w4.json --output reports/w4
    """
    from compress.eval.report import summary
    from compress.eval.runner import evaluate, eval_spec, write_outputs

    spec = eval_spec({"tasks": _split_list(tasks), "data": _cwd_path(data), "seq_len": seq_len, "stride": stride,
                      "bos": bos or None, "max_tokens": max_tokens, "batch_size": batch_size,
                      "fuse": False if no_fuse else None,
                      "prompts": _cwd_path(prompts), "speculative": {"draft": _cwd_path(draft)},
                      "speed": {"batch_sizes": _split_list(batch_sizes), "configs": _split_list(speed_configs),
                                "prompt_len": prompt_len, "new_tokens": new_tokens, "repeats": repeats}})
    report = evaluate(_cwd_path(model), spec, _cwd_path(baseline), device, dtype)
    click.echo(summary(report))
    for path in write_outputs(report, json_path, output):
        click.echo(f"wrote {path}")


@cli.command("report")
@click.argument("reports", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--output", "-o", metavar="DIR", help="Write report.md and report.html here (default: print the "
              "Markdown).")
@click.pass_context
@_friendly_errors
def report_cmd(ctx: click.Context, reports: tuple[str, ...], output: str | None) -> None:
    """Merge the JSON reports of several `compress eval` runs into one comparison.

    Perplexities measured under different protocols (window, stride, BOS, text) go in separate tables.
    """
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


def _default_output(model_ref: str, recipe: str) -> str:
    return str(Path("compressed") / f"{Path(model_ref).name}-{Path(recipe).stem}")


def main() -> None:
    cli(obj={})


if __name__ == "__main__":
    main()
