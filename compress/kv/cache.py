"""A quantized KV cache that transformers' ``generate`` and forward passes use like their own caches.

:class:`QuantizedCache` holds one :class:`QuantizedLayer` per decoder layer. A layer keeps the most recent tokens in
full precision (the residual window: between ``residual`` and ``residual + group_size - 1`` of them) and the older
ones quantized (:mod:`compress.kv.quant`): when the window holds ``group_size`` tokens more than ``residual``, its
oldest whole groups are quantized and moved out. With ``fp8``, every token is stored in E4M3 at once, with one scale
per head taken from the first tokens the layer sees (later ones beyond that range saturate).

Every step's attention sees the tokens it brings, and the window, in full precision, and the older tokens as
stored: a token is first read quantized by the step after the one that moved it out of the window. That holds for a
prompt too, so a prompt's own attention is exact (as in KIVI).

:class:`StaticQuantizedLayer` holds the same in buffers of fixed size and address, for ``torch.compile``.

What :meth:`QuantizedLayer.update` hands to the attention: the keys and values as the model's dtype (the stored
part dequantized), or, where the model's attention reads the packed cache itself (:mod:`compress.kv.attention`),
a :class:`PackedKV` that says where everything lies.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicLayer

from compress.errors import UsageError
from compress.kv import quant

BITS = (2, 4, 8)
NAMES = ("fp8", "int8", "int4", "int2")


@dataclass(frozen=True)
class KVScheme:
    """How a cache stores keys and values: ``format`` int (``bits`` 2, 4 or 8, ``group_size`` tokens per key scale
    and channels per value scale, ``residual`` recent tokens in full precision) or fp8 (E4M3, a scale per head)."""

    format: Literal["int", "fp8"] = "int"
    bits: int = 4
    group_size: int = 64
    residual: int = 128

    def __post_init__(self) -> None:
        if self.format not in ("int", "fp8"):
            raise UsageError(f"kv cache format {self.format!r} is not one of int, fp8")
        if self.format == "int" and self.bits not in BITS:
            raise UsageError(f"kv cache bits: {self.bits!r} is not one of 2, 4, 8: use int2, int4 or int8 (or fp8)")
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size < 1:
            raise UsageError(f"kv cache group_size: {self.group_size!r} must be a positive integer (32, 64, 128)")
        if isinstance(self.residual, bool) or not isinstance(self.residual, int) or self.residual < 0:
            raise UsageError(f"kv cache residual: {self.residual!r} must be an integer >= 0 (tokens kept in full "
                             "precision; 128 is usual)")

    @classmethod
    def named(cls, name: str, group_size: int = 64, residual: int = 128) -> KVScheme:
        """``fp8``, ``int8``, ``int4`` or ``int2``."""
        if name not in NAMES:
            raise UsageError(f"kv cache {name!r} is not one of {', '.join(NAMES)}")
        if name == "fp8":
            return cls("fp8", 8, group_size, residual)
        return cls("int", int(name[3:]), group_size, residual)

    @property
    def name(self) -> str:
        return "fp8" if self.format == "fp8" else f"int{self.bits}"

    def bytes_per_token(self, heads: int, head_dim: int, context: int, dtype_bytes: int = 2) -> float:
        """Bytes of one layer's keys and values per token at ``context`` tokens, scales and residual included."""
        if self.format == "fp8":
            return 2 * heads * head_dim
        stored = self.group_size * (max(0, context - self.residual) // self.group_size)
        window = context - stored
        code = head_dim * self.bits / 8
        meta = 3 * head_dim / self.group_size  # a float16 scale and an int8 zero point a group, keys and values alike
        per_head = stored * 2 * (code + meta) + window * 2 * head_dim * dtype_bytes
        return heads * per_head / context


@dataclass
class PackedKV:
    """What an attention that reads the cache itself gets from a quantized layer's ``update``: the first ``stored``
    tokens as stored, then tokens [stored, length) in the model's dtype, from ``tail_keys`` / ``tail_values``
    [B, H, n, D]: the window and the step's new tokens in order, or with ``ring`` the window kept in a ring (token t
    at t mod n) by a static layer, whose ``stored`` and ``length`` are then 0-d tensors on the device. ``bound``:
    an upper bound of ``length`` known on the host (the grid of a kernel, the width of the attention mask)."""

    layer: QuantizedLayer | StaticQuantizedLayer
    stored: int | torch.Tensor
    length: int | torch.Tensor
    tail_keys: torch.Tensor
    tail_values: torch.Tensor
    bound: int
    ring: bool = False

    def dequantized(self, rows: slice = slice(None)) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values [B, H, length, D] in the model's dtype (of the sequences ``rows`` only, where given); for a
        ring view [B, H, bound, D], whatever lies past the length (the attention's mask covers ``bound`` keys and
        hides those), with no host synchronisation (so a compiled step can take this path)."""
        if self.ring:
            return self._dequantized_ring(rows)
        stored = int(self.stored)
        k, v = self.tail_keys[rows], self.tail_values[rows]
        if stored == 0:
            return k, v
        old_k, old_v = self.layer.dequantize(stored, rows)
        return torch.cat([old_k, k], 2), torch.cat([old_v, v], 2)

    def _dequantized_ring(self, rows: slice) -> tuple[torch.Tensor, torch.Tensor]:
        g = self.layer.scheme.group_size
        whole = -(-self.bound // g) * g  # every group up to the bound (the buffers hold them)
        positions = torch.arange(self.bound, device=self.tail_keys.device)
        exact = (positions >= self.stored)[None, None, :, None]
        slots = positions % self.tail_keys.shape[2]
        out = []
        for stored, ring in zip(self.layer.dequantize(whole, rows), (self.tail_keys, self.tail_values)):
            out.append(torch.where(exact, ring[rows].index_select(2, slots), stored[:, :, : self.bound]))
        return out[0], out[1]


class _Stored:
    """What both layers share: the quantized parts of a run of tokens, and reading the first ``stored`` back."""

    scheme: KVScheme
    buffers: dict[str, torch.Tensor]
    dtype: torch.dtype

    @torch.no_grad()  # codes and scales keep no autograd history (rounding has no gradient; nextafter no formula)
    def quantized(self, k: torch.Tensor, v: torch.Tensor) -> dict[str, torch.Tensor]:
        """The stored parts of keys and values [B, H, n, D] (n a multiple of the group size for int schemes)."""
        s = self.scheme
        if s.format == "fp8":
            return {"k": quant.fp8_quantize(k, self.fp8_scales[0]), "v": quant.fp8_quantize(v, self.fp8_scales[1])}
        qk, qv = quant.quantize_keys(k, s.bits, s.group_size), quant.quantize_values(v, s.bits, s.group_size)
        return {"k": qk.codes, "k_scale": qk.scale, "k_zero": qk.zero, "v": qv.codes, "v_scale": qv.scale,
                "v_zero": qv.zero}

    def per(self, name: str) -> int:
        """Tokens a row of buffer ``name`` is for: a key group for key scales, else one."""
        return self.scheme.group_size if name in ("k_scale", "k_zero") else 1

    def stored_part(self, name: str, stored: int, rows: slice = slice(None)) -> torch.Tensor:
        """Buffer ``name`` cut to the first ``stored`` tokens (their key groups, for key scales) of the sequences
        ``rows``."""
        return self.buffers[name][rows, :, : stored // self.per(name)]

    def dequantize(self, stored: int, rows: slice = slice(None)) -> tuple[torch.Tensor, torch.Tensor]:
        """The first ``stored`` tokens' keys and values in the model's dtype, of the sequences ``rows``."""
        s, part = self.scheme, lambda n: self.stored_part(n, stored, rows)
        if s.format == "fp8":
            return (quant.fp8_dequantize(part("k"), self.fp8_scales[0], self.dtype),
                    quant.fp8_dequantize(part("v"), self.fp8_scales[1], self.dtype))
        k = quant.dequantize_keys(quant.Quantized(part("k"), part("k_scale"), part("k_zero")), s.bits, s.group_size,
                                  self.dtype)
        v = quant.dequantize_values(quant.Quantized(part("v"), part("v_scale"), part("v_zero")), s.bits,
                                    s.group_size, self.dtype)
        return k, v


class QuantizedLayer(_Stored, DynamicLayer):
    """One decoder layer's quantized keys and values (see the module doc)."""

    is_compileable = False
    is_croppable = False

    def __init__(self, scheme: KVScheme, direct: bool = False):
        super().__init__()
        self.scheme = scheme
        self.direct = direct
        self.stored = 0  # tokens stored quantized
        self.buffers: dict[str, torch.Tensor] = {}  # codes, scales, zero points; grown by doubling

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device, self.dtype = key_states.device, key_states.dtype
        self.keys = key_states[:, :, :0]
        self.values = value_states[:, :, :0]
        if self.scheme.format == "fp8":
            self.fp8_scales = (quant.fp8_scale(key_states), quant.fp8_scale(value_states))
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        tail_k = torch.cat([self.keys, key_states], 2)
        tail_v = torch.cat([self.values, value_states], 2)
        length = self.stored + tail_k.shape[2]
        view = PackedKV(self, self.stored, length, tail_k, tail_v, length)
        move = self._to_store(tail_k.shape[2])
        if move:
            self._store(tail_k[:, :, :move], tail_v[:, :, :move])
        self.keys, self.values = tail_k[:, :, move:].contiguous(), tail_v[:, :, move:].contiguous()
        return (view, view) if self.direct else view.dequantized()

    def _to_store(self, window: int) -> int:
        """How many of the window's oldest tokens to store now."""
        if self.scheme.format == "fp8":
            return window
        g, r = self.scheme.group_size, self.scheme.residual
        return g * ((window - r) // g) if window - r >= g else 0

    def _store(self, k: torch.Tensor, v: torch.Tensor) -> None:
        start, end = self.stored, self.stored + k.shape[2]
        for name, t in self.quantized(k, v).items():
            self._write(name, t, start, end)
        self.stored = end

    def _write(self, name: str, t: torch.Tensor, start: int, end: int) -> None:
        """Write ``t`` (tokens [start, end) along dim 2, or their key groups for key scales) into its buffer."""
        lo, hi = start // self.per(name), end // self.per(name)
        buf = self.buffers.get(name)
        if buf is None or buf.shape[2] < hi:
            grown = t.new_empty((*t.shape[:2], max(hi, 2 * (0 if buf is None else buf.shape[2])), *t.shape[3:]))
            if buf is not None:
                grown[:, :, : buf.shape[2]] = buf
            self.buffers[name] = buf = grown
        buf[:, :, lo:hi] = t

    def get_seq_length(self) -> int:
        return self.stored + (self.keys.shape[2] if self.is_initialized else 0)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def stored_bytes(self) -> int:
        """Bytes of everything the layer holds for its tokens (buffers cut to the tokens stored, and the window)."""
        if not self.is_initialized:
            return 0
        held = sum(self.stored_part(n, self.stored).nbytes for n in self.buffers)
        return held + self.keys.nbytes + self.values.nbytes

    def reset(self) -> None:
        self.stored, self.buffers = 0, {}
        super().reset()

    def _each(self, fn) -> None:
        if self.is_initialized:
            self.keys, self.values = fn(self.keys), fn(self.values)
            self.buffers = {n: fn(b) for n, b in self.buffers.items()}

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._each(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._each(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._each(lambda t: t[indices, ...])

    def crop(self, tokens_to_remove: int) -> None:
        raise UsageError("a quantized KV cache cannot be cropped (assisted generation crops its cache): use a "
                         "full-precision cache with assistant models")


class StaticQuantizedLayer(_Stored, CacheLayerMixin):
    """A :class:`QuantizedLayer` in buffers of fixed size and address, for ``torch.compile`` and CUDA graphs: codes
    and scales for ``max_cache_len`` tokens, and the window in a ring of ``residual + group_size`` slots. A decode step
    (one token) runs without host synchronisation or data-dependent shapes: the group a step completes is quantized
    from the ring and written to its place, and other steps write the same work to a spare group past the end. A
    prompt (several tokens) runs eagerly. Int schemes only."""

    is_compileable = True
    is_sliding = False

    def __init__(self, scheme: KVScheme, max_cache_len: int, direct: bool = False):
        super().__init__()
        if scheme.format != "int":
            raise UsageError(f"a static quantized KV cache takes int2/int4/int8, not {scheme.name}: use the dynamic "
                             "cache (no max_cache_len) for fp8")
        self.scheme, self.direct, self.max_cache_len = scheme, direct, max_cache_len
        self.ring = scheme.residual + scheme.group_size
        self.buffers = {}

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device, self.dtype = key_states.device, key_states.dtype
        B, H, _, D = key_states.shape
        g = self.scheme.group_size
        capacity = -(-self.max_cache_len // g) * g + g  # and one spare group
        parts = self.quantized(key_states.new_zeros(B, H, g, D), value_states.new_zeros(B, H, g, D))
        self.buffers = {name: t.new_zeros((B, H, capacity // self.per(name), *t.shape[3:])) for name, t in parts.items()}
        self.keys = key_states.new_zeros(B, H, self.ring, D)  # the window's ring
        self.values = value_states.new_zeros(B, H, self.ring, D)
        self.length = torch.zeros((), dtype=torch.long, device=self.device)
        if self.direct:  # the kernel's grid reads the device's multiprocessors: known before a step is compiled
            from compress.kv.attention import sm_count

            sm_count(self.device)
        self.spare = torch.arange(capacity - g, capacity, device=self.device)
        if not torch.compiler.is_compiling():
            for t in (*self.buffers.values(), self.keys, self.values, self.length):
                torch._dynamo.mark_static_address(t)
        self.is_initialized = True

    def _stored_of(self, length):
        g, r = self.scheme.group_size, self.scheme.residual
        return g * ((length - r).clamp(min=0) // g) if torch.is_tensor(length) else g * (max(0, length - r) // g)

    @torch.no_grad()  # an inference cache at fixed addresses: its in-place writes keep no autograd history
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        view = self._step(key_states, value_states) if key_states.shape[2] == 1 else self._prompt(key_states,
                                                                                                 value_states)
        return (view, view) if self.direct else view.dequantized()

    def _step(self, k: torch.Tensor, v: torch.Tensor) -> PackedKV:
        g = self.scheme.group_size
        before = self.length.clone()
        self.keys.index_copy_(2, (before % self.ring).view(1), k)
        self.values.index_copy_(2, (before % self.ring).view(1), v)
        self.length.add_(1)
        stored, now = self._stored_of(before), self._stored_of(self.length)
        group = (now - g).clamp(min=0) + torch.arange(g, device=self.device)  # the group this step completes, if any
        slots = group % self.ring
        parts = self.quantized(self.keys.index_select(2, slots), self.values.index_select(2, slots))
        rows = torch.where(now > stored, group, self.spare)
        for name, t in parts.items():
            self.buffers[name].index_copy_(2, rows[:1] // g if self.per(name) > 1 else rows, t)
        return PackedKV(self, stored, before + 1, self.keys, self.values, self.max_cache_len, ring=True)

    def _prompt(self, k: torch.Tensor, v: torch.Tensor) -> PackedKV:
        before = int(self.length)
        if before + k.shape[2] > self.max_cache_len:
            raise UsageError(f"the static KV cache holds {self.max_cache_len} tokens; {before} are in it and "
                             f"{k.shape[2]} more came: make max_cache_len larger")
        stored = self._stored_of(before)
        slots = torch.arange(stored, before, device=self.device) % self.ring
        tail_k = torch.cat([self.keys.index_select(2, slots), k], 2)
        tail_v = torch.cat([self.values.index_select(2, slots), v], 2)
        length = before + k.shape[2]
        now = self._stored_of(length)
        if now > stored:
            for name, t in self.quantized(tail_k[:, :, : now - stored], tail_v[:, :, : now - stored]).items():
                self.buffers[name][:, :, stored // self.per(name) : now // self.per(name)] = t
        window = torch.arange(now, length, device=self.device)
        self.keys.index_copy_(2, window % self.ring, tail_k[:, :, now - stored :])
        self.values.index_copy_(2, window % self.ring, tail_v[:, :, now - stored :])
        self.length.fill_(length)
        return PackedKV(self, stored, length, tail_k, tail_v, length)

    def get_seq_length(self):
        return self.length if self.is_initialized else 0

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.max_cache_len, 0

    def get_max_length(self) -> int:
        return self.max_cache_len

    def stored_bytes(self) -> int:
        """Bytes of the codes and scales of the tokens stored now, and of the window's ring."""
        if not self.is_initialized:
            return 0
        stored = int(self._stored_of(int(self.length)))
        return sum(self.stored_part(n, stored).nbytes for n in self.buffers) + self.keys.nbytes + self.values.nbytes

    def reset(self) -> None:
        if self.is_initialized:
            self.length.zero_()

    def crop(self, tokens_to_remove: int) -> None:
        raise UsageError("a quantized KV cache cannot be cropped (assisted generation crops its cache): use a "
                         "full-precision cache with assistant models")


def attention_shape(config) -> tuple:
    """(the decoder's text config, its KV heads, their dimension); UsageError for a model without attention heads."""
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    heads = getattr(text, "num_attention_heads", None)
    if not heads or not getattr(text, "num_hidden_layers", None):
        raise UsageError(f"{type(config).__name__} has no attention heads (num_attention_heads): a quantized KV cache "
                         "is for models whose attention uses transformers' cache; run this model with its own")
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return text, kv_heads, head_dim


def check_model(config, scheme: KVScheme):
    """UsageError if a model of ``config`` cannot take a cache of ``scheme`` (no attention heads, a layer that is not
    full attention, a group size that does not divide the heads' dimension); else the decoder's text config."""
    text, _, head_dim = attention_shape(config)
    if scheme.format == "int" and head_dim % scheme.group_size:
        divisors = [d for d in (16, 32, 64, 128) if head_dim % d == 0]
        raise UsageError(f"kv cache group_size {scheme.group_size} does not divide the attention heads' dimension "
                         f"{head_dim} ({type(config).__name__}): use a divisor of {head_dim}"
                         + (f", such as {max(divisors)}" if divisors else ""))
    types = set(getattr(text, "layer_types", None) or ["full_attention"])
    if types - {"full_attention"}:
        raise UsageError(f"a quantized KV cache needs every layer to be full attention; {type(config).__name__} "
                         f"has {', '.join(sorted(types - {'full_attention'}))} layers: use its own cache")
    return text


class QuantizedCache(Cache):
    """A KV cache that stores keys per channel and values per token in 2, 4 or 8 bits with a full-precision window
    (KIVI), or both in FP8 E4M3 with a scale per head::

        model.generate(**inputs, past_key_values=compress.kv.QuantizedCache(model.config, bits=4))

    ``config`` is the model's config (it must have only full-attention layers); ``group_size`` must divide the
    attention heads' dimension. Where the model runs transformers' ``sdpa`` attention, decode steps on CUDA read the
    packed cache directly (:mod:`compress.kv.attention`); elsewhere the attention gets the cache dequantized. With
    ``max_cache_len`` its layers are static (:class:`StaticQuantizedLayer`, for ``torch.compile``)."""

    def __init__(self, config, bits: int = 4, group_size: int = 64, residual: int = 128,
                 format: Literal["int", "fp8"] = "int", scheme: KVScheme | None = None,
                 max_cache_len: int | None = None):
        from compress.kv.attention import reads_packed

        self.scheme = scheme or KVScheme(format, 8 if format == "fp8" else bits, group_size, residual)
        text = check_model(config, self.scheme)
        direct = reads_packed(config)
        if max_cache_len is None:
            layers = [QuantizedLayer(self.scheme, direct) for _ in range(text.num_hidden_layers)]
        else:
            layers = [StaticQuantizedLayer(self.scheme, max_cache_len, direct) for _ in range(text.num_hidden_layers)]
        super().__init__(layers=layers)

    def stored_bytes(self) -> int:
        """Bytes the cache holds now, over all layers."""
        return sum(layer.stored_bytes() for layer in self.layers)
