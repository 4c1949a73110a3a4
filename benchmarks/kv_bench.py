"""The quantized KV cache (compress.kv, issue 25): quality on a real model, and decode speed at long context.

Quality: perplexity through each cache against the same model through a full-precision cache in the same steps
(each window's first ``--prefill`` tokens at once, then one token a step)::

    python -m benchmarks.kv_bench quality --model ../shared/models/ref-a --valid valid.txt --windows 64 \\
        --schemes int8,fp8,int4:32,int2:32,int4:64,int2:64

Speed: a random-weight model of a real shape, one prompt of ``--context`` tokens, then timed decode steps with each
cache: ``eager`` (the model's forward on one token, dynamic caches) and ``compiled`` (static caches, the step compiled
with CUDA graphs, as the speed task's compiled-step); and the attention alone, per layer::

    python -m benchmarks.kv_bench speed --shape llama-3-8b --context 32768 --schemes bf16,int4:64,int8:64

Every figure is printed with the median of ``--repeats`` runs and its ratio to the first scheme's in the same run.
``bf16+attn``: transformers' bf16 caches attended by compress's decode kernel (runtime feature ``decode-attention``)
instead of sdpa, which with a mask (static caches) repeats the grouped keys and values for each query head.

Attention: one layer's decode attention alone at several batch sizes and contexts, sdpa against the kernel at
several numbers of programs a multiprocessor (how finely it splits the tokens)::

    python -m benchmarks.kv_bench attention --batches 1,32 --contexts 8192,32768 --programs-per-sm 1,2,4,8 \\
        --blocks 32,64 --warps 4,8

Capacity: how many sequences of ``--context`` tokens each cache serves within a fixed budget of GPU memory beyond the
weights (the process capped at weights + budget): for each cache, batches from the most its static cache alone would
allow down, each prefilled in chunks and decoded for ``--steps`` eager steps, until one runs without running out of
memory; the largest that ran, its peak memory beyond the weights and its decode speed::

    python -m benchmarks.kv_bench capacity --shape llama-3-8b --context 8192 --budget-gib 16 --schemes bf16,int4:64
"""

from __future__ import annotations

import argparse
import gc
import itertools
import statistics
import time

import torch

from benchmarks.bench import random_model


def _scheme(text: str, residual: int = 128):
    """``int4:32`` (name, group size) -> KVScheme; ``bf16`` -> None (transformers' own cache; ``bf16+attn``: the
    same, attended by compress's kernel, which the run turns on for it); ``quanto:4`` or ``hqq:4`` -> (backend,
    bits) of transformers' QuantizedCache (group 64 along its default axis 0; quanto's: per token), eager only."""
    from compress.kv import KVScheme

    if text in ("bf16", "bf16+attn"):
        return None
    name, _, group = text.partition(":")
    if name in ("quanto", "hqq"):
        return name, int(group or 4)
    return KVScheme.named(name, int(group or 64), residual)


def _cache(model, scheme, residual: int = 128):
    from transformers import DynamicCache
    from transformers import QuantizedCache as TransformersQuantizedCache

    from compress.kv import QuantizedCache

    if scheme is None:
        return DynamicCache(config=model.config)
    if isinstance(scheme, tuple):
        return TransformersQuantizedCache(scheme[0], model.config, nbits=scheme[1], q_group_size=64,
                                          residual_length=residual)
    return QuantizedCache(model.config, scheme=scheme)


def quality(args: argparse.Namespace) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from compress.eval.perplexity import Protocol, perplexity, windows
    from compress.eval.spec import KVCacheSpec

    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, args.dtype)).to(args.device).eval()
    ids = AutoTokenizer.from_pretrained(args.model)(open(args.valid).read(), return_tensors="pt").input_ids[0]
    protocol = Protocol(seq_len=args.seq_len, max_tokens=args.windows * args.seq_len, text=args.valid)
    plain = perplexity(model, ids, protocol, batch_size=args.batch, progress=False).perplexity
    print(f"{args.model} {args.dtype} on {args.device}, first {args.windows} windows of {args.seq_len}, prefill "
          f"{args.prefill}, residual {args.residual}; bytes a token: the cache's after a batch's last window")
    print(f"plain forward (no cache): {plain:.4f}")
    count = windows(ids, protocol, None)[0].shape[0]
    last = count - args.batch * ((count - 1) // args.batch)  # windows in the last batch, whose cache is counted
    steps = KVCacheSpec(scheme="int8", residual=args.residual, prefill=args.prefill)  # the prefill, for every cache
    full = None
    for text in ["bf16"] + args.schemes.split(","):
        scheme, made = _scheme(text, args.residual), []

        def new_cache():
            made.append(_cache(model, scheme, args.residual))
            return made[-1]

        start = time.perf_counter()
        ppl = perplexity(model, ids, protocol, batch_size=args.batch, progress=False, kv=steps,
                         new_cache=new_cache).perplexity
        held = _held_bytes(made[-1]) / (last * args.seq_len)
        full = full or (ppl, held)
        name = "full-precision cache" if scheme is None else _describe(scheme, args.residual)
        print(f"{name}: {ppl:.4f} ({ppl / full[0] - 1:+.3%}), {held:.0f} bytes a token ({held / full[1]:.3f}x); "
              f"{time.perf_counter() - start:.0f} s", flush=True)


def _describe(scheme, residual: int) -> str:
    if isinstance(scheme, tuple):
        return f"transformers QuantizedCache {scheme[0]} {scheme[1]}-bit (group 64, residual {residual})"
    layout = "" if scheme.name == "fp8" else f" group {scheme.group_size}, residual {scheme.residual}"
    return f"compress {scheme.name}{layout}"


def _held_bytes(cache) -> int:
    """Bytes of the tensors ``cache`` holds: its own count where it keeps one, else every tensor its layers hold
    (packed ones through their inner tensors: quanto's, HQQ's codes and scales)."""
    if hasattr(cache, "stored_bytes"):
        return cache.stored_bytes()

    def count(x) -> int:
        if isinstance(x, (tuple, list)):
            return sum(count(y) for y in x)
        if isinstance(x, dict):
            return sum(count(y) for y in x.values())
        if not torch.is_tensor(x):
            return 0
        if type(x) is not torch.Tensor and hasattr(x, "__tensor_flatten__"):
            return sum(count(getattr(x, name)) for name in x.__tensor_flatten__()[0])
        return x.nbytes

    return sum(count(vars(layer)) for layer in cache.layers)


#: Tokens a prefill chunk holds over the whole batch: 16,384 keep a Llama-3-8B shape's MLP activations near 0.5 GiB.
PREFILL_TOKENS = 16384


def prefill_chunk(batch: int) -> int:
    """Tokens of each sequence a prefill chunk takes at ``batch`` sequences (2,048 at batch 8, 512 at 32)."""
    return max(128, min(2048, PREFILL_TOKENS // batch))


def _time_steps(model, scheme, prompt: torch.Tensor, steps: int, repeats: int) -> tuple[float, int]:
    """Median seconds a decode step takes after ``prompt``, and the cache's bytes then."""
    from compress.eval.speed import cache_keyword

    key = cache_keyword(model)
    times = []
    for repeat in range(repeats):
        cache = _cache(model, scheme)
        warm = 2 if repeat else steps + 2  # the first run's kernels compiled before any step is timed
        with torch.no_grad():
            chunk = prefill_chunk(prompt.shape[0])
            for start in range(0, prompt.shape[1], chunk):  # the prompt in chunks: a batch's activations stay small
                out = model(input_ids=prompt[:, start:start + chunk], use_cache=True, logits_to_keep=1, **{key: cache})
            token = out.logits[:, -1:].argmax(-1)
            del out
            for i in range(steps + warm):
                if i == warm:
                    torch.cuda.synchronize()
                    start = time.perf_counter()
                token = model(input_ids=token, use_cache=True, **{key: cache}).logits[:, -1:].argmax(-1)
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) / steps)
    return statistics.median(times), _held_bytes(cache)


def _time_attention(scheme, context: int, heads: int, kv_heads: int, head_dim: int, repeats: int,
                    dense: bool = False, batch: int = 1) -> float:
    """Median seconds of one layer's decode attention over ``context`` tokens (sdpa on bf16 keys for bf16), as
    CUDA-graph replays: the GPU's time, as a compiled step spends it. (Timed by the wall clock of eager calls, the
    quantized attention's dozen small launches cost more on the host than on the GPU: H100, 32k, 256.6 us against
    sdpa's one launch, 55.1 us.)"""
    from compress.kv.attention import decode_attention
    from compress.kv.cache import QuantizedLayer

    k = torch.randn(batch, kv_heads, context + 1, head_dim, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    q = torch.randn(batch, heads, 1, head_dim, device="cuda", dtype=torch.bfloat16)
    if scheme is None and dense:
        from compress.kv.attention import dense_decode_attention

        def run():
            return dense_decode_attention(q, k, v)
    elif scheme is None:
        def run():
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    else:
        layer = QuantizedLayer(scheme, direct=True)
        layer.update(k[:, :, :context], v[:, :, :context])
        view, _ = layer.update(k[:, :, context:], v[:, :, context:])

        def run():
            return decode_attention(q, view)
    import triton.testing

    run()  # compiles the kernels outside the graph
    return triton.testing.do_bench_cudagraph(run, rep=20 * repeats, return_mode="median") / 1e3


def speed(args: argparse.Namespace) -> None:
    from compress.eval.speed import time_compiled_steps
    from compress.kv.attention import read_caches_directly

    model = random_model(args.shape, "cuda", torch.bfloat16)
    config = model.config
    prompt = torch.randint(0, config.vocab_size, (args.batch, args.context), device="cuda",
                           generator=torch.Generator("cuda").manual_seed(0))
    print(f"{args.shape} (random weights, bf16) on {torch.cuda.get_device_name()}, batch {args.batch}, context "
          f"{args.context}, {args.steps} steps, median of {args.repeats}")
    if "eager" in args.modes:
        # untimed: the first scheme's eager steps otherwise pay for first uses (most likely the allocator's growth;
        # H100, 32k: bf16 13.2 tok/s when first, 35.4 when last in one run)
        _time_steps(model, None, prompt, args.steps, 1)
    base: dict = {}
    for text in args.schemes.split(","):
        scheme, dense = _scheme(text), text == "bf16+attn"
        peer = isinstance(scheme, tuple)  # transformers' own quantized cache: its forward only, no compile
        read_caches_directly(model, dense)
        row = {} if peer else {"attention": _time_attention(scheme, args.context, config.num_attention_heads,
                                                            config.num_key_value_heads, config.head_dim, args.repeats,
                                                            dense)}
        if "eager" in args.modes:
            row["eager"], row["held"] = _time_steps(model, scheme, prompt, args.steps, args.repeats)
        if "compiled" in args.modes and not peer:
            if "eager" in args.modes:  # what is measured so far, in case the compiled run does not finish
                print(f"{text:>8}: " + _cells(row, base or row, args.batch) + " (compiled: running)", flush=True)
            _, decode = time_compiled_steps(model, args.batch, args.context, args.steps + 1, 1, args.repeats, kv=scheme,
                                            prefill_chunk=prefill_chunk(args.batch))
            row["compiled"] = statistics.median(decode) / args.steps
        torch.cuda.empty_cache()
        base = base or row
        print(f"{text:>8}: " + _cells(row, base, args.batch), flush=True)


@torch.no_grad()
def _serve(model, scheme, batch: int, context: int, steps: int) -> tuple[float, int]:
    """Seconds an eager decode step takes for ``batch`` sequences after prompts of ``context`` tokens (prefilled in
    chunks) through a static cache, and the peak bytes allocated meanwhile; OutOfMemoryError where they do not fit."""
    from compress.eval.speed import decode_step, random_prompts, static_cache

    torch.cuda.reset_peak_memory_stats()
    cache = static_cache(model, context + steps + 1, scheme)
    step, _ = decode_step(model, cache)
    ids = random_prompts(model, batch, context)
    positions = torch.arange(context + steps + 1, device="cuda")
    chunk = prefill_chunk(batch)
    for start in range(0, context, chunk):
        token = step(ids[:, start:start + chunk], positions[start:min(start + chunk, context)])
    torch.cuda.synchronize()
    start = time.perf_counter()
    for i in range(context, context + steps):
        token = step(token, positions[i:i + 1])
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps, torch.cuda.max_memory_allocated()


def _sequence_bytes(model, scheme, max_cache_len: int) -> int:
    """Bytes a static cache of ``max_cache_len`` tokens allocates for one sequence (measured)."""
    from compress.eval.speed import decode_step, static_cache

    before = torch.cuda.memory_allocated()
    cache = static_cache(model, max_cache_len, scheme)
    step, _ = decode_step(model, cache)
    with torch.no_grad():
        step(torch.zeros(1, 1, dtype=torch.long, device="cuda"), torch.zeros(1, dtype=torch.long, device="cuda"))
    held = torch.cuda.memory_allocated() - before
    del cache, step
    return held


def capacity(args: argparse.Namespace) -> None:
    model = random_model(args.shape, "cuda", torch.bfloat16)
    torch.cuda.synchronize()
    weights, total = torch.cuda.memory_allocated(), torch.cuda.get_device_properties(0).total_memory
    budget = int(args.budget_gib * 2**30)
    torch.cuda.set_per_process_memory_fraction(min(1.0, (weights + budget) / total))
    print(f"{args.shape} (random weights, bf16, {weights / 2**30:.2f} GiB) on {torch.cuda.get_device_name()}: "
          f"sequences of {args.context} tokens within {args.budget_gib:g} GiB beyond the weights, static caches, "
          f"{args.steps} eager decode steps")
    first = None
    for text in args.schemes.split(","):
        scheme = _scheme(text)
        per = _sequence_bytes(model, scheme, args.context + args.steps + 1)
        batch, tried = max(1, budget // per), []
        while batch > 0:
            try:
                seconds, peak = _serve(model, scheme, batch, args.context, args.steps)
                break
            except torch.OutOfMemoryError:
                tried.append(batch)
            gc.collect()
            torch.cuda.empty_cache()
            batch -= max(1, round(batch * 0.03))
        gc.collect()
        torch.cuda.empty_cache()
        if batch == 0:
            print(f"{text:>8}: not one sequence fits")
            continue
        first = first or batch
        print(f"{text:>8}: {batch:4d} sequences ({batch / first:.2f}x), {per / 2**20:7.1f} MiB of cache a sequence, "
              f"peak {(peak - weights) / 2**30:6.2f} GiB beyond the weights, eager decode {batch / seconds:8.1f} "
              f"tok/s; out of memory at {', '.join(map(str, tried)) or 'none tried above'}", flush=True)


def attention(args: argparse.Namespace) -> None:
    """One layer's decode attention (Llama-3-8B's heads) at each batch x context, for each scheme, and for the
    kernel's schemes at each setting of ``--programs-per-sm`` x ``--blocks`` x ``--warps``."""
    from compress.kv import attention as kernel

    print(f"decode attention, one layer (32 query heads, 8 KV heads of 128), us, CUDA-graph replays, median of "
          f"{args.repeats}, {torch.cuda.get_device_name()}")
    default = kernel.PROGRAMS_PER_SM, kernel.BLOCK_T, kernel.WARPS
    for batch in map(int, args.batches.split(",")):
        for context in map(int, args.contexts.split(",")):
            cells = []
            for text in args.schemes.split(","):
                scheme, dense = _scheme(text), text == "bf16+attn"
                settings = itertools.product(*(map(int, a.split(",")) for a in (args.programs_per_sm, args.blocks,
                                                                                 args.warps)))
                for setting in settings if scheme is not None or dense else [None]:
                    if setting:
                        kernel.PROGRAMS_PER_SM, kernel.BLOCK_T, kernel.WARPS = setting
                    seconds = _time_attention(scheme, context, 32, 8, 128, args.repeats, dense, batch)
                    tag = " p{} t{} w{}".format(*setting) if setting else ""
                    cells.append(f"{text}{tag} {seconds * 1e6:.1f}")
                    torch.cuda.empty_cache()
            print(f"batch {batch:3d} x {context:6d}: " + ", ".join(cells), flush=True)
    kernel.PROGRAMS_PER_SM, kernel.BLOCK_T, kernel.WARPS = default


def _cells(row: dict, base: dict, batch: int) -> str:
    """One scheme's figures, with their ratios to the first scheme's."""
    cells = [f"attention {row['attention'] * 1e6:8.1f} us/layer ({base['attention'] / row['attention']:.2f}x)"
             ] if "attention" in row else []
    for mode in ("eager", "compiled"):
        if mode in row and mode in base:
            cells.append(f"{mode} decode {batch / row[mode]:8.1f} tok/s ({base[mode] / row[mode]:.2f}x)")
    if "held" in row:
        cells.append(f"cache {row['held'] / 2**20:8.1f} MiB ({row['held'] / base['held']:.3f}x)")
    return ", ".join(cells)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="mode", required=True)
    q = sub.add_parser("quality")
    q.add_argument("--model", required=True)
    q.add_argument("--valid", required=True)
    q.add_argument("--schemes", default="int8,fp8,int4:32,int2:32")
    q.add_argument("--windows", type=int, default=64)
    q.add_argument("--seq-len", type=int, default=1024)
    q.add_argument("--prefill", type=int, default=128)
    q.add_argument("--residual", type=int, default=128)
    q.add_argument("--batch", type=int, default=32)
    q.add_argument("--dtype", default="bfloat16")
    q.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    s = sub.add_parser("speed")
    s.add_argument("--shape", default="llama-3-8b")
    s.add_argument("--context", type=int, default=32768)
    s.add_argument("--batch", type=int, default=1)
    s.add_argument("--steps", type=int, default=32)
    s.add_argument("--repeats", type=int, default=3)
    s.add_argument("--schemes", default="bf16,int4:64")
    s.add_argument("--modes", default="eager,compiled", help="eager (the dynamic caches, uncompiled forward) and/or "
                   "compiled (static caches, compiled step with CUDA graphs)")
    c = sub.add_parser("capacity")
    c.add_argument("--shape", default="llama-3-8b")
    c.add_argument("--context", type=int, default=8192)
    c.add_argument("--budget-gib", type=float, default=16.0, help="GPU memory beyond the weights")
    c.add_argument("--steps", type=int, default=8)
    c.add_argument("--schemes", default="bf16,int4:64")
    a = sub.add_parser("attention")
    a.add_argument("--batches", default="1,32")
    a.add_argument("--contexts", default="8192,32768")
    a.add_argument("--schemes", default="bf16,bf16+attn,int4:64")
    a.add_argument("--programs-per-sm", default="1,2,4,8", help="the kernel's PROGRAMS_PER_SM values to time")
    a.add_argument("--blocks", default="64", help="its BLOCK_T values (tokens a step of a program)")
    a.add_argument("--warps", default="4", help="its WARPS values")
    a.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    {"quality": quality, "speed": speed, "capacity": capacity, "attention": attention}[args.mode](args)


if __name__ == "__main__":
    main()
