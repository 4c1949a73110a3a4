"""Attention that reads a :class:`compress.kv.cache.QuantizedCache` as stored.

A model's attention gets what the cache's ``update`` returns. Where the model runs transformers' ``sdpa`` attention,
:func:`install` puts a wrapper in its place (in transformers' registry of attention functions) that takes the
cache's :class:`~compress.kv.cache.PackedKV` views: a decode step (one query token) on CUDA goes to
:func:`decode_attention`, a Triton kernel that computes q.K^T and softmax.V from the packed codes and scales (split
over the tokens, as flash-decoding does, so one long sequence fills the GPU); anything else (prompts, the CPU, a
model with soft-capping or a sliding window) gets the keys and values dequantized (a few sequences at a time, past
DEQUANTIZED_BYTES) and the original attention. Any other input goes to the original attention untouched, so models
without a quantized cache run as before, except where :func:`read_caches_directly` (the runtime feature
``decode-attention``) marked the model's attention layers: their masked decode steps over a full-precision cache go
to :func:`dense_decode_attention`, the same kernel with nothing stored quantized.

:func:`decode_reference` is the same computation in PyTorch, the oracle of the kernel's tests.
"""

from __future__ import annotations

import functools
import math

import torch

from compress.kv.cache import PackedKV

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs
    triton = None

UNSUPPORTED = ("softcap", "sliding_window", "s_aux")  # attention options the kernel does not have


def install() -> None:
    """Wrap transformers' ``sdpa`` attention so that it takes packed caches (once per process)."""
    from transformers.modeling_utils import AttentionInterface

    current = AttentionInterface._global_mapping["sdpa"]
    if not getattr(current, "reads_packed_kv", False):
        AttentionInterface.register("sdpa", _reading_packed(current))


def reads_packed(config) -> bool:
    """Whether a model of ``config`` runs an attention that takes packed caches (installing it if needed)."""
    if getattr(config, "_attn_implementation", None) != "sdpa":
        return False
    install()
    return True


def _reading_packed(original):
    @functools.wraps(original)
    def attention(module, query, key, value, attention_mask, **kwargs):
        if not isinstance(key, PackedKV):
            if (getattr(module, DENSE_FLAG, False) and attention_mask is not None  # unmasked: sdpa's own GQA
                    and _keeps_or_drops(attention_mask) and _dense_kernel_can_run(query, key, value, kwargs)):
                out = dense_decode_attention(query, key, value, _keep(attention_mask, key.shape[2]),
                                             kwargs.get("scaling"))
                return out.transpose(1, 2).contiguous(), None
            return original(module, query, key, value, attention_mask, **kwargs)
        if _keeps_or_drops(attention_mask) and _kernel_can_run(query, key, kwargs):
            out = decode_attention(query, key, _keep(attention_mask, key.bound), kwargs.get("scaling"))
            return out.transpose(1, 2).contiguous(), None
        batch, rows = query.shape[0], _rows_at_once(key)
        if rows >= batch:
            return _dequantized_attention(original, module, query, key, slice(None), attention_mask, kwargs)
        parts = [_dequantized_attention(original, module, query, key, slice(b, b + rows), attention_mask, kwargs)[0]
                 for b in range(0, batch, rows)]
        return torch.cat(parts, 0), None

    attention.reads_packed_kv = True
    return attention


#: Bytes of dequantized keys and values (and their float32 working copies) a prompt's attention may hold at once.
#: Beyond them it runs a few sequences at a time: a batch of long prompts (48 x 8k tokens of a Llama-3-8B shape would
#: hold 9 GiB a layer) takes no more memory for its attention than the cache saves.
DEQUANTIZED_BYTES = 2**30


def _rows_at_once(kv: PackedKV) -> int:
    """How many sequences' keys and values the attention dequantizes at once: 24 bytes an element of the keys (both
    dequantized, the float32 working copies of one, and the copies a masked grouped-query attention repeats them
    into)."""
    _, heads, _, dim = kv.tail_keys.shape
    return max(1, DEQUANTIZED_BYTES // (24 * heads * int(kv.bound) * dim))


def _dequantized_attention(original, module, query, kv: PackedKV, rows: slice, mask, kwargs):
    """The original attention of the sequences ``rows`` over their keys and values, dequantized."""
    k, v = kv.dequantized(rows)
    if mask is not None:
        mask = mask[rows] if mask.shape[0] > 1 else mask
        if mask.shape[-1] > k.shape[2]:  # a static cache's prompt: its mask spans the whole cache, the keys the
            mask = mask[..., : k.shape[2]]  # tokens so far
    return original(module, query[rows], k, v, mask, **kwargs)


#: The attribute that sends an attention module's decode steps over full-precision caches to
#: :func:`dense_decode_attention` (set by :func:`read_caches_directly`).
DENSE_FLAG = "compress_decode_kernel"


def read_caches_directly(model: torch.nn.Module, on: bool = True) -> int:
    """Send the masked decode steps (one query token, CUDA, a mask: static caches, padded batches) of ``model``'s
    attention layers over full-precision caches to :func:`dense_decode_attention` (``on``), or back to the model's
    own attention; the number of layers changed. The model must run transformers' ``sdpa`` attention; other steps
    (prompts, the CPU, unmasked steps, which sdpa runs without repeating the grouped heads) take it as before."""
    if on:
        install()
    layers = [m for m in model.modules() if type(m).__name__.endswith("Attention") and hasattr(m, "layer_idx")]
    for layer in layers:
        if on:
            setattr(layer, DENSE_FLAG, True)
        else:
            layer.__dict__.pop(DENSE_FLAG, None)
    return len(layers)


def _dense_kernel_can_run(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kwargs: dict) -> bool:
    return (triton is not None and query.is_cuda and query.shape[2] == 1 and key.shape[2] >= 1
            and query.dtype in (torch.bfloat16, torch.float16) and key.dtype == value.dtype == query.dtype
            and key.shape[-1] == value.shape[-1] == query.shape[-1] and key.stride(-1) == value.stride(-1) == 1
            and query.shape[-1] & (query.shape[-1] - 1) == 0 and query.shape[1] % key.shape[1] == 0
            and not kwargs.get("dropout") and all(kwargs.get(name) is None for name in UNSUPPORTED))


def _kernel_can_run(query: torch.Tensor, kv: PackedKV, kwargs: dict) -> bool:
    scheme = kv.layer.scheme
    return (triton is not None and query.is_cuda and query.shape[2] == 1
            and (scheme.format == "fp8" or scheme.group_size >= 16)  # a block's products: at least 16 tokens
            and query.shape[-1] & (query.shape[-1] - 1) == 0  # a power-of-two head dimension (Triton's tiles)
            and not kwargs.get("dropout") and all(kwargs.get(name) is None for name in UNSUPPORTED))


def _keeps_or_drops(mask: torch.Tensor | None) -> bool:
    """Whether ``mask`` only says which keys to attend to, the same for every head (what the kernel takes): None,
    or [B, 1, q, kv]. A mask with a row for each head can carry biases (ALiBi): the model's attention takes it."""
    return mask is None or mask.shape[1] == 1


def _keep(mask: torch.Tensor | None, length: int) -> torch.Tensor | None:
    """Which of the first ``length`` keys the one query may attend to [B, length] (bool), from transformers' 4-D
    mask; None: all."""
    if mask is None:
        return None
    row = mask[:, 0, -1, :length]
    return row if row.dtype == torch.bool else row > torch.finfo(row.dtype).min / 2


#: Programs the decode kernel aims at for each multiprocessor, splitting the tokens when the batch's heads are
#: fewer (flash-decoding); a batch with more heads than that takes one split. With the tokens a program takes at a
#: time (BLOCK_T) and its warps (WARPS), what `kv_bench attention` sweeps: compiled offline for sm_90, int4 with
#: 64 tokens and 4 warps holds 168 registers a thread and 70 KiB of shared memory (3 programs an SM), with 32 tokens
#: 128 and 37 KiB, with 8 warps 128 and 70 KiB.
PROGRAMS_PER_SM = 2
BLOCK_T = 64
WARPS = 4

_SMS: dict[int, int] = {}


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (4 elsewhere: Triton's interpreter); asked once a device, so a
    compiled step reads a constant."""
    if device.type != "cuda":
        return 4
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SMS:
        _SMS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SMS[index]


def decode_reference(query: torch.Tensor, kv: PackedKV, keep: torch.Tensor | None = None,
                     scaling: float | None = None) -> torch.Tensor:
    """Attention of ``query`` [B, Hq, 1, D] over the cache view ``kv`` (dequantized), in float32: [B, Hq, 1, D]."""
    k, v = (t[:, :, : int(kv.length)].float() for t in kv.dequantized())  # a ring view's: the whole bound
    groups = query.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    scores = (query.float() @ k.transpose(2, 3)) * (scaling or 1 / math.sqrt(query.shape[-1]))
    if keep is not None:
        scores = scores.masked_fill(~keep[:, None, None, :], float("-inf"))
    return torch.softmax(scores, -1) @ v


def decode_attention(query: torch.Tensor, kv: PackedKV, keep: torch.Tensor | None = None,
                     scaling: float | None = None, block: int | None = None) -> torch.Tensor:
    """:func:`decode_reference` as Triton kernels on CUDA, reading the stored tokens' packed codes: [B, Hq, 1, D] in
    the query's dtype."""
    layer, s = kv.layer, kv.layer.scheme
    B, D = query.shape[0], query.shape[-1]
    fp8 = s.format == "fp8"
    stored = None  # the stored parts: codes, scales and zero points of keys, then of values
    if torch.is_tensor(kv.length) or kv.stored:
        if fp8:  # codes read as bytes; one scale a head (the kernel's scale "rows" are then heads)
            scales = [t.view(1, -1, 1).expand(B, -1, 1) for t in layer.fp8_scales]
            stored = (layer.buffers["k"].view(torch.uint8), scales[0], None, layer.buffers["v"].view(torch.uint8),
                      scales[1], None)
        else:
            stored = tuple(layer.buffers[n] for n in ("k", "k_scale", "k_zero", "v", "v_scale", "v_zero"))
    return _launch(query, stored, kv.tail_keys, kv.tail_values, kv.stored, kv.length, kv.bound, kv.ring, keep, scaling,
                   block, bits=s.bits, group=D if fp8 else s.group_size, fp8=fp8)


def dense_decode_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                           keep: torch.Tensor | None = None, scaling: float | None = None,
                           block: int | None = None) -> torch.Tensor:
    """Attention of one query token [B, Hq, 1, D] over a full-precision cache's keys and values [B, Hkv, L, D] (a
    static cache's buffers, masked by ``keep`` [B, L]), the same kernels with nothing stored quantized: each
    key and value is read once for its grouped query heads, where sdpa with a mask reads copies repeated for each
    (transformers' ``repeat_kv``). [B, Hq, 1, D] in the query's dtype."""
    length = key.shape[2]
    return _launch(query, None, key, value, 0, length, length, False, keep, scaling, block, bits=8,
                   group=query.shape[-1], fp8=False)


def _cdiv(a: int, b: int) -> int:  # Triton's cdiv and next_power_of_2 cost microseconds a call from the host
    return -(-a // b)


def _pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def _launch(query: torch.Tensor, stored: tuple | None, tk: torch.Tensor, tv: torch.Tensor, n_stored, length,
            bound: int, ring: bool, keep: torch.Tensor | None, scaling: float | None, block: int, bits: int,
            group: int, fp8: bool) -> torch.Tensor:
    """The decode kernel over ``stored`` (the packed parts of the first ``n_stored`` tokens; None where none are
    read) and the tokens [n_stored, length) in ``tk`` / ``tv``, then the merge of its splits."""
    B, Hq, _, D = query.shape
    Hkv = tk.shape[1]
    groups = Hq // Hkv
    block = min(block or BLOCK_T, group)  # a block within one key group
    programs = PROGRAMS_PER_SM * sm_count(query.device)
    splits = max(1, min(_cdiv(bound, block), _cdiv(programs, B * Hkv)))
    per_split = _cdiv(_cdiv(bound, splits), block) * block
    splits = _cdiv(bound, per_split)
    if query.stride(-1) != 1:
        query = query.contiguous()
    acc = torch.empty(B, Hkv, splits, groups, D, device=query.device, dtype=torch.float32)
    stats = torch.empty(B, Hkv, splits, groups, 2, device=query.device, dtype=torch.float32)
    unused = acc  # stands in for a buffer the kernel does not read
    on_device = torch.is_tensor(length)
    lengths = (torch.as_tensor(n_stored, device=query.device), length) if on_device else (unused, unused)
    kc, ks, kz, vc, vs, vz = (unused if t is None else t for t in (stored or (None,) * 6))
    if keep is not None and keep.shape[0] != B:  # a mask made for one row, broadcast over the batch
        keep = keep.expand(B, -1)
    keep_t = keep if keep is not None else unused  # HAS_KEEP is False
    _decode_kernel[(B * Hkv, splits)](
        query, kc, ks, kz, vc, vs, vz, tk, tv, keep_t, acc, stats, *lengths,
        Hkv, 0 if on_device else n_stored, 0 if on_device else length, per_split, tk.shape[2],
        scaling or 1 / math.sqrt(D), query.stride(0), query.stride(1),
        kc.stride(0), kc.stride(1), kc.stride(2), ks.stride(0), ks.stride(1), ks.stride(2),
        vc.stride(0), vc.stride(1), vc.stride(2), vs.stride(0), vs.stride(1), vs.stride(2),
        tk.stride(0), tk.stride(1), tk.stride(2), tv.stride(0), tv.stride(1), tv.stride(2),
        keep_t.stride(0) if keep is not None else 0,
        GROUPS=groups, BLOCK_H=max(16, _pow2(groups)), D=D, BITS=bits, GROUP=group, BLOCK_T=block,
        FP8=fp8, HAS_KEEP=keep is not None, ON_DEVICE=on_device, RING=ring, num_warps=WARPS)
    out = torch.empty(B, 1, Hq, D, device=query.device, dtype=query.dtype)  # as the attention hands it on
    _merge_kernel[(B * Hq,)](acc, stats, out, splits, GROUPS=groups, D=D, BLOCK_S=_pow2(splits),
                             num_warps=4)
    return out.transpose(1, 2)


if triton is not None:

    @triton.jit
    def _e4m3(x):
        """float8_e4m3fn codes (read as bytes) as float32: sign, 4 exponent bits (bias 7), 3 mantissa bits."""
        x = x.to(tl.int32)
        e = (x >> 3) & 15
        m = (x & 7).to(tl.float32) / 8.0
        value = tl.where(e == 0, m * 0.015625, (1.0 + m) * tl.exp2((e - 7).to(tl.float32)))
        return tl.where((x & 128) != 0, -value, value)

    @triton.jit
    def _unpack(packed, BITS: tl.constexpr):
        """Bytes [T, W] as the codes they pack [T, W * 8 / BITS], lowest bits first (interleaved: no gather)."""
        if BITS == 4:
            codes = tl.interleave(packed & 15, packed >> 4)
        elif BITS == 2:
            codes = tl.interleave(tl.interleave(packed & 3, (packed >> 4) & 3),
                                  tl.interleave((packed >> 2) & 3, packed >> 6))
        else:
            codes = packed
        return codes

    @triton.jit
    def _attend(s, v, ok, m, l, acc):
        """A block's scores ``s`` [BLOCK_H, BLOCK_T] and values ``v`` [BLOCK_T, D] (float16) folded into the running
        softmax (m, l) and output (acc)."""
        s = tl.where(ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m - m_safe)
        l = l * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        return m_new, l, acc

    # The lengths (and the mask's row stride, the window's length) change from step to step: specialised, as
    # Triton does with integers (on being a multiple of 16), each new combination would compile the kernel again in
    # the middle of decoding, a second or so each time
    @triton.jit(do_not_specialize=["stored", "length", "ring", "keep_b"])
    def _decode_kernel(q_ptr, kc_ptr, ks_ptr, kz_ptr, vc_ptr, vs_ptr, vz_ptr, tk_ptr, tv_ptr, keep_ptr, acc_ptr,
                       stats_ptr, stored_ptr, length_ptr, Hkv, stored, length, per_split, ring, scaling, q_b, q_h,
                       kc_b, kc_h, kc_t, ks_b, ks_h, ks_t, vc_b, vc_h, vc_t, vs_b, vs_h, vs_t,
                       tk_b, tk_h, tk_t, tv_b, tv_h, tv_t, keep_b,
                       GROUPS: tl.constexpr, BLOCK_H: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr,
                       GROUP: tl.constexpr, BLOCK_T: tl.constexpr, FP8: tl.constexpr, HAS_KEEP: tl.constexpr,
                       ON_DEVICE: tl.constexpr, RING: tl.constexpr):
        bh = tl.program_id(0)
        if ON_DEVICE:  # a static cache's lengths, read here: the launch needs no host synchronisation
            stored = tl.load(stored_ptr).to(tl.int32)
            length = tl.load(length_ptr).to(tl.int32)
        split = tl.program_id(1)
        b = bh // Hkv
        h = bh % Hkv
        splits = tl.num_programs(1)
        PER: tl.constexpr = 8 // BITS
        rows = tl.arange(0, BLOCK_H)
        d = tl.arange(0, D)
        q = tl.load(q_ptr + b * q_b + (h * GROUPS + rows[:, None]) * q_h + d[None, :], mask=rows[:, None] < GROUPS,
                    other=0.0)
        q = (q * scaling).to(tl.float32)  # under torch.compile a float argument may arrive as float64
        q16 = q.to(tl.float16)
        m = tl.full([BLOCK_H], float("-inf"), tl.float32)
        l = tl.zeros([BLOCK_H], tl.float32)
        acc = tl.zeros([BLOCK_H, D], tl.float32)
        w = tl.arange(0, D // PER)  # a token's bytes: loaded whole (vectorised), then unpacked
        start = split * per_split
        end = tl.minimum(start + per_split, length)
        # the stored tokens: keys per channel over runs of GROUP tokens, values per token over runs of GROUP channels
        kc = kc_ptr + b * kc_b + h * kc_h
        ks = ks_ptr + b * ks_b + h * ks_h
        kz = kz_ptr + b * ks_b + h * ks_h
        vc = vc_ptr + b * vc_b + h * vc_h
        vs = vs_ptr + b * vs_b + h * vs_h
        vz = vz_ptr + b * vs_b + h * vs_h
        NG: tl.constexpr = D // GROUP
        j = tl.arange(0, NG)
        for t0 in range(start, tl.minimum(end, stored), BLOCK_T):  # BLOCK_T divides GROUP: one key group a block
            t = t0 + tl.arange(0, BLOCK_T)
            ok = t < tl.minimum(end, stored)
            if FP8:  # E4M3 codes with one scale a head: the keys' folded into the query, the values' applied
                codes = tl.load(kc + t[:, None] * kc_t + d[None, :], mask=ok[:, None], other=0)
                s = tl.dot((q * tl.load(ks)).to(tl.float16), tl.trans(_e4m3(codes).to(tl.float16)))
                codes = tl.load(vc + t[:, None] * vc_t + d[None, :], mask=ok[:, None], other=0)
                v = (_e4m3(codes) * tl.load(vs)).to(tl.float16)
            else:
                # keys: q.k = (q * scale).codes - (q * scale).zero, the group's scale and zero point taken once
                codes = _unpack(tl.load(kc + t[:, None] * kc_t + w[None, :], mask=ok[:, None], other=0), BITS)
                g = t0 // GROUP
                qs = q * tl.load(ks + g * ks_t + d).to(tl.float32)[None, :]
                bias = tl.sum(qs * tl.load(kz + g * ks_t + d).to(tl.float32)[None, :], 1)
                s = tl.dot(qs.to(tl.float16), tl.trans(codes.to(tl.float16))) - bias[:, None]
                # values: each token's runs of GROUP channels with their own scale and zero point
                codes = _unpack(tl.load(vc + t[:, None] * vc_t + w[None, :], mask=ok[:, None], other=0), BITS)
                scale = tl.load(vs + t[:, None] * vs_t + j[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
                zero = tl.load(vz + t[:, None] * vs_t + j[None, :], mask=ok[:, None], other=0).to(tl.float32)
                v = tl.reshape(codes.to(tl.float32), (BLOCK_T, NG, GROUP))
                v = tl.reshape((v - zero[:, :, None]) * scale[:, :, None], (BLOCK_T, D)).to(tl.float16)
            if HAS_KEEP:
                ok = ok & (tl.load(keep_ptr + b * keep_b + t, mask=ok, other=0) != 0)
            m, l, acc = _attend(s, v, ok, m, l, acc)
        # the window and the step's new tokens, as they are
        tk = tk_ptr + b * tk_b + h * tk_h
        tv = tv_ptr + b * tv_b + h * tv_h
        for t0 in range(tl.maximum(start, stored), end, BLOCK_T):
            t = t0 + tl.arange(0, BLOCK_T)
            ok = t < end
            slot = t % ring if RING else t - stored
            k = tl.load(tk + slot[:, None] * tk_t + d[None, :], mask=ok[:, None], other=0.0).to(tl.float16)
            v = tl.load(tv + slot[:, None] * tv_t + d[None, :], mask=ok[:, None], other=0.0).to(tl.float16)
            if HAS_KEEP:
                ok = ok & (tl.load(keep_ptr + b * keep_b + t, mask=ok, other=0) != 0)
            m, l, acc = _attend(tl.dot(q16, tl.trans(k)), v, ok, m, l, acc)
        out = ((bh * splits + split) * GROUPS + rows)
        tl.store(acc_ptr + out[:, None] * D + d[None, :], acc, mask=rows[:, None] < GROUPS)
        tl.store(stats_ptr + out * 2, m, mask=rows < GROUPS)
        tl.store(stats_ptr + out * 2 + 1, l, mask=rows < GROUPS)

    @triton.jit(do_not_specialize=["splits"])
    def _merge_kernel(acc_ptr, stats_ptr, out_ptr, splits, GROUPS: tl.constexpr, D: tl.constexpr,
                      BLOCK_S: tl.constexpr):
        """One query head's splits merged by their softmax statistics, written as the attention's output [B, 1, Hq,
        D]; a split with no key (masked, or past the length) weighs nothing."""
        row = tl.program_id(0)  # b * Hq + query head; the splits' rows are (b * Hkv + kv head) * splits + split
        bh = row // GROUPS
        split = tl.arange(0, BLOCK_S)
        ok = split < splits
        at = (bh * splits + split) * GROUPS + row % GROUPS
        m = tl.load(stats_ptr + at * 2, mask=ok, other=float("-inf"))
        l = tl.load(stats_ptr + at * 2 + 1, mask=ok, other=0.0)
        weight = tl.where(m == float("-inf"), 0.0, tl.exp(m - tl.max(m, 0)))
        d = tl.arange(0, D)
        acc = tl.load(acc_ptr + at[:, None] * D + d[None, :], mask=ok[:, None], other=0.0)
        out = tl.sum(acc * weight[:, None], 0) / tl.sum(l * weight, 0)
        tl.store(out_ptr + row * D + d, out.to(out_ptr.dtype.element_ty))
