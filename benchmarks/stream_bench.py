"""Memory of compressing a model larger than it by streaming (issue 19): a random-weight model of a real shape is
saved as a Hub-style sharded checkpoint, then ``compress apply`` compresses it with ``model.load: stream`` in a
child process, whose peak resident CPU memory and GPU memory are printed with the time::

    python -m benchmarks.stream_bench --shape llama-3-8b --recipe recipes/w4-gptq.yaml \\
        --tokenizer ../models/ref-a --calib calib.txt --samples 32 --work /tmp/stream

The tokenizer is copied from ``--tokenizer`` (any whose ids fit the shape's vocabulary); the weights are random,
so the output says nothing of quality: that streaming writes what compressing in memory writes is tested, bit for
bit, in tests/test_streaming.py.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

from benchmarks.bench import random_model

KEEP = ("config.json", "generation_config.json")  # the random model's own; the tokenizer's other files are copied


def save_random(shape: str, folder: Path, tokenizer: Path) -> float:
    """Save a random-weight model of ``shape`` (bf16, 5 GB shards) with ``tokenizer``'s files; its size in GB."""
    model = random_model(shape, "cuda" if torch.cuda.is_available() else "cpu", torch.bfloat16)
    model.save_pretrained(folder, max_shard_size="5GB")
    del model
    torch.cuda.empty_cache()
    for file in tokenizer.iterdir():
        if file.is_file() and file.name not in KEEP and not file.name.startswith("model"):
            shutil.copy(file, folder / file.name)
    return sum(f.stat().st_size for f in folder.glob("*.safetensors")) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="llama-3-8b")
    parser.add_argument("--recipe", default="recipes/w4-gptq.yaml")
    parser.add_argument("--tokenizer", required=True, help="a model folder whose tokenizer files are copied")
    parser.add_argument("--calib", required=True, help="calibration text file")
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--work", default="stream-bench", help="folder for the random checkpoint and the output")
    args = parser.parse_args()
    work = Path(args.work)
    source, output = work / args.shape, work / f"{args.shape}-out"
    if not (source / "config.json").exists():
        start = time.perf_counter()
        size = save_random(args.shape, source, Path(args.tokenizer))
        print(f"saved a random {args.shape} checkpoint of {size:.1f} GB in {time.perf_counter() - start:.0f} s",
              flush=True)
    recipe = yaml.safe_load(Path(args.recipe).read_text())
    recipe["model"] = {**recipe.get("model", {}), "load": "stream", "device": args.device}
    recipe["calibration"] = {"dataset": str(Path(args.calib).resolve()), "samples": args.samples,
                             "seq_len": args.seq_len}
    recipe_file = work / "recipe.yaml"
    recipe_file.write_text(yaml.safe_dump(recipe))
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "compress_cli", "apply", str(recipe_file), "--model", str(source),
                           "--output", str(output), "--overwrite"], capture_output=True, text=True)
    wall = time.perf_counter() - start
    sys.stdout.write(done.stdout)
    sys.stderr.write(done.stderr[-4000:])
    # the child's own "peak memory" line (above) is the figure: getrusage's ru_maxrss of a child starts at this
    # process's peak (it survives exec), which saving the random model made as large as the model
    print(f"exit {done.returncode}; wall {wall:.0f} s")
    written = sum(f.stat().st_size for f in output.glob("*.safetensors")) / 1e9 if output.exists() else 0.0
    print(f"output {written:.2f} GB in {len(list(output.glob('*.safetensors')))} files")


if __name__ == "__main__":
    main()
