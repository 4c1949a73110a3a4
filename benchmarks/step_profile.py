"""Where a compiled decode step's GPU time goes, kernel by kernel (GPU): the breakdown behind a speed figure::

    python -m benchmarks.step_profile --shape llama-3-8b --formats bf16,int4,int4-lm-head+fused

Per format, on a random-weight model of ``--shape`` at batch 1: the compiled step's wall time per token (CUDA
graphs, as ``compiled-step`` times it) and the GPU time of each kernel per step, from torch.profiler over the
same step compiled without CUDA graphs (kernels launched one by one can be attributed; their durations are the
same). Kernels are grouped as weight matmuls (cuBLAS, the compress decode kernels) and the rest (attention,
norms, rotary embedding, cache writes, elementwise work fused by inductor), which is what a faster weight
kernel cannot remove.
"""

from __future__ import annotations

import argparse
import collections
import gc

import torch
from transformers import StaticCache

from compress.eval.speed import cuda_mark, decode_step, random_prompts

from benchmarks.format_bench import apply_runtime, build, split_format

MATMUL_MARKS = ("gemm", "gemv", "cutlass", "xmma", "sm90_", "splitk", "int4pack", "scaled_mm", "int4_mma")


def is_matmul(kernel: str) -> bool:
    return any(mark in kernel.lower() for mark in MATMUL_MARKS)


@torch.no_grad()
def profile_format(model: torch.nn.Module, prompt_len: int, steps: int) -> tuple[float, dict[str, tuple[int, float]]]:
    """Wall seconds per CUDA-graph step, and {kernel: (launches per step, GPU seconds per step)}."""
    cache = StaticCache(config=model.config, max_cache_len=prompt_len + 2 * steps + 16)
    device = next(model.parameters()).device
    positions = torch.arange(prompt_len + 2 * steps + 16, device=device)
    ids = random_prompts(model, 1, prompt_len)
    step, graphed = decode_step(model, cache)
    _, plain = decode_step(model, cache, mode=None)

    def prefill() -> torch.Tensor:
        cache.reset()
        return step(ids, positions[:prompt_len])

    def decode(fn, token: torch.Tensor, count: int, graphs: bool) -> torch.Tensor:
        for i in range(prompt_len, prompt_len + count):
            if graphs:
                torch.compiler.cudagraph_mark_step_begin()
            token = fn(token, positions[i:i + 1]).clone()
        return token

    for _ in range(2):  # compile, capture, warm the allocator
        decode(graphed, prefill(), steps, True)
    token = prefill()
    start = cuda_mark()
    decode(graphed, token, steps, True)
    end = cuda_mark()
    end.synchronize()
    wall = start.elapsed_time(end) / 1000 / steps

    decode(plain, prefill(), 4, False)  # compile the graph-less step
    token = prefill()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        decode(plain, token, steps, False)
        torch.cuda.synchronize()
    kernels: dict[str, list[float]] = collections.defaultdict(lambda: [0, 0.0])
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA and event.device_time_total > 0:
            kernels[event.name][0] += 1
            kernels[event.name][1] += event.device_time_total / 1e6
    return wall, {name: (round(n / steps), t / steps) for name, (n, t) in kernels.items()}


def report(fmt: str, wall: float, kernels: dict[str, tuple[int, float]], top: int) -> None:
    gpu = sum(t for _, t in kernels.values())
    matmul = sum(t for name, (_, t) in kernels.items() if is_matmul(name))
    print(f"\n{fmt}: {wall * 1e3:.3f} ms a step with CUDA graphs ({1 / wall:.1f} tok/s); kernels without graphs "
          f"{gpu * 1e3:.3f} ms: weight matmuls {matmul * 1e3:.3f} ms, the rest {(gpu - matmul) * 1e3:.3f} ms, "
          f"{sum(n for n, _ in kernels.values())} launches")
    print(f"  {'us/step':>8} {'calls':>6}  kernel")
    for name, (n, t) in sorted(kernels.items(), key=lambda kv: -kv[1][1])[:top]:
        print(f"  {t * 1e6:8.1f} {n:6d}  {'[mm] ' if is_matmul(name) else ''}{name[:110]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="llama-3-8b")
    parser.add_argument("--formats", default="bf16,int4")
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    torch._dynamo.config.recompile_limit = 64
    formats = [(fmt, *split_format(fmt)) for fmt in args.formats.split(",")]  # checked before any GPU work
    for fmt, name, fused, attn in formats:
        model = build(args.shape, name)
        apply_runtime(model, fused, attn)
        wall, kernels = profile_format(model, 128, args.steps)
        report(fmt, wall, kernels, args.top)
        del model
        gc.collect()
        torch.cuda.empty_cache()
        torch._dynamo.reset()


if __name__ == "__main__":
    main()
