"""Decode and prefill speed of compressed formats against bf16 and bitsandbytes, on a random-weight model of a
real shape built on the GPU, in one run (the issue-5 table)::

    python -m benchmarks.format_bench --shape llama-3-8b --formats bf16,int4,int4-lm-head,int8,fp8,nf4,llm.int8

Per format: decode tok/s at batch 1 (128-token prompt, 256 new tokens; static KV cache + torch.compile for
bf16 and compress formats, in each of ``--decode-configs``: ``compiled-step``, the compiled step in a bare
greedy loop, is the headline, ``static-compile`` runs it through ``generate``, ``compiled-verify`` feeds the
step 8-token drafts as speculative decoding verifies them; eager dynamic cache for bitsandbytes as in
ANCHORS.md), prefill tok/s at batch
8 x 512 (eager), peak GPU memory during decode, and decode time against the bandwidth floor (bytes of the
weights read per token over the device-to-device copy bandwidth measured in the same run). Formats:
``int4`` = RTN 4-bit group 128 symmetric, ``int8`` = absmax int8 per channel, ``fp8`` = FP8 W8A8 dynamic
(each with ``-lm-head``: the output head too, as torchao's ``quantize_`` does by default), ``fp8-wo`` = FP8
weight-only, ``sparse24`` = 2:4 magnitude pruning stored as kept bf16 values and positions, ``sparse24-int4`` =
the same then ``int4`` (the kept codes only), ``factored50`` = every linear layer but the head as two factors
holding half its parameters (the ``factored`` format of the ``lowrank`` method), ``int4-lr32`` = ``int4`` with a
rank-32 correction beside each layer (the ``corrected`` format of ``lowrank-correct``); the factors of these two are
random, as the weights are (fitting them would take minutes and change no timing), ``nf4`` / ``llm.int8`` = bitsandbytes ``Linear4bit`` / ``Linear8bitLt``; bf16 or a compress format
with ``+fused`` (``int4+fused``) has its q/k/v and gate/up layers fused (``compress.fuse_projections``); any
format with ``+attn`` attends at decode through compress's Triton kernel, which reads the static cache's grouped
keys and values once (``compress.kv.attention.read_caches_directly``; the runtime feature ``decode-attention``);
``torchao-int4`` / ``torchao-int8`` = torchao's ``quantize_`` with ``Int4WeightOnlyConfig`` (group 128, the
tinygemm layout that torch's own ``_weight_int4pack_mm`` runs) / ``Int8WeightOnlyConfig`` (a scale per row), every
linear layer and the head as torchao does by default, compiled like ours with torchao's recommended inductor settings
(set for those formats only: the settings of the rest of the run are restored after each); torchao comes from
``PYTHONPATH`` (``make-devdeps.sh --torchao``).

``--batch-sizes 1,8,32,64`` adds decode at each batch size over 1 (tok/s summed over the batch, the first decode
configuration, 128-token prompts), shown as ``bN`` with its ratio to the first format's at the same batch.
"""

from __future__ import annotations

import argparse
import gc
import json

import torch
import torch._inductor.config
import torch.nn as nn

import compress
from compress.eval.speed import time_generation

from benchmarks.bench import random_model

STEPS = {
    "int4": [{"method": "rtn", "args": {"bits": 4, "group_size": 128}}],
    "int4-lm-head": [{"method": "rtn", "args": {"bits": 4, "group_size": 128}, "targets": ["Linear", "lm_head"]}],
    "int8": [{"method": "int8", "args": {"scheme": "absmax", "granularity": "channel"}}],
    "int8-lm-head": [{"method": "int8", "args": {"scheme": "absmax", "granularity": "channel"},
                      "targets": ["Linear", "lm_head"]}],
    "fp8": [{"method": "fp8", "args": {"activations": "dynamic"}}],
    "fp8-lm-head": [{"method": "fp8", "args": {"activations": "dynamic"}, "targets": ["Linear", "lm_head"]}],
    "fp8-wo": [{"method": "fp8", "args": {"activations": "none"}}],
    "sparse24": [{"method": "magnitude", "args": {"structure": "2:4"}}],
    "sparse24-int4": [{"method": "magnitude", "args": {"structure": "2:4"}},
                      {"method": "rtn", "args": {"bits": 4, "group_size": 128}}],
}


RANDOM_FACTORS = ("factored50", "int4-lr32")  # built by with_random_factors
TORCHAO = ("torchao-int4", "torchao-int8")  # built by to_torchao


def copy_bandwidth() -> float:
    """Bytes per second of a large device-to-device copy (read plus write), median of 20."""
    src = torch.randn(2**28, device="cuda")
    dst = torch.empty_like(src)
    times = []
    for _ in range(25):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * src.numel() * 4 / sorted(times[5:])[len(times[5:]) // 2]


def stored_bytes(t: torch.Tensor) -> int:
    """Bytes a tensor holds: for a tensor subclass (torchao's quantized weights) the sum over the inner tensors it
    flattens to, not its logical shape times its logical dtype."""
    if type(t) not in (torch.Tensor, nn.Parameter) and hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        return sum(stored_bytes(getattr(t, name)) for name in names)
    return t.numel() * t.element_size()


def bytes_read_per_token(model: nn.Module) -> int:
    """Weight bytes a decode step reads: every parameter and buffer except the input embedding table (only one
    row per token is read) unless it is tied to the output head; kernel layouts counted as stored on the GPU."""
    embed = model.get_input_embeddings().weight
    tied = model.get_output_embeddings() is not None and getattr(model.get_output_embeddings(), "weight", None) is embed
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) in seen or (t is embed and not tied) or t.device.type != "cuda":
            continue
        seen.add(id(t))
        total += stored_bytes(t)
    return total


def to_bitsandbytes(model: nn.Module, kind: str) -> None:
    """Replace every Linear but lm_head with bitsandbytes' NF4 or LLM.int8 layer (what transformers does)."""
    import bitsandbytes as bnb

    head = model.get_output_embeddings()
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear) or module is head:
            continue
        w = module.weight.data
        if kind == "nf4":
            new = bnb.nn.Linear4bit(module.in_features, module.out_features, module.bias is not None,
                                    compute_dtype=torch.bfloat16, quant_type="nf4")
            new.weight = bnb.nn.Params4bit(w.cpu(), requires_grad=False, quant_type="nf4")
        else:
            new = bnb.nn.Linear8bitLt(module.in_features, module.out_features, module.bias is not None,
                                      has_fp16_weights=False, threshold=6.0)
            new.weight = bnb.nn.Int8Params(w.cpu(), requires_grad=False, has_fp16_weights=False)
        new = new.to("cuda")
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, new)
        del module, w


def to_torchao(model: nn.Module, fmt: str) -> None:
    """torchao's weight-only quantization of every linear layer (the head included), as its README shows it."""
    from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig, quantize_

    if fmt == "torchao-int4":
        config = Int4WeightOnlyConfig(group_size=128, int4_packing_format="tile_packed_to_4d")
    else:
        config = Int8WeightOnlyConfig()
    quantize_(model, config)


@torch.no_grad()
def with_random_factors(model: nn.Module, fmt: str) -> None:
    """``factored50``: every Linear but the head replaced by random factors holding half its parameters;
    ``int4-lr32``: every int4 layer given a random rank-32 correction."""
    from compress.formats import compressed_modules
    from compress.formats.corrected import CorrectedLinear
    from compress.formats.factored import FactoredLinear, rank_for

    head, device = model.get_output_embeddings(), model.get_output_embeddings().weight.device
    if fmt == "factored50":
        layers = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and m is not head]
    else:
        layers = list(compressed_modules(model))
    for name, layer in layers:
        i, o = layer.in_features, layer.out_features
        rank = rank_for(i, o, 0.5) if fmt == "factored50" else 32
        A = torch.randn(rank, i, device=device, dtype=torch.bfloat16) / i**0.5
        B = torch.randn(o, rank, device=device, dtype=torch.bfloat16) / rank**0.5
        if fmt == "factored50":
            new = FactoredLinear.from_factors(A, B, layer.bias, torch.bfloat16)
        else:
            new = CorrectedLinear.wrap(layer, A, B * 0.01, torch.bfloat16)
        model.set_submodule(name, new)


def build(shape: str, fmt: str) -> nn.Module:
    model = random_model(shape, "cuda", torch.bfloat16)
    if fmt == "int4-lr32":
        compress.apply(model, [dict(s) for s in STEPS["int4"]], device="cuda")
        with_random_factors(model, fmt)
    elif fmt == "factored50":
        with_random_factors(model, fmt)
    elif fmt in STEPS:
        steps = [dict(s) for s in STEPS[fmt]]
        compress.apply(model, steps, device="cuda")
    elif fmt in ("nf4", "llm.int8"):
        to_bitsandbytes(model, fmt)
    elif fmt in TORCHAO:
        to_torchao(model, fmt)
    gc.collect()
    torch.cuda.empty_cache()
    return model


def split_format(fmt: str) -> tuple[str, bool, bool]:
    """``int4+fused+attn`` -> ("int4", True, True); ``int4`` -> ("int4", False, False). Exits with a message for an
    unknown format or suffix, or ``+fused`` on a format that cannot fuse (bitsandbytes, torchao)."""
    name, *suffixes = fmt.split("+")
    known = (*STEPS, *RANDOM_FACTORS, *TORCHAO, "nf4", "llm.int8", "bf16")
    if name not in known:
        raise SystemExit(f"unknown format {fmt!r}: choose from {', '.join(known)}")
    if set(suffixes) - {"fused", "attn"}:
        raise SystemExit(f"unknown format {fmt!r}: the suffixes are '+fused' and '+attn'")
    if "fused" in suffixes and name not in (*STEPS, *RANDOM_FACTORS, "bf16"):
        raise SystemExit(f"unknown format {fmt!r}: only bf16 and compress formats take '+fused'")
    return name, "fused" in suffixes, "attn" in suffixes


def apply_runtime(model: nn.Module, fused: bool, attn: bool) -> None:
    """A format's suffixes: ``+fused`` fuses its projections, ``+attn`` sends its decode steps' attention to
    compress's kernel (:func:`compress.kv.attention.read_caches_directly`)."""
    if fused:
        compress.fuse_projections(model)
    if attn:
        from compress.kv.attention import read_caches_directly

        read_caches_directly(model)


def summary(row: dict, base: dict) -> str:
    """One format's line: its figures and their ratios to the first format's (prefill only where it was timed)."""
    parts = [f"{row['format']:<9} decode {row['decode_tok_s']:7.1f} tok/s ({row['decode_tok_s'] / base['decode_tok_s']:.2f}x "
             f"{base['format']}, {row['floor_fraction']:.0%} of floor)"]
    if "prefill_tok_s" in row:
        parts.append(f"prefill {row['prefill_tok_s']:8.0f} tok/s ({row['prefill_tok_s'] / base['prefill_tok_s']:.2f}x)")
    parts.append(f"peak {row['peak_gpu_bytes'] / 2**30:.2f} GiB ({row['peak_gpu_bytes'] / base['peak_gpu_bytes']:.2f}x)")
    parts += [f"{c} {v:.1f} ({v / base['decode'].get(c, v):.2f}x)" for c, v in row["decode"].items()]
    parts += [f"b{b} {v:.1f} ({v / base['batches'].get(b, v):.2f}x)" for b, v in row["batches"].items()]
    return "  ".join(parts)


def parse_batch_sizes(text: str) -> list[int]:
    """``"1,8,32"`` -> [8, 32]: the batch sizes over 1 (batch 1 is every row's headline). Exits with a message on
    anything but positive integers."""
    try:
        sizes = [int(b) for b in text.split(",")]
    except ValueError:
        sizes = [0]
    if any(b < 1 for b in sizes):
        raise SystemExit(f"--batch-sizes {text!r}: give positive integers separated by commas, e.g. 1,8,32,64")
    return [b for b in dict.fromkeys(sizes) if b > 1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="llama-3.2-1b")
    parser.add_argument("--formats", default="bf16,int4,int8,fp8,nf4,llm.int8")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-prefill", action="store_true")
    parser.add_argument("--decode-configs", default="compiled-step,static-compile",
                        help="speed configurations for decode (the first is the headline and sets the floor fraction)")
    parser.add_argument("--batch-sizes", default="1",
                        help="decode batch sizes (comma-separated); those over 1 run the first decode configuration")
    parser.add_argument("--json")
    args = parser.parse_args()
    formats = [(fmt, *split_format(fmt)) for fmt in args.formats.split(",")]  # checked before any GPU work
    batches = parse_batch_sizes(args.batch_sizes)
    torch._dynamo.config.recompile_limit = 64
    bandwidth = copy_bandwidth()
    print(f"copy bandwidth {bandwidth / 1e12:.2f} TB/s", flush=True)
    rows = []
    for fmt, name, fused, attn in formats:
        inductor = torch._inductor.config.save_config()  # torchao's formats set their own; put back after each
        model = build(args.shape, name)
        row = {"format": fmt, "bytes_per_token": bytes_read_per_token(model), "decode": {}, "batches": {}}
        apply_runtime(model, fused, attn)  # after counting the bytes: fused layers' views share them
        for config in args.decode_configs.split(","):
            if fmt in ("nf4", "llm.int8"):  # eager only, as in ANCHORS.md
                config = "dynamic"
            if config in row["decode"]:
                continue
            decode = time_generation(model, config, 1, 128, 256, warmup=2, repeats=args.repeats)
            row["decode"][config] = decode["decode_tok_s"]
            row.setdefault("decode_tok_s", decode["decode_tok_s"])
            row["peak_gpu_bytes"] = max(row.get("peak_gpu_bytes", 0), decode["peak_gpu_bytes"])
        headline = next(iter(row["decode"]))  # the first configuration this format ran
        for batch in batches:
            decode = time_generation(model, headline, batch, 128, 256, warmup=2, repeats=args.repeats)
            row["batches"][batch] = decode["decode_tok_s"]
            row["peak_gpu_bytes"] = max(row["peak_gpu_bytes"], decode["peak_gpu_bytes"])
        row["floor_fraction"] = (row["bytes_per_token"] / bandwidth) / (1 / row["decode_tok_s"])
        if not args.no_prefill:
            prefill = time_generation(model, "dynamic", 8, 512, 2, warmup=1, repeats=args.repeats)
            row["prefill_tok_s"] = prefill["prefill_tok_s"]
        rows.append(row)
        print(summary(row, rows[0]), flush=True)
        del model
        gc.collect()
        torch.cuda.empty_cache()
        torch._dynamo.reset()
        torch._inductor.config.load_config(inductor)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"shape": args.shape, "copy_bandwidth": bandwidth, "rows": rows}, fh, indent=2)


if __name__ == "__main__":
    main()
