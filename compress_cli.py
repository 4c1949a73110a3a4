"""The ``compress`` command: its commands, options and help, declared without importing torch, transformers or
compress, so that ``compress --help`` and ``compress COMMAND --help`` answer at once. Each command's work is done by
:mod:`compress.cli`, imported when the command runs (importing ``compress`` takes seconds: torch, transformers, and
the registration that teaches transformers to load compress checkpoints).

This module sits outside the ``compress`` package because importing anything inside it imports ``compress``.
"""

from __future__ import annotations

import functools
import logging
import os
import sys

import click


def _setup_logging(verbose: int) -> None:
    level = logging.WARNING if verbose < 0 else logging.INFO if verbose == 0 else logging.DEBUG
    if os.environ.get("RANK", "0") not in ("", "0"):  # a launcher's other processes: the main one reports progress
        level = max(level, logging.WARNING)
        os.environ["TQDM_DISABLE"] = "1"
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("httpx", "urllib3", "filelock", "matplotlib", "ContinuousBatchingLogger"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    for own_handler in ("huggingface_hub", "datasets"):  # they print through a handler of their own: once is enough
        logging.getLogger(own_handler).propagate = False


def _runs(name: str):
    """Declare a command whose work is ``compress.cli.<name>(**its parameters)``. A CompressError is printed as one
    clean block and exits with its code; --debug keeps the traceback."""

    def declare(declaration):
        @functools.wraps(declaration)
        def command(**params):
            ctx = click.get_current_context()
            from compress import cli as commands
            from compress.errors import CompressError

            try:
                return getattr(commands, name)(**params)
            except CompressError as exc:
                if ctx.obj.get("debug"):
                    raise
                click.echo(f"error: {exc}", err=True)
                ctx.exit(exc.exit_code)

        return command

    return declare


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
@_runs("plugins_cmd")
def plugins_cmd() -> None:
    """List the installed compression methods (built-in and third-party), then the storage formats and
    runtime features."""


def _recipe_options(fn):
    fn = click.option("--calib", metavar="DATA", help="Calibration data (a .txt/.jsonl/.parquet file or a "
                      "datasets id); overrides the recipe's calibration.dataset.")(fn)
    fn = click.option("--model", "model", metavar="M", help="Model (Hub id or local directory); overrides "
                      "the recipe's model.path.")(fn)
    fn = click.argument("recipe", type=click.Path(dir_okay=False))(fn)
    return fn


@cli.command("validate")
@_recipe_options
@_runs("validate_cmd")
def validate_cmd(recipe: str, model: str | None, calib: str | None) -> None:
    """Check RECIPE completely without loading weights: the file, each step's arguments, the steps
    together, and the model's structure (on the meta device). Prints which layers each step compresses."""


@cli.command("apply")
@_recipe_options
@click.option("--output", "-o", metavar="DIR", help="Where to write the checkpoint (default: the recipe's "
              "output, else ./compressed/<model>-<recipe>).")
@click.option("--device", metavar="D", help="Execution device: auto, cpu, cuda, cuda:N (default: recipe's, else auto).")
@click.option("--overwrite", is_flag=True, help="Replace an existing checkpoint at the output.")
@click.option("--data", metavar="DATA", help="Training data of the recipe's training steps (a .txt/.jsonl/.parquet "
              "file or a datasets id); overrides training.dataset.")
@click.option("--resume", is_flag=True, help="Continue the training stages of an interrupted run from the last "
              "checkpoint it left in the work folder (.<output>.work beside the output).")
@_runs("apply_cmd")
def apply_cmd(recipe: str, model: str | None, calib: str | None, output: str | None, device: str | None,
              overwrite: bool, data: str | None, resume: bool) -> None:
    """Compress a model with RECIPE and write the checkpoint.

    \b
    The recipe is checked completely before any weight is loaded. Writing is atomic: a failed or killed
    run leaves nothing at the output. Running the same recipe again on the same model is a no-op.
    Training stages (distill, qlora) save checkpoints every training.save_every steps in the work folder;
    after an interruption, the same command with --resume continues from the last of them.
    """


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
@click.option("--kv-cache", type=click.Choice(["fp8", "int8", "int4", "int2"]), help="Evaluate the model with a "
              "quantized KV cache (compress.kv): perplexity prefills each window's first --kv-prefill tokens, then "
              "feeds one token a step through the cache (the baseline runs without it).")
@click.option("--kv-group-size", type=int, metavar="N", help="Tokens per key scale and channels per value scale of an "
              "int cache (default 64; must divide the heads' dimension).")
@click.option("--kv-residual", type=int, metavar="N", help="Most recent tokens an int cache keeps in full precision "
              "(default 128).")
@click.option("--kv-prefill", type=int, metavar="N", help="Tokens of each perplexity window given at once before "
              "the token-by-token part (default 128).")
@click.option("--json", "json_path", metavar="FILE", help="Write the machine-readable report here.")
@click.option("--output", "-o", metavar="DIR", help="Write report.json, report.md with its plots (PNG) and report.html "
              "here.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--dtype", type=click.Choice(["auto", "float32", "float16", "bfloat16"]), default="auto",
              show_default=True, help="Compute dtype (auto: the checkpoint's).")
@click.option("--no-fuse", is_flag=True, help="Run the models as they are, without fusing the layers that read "
              "the same input (q/k/v, gate/up: compress.fuse_projections, done by default).")
@_runs("eval_cmd")
def eval_cmd(model: str, **options) -> None:
    """Evaluate MODEL (a Hub id, a model directory or a compress checkpoint), against --baseline.

    \b
    Perplexity (stated protocol), KL divergence and greedy agreement with the baseline, outputs side by
    side, memory (disk, weights by dtype, KV cache, peak), generation speed and speculative decoding.
    Example:
      compress eval compressed/w4 --baseline ORIGINAL --data wiki.test.raw --json w4.json --output reports/w4
    """


@cli.command("report")
@click.argument("reports", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--output", "-o", metavar="DIR", help="Write report.md with its plots (PNG) and report.html here "
              "(default: print the Markdown, without the plots).")
@_runs("report_cmd")
def report_cmd(reports: tuple[str, ...], output: str | None) -> None:
    """Merge the JSON reports of several `compress eval` runs into one comparison.

    Perplexities measured under different protocols (window, stride, BOS, text) go in separate tables.
    """


@cli.command("push")
@click.argument("folder", type=click.Path(file_okay=False))
@click.argument("repo_id")
@click.option("--private", is_flag=True, help="Create the repository private (an existing one keeps its visibility).")
@click.option("--revision", metavar="BRANCH", help="Commit to this branch, created from main when missing "
              "(default: main).")
@click.option("--token", metavar="TOKEN", help="Hub token with write access (default: HF_TOKEN, else the login "
              "saved by `hf auth login`). Never printed or written.")
@click.option("--card", is_flag=True, help="Write the model card (README.md) again, even if the folder has one.")
@click.option("--report", "reports", multiple=True, type=click.Path(dir_okay=False), metavar="JSON",
              help="A `compress eval --json` report for the card's evaluation section (repeatable; default: "
              "FOLDER/report.json when present).")
@click.option("--base-model", metavar="ID", help="The Hub id of the model that was compressed, for the card "
              "(default: the recipe's model when it is a Hub id or in the Hub cache).")
@click.option("--dry-run", is_flag=True, help="Check the folder, write the card and list the files and bytes that "
              "would be sent; touch nothing remote.")
@_runs("push_cmd")
def push_cmd(folder: str, repo_id: str, **options) -> None:
    """Push the compressed checkpoint FOLDER to the Hugging Face Hub repository REPO_ID (org/name).

    \b
    FOLDER must be a complete checkpoint written by `compress apply` whose weights match its config;
    a model card (README.md: base model, tags, the recipe, evaluation results, how to load) is written
    unless the folder has one. Every file goes in ONE commit: a failed or interrupted push leaves the
    repository as it was. The Hub's address is HF_ENDPOINT (default huggingface.co).
    Example:
      compress push compressed/llama-w4 my-org/llama-w4 --report reports/w4.json --dry-run
    """


@cli.command("export")
@click.argument("folder", type=click.Path(file_okay=False))
@click.option("--format", "layout", type=click.Choice(["compressed-tensors", "gptq"]), required=True,
              help="compressed-tensors: llm-compressor's layout (int layers pack-quantized or int-quantized, fp8 "
              "float-quantized), read by transformers with the compressed-tensors package, vLLM and SGLang. gptq: "
              "the GPTQ layout (int32 qweight / qzeros, scales, g_idx) that transformers, vLLM, SGLang and TGI read.")
@click.option("--output", "-o", metavar="DIR", required=True, help="Where the exported checkpoint is written.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output.")
@_runs("export_cmd")
def export_cmd(folder: str, **options) -> None:
    """Write the compress checkpoint FOLDER in the layout a serving engine reads.

    \b
    compressed-tensors takes int layers of 2-8 bits (groups that divide the layer) and fp8 layers;
    gptq takes int layers of 2, 4 or 8 bits, one bit width and group size a model, every linear layer
    of the decoder blocks quantized. What a layout cannot express is refused with the layer and the
    reason, and nothing is written. compress.load reads GPTQ checkpoints back (no re-quantization).
    Example:
      compress export compressed/llama-w4 --format compressed-tensors --output exported/llama-w4-ct
    """


def main() -> None:
    cli(obj={})


if __name__ == "__main__":
    main()
