"""Speed benchmark on a random-weight model of a real architecture's shape, built directly on the device.

Decode speed does not depend on weight values, so no download is needed to measure a 1B or 8B model::

    python -m benchmarks.bench --random llama-3.2-1b                      # batch 1, as in ANCHORS.md
    python -m benchmarks.bench --random llama-3.2-1b --batch-sizes 1,8,32 --json speed.json --output reports/speed

It prints the speed table (and the memory table with ``--tasks memory,speed``); for real models, with
quality tasks, use ``compress eval``.
"""

from __future__ import annotations

import logging
import sys

import click
import torch

from compress.errors import CompressError, UsageError

log = logging.getLogger(__name__)

# Architecture shapes (random weights): the anchors' Llama-3.2-1B (1.24B parameters, tied embeddings).
SHAPES = {
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=64, vocab_size=128256, tie_word_embeddings=True,
                         max_position_embeddings=131072, rope_theta=500000.0),
    "llama-3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, head_dim=128, vocab_size=128256, tie_word_embeddings=False,
                       max_position_embeddings=8192, rope_theta=500000.0),
}
# Llama-3-8B with its MLP widened to 14,400, which group 128 does not divide (issue 19's ragged-group speed bar)
SHAPES["llama-3-8b-mlp14400"] = {**SHAPES["llama-3-8b"], "intermediate_size": 14400}


def random_model(shape: str, device: str, dtype: torch.dtype, seed: int = 0):
    """A LlamaForCausalLM of ``shape`` with random weights, allocated and initialised on ``device``."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    if shape not in SHAPES:
        raise UsageError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(LlamaConfig(**SHAPES[shape]), dtype=dtype)
    log.warning("built %s with RANDOM weights on %s (%s): for speed and memory only", shape, device, dtype)
    return model.eval()


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--random", "shape", required=True, help=f"Architecture shape: {', '.join(SHAPES)}.")
@click.option("--tasks", default="speed", show_default=True, help="speed and/or memory, comma-separated.")
@click.option("--batch-sizes", default="1", show_default=True, help="Comma-separated batch sizes.")
@click.option("--speed-configs", default="no-cache,dynamic,static-compile", show_default=True,
              help="From no-cache, dynamic, static, static-compile, compiled-step, compiled-verify.")
@click.option("--prompt-len", default=128, show_default=True)
@click.option("--new-tokens", default=256, show_default=True)
@click.option("--no-cache-new-tokens", default=64, show_default=True, help="New tokens without a KV cache.")
@click.option("--warmup", default=2, show_default=True)
@click.option("--repeats", default=5, show_default=True, help="Timed runs; medians are reported.")
@click.option("--mixed-requests", default=0, show_default=True, help="Also time static vs continuous batching "
              "on this many requests of mixed lengths (0: skip).")
@click.option("--dtype", type=click.Choice(["bfloat16", "float16", "float32"]), default="bfloat16", show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.option("--json", "json_path", help="Write the run's JSON report here.")
@click.option("--output", "-o", help="Write report.md and report.html here.")
def main(shape: str, tasks: str, batch_sizes: str, speed_configs: str, prompt_len: int, new_tokens: int,
         no_cache_new_tokens: int, warmup: int, repeats: int, mixed_requests: int, dtype: str, device: str,
         json_path: str | None, output: str | None) -> None:
    """Time generation of a random-weight model of a real architecture's shape."""
    from compress.eval.render import Plot, to_markdown
    from compress.eval.report import document, summary
    from compress.eval.runner import eval_spec, write_outputs
    from compress.eval.tasks import Subject, evaluate_subjects
    from compress.model import DTYPES, resolve_device

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("ContinuousBatchingLogger").setLevel(logging.WARNING)
    try:
        spec = eval_spec({"tasks": tasks.split(","), "speed": {
            "batch_sizes": batch_sizes.split(","), "configs": speed_configs.split(","), "prompt_len": prompt_len,
            "new_tokens": new_tokens, "no_cache_new_tokens": no_cache_new_tokens, "warmup": warmup,
            "repeats": repeats, "mixed_requests": mixed_requests}})
        if set(spec.tasks) - {"speed", "memory"}:
            raise UsageError("a random-weight model has no tokenizer and meaningless outputs: use --tasks speed,memory")
        model = random_model(shape, resolve_device(device), DTYPES[dtype])
        report = evaluate_subjects(Subject(model, None, f"{shape} (random, {dtype})"), spec)
    except CompressError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)
    click.echo(to_markdown([b for b in document([report]) if not isinstance(b, Plot)]))
    click.echo(summary(report))
    for path in write_outputs(report, json_path, output):
        click.echo(f"wrote {path}")


if __name__ == "__main__":
    main()
