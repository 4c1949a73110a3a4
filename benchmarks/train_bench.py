"""Training-stage benchmark: tokens/s and peak GPU memory of a training method on one device.

    python -m benchmarks.train_bench --model ref-a-dir --random llama-3.2-1b --steps 20 --batch-size 8 --seq-len 1024
    python -m benchmarks.train_bench --random llama-3-8b --method lora,qlora --checkpointing on --batch-size 2

For each model (a checkpoint directory, or a random-weight shape of benchmarks.bench), method and gradient
checkpointing setting, on random tokens (the speed does not depend on them):
- distill: the student trains every linear layer of its blocks and its norms against a frozen copy of itself (the
  teacher, as ``teacher: original`` holds it), with AdamW;
- lora: rank-16 adapters (peft) on every linear layer of the blocks, the --dtype base frozen, AdamW;
- qlora: the same adapters on the layers rounded to NF4 with double quantization (bf16 compute), paged 8-bit AdamW.
Weights in --dtype, trained tensors as float32 master copies, the forward autocast to --dtype, as the trainer does
by default. Prints the median step time after --warmup steps, tokens/s from it, and the peak memory allocated
while training (the model as the method prepared it included).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics

import torch

from benchmarks.bench import SHAPES, random_model
from compress.calibration.data import CalibrationSet
from compress.losses import causal_lm_loss
from compress.model import DTYPES
from compress.plugins.distill import DistillConfig, distillation_loss
from compress.plugins.qlora import QLora, QLoraConfig
from compress.recipe import TrainingSpec
from compress.targets import select
from compress.train import training_context
from compress.trainer import fit


def _model(name: str, dtype: torch.dtype, device: str):
    if name in SHAPES:
        return random_model(name, device, dtype)
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(name, dtype=dtype).to(device).eval()


def measure(name: str, method: str, dtype: torch.dtype, device: str, steps: int, warmup: int, batch_size: int,
            seq_len: int, checkpointing: bool) -> dict:
    model = _model(name, dtype, device)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (batch_size * (steps + warmup), seq_len), generator=torch.Generator().manual_seed(0))
    spec = TrainingSpec(steps=steps + warmup, batch_size=batch_size, seq_len=seq_len, eval_samples=0, lr=1e-5,
                        gradient_checkpointing=checkpointing)
    layers = list(select(model, ["Linear"], ["lm_head"]).modules)
    teacher = None
    if method == "distill":
        teacher = copy.deepcopy(model).requires_grad_(False)
        kinds, loss = ("weights", "biases", "norms"), distillation_loss(teacher, DistillConfig(), None)
        optimizer = "adamw"
    else:
        QLora().prepare(model, QLoraConfig(base="nf4" if method == "qlora" else "keep"), layers, torch.device(device))
        kinds, loss = ("adapters",), causal_lm_loss
        optimizer = "paged_adamw_8bit" if method == "qlora" else "adamw"
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    with training_context(model, layers, kinds, {}, CalibrationSet(ids, "random"), torch.device(device), teacher,
                          settings=spec) as context:
        report = fit(context, loss, label=method, optimizer=optimizer)
    step = statistics.median(report.step_seconds[warmup:])
    row = {"model": name, "method": method, "parameters": sum(p.numel() for p in model.parameters()),
           "dtype": str(dtype), "gradient_checkpointing": checkpointing, "batch_size": batch_size, "seq_len": seq_len,
           "median_step_s": step, "tokens_per_s": batch_size * seq_len / step,
           "peak_gib": torch.cuda.max_memory_allocated() / 2**30, "loss_first": report.losses[0],
           "loss_last": report.losses[-1]}
    del model, teacher, context
    torch.cuda.empty_cache()
    return row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", default=[], help="checkpoint directory (repeatable)")
    parser.add_argument("--random", action="append", default=[], help=f"random-weight shape: {', '.join(SHAPES)}")
    parser.add_argument("--steps", type=int, default=20, help="timed steps")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    parser.add_argument("--checkpointing", default="off,on", help="gradient checkpointing settings to run")
    parser.add_argument("--method", default="distill", help="comma-separated: distill, lora, qlora")
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("train_bench measures GPU training speed and memory; no CUDA device here")
    rows = []
    for name in args.model + args.random:
        for method in args.method.split(","):
            for setting in args.checkpointing.split(","):
                row = measure(name, method, DTYPES[args.dtype], "cuda", args.steps, args.warmup, args.batch_size,
                              args.seq_len, setting == "on")
                rows.append(row)
                print(f"{name:<30} {method:<8} checkpointing {setting:<3}  {row['median_step_s'] * 1e3:8.1f} ms/step  "
                      f"{row['tokens_per_s']:10,.0f} tokens/s  peak {row['peak_gib']:6.2f} GiB", flush=True)
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"device": torch.cuda.get_device_name(), "rows": rows}, fh, indent=2)


if __name__ == "__main__":
    main()
