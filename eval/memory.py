"""What a model costs in bytes: on disk, in memory by dtype, by layout of its linear layers (dense, each compressed
format, with the fraction of weights pruned), at peak during generation, and per token of KV cache.

KV-cache bytes per token = 2 (keys and values) x layers x KV heads x head dim x bytes of the compute dtype:
weight compression does not shrink it, so at long contexts it can outweigh the weights.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn as nn

from compress.eval.spec import KVCacheSpec
from compress.formats.base import CompressedLinear, layer_modules
from compress.runtime.fusion import FusedProjection
from compress.linear import get_bias, is_linear_like, linear_shape
from compress.model import is_local_reference

log = logging.getLogger(__name__)


def checkpoint_bytes(ref: str) -> int | None:
    """Bytes of the model's files on disk (a local directory, or a Hub id already in the local cache)."""
    path = Path(ref).expanduser() if is_local_reference(ref) else _hub_snapshot(ref)
    if path is None or not path.is_dir():
        return None
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _hub_snapshot(ref: str) -> Path | None:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(ref, local_files_only=True))
    except Exception as exc:  # huggingface_hub raises several types for "not in the cache"
        log.info("checkpoint size of %s unknown: not in the local Hub cache (%s)", ref, type(exc).__name__)
        return None


def tensor_bytes_by_dtype(model: nn.Module) -> dict[str, int]:
    """Bytes of the parameters and buffers in memory, by dtype; bytes that several tensors view (tied embeddings;
    fused projections, whose members' buffers are views of the fused layer's) are counted once."""
    spans: dict[int, list[tuple[int, int, str]]] = defaultdict(list)  # storage -> (start, end, dtype) in bytes
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.device.type == "meta":
            continue
        start = tensor.storage_offset() * tensor.element_size()
        spans[tensor.untyped_storage().data_ptr()].append(
            (start, start + tensor.numel() * tensor.element_size(), str(tensor.dtype).removeprefix("torch.")))
    by_dtype: dict[str, int] = defaultdict(int)
    for ranges in spans.values():
        covered = 0  # bytes of this storage counted so far, from its start
        for start, end, dtype in sorted(ranges):
            if end > max(start, covered):
                by_dtype[dtype] += end - max(start, covered)
                covered = end
    return dict(sorted(by_dtype.items()))


def layout_bytes(model: nn.Module) -> dict[str, dict]:
    """The linear layers by how they are stored (``dense``, or a compressed format's name): how many, the bytes
    their checkpoint tensors take (``stored_bytes``), those bytes were every weight and bias stored dense in the
    compute dtype (``dense_bytes``), and the fraction of their weights pruned (``sparsity``, by weight count)."""
    itemsize = torch.empty(0, dtype=compute_dtype(model)).element_size()
    layouts: dict[str, dict] = {}
    pruned: dict[str, float] = defaultdict(float)
    # a fused group's layer (compress.fuse_projections) holds its members' tensors, which the members count
    fused = {id(m.fused) for m in model.modules() if isinstance(m, FusedProjection) and m.fused is not None}
    for _, module in layer_modules(model):
        if id(module) in fused:
            continue
        if isinstance(module, CompressedLinear):
            name, shape, sparsity = module.format, (module.in_features, module.out_features), module.sparsity()
        elif is_linear_like(module):
            name, shape, sparsity = "dense", linear_shape(module), 0.0
        else:
            continue
        row = layouts.setdefault(name, {"layers": 0, "stored_bytes": 0, "dense_bytes": 0, "weights": 0})
        weights = shape[0] * shape[1]
        row["layers"] += 1
        row["stored_bytes"] += sum(t.nbytes for t in module.state_dict().values())
        bias = get_bias(module)
        row["dense_bytes"] += (weights + (0 if bias is None else bias.numel())) * itemsize
        row["weights"] += weights
        pruned[name] += sparsity * weights
    for name, row in layouts.items():
        row["sparsity"] = pruned[name] / row["weights"] if row["weights"] else 0.0
    return layouts


def compute_dtype(model: nn.Module) -> torch.dtype:
    """The dtype activations (and the KV cache) are computed in: the input embeddings'."""
    return model.get_input_embeddings().weight.dtype


def kv_cache_bytes_per_token(config, dtype: torch.dtype) -> int:
    """2 x layers x KV heads x head dim x bytes, for one sequence."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return 2 * text.num_hidden_layers * kv_heads * head_dim * dtype.itemsize


@torch.no_grad()
def peak_generation_bytes(model: nn.Module, prompt_len: int, new_tokens: int, pad_token_id: int = 0) -> int | None:
    """Peak CUDA memory allocated while generating ``new_tokens`` after a random prompt (batch 1); None on CPU."""
    device = next(model.parameters()).device
    if device.type != "cuda":
        return None
    ids = torch.randint(0, model.config.get_text_config().vocab_size, (1, prompt_len), device=device)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                   pad_token_id=pad_token_id)
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device)


@torch.no_grad()
def quantized_cache_bytes(model: nn.Module, kv: KVCacheSpec, context: int) -> dict:
    """Bytes per token of a quantized KV cache (scales and the full-precision window included), for one sequence:
    measured after a forward of ``context`` random tokens through it, and by its arithmetic at that, 4k and 32k tokens;
    each also as a fraction of the model's own cache."""
    from compress.eval.speed import cache_keyword
    from compress.kv import KVScheme, QuantizedCache
    from compress.kv.cache import attention_shape

    scheme = KVScheme.named(kv.scheme, kv.group_size, kv.residual)
    cache = QuantizedCache(model.config, scheme=scheme)
    ids = torch.randint(0, model.config.get_text_config().vocab_size, (1, context), device=next(model.parameters()).device)
    model(input_ids=ids, use_cache=True, logits_to_keep=1, **{cache_keyword(model): cache})
    full = kv_cache_bytes_per_token(model.config, compute_dtype(model))
    text, kv_heads, head_dim = attention_shape(model.config)
    at = {n: text.num_hidden_layers * scheme.bytes_per_token(kv_heads, head_dim, n, compute_dtype(model).itemsize)
          for n in sorted({context, 4096, 32768})}
    measured = cache.stored_bytes() / context
    out = {"scheme": kv.describe(), "context": context, "bytes_per_token": measured, "vs_full": measured / full,
           "bytes_per_token_at": {str(n): b for n, b in at.items()},
           "vs_full_at": {str(n): b / full for n, b in at.items()}}
    device = next(model.parameters()).device
    if device.type == "cuda":  # how many sequences of 8k tokens the GPU's free memory holds, cache alone
        del cache
        free = torch.cuda.mem_get_info(device)[0]
        per_sequence = {"full": full * 8192, "quantized": text.num_hidden_layers * scheme.bytes_per_token(
            kv_heads, head_dim, 8192, compute_dtype(model).itemsize) * 8192}
        out["sequences_of_8192_in_free_memory"] = {"free_bytes": free,
                                                   **{k: int(free // b) for k, b in per_sequence.items()}}
    return out


def memory_report(model: nn.Module, ref: str | None, context: int, prompt_len: int = 128,
                  new_tokens: int = 128, pad_token_id: int = 0, kv: KVCacheSpec | None = None) -> dict:
    """The ``memory`` task for one model: ``context`` is the tested context length (the perplexity window); with
    ``kv``, the bytes of that quantized KV cache too."""
    by_dtype = tensor_bytes_by_dtype(model)
    per_token = kv_cache_bytes_per_token(model.config, compute_dtype(model))
    return {
        **({"kv_cache_quantized": quantized_cache_bytes(model, kv, context)} if kv is not None else {}),
        "checkpoint_bytes": checkpoint_bytes(ref) if ref else None,
        "tensor_bytes_by_dtype": by_dtype,
        "tensor_bytes": sum(by_dtype.values()),
        "layouts": layout_bytes(model),
        "kv_cache_bytes_per_token": per_token,
        "context": context,
        "kv_cache_bytes_at_context": per_token * context,
        "peak_generation_bytes": peak_generation_bytes(model, prompt_len, new_tokens, pad_token_id),
        "peak_generation_setting": {"batch": 1, "prompt_len": prompt_len, "new_tokens": new_tokens},
    }
