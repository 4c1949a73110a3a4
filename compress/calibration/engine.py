"""The layer-wise calibration engine shared by every method.

One stage = one walk over the decoder blocks. The inputs of the first block are captured once (a forward
pre-hook that stops the model there, so no tracing), then for each block: move it to the execution
device, let each step of the stage compress its targets in that block (observing the block's inputs if
it needs them), run the block again so the next block sees the *compressed* outputs, and move it back.
Only the active block (and the small modules before the first block) sit on the execution device, so peak
GPU memory is about one block plus its activations.

Each layer's state (:mod:`compress.states`: a pruner's mask, the format a quantizer stored and which method
wrote it) lives in one table for the whole recipe; a step reads and writes it through its :class:`BlockWork`,
and the engine checks that each step left its targets in the state it declared.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from compress.calibration.activations import BlockInputs, choose_store, moved
from compress.calibration.data import CalibrationSet
from compress.errors import CalibrationError, PluginError
from compress.formats.base import CompressedLinear
from compress.formats.sparse import SPARSE_FORMATS, sparse_layer
from compress.model import Blocks
from compress.states import LayerKind, LayerState
from compress.streaming import has_meta

if TYPE_CHECKING:
    from compress.streaming import BlockStream

log = logging.getLogger(__name__)


class _StopForward(Exception):
    """Raised by the capture hook to end a forward pass at the first decoder block."""


def block_output(out: object) -> torch.Tensor:
    """The hidden states a decoder block returns (a tensor, or the first item of a tuple)."""
    return out[0] if isinstance(out, (tuple, list)) else out  # type: ignore[index]


@dataclass
class Reference:
    """The uncompressed copy of a block and the inputs it has in the uncompressed model."""

    block: nn.Module
    inputs: BlockInputs


def _run_until(block: nn.Module, call: tuple[tuple, dict], layers: dict[str, nn.Module],
               fn: Callable[[str, torch.Tensor], None]) -> None:
    """Run ``block`` on one call until each of ``layers`` has had ``fn(name, input)`` called."""
    wanted, seen = set(layers), set()

    def see(_module: nn.Module, args: tuple, name: str) -> None:
        fn(name, args[0])
        seen.add(name)
        if seen >= wanted:
            raise _StopForward

    handles = [m.register_forward_pre_hook(lambda mod, a, n=n: see(mod, a, n)) for n, m in layers.items()]
    try:
        block(*call[0], **call[1])
    except _StopForward:
        pass
    finally:
        for h in handles:
            h.remove()


@dataclass
class BlockWork:
    """One decoder block as a method sees it while compressing it."""

    index: int
    name: str  # qualified name of the block, "" for layers outside the decoder blocks
    block: nn.Module
    targets: dict[str, nn.Module]  # qualified name -> layer, for the step being applied
    inputs: BlockInputs | None
    device: torch.device
    reference: Reference | None = None  # the block as it was, on the uncompressed model's inputs
    states: dict[str, LayerState] = field(default_factory=dict, repr=False)  # the recipe's layer states
    written_by: dict[str, str] = field(default_factory=dict, repr=False)  # the step's method and its version
    _groups: list[list[str]] | None = field(default=None, repr=False)

    def local(self, qualified: str) -> str:
        return qualified[len(self.name) + 1 :] if self.name else qualified

    def replace(self, qualified: str, new: nn.Module) -> None:
        """Swap the layer ``qualified`` for ``new`` inside the block (and in ``targets``); a stored format is
        recorded in the layer's state with the method that wrote it."""
        parent_name, _, child = self.local(qualified).rpartition(".")
        parent = self.block.get_submodule(parent_name) if parent_name else self.block
        setattr(parent, child, new)
        if qualified in self.targets:
            self.targets[qualified] = new
        if isinstance(new, CompressedLinear):
            new.written_by = dict(self.written_by)
            mask = self.states.get(qualified, LayerState()).mask  # a pruner's, stored with the format's weights
            self.states[qualified] = LayerState(LayerKind.FORMAT, mask, new.format, dict(self.written_by))

    def mask(self, qualified: str) -> torch.Tensor | None:
        """The mask a pruner left on layer ``qualified`` (bool [out, in] on this block's device, True where a
        weight is kept), or None when the layer is not masked."""
        state = self.states.get(qualified)
        return None if state is None or state.mask is None else state.mask.to(self.device)

    def set_mask(self, qualified: str, mask: torch.Tensor) -> None:
        """Record that layer ``qualified`` keeps only the weights where ``mask`` (bool [out, in]) is True: later
        steps that take masked layers keep them zero."""
        self.states[qualified] = replace(self.states.get(qualified, LayerState()).masked(mask),
                                         written_by=dict(self.written_by))

    @torch.no_grad()
    def forward(self, limit: int | None = None) -> list[torch.Tensor]:
        """Run the block on its calibration inputs (the first ``limit`` batches); the outputs per batch."""
        if self.inputs is None:
            raise RuntimeError("forward() needs calibration inputs; the method must declare Needs.CALIBRATION")
        return [block_output(self.block(*args, **kwargs)) for args, kwargs in self.inputs.on(self.device, limit)]

    @contextlib.contextmanager
    def observe(self, layers: dict[str, nn.Module], fn: Callable[[str, torch.Tensor], None]) -> Iterator[None]:
        """While active, ``fn(name, x)`` sees the input ``x`` of each listed layer on every call."""
        handles = [
            layer.register_forward_pre_hook(lambda _m, args, _n=name: fn(_n, args[0]))
            for name, layer in layers.items()
        ]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    @torch.no_grad()
    def collect_inputs(self, layers: dict[str, nn.Module], fn: Callable[[str, torch.Tensor], None]) -> None:
        """Run the block on every calibration batch only as far as needed for ``fn(name, x)`` to see the
        input of each listed layer (the rest of the block is skipped)."""
        if self.inputs is None:
            raise RuntimeError("collect_inputs() needs calibration inputs; the method must declare Needs.CALIBRATION")
        for call in self.inputs.on(self.device):
            _run_until(self.block, call, layers, fn)

    @torch.no_grad()
    def collect_input_pairs(self, layers: dict[str, nn.Module],
                            fn: Callable[[str, torch.Tensor, torch.Tensor], None]) -> None:
        """Like :meth:`collect_inputs`, but ``fn(name, x_reference, x)`` also gets the input the layer has in
        the uncompressed model (the reference block on the reference inputs), batch by batch."""
        if self.reference is None:
            raise RuntimeError("collect_input_pairs() needs the reference stream; the method must ask for it")
        ref_layers = {n: self.reference.block.get_submodule(self.local(n)) for n in layers}
        for ref_call, call in zip(self.reference.inputs.on(self.device), self.inputs.on(self.device)):
            seen: dict[str, torch.Tensor] = {}
            _run_until(self.reference.block, ref_call, ref_layers, seen.__setitem__)
            _run_until(self.block, call, layers, lambda n, x: fn(n, seen[n], x))

    def linear_groups(self) -> list[list[str]]:
        """The targets grouped by the tensor they read (q/k/v; o; gate/up; down), in execution order."""
        if self._groups is None:
            order: list[tuple[str, tuple]] = []
            alive: list[torch.Tensor] = []  # holding every input keeps its memory from being reused

            def record(name: str, x: torch.Tensor) -> None:
                if all(n != name for n, _ in order):
                    alive.append(x)
                    order.append((name, (x.data_ptr(), tuple(x.shape), x.stride())))

            with self.observe(self.targets, record):
                self.forward(limit=1)
            groups: dict[tuple, list[str]] = {}
            for name, key in order:
                groups.setdefault(key, []).append(name)
            missing = [n for n in self.targets if all(n != m for m, _ in order)]
            self._groups = list(groups.values()) + [[n] for n in missing]
        return [[n for n in g if n in self.targets] for g in self._groups]


def _module_device(module: nn.Module) -> torch.device:
    for t in module.parameters():
        return t.device
    for t in module.buffers():
        return t.device
    return torch.device("cpu")


def _stem_modules(model: nn.Module, blocks_list: nn.Module) -> list[tuple[str, nn.Module]]:
    """The children (recursively) that are not the decoder blocks nor contain them, with their qualified names."""
    stem = []

    def visit(module: nn.Module, prefix: str) -> None:
        for name, child in module.named_children():
            if child is blocks_list:
                continue
            if any(m is blocks_list for m in child.modules()):
                visit(child, f"{prefix}{name}.")
            else:
                stem.append((prefix + name, child))

    visit(model, "")
    return stem


_COMPUTE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)  # not float8: that is storage


def _floating(module: nn.Module) -> dict[str, torch.Tensor]:
    tensors = dict(module.named_parameters())
    tensors.update(module.named_buffers())
    return {name: t for name, t in tensors.items() if t.dtype in _COMPUTE_DTYPES}


@contextlib.contextmanager
def on_device(module: nn.Module, device: torch.device, dtype: torch.dtype | None = None) -> Iterator[None]:
    """Temporarily move ``module`` to ``device`` and, given ``dtype``, cast its floating-point tensors (casting up
    and back down is exact). On exit it goes back where it was: tensors it had keep their own dtypes (a float32
    buffer of a bf16 block stays float32), tensors made meanwhile (a quantized layer's scales) take the dtype of
    the module's first floating-point tensor."""
    home = _module_device(module)
    before = {name: t.dtype for name, t in _floating(module).items()} if dtype is not None else {}
    module.to(device, dtype if before else None)
    try:
        yield
    finally:
        module.to(home, next(iter(before.values()), None))
        for name, t in _floating(module).items():
            if name in before and t.dtype != before[name]:
                t.data = t.data.to(before[name])


@contextlib.contextmanager
def stem_on(model: nn.Module, blocks: Blocks, device: torch.device, dtype: torch.dtype | None = None,
            stream: BlockStream | None = None) -> Iterator[None]:
    """Temporarily move everything except the decoder blocks to ``device`` (and ``dtype``). With ``stream``, a
    module not read yet (on the meta device) is read when it is first called, and freed again on exit."""
    blocks_list = model.get_submodule(blocks.prefix)
    with contextlib.ExitStack() as stack:
        for name, m in _stem_modules(model, blocks_list):
            unread = stream is not None and has_meta(m)
            placed = _read_on_call(m, name, device, dtype, stream) if unread else on_device(m, device, dtype)
            stack.enter_context(placed)
        yield


@contextlib.contextmanager
def _read_on_call(module: nn.Module, name: str, device: torch.device, dtype: torch.dtype | None,
                  stream: BlockStream) -> Iterator[None]:
    """While active, ``module`` (on the meta device) is read from ``stream`` and moved to ``device`` the first time
    it is called; on exit it is freed (put back on the meta device)."""
    def read(_module: nn.Module, _args: tuple) -> None:
        handle.remove()
        stream.load_outside(name, module)
        module.to(device, dtype if _floating(module) else None)

    handle = module.register_forward_pre_hook(read)
    try:
        yield
    finally:
        handle.remove()
        module.to("meta")


@torch.no_grad()
def capture_block_inputs(model: nn.Module, blocks: Blocks, calib: CalibrationSet, device: torch.device,
                         batch_size: int, dtype: torch.dtype | None = None, stream: BlockStream | None = None,
                         activations: str = "auto", copies: int = 2) -> BlockInputs:
    """Run the model (its layers before the first block in ``dtype``, if given) on each calibration batch up
    to the first decoder block and keep its arguments: on ``device``, or in CPU memory where ``copies`` copies of
    them would not fit there (``activations``: auto, device or cpu; :func:`choose_store`). With ``stream``, the
    layers it runs are read for it."""
    calls: list[tuple[tuple, dict]] = []
    batches = calib.batches(batch_size)
    store: list[torch.device] = []

    def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        if not store:
            store.append(choose_store(activations, device, (args, kwargs), len(batches), copies, blocks.modules[0]))
        calls.append((moved(args, store[0]), moved(kwargs, store[0])))
        raise _StopForward

    handle = blocks.modules[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with stem_on(model, blocks, device, dtype, stream):
            for batch in batches:
                try:
                    model(input_ids=batch.to(device), use_cache=False)
                except _StopForward:
                    pass
    finally:
        handle.remove()
    args, kwargs = calls[0]
    hidden_key: int | str = 0 if args else "hidden_states"
    return BlockInputs(calls, hidden_key, store[0])


@torch.no_grad()
def next_inputs(block: nn.Module, inputs: BlockInputs, device: torch.device) -> BlockInputs:
    """The inputs of the block after ``block``: its outputs on ``inputs``, kept where ``inputs`` are."""
    return inputs.with_hidden([moved(block_output(block(*args, **kwargs)), inputs.store)
                               for args, kwargs in inputs.on(device)])


class _Backup:
    """A decoder block as it was before its steps ran, to run them again: its modules, its tensors (those on the
    execution device copied to the CPU, the others kept as they are, since moving the block gives it new ones)
    and its layers' states."""

    def __init__(self, block: nn.Module, device: torch.device, states: dict[str, LayerState], prefix: str):
        def kept(t: torch.Tensor) -> torch.Tensor:
            return t.detach().to("cpu", copy=True) if t.device == device else t.detach()

        self.modules = [(m, dict(m._modules), dict(m._parameters), dict(m._buffers)) for m in block.modules()]
        self.data = {id(t): kept(t) for _, _, params, buffers in self.modules
                     for t in (*params.values(), *buffers.values()) if t is not None}
        self.states = {name: state for name, state in states.items() if name.startswith(prefix)}
        self.prefix = prefix

    def restore(self, states: dict[str, LayerState]) -> None:
        fresh = {key: t.clone() for key, t in self.data.items()}  # copies: the next attempt may change them in place
        for module, children, params, buffers in self.modules:
            module._modules.clear()
            module._modules.update(children)
            module._parameters.clear()
            module._parameters.update(params)
            module._buffers.clear()
            module._buffers.update({k: None if t is None else fresh[id(t)] for k, t in buffers.items()})
            for p in params.values():
                if p is not None:
                    p.data = fresh[id(p)]
        for name in [n for n in states if n.startswith(self.prefix)]:
            del states[name]
        states.update(self.states)


@dataclass
class StepWork:
    """What the engine needs of one step: how to compress a block, which layers it targets, and the state it
    declares it leaves them in."""

    label: str
    apply: Callable[[BlockWork], None]
    targets: list[str]
    needs_inputs: bool
    needs_reference: bool = False
    produces: LayerKind | None = None  # None: the state the layers had
    written_by: dict[str, str] = field(default_factory=dict)  # {"method": ..., "method_version": ...}

    def work(self, index: int, name: str, block: nn.Module, model: nn.Module, targets: list[str],
             inputs: BlockInputs | None, device: torch.device, reference: Reference | None,
             states: dict[str, LayerState]) -> BlockWork:
        return BlockWork(index, name, block, {t: model.get_submodule(t) for t in targets}, inputs, device,
                         reference, states, self.written_by)

    def check(self, work: BlockWork) -> None:
        """The step left every target in the state it declared (a plugin that does not is a bug to report)."""
        for name, layer in work.targets.items():
            if self.produces == LayerKind.FORMAT and not isinstance(layer, CompressedLinear):
                problem = "is still a float layer; it declares it stores a format (work.replace with a format's layer)"
            elif self.produces == LayerKind.MASKED and work.states.get(name, LayerState()).mask is None:
                problem = "has no mask; it declares it prunes (work.set_mask for every target)"
            else:
                continue
            raise PluginError(f"method step {self.label!r}: layer {name} {problem}; the plugin's author must fix it")


def _progress(blocks: list, labels: str, device: torch.device) -> Iterator:
    """``blocks`` one by one, shown as a progress bar where stderr is a terminal, and logged at INFO as each is done
    (every block of a model of up to 20, else about every 5% and the last), so that a log file or CI sees the job
    is alive, with the peak GPU memory so far on CUDA (when it was reached, and how near the device's limit); where
    the bar shows, the log lines go above it."""
    every = max(1, math.ceil(len(blocks) / 20))
    start = time.perf_counter()
    bar = tqdm(blocks, desc=labels, unit="block", disable=None)
    with contextlib.nullcontext() if bar.disable else logging_redirect_tqdm():
        for i, block in enumerate(bar, start=1):
            yield block
            if i % every == 0 or i == len(blocks):
                peak = (f", peak GPU memory so far {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB"
                        if device.type == "cuda" else "")
                log.info("%s: block %d of %d done, %.1f s elapsed%s", labels, i, len(blocks),
                         time.perf_counter() - start, peak)


def run_stage(model: nn.Module, blocks: Blocks, steps: list[StepWork], calib: CalibrationSet | None,
              device: torch.device, batch_size: int = 8, compute_dtype: torch.dtype | None = None,
              states: dict[str, LayerState] | None = None, stream: BlockStream | None = None,
              activations: str = "auto", retry: bool | None = None, last_stage: bool = False) -> None:
    """Walk the decoder blocks once, applying ``steps`` in order to each block (see the module doc). With
    ``compute_dtype``, each block (and the layers before the first) is in that dtype while it is worked on.
    ``states`` is the recipe's table of layer states, read and updated by the steps. With ``stream``, each block
    is read from disk before its turn and written out and freed after it (:mod:`compress.streaming`).
    ``activations`` says where the calibration activations live (:func:`choose_store`). With ``retry`` (default:
    on a CUDA device), a block whose work runs out of device memory is put back as it was and done again with
    batches half as large, down to one sample. In the recipe's ``last_stage``, the layers it leaves masked are
    stored in a sparse format as their block is done (:func:`store_masked`)."""
    states = {} if states is None else states
    retry = device.type == "cuda" if retry is None else retry
    needs_inputs = any(s.needs_inputs for s in steps)
    if needs_inputs and calib is None:
        raise ValueError("a step needs calibration inputs but no calibration set was given")
    with_reference = any(s.needs_reference for s in steps)
    inputs = (capture_block_inputs(model, blocks, calib, device, batch_size, compute_dtype, stream, activations,
                                   copies=4 if with_reference else 2) if needs_inputs else None)
    ref_inputs = inputs if with_reference else None
    names = blocks.names()
    in_blocks: set[str] = set()
    last = len(blocks.modules) - 1
    labels = ", ".join(s.label for s in steps)
    for i, (name, block) in enumerate(_progress(list(zip(names, blocks.modules)), labels, device)):
        if stream is not None:
            stream.load(name, block)
        home = _module_device(block)
        prefix = name + "."
        backup = _Backup(block, device, states, prefix) if retry and inputs is not None else None
        while True:
            try:
                with on_device(block, device, compute_dtype):
                    for step in steps:
                        in_blocks.update(t for t in step.targets if t.startswith(prefix))
                    inputs, ref_inputs = _compress_block(i, name, block, model, steps, inputs, ref_inputs, device,
                                                         states, propagate=i < last)
                break
            except torch.OutOfMemoryError as exc:
                if backup is None or inputs.batch == 1:
                    raise CalibrationError(
                        f"out of memory on {device} while compressing block {name}"
                        f"{' with one calibration sample per batch' if inputs is not None else ''}: set "
                        "calibration.activations: cpu, use fewer calibration.samples or a shorter seq_len, or a "
                        f"device with more memory ({str(exc).splitlines()[0] if str(exc) else 'no details'})") from exc
            backup.restore(states)  # outside the except clause: the failed attempt's tensors are released
            torch.cuda.empty_cache()
            log.warning("out of memory on %s while compressing block %s with %d samples per batch: doing it again "
                        "with %d", device, name, inputs.batch, (inputs.batch + 1) // 2)
            inputs = inputs.halved()
            ref_inputs = ref_inputs.halved() if ref_inputs is not None else None
        del backup
        for t, state in states.items():  # masks wait with their block (in memory), not on the execution device
            if t.startswith(prefix) and state.mask is not None:
                state.mask = state.mask.to(home)
        if last_stage:
            store_masked(model, states, prefix)
        if stream is not None:
            stream.store(name, block)
    for step in steps:  # layers outside the decoder blocks (data-free methods only; checked beforehand)
        rest = [t for t in step.targets if t not in in_blocks]
        if rest and stream is not None:
            for t in rest:
                stream.load_outside(t, model.get_submodule(t))
        if rest:
            work = step.work(-1, "", model, model, rest, None, device, None, states)
            step.apply(work)
            step.check(work)
    if last_stage:
        store_masked(model, states)


def store_masked(model: nn.Module, states: dict[str, LayerState], prefix: str = "") -> None:
    """Store each layer (whose name starts with ``prefix``) that the recipe leaves masked in its sparse format
    (:func:`compress.formats.sparse.sparse_layer`): a pruned layer's checkpoint holds only what it keeps."""
    for name, state in list(states.items()):
        if state.mask is None or not name.startswith(prefix) or state.format in SPARSE_FORMATS:
            continue
        new = sparse_layer(model.get_submodule(name), state.mask)
        if new is None:
            continue
        new.written_by = dict(state.written_by)
        model.set_submodule(name, new)
        states[name] = replace(state, kind=LayerKind.FORMAT, format=new.format)


def _compress_block(index: int, name: str, block: nn.Module, model: nn.Module, steps: list[StepWork],
                    inputs: BlockInputs | None, ref_inputs: BlockInputs | None, device: torch.device,
                    states: dict[str, LayerState], propagate: bool) -> tuple[BlockInputs | None, BlockInputs | None]:
    """Apply ``steps`` to one block (on the device); the next block's inputs (and reference inputs) when
    ``propagate``."""
    prefix = name + "."
    reference = Reference(copy.deepcopy(block), ref_inputs) if ref_inputs is not None else None
    for step in steps:
        hit = [t for t in step.targets if t.startswith(prefix)]
        if hit:
            work = step.work(index, name, block, model, hit, inputs, device, reference, states)
            step.apply(work)
            step.check(work)
    if inputs is not None and propagate:
        following = next_inputs(block, inputs, device)
        if reference is not None:
            ref_inputs = next_inputs(reference.block, ref_inputs, device)
        inputs = following
    return inputs, ref_inputs
