"""`LitesparkConfig.cuda_graphs`: the decoder layers of a training step replayed from CUDA graphs.

Post-training steps are bound by the host: a 1B Llama's forward and backward launch ~2,000 kernels through ~150
autograd Functions a step, and at the few thousand real tokens of a TRL batch the GPU finishes them faster than
Python issues them (benchmarks/NOTES.md, sessions 11-17). Here the whole decoder stack - every layer's forward, and its
backward - is captured once per *length bucket* as two CUDA graphs and replayed: two launches instead of thousands.

How a step runs. The first decoder layer's call (`LitesparkDecoderLayer.forward`) hands its inputs to `StackGraphs`.
When the call is one the graphs can stand for (below), the packed row of ``T`` tokens is copied into the bucket's
static input of ``Tb >= T`` tokens (`bucket`: ``T`` rounded up to 1/8 of its power of two, at least 128), the
tokens ``T..Tb`` being filler in a document of their own after every real token (causal attention: no real token
sees them; their output gradients are zero, so they add nothing to any weight gradient), the forward graph is
replayed, and the first ``T`` rows of its output are returned; the other layers then pass that tensor through. The
backward replays the backward graph and hands autograd the gradients of the stack's input and of every trainable
weight, in one buffer per weight shared by all buckets (the fused projections' weight-gradient GEMMs write into
theirs directly, `linear.GRAD_DESTINATIONS`; the other weights' gradients are copied there inside the graph). A
bucket seen for the first time is captured first (one eager warm-up pass on a side stream, then the capture: ~3
steps of time, once).

What the graphs stand for, checked at every call (else the layers run eagerly, as without this option):
training mode, gradients on, CUDA, not under torch.compile; one packed row (what `LitesparkConfig.unpad` makes of a
padded batch, and what padding-free / packed batches are) without attention mask or KV cache; the decoder layers
all Litespark's, with no hooks, no gradient checkpointing (`checkpoint_layers` keeps every layer on a large GPU),
no active dropout, no SAT (unless ``LITESPARK_SAT_GRAPHS=1``: `sat_graphs_enabled`), no float8, weights whole on
one device (no FSDP / ZeRO-3 shards). The graphs are keyed by
everything the recorded kernels depend on: the bucket, dtypes, autocast, which weights train and where every weight
and weight cast lives (`LitesparkAdamW`'s cast shadow is updated in place, so it stays one key), the adapters'
state (PEFT: active, disabled, merged), the modules' training flags, and under SAT what each sparse module computes
(dense or sparse, measuring or not, kept units) and where its selection and accumulators live. A capture that fails
(an operation that waits for the host, a kernel that cannot be captured) runs that step eagerly, with a one-time
warning, and is tried again at a later step, up to `CAPTURE_TRIES` times per key.

Memory: one private pool for all buckets (the activations of one step at a time: a bucket's forward and backward
are never interleaved with another graph's, `StackGraphs` refuses a second graphed forward while one waits for
its backward), plus per bucket its static input, output and input gradient, plus one gradient buffer per trainable
weight. Limits: a graphed forward can be backpropagated once (no ``retain_graph``, no double backward); the
replayed forward's output is the bucket's static buffer until the next graphed forward.

``LITESPARK_GRAPH_BUCKETS`` sets the buckets per octave (default 8: at most 12.5% filler, ~6% on average).
"""

from __future__ import annotations

import logging
import os
import weakref
from collections import Counter

import torch
import torch.nn as nn

from litespark_kernels._dispatch import note_once
from litespark_kernels.ops.linear import _plain_tensor

from .modules.decoder import _hookless

logger = logging.getLogger(__name__)

GRAPHS_ATTR = "_litespark_graphs"
_MANAGER_ATTR = "_litespark_graph_manager"
FILLER_SEGMENT = 1 << 30  # the filler tokens' document id: after every real one
QUANTUM = 128
KEYS_PER_BUCKET = 3  # captures of one bucket under different keys before that bucket stays eager
CAPTURE_TRIES = 3  # failed captures of one key before it stays eager (a capture can fail on a passing state: e.g.
# autograd nodes of an earlier step's graph kept alive by a tensor, on another stream)


def _layer_kwargs() -> frozenset:
    """Keyword arguments a decoder layer may get that the graphs can drop: the attention's inert ones, and the
    packed-document descriptors, which the replay takes from ``position_ids`` (its segments, as the attention
    backend does first) instead."""
    from .attention import _INERT_KWARGS

    return _INERT_KWARGS | {"cu_seq_lens_q", "seq_idx"}


_LAYER_KWARGS = _layer_kwargs()


def bucket(tokens: int, per_octave: int | None = None, quantum: int = QUANTUM) -> int:
    """The static length a packed row of ``tokens`` runs at: rounded up to a multiple of ``2**floor(log2 tokens) /
    per_octave`` (at least ``quantum``)."""
    if per_octave is None:
        per_octave = int(os.environ.get("LITESPARK_GRAPH_BUCKETS", "8"))
    if tokens <= quantum:
        return quantum
    step = max(quantum, (1 << (tokens.bit_length() - 1)) // max(1, per_octave))
    return -(-tokens // step) * step


class _Token:
    __slots__ = ("__weakref__",)


class _Entry:
    """One bucket's graphs and static tensors."""

    __slots__ = ("tb", "x", "cos", "sin", "seg", "pos", "out", "gout", "gx", "fwd", "bwd", "params", "grads", "x_grad",
                 "row_w", "n_real")


class _Step:
    """One graphed forward waiting for its backward."""

    __slots__ = ("manager", "entry", "tokens", "keep", "token", "done")

    def __init__(self, manager, entry, tokens, keep):
        self.manager, self.entry, self.tokens, self.keep = manager, entry, tokens, keep
        self.token, self.done = _Token(), False


class _GraphedStack(torch.autograd.Function):
    @staticmethod
    def forward(ctx, step: _Step, x, *params):
        ctx.step = step
        return step.manager._replay_forward(step, x)

    @staticmethod
    def backward(ctx, grad):
        return (None, *ctx.step.manager._replay_backward(ctx.step, grad))


def _dropout_active(m: nn.Module) -> bool:
    """``m`` (in training mode) drops out: an ``nn.Dropout`` or an attention / residual dropout probability."""
    if isinstance(m, nn.Dropout):
        return m.p > 0
    return any(isinstance(p, (int, float)) and p > 0
               for p in (m.__dict__.get("attention_dropout"), m.__dict__.get("residual_dropout")))


def sat_graphs_enabled() -> bool:
    """SAT's sparse layers in the graphs (``LITESPARK_SAT_GRAPHS=1``; experimental, off by default): the selection
    and the importance accumulators then live at fixed addresses (`SATController._slot`) and are keyed by kept count,
    so a graph is recorded per bucket and per kept count (each ladder rung, each dense-refresh step)."""
    return os.environ.get("LITESPARK_SAT_GRAPHS", "0") == "1"


def _sat_signature(st) -> tuple[tuple, tuple]:
    """(what a SAT module computes: dense or sparse, collecting or not, kept units; where the tensors its recorded
    kernels read and write live)."""
    def where(t):
        return None if t is None else (t.data_ptr(), tuple(t.shape))

    rows = st.rows or (None, None)
    return ((st.index is None, bool(st.collect), st.kept()),
            tuple(where(t) for t in (st.index, st.index2, st.qkv_rows, rows[0], rows[1], st.acc, st.count)))


def _same_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    """``b`` is ``a`` itself (same memory, shape and strides): a gradient the graph already wrote in place."""
    return a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride() and a.dtype == b.dtype


class StackGraphs:
    """The CUDA graphs of one decoder stack (see the module docstring). Installed by `install`; each decoder layer
    holds ``(manager, index)`` under `GRAPHS_ATTR` and asks `call` first."""

    def __init__(self, layers: list[nn.Module], base: nn.Module):
        self.layers = layers
        self._base = weakref.ref(base)
        self.pool = None
        self.entries: dict = {}
        self.per_bucket: Counter = Counter()
        self.failures: Counter = Counter()
        self.grads: dict[int, tuple] = {}  # id(param) -> (weak ref to the param, its shared gradient buffer)
        self._flat: dict = {}  # a fused group's weight ids -> (its gradient buffer, weak refs to the weights)
        self._pending = None  # weakref to the _Token of the graphed forward awaiting its backward
        self._running = None  # (output tensor, index of the next layer that passes it through)
        self._capturing = False
        self.stats: Counter = Counter()

    # -- dispatch ---------------------------------------------------------------------------------------------------

    def call(self, index, hidden_states, attention_mask, position_ids, past_key_values, use_cache,
             position_embeddings, kwargs):
        """The layer's output when the graphs computed it (layer 0: replay; later layers: pass the replayed output
        through), else None (the layer runs eagerly)."""
        if self._capturing:
            return None
        if index:
            run = self._running
            if run is not None and run[0] is hidden_states and run[1] == index:
                self._running = None if index + 1 >= len(self.layers) else (hidden_states, index + 1)
                return hidden_states
            self._running = None
            return None
        self._running = None
        why = self._ineligible(hidden_states, attention_mask, position_ids, past_key_values, use_cache,
                               position_embeddings, kwargs)
        if why is not None:
            if why:
                self.stats["eager: " + why] += 1
            return None
        out = self._run(hidden_states, position_ids, position_embeddings)
        if out is None:
            return None
        if len(self.layers) > 1:
            self._running = (out, 1)
        return out

    def _modules(self) -> list[nn.Module]:
        return [m for layer in self.layers for m in layer.modules()]

    def _ineligible(self, x, attention_mask, position_ids, past_key_values, use_cache, position_embeddings,
                    kwargs) -> str | None:
        """Why this call runs eagerly ("" for the usual eager calls: eval, no grad, CPU), or None."""
        if not (isinstance(x, torch.Tensor) and x.is_cuda and torch.is_grad_enabled() and self.layers[0].training) \
                or torch.compiler.is_compiling() or torch.cuda.is_current_stream_capturing():
            return ""
        if x.dim() != 3 or x.shape[0] != 1:
            return "not one packed row"
        if attention_mask is not None or past_key_values is not None or use_cache:
            return "attention mask or KV cache"
        if not isinstance(position_embeddings, (tuple, list)) or len(position_embeddings) != 2:
            return "no rotary position embeddings"
        cos, sin = position_embeddings
        tokens = x.shape[1]
        if not (isinstance(cos, torch.Tensor) and isinstance(sin, torch.Tensor) and cos.shape == sin.shape
                and cos.dim() == 3 and cos.shape[:2] == (1, tokens)):
            return "rotary embeddings not [1, tokens, dim]"
        if not isinstance(position_ids, torch.Tensor) or tuple(position_ids.shape) != (1, tokens):
            return "position_ids not [1, tokens]"
        if any(v is not None and k not in _LAYER_KWARGS for k, v in kwargs.items()):
            return "extra layer arguments"
        if self._pending is not None and self._pending() is not None:
            return "a graphed forward awaits its backward"
        if nn.modules.module._global_backward_hooks or nn.modules.module._global_backward_pre_hooks:
            return "global module hooks"
        for layer in self.layers:
            if getattr(layer, "gradient_checkpointing", False):
                return "gradient checkpointing recomputes layers"
            if not _hookless(layer):  # its own or global forward hooks (FSDP2 units, DeepSpeed): before the walk
                return "module hooks"
        base = self._base()
        if base is None:
            return "model gone"
        if "_litespark_sat" in base.__dict__ and not sat_graphs_enabled():
            return "SAT"
        return None

    # -- keys ---------------------------------------------------------------------------------------------------------

    def _key(self, modules, x, cos, tb):
        """(key, trainable params, casts to keep alive, reason or None, the key's group: bucket and what SAT
        computes)."""
        params, casts, state, training, sat = [], [], [], [], []
        for m in modules:
            if m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks:
                return None, None, None, "module hooks", None
            if m.__dict__.get("_litespark_fp8"):
                return None, None, None, "float8", None
            training.append(m.training)
            if m.training and _dropout_active(m):
                return None, None, None, "dropout", None
            for p in m._parameters.values():
                if p is not None:
                    params.append(p)
            c = m.__dict__.get("_litespark_casts")
            if c:
                casts.extend(c.values())
            if hasattr(m, "active_adapters") and hasattr(m, "merged"):  # PEFT's tuner layers
                state.append((tuple(m.active_adapters), bool(getattr(m, "disable_adapters", False)), m.merged))
            st = m.__dict__.get("_sat_state")
            if st is not None:
                sat.append(_sat_signature(st))
        device = x.device
        for p in params:
            if p.device != device or not _plain_tensor(p) or p.is_meta:
                return None, None, None, "weights not whole on this device", None
        key = (tb, x.dtype, x.requires_grad, cos.dtype, cos.shape[-1], torch.is_autocast_enabled("cuda"),
               torch.get_autocast_dtype("cuda"), tuple((p.data_ptr(), p.requires_grad) for p in params),
               tuple(c.data_ptr() for c in casts), tuple(state), tuple(training), tuple(sat))
        return key, [p for p in params if p.requires_grad], casts, None, (tb, tuple(shape for shape, _ in sat))

    # -- replay -------------------------------------------------------------------------------------------------------

    def _run(self, x, position_ids, position_embeddings):
        from .attention import _memo as segment_memo

        cos, sin = position_embeddings
        tokens = x.shape[1]
        tb = bucket(tokens)
        modules = self._modules()
        key, params, casts, why, group = self._key(modules, x, cos, tb)
        if why is not None:
            self.stats["eager: " + why] += 1
            return None
        entry = self.entries.get(key)
        if entry is False or self.failures[key] >= CAPTURE_TRIES:
            self.stats["eager: capture failed"] += 1
            return None
        segments = segment_memo.get(position_ids)  # the documents, as the attention backend would find them
        if entry is None:
            if self.per_bucket[group] >= KEYS_PER_BUCKET:
                note_once("graphs", f"cuda_graphs: the {tb}-token bucket was captured {KEYS_PER_BUCKET} times "
                                    "(weights or their casts moved between steps); it runs eagerly from now on. "
                                    "LitesparkAdamW keeps the casts in place.")
                self.stats["eager: bucket keys exhausted"] += 1
                return None
            entry = self._capture(tb, x, position_ids, cos, sin, segments, params, modules, bool(group[1]))
            if entry is None:
                self.failures[key] += 1
                self.stats["eager: capture failed"] += 1
                return None
            self.per_bucket[group] += 1
            self.entries[key] = entry
        step = _Step(self, entry, tokens, (casts, cos, sin, segments))
        self._pending = weakref.ref(step.token)
        out = _GraphedStack.apply(step, x, *entry.params)
        self.stats["graphed"] += 1
        return out

    def _fill_inputs(self, entry: _Entry, x, cos, sin, segments) -> None:
        t = x.shape[1]
        with torch.no_grad():
            entry.x[:, :t].copy_(x)
            entry.cos[:, :t].copy_(cos)
            entry.sin[:, :t].copy_(sin)
            if segments is None:
                entry.seg[:, :t].zero_()
            else:
                entry.seg[:, :t].copy_(segments.reshape(1, t))
            if t < entry.tb:
                entry.seg[:, t:].fill_(FILLER_SEGMENT)
            if entry.row_w is not None:  # SAT's statistics: the real tokens only
                entry.row_w[:t].fill_(1.0)
                entry.row_w[t:].zero_()
                entry.n_real.fill_(float(t))

    def _replay_forward(self, step: _Step, x):
        entry = step.entry
        _, cos, sin, segments = step.keep
        self._fill_inputs(entry, x, cos, sin, segments)
        entry.fwd.replay()
        return entry.out[:, :step.tokens]

    def _replay_backward(self, step: _Step, grad):
        if step.done:
            raise RuntimeError("litespark cuda_graphs: a graphed decoder forward can be backpropagated only once "
                               "(retain_graph / double backward are not supported); set cuda_graphs=False")
        step.done = True
        entry, t = step.entry, step.tokens
        for p, g in zip(entry.params, entry.grads):  # a gradient still holding the previous backward's buffer
            if g is not None and p.grad is not None and p.grad.data_ptr() == g.data_ptr():
                p.grad = p.grad.clone()  # (gradient accumulation): keep its value before the buffer is rewritten
        with torch.no_grad():
            entry.gout[:, :t].copy_(grad)
            if t < entry.tb:
                entry.gout[:, t:].zero_()
        entry.bwd.replay()
        if self._pending is not None and self._pending() is step.token:
            self._pending = None
        step.keep = None
        gx = entry.gx[:, :t] if entry.x_grad else None
        return (gx, *[None if g is None else g.detach() for g in entry.grads])

    # -- capture ------------------------------------------------------------------------------------------------------

    def _grad_buffer(self, p: torch.Tensor) -> torch.Tensor:
        owner, buf = self.grads.get(id(p), (None, None))
        if buf is None or owner() is not p or buf.shape != p.shape or buf.dtype != p.dtype:
            buf = torch.zeros_like(p, memory_format=torch.contiguous_format)
            self.grads[id(p)] = (weakref.ref(p), buf)
        return buf

    def _group_buffers(self, modules, params) -> dict:
        """`GRAD_DESTINATIONS` for the fused projection groups (q/k/v, o, gate/up, down) whose weights all train: one
        buffer per group, shared by all buckets, whose row blocks are its weights' gradient buffers. The captured
        weight-gradient GEMM then writes into them directly (no copy out of the graph: ~2 ms a step for the 1B
        model's decoder weights in fp32)."""
        trainable = {id(p) for p in params}
        dests = {}
        for m in modules:
            groups = getattr(m, "litespark_cast_groups", None)
            if groups is None:
                continue
            for linears in groups().values():
                ws = [lin.weight for lin in linears]
                if not ws or any(id(w) not in trainable or w.dim() != 2 for w in ws) \
                        or len({(w.dtype, w.shape[1]) for w in ws}) != 1:
                    continue
                key = tuple(id(w) for w in ws)
                have = self._flat.get(key)
                if have is None or any(ref() is not w for ref, w in zip(have[1], ws)) \
                        or have[0].shape[0] != sum(w.shape[0] for w in ws):
                    flat = torch.zeros((sum(w.shape[0] for w in ws), ws[0].shape[1]), dtype=ws[0].dtype,
                                       device=ws[0].device)
                    r = 0
                    for w in ws:
                        self.grads[id(w)] = (weakref.ref(w), flat[r:r + w.shape[0]])
                        r += w.shape[0]
                    have = self._flat[key] = (flat, [weakref.ref(w) for w in ws])
                dests[key] = have[0]
        return dests

    def _capture(self, tb, x, position_ids, cos, sin, segments, params, modules, sat: bool = False) -> _Entry | None:
        from litespark_kernels.ops import linear

        from .sat import modules as sat_modules
        from .unpadding import mark_segments

        device = x.device
        e = _Entry()
        e.tb, e.params, e.x_grad = tb, params, x.requires_grad
        e.x = torch.zeros((1, tb, x.shape[-1]), dtype=x.dtype, device=device)
        e.cos = torch.zeros((1, tb, cos.shape[-1]), dtype=cos.dtype, device=device)
        e.sin = torch.zeros_like(e.cos)
        e.seg = torch.full((1, tb), FILLER_SEGMENT, dtype=torch.int32, device=device)
        e.pos = mark_segments(torch.zeros((1, tb), dtype=position_ids.dtype, device=device), e.seg)
        e.row_w = torch.zeros(tb, dtype=torch.float32, device=device) if sat else None
        e.n_real = torch.zeros((), dtype=torch.float32, device=device) if sat else None
        self._fill_inputs(e, x, cos, sin, segments)
        e.x.requires_grad_(x.requires_grad)
        dests = self._group_buffers(modules, params)  # before the per-weight buffers: theirs are row blocks
        grads = [self._grad_buffer(p) for p in params]
        inputs = ([e.x] if e.x_grad else []) + list(params)
        last = self.layers[-1]
        link = last.__dict__.pop("_litespark_next", None)  # the final norm stays outside the graphs

        def run():
            h = e.x
            for layer in self.layers:
                h = layer(h, attention_mask=None, position_ids=e.pos, past_key_values=None, use_cache=False,
                          position_embeddings=(e.cos, e.sin))
            return h

        # autocast as the caller has it, but without its weight-cast cache: a cast cached before the capture would be
        # read at its address by every replay after it was freed; uncached, each replay casts inside the graph
        cast = dict(device_type="cuda", dtype=torch.get_autocast_dtype("cuda"),
                    enabled=torch.is_autocast_enabled("cuda"), cache_enabled=False)
        self._capturing = True
        # SAT's importance accumulators: the warm-up pass must not add a measurement of its own to this step's
        accumulated = [t for m in modules for st in [m.__dict__.get("_sat_state")] if st is not None
                       for t in (st.acc, st.count) if t is not None]
        saved = side = None
        try:
            saved = [t.clone() for t in accumulated]
            if sat:
                sat_modules.GRAPH_ROWS = (e.row_w, e.n_real)
            side = torch.cuda.Stream(device=device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side), torch.autocast(**cast):  # warm-up: lazy set-up, compilation
                out = run()
                torch.autograd.grad(out, inputs, torch.zeros_like(out), allow_unused=True)
                e.gout = torch.zeros_like(out)
                del out
            torch.cuda.current_stream(device).wait_stream(side)
            self._restore(accumulated, saved)
            saved = None
            if self.pool is None:
                self.pool = torch.cuda.graph_pool_handle()
            e.fwd, e.bwd = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
            linear.GRAD_DESTINATIONS.update(dests)  # read by the fused projections' forwards, used by their backwards
            try:
                with torch.cuda.graph(e.fwd, pool=self.pool, capture_error_mode="thread_local"), \
                        torch.autocast(**cast):
                    out = run()
            finally:
                linear.GRAD_DESTINATIONS.clear()
            with torch.cuda.graph(e.bwd, pool=self.pool, capture_error_mode="thread_local"):
                got = torch.autograd.grad(out, inputs, e.gout, allow_unused=True)
                e.gx = got[0] if e.x_grad else None
                pg = got[1:] if e.x_grad else got
                pairs = [(b, g) for b, g in zip(grads, pg) if g is not None and not _same_memory(b, g)]
                if pairs:
                    torch._foreach_copy_([b for b, _ in pairs], [g for _, g in pairs])
            e.grads = [b if g is not None else None for b, g in zip(grads, pg)]
            e.out = out.detach()
            del out, got, pg, pairs
        except Exception as err:  # noqa: BLE001 - any failure leaves this key eager
            if saved is not None:  # the warm-up failed part way: its measurements are not this step's
                if side is not None:
                    torch.cuda.current_stream(device).wait_stream(side)
                self._restore(accumulated, saved)
            note_once("graphs", f"cuda_graphs: capturing the decoder stack for {tb} tokens failed "
                                f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); that step "
                                f"runs eagerly (a key is tried {CAPTURE_TRIES} times)")
            logger.info("cuda_graphs capture failed", exc_info=True)
            return None
        finally:
            self._capturing = False
            sat_modules.GRAPH_ROWS = None
            if link is not None:
                last.__dict__["_litespark_next"] = link
        e.x.requires_grad_(False)
        self.stats["captures"] += 1
        return e

    @staticmethod
    def _restore(accumulated: list, saved: list) -> None:
        """SAT's accumulators back to their values before the capture's warm-up pass."""
        with torch.no_grad():
            for t, v in zip(accumulated, saved):
                t.copy_(v)

    def summary(self) -> dict:
        """Counts of graphed forwards, captures and eager forwards by reason, and the buckets captured."""
        return {"stats": dict(self.stats), "buckets": sorted({k[0] for k in self.entries})}


def _eligible_layers(base: nn.Module):
    from .model_utils import decoder_layers
    from .modules.decoder import LitesparkDecoderLayer

    layers = decoder_layers(base)
    if not layers:
        return None, "no decoder layers"
    for layer in layers:
        if not isinstance(layer, LitesparkDecoderLayer):
            return None, f"{type(layer).__name__} is not a Litespark decoder layer"
        cls = type(layer)
        if cls._litespark_branch is not LitesparkDecoderLayer._litespark_branch \
                or cls._litespark_add_to_next is not LitesparkDecoderLayer._litespark_add_to_next:
            return None, f"{cls.__name__} changes the residual branches"
        if hasattr(layer.mlp, "experts") or hasattr(layer.mlp, "gate") and not hasattr(layer.mlp, "gate_proj"):
            return None, "mixture-of-experts layers"
    if len({type(layer) for layer in layers}) != 1:
        return None, "mixed decoder layer classes"
    return layers, None


def install(base: nn.Module) -> StackGraphs | None:
    """Give ``base``'s decoder layers a `StackGraphs` (idempotent); None, with a log line, where the model's layers
    are not all plain Litespark decoder layers."""
    uninstall(base)
    layers, why = _eligible_layers(base)
    if layers is None:  # the layers run eagerly, exactly as with cuda_graphs off: logged, not warned (on by default)
        logger.info("litespark cuda_graphs: %s; the decoder runs eagerly", why)
        return None
    manager = StackGraphs(layers, base)
    for i, layer in enumerate(layers):
        layer.__dict__[GRAPHS_ATTR] = (manager, i)
    base.__dict__[_MANAGER_ATTR] = manager
    return manager


def uninstall(base: nn.Module) -> None:
    manager = base.__dict__.pop(_MANAGER_ATTR, None)
    if manager is not None:  # `install` marks exactly the manager's layers
        for layer in manager.layers:
            layer.__dict__.pop(GRAPHS_ATTR, None)
        manager.entries.clear()


def manager_of(model: nn.Module) -> StackGraphs | None:
    """The `StackGraphs` of a model `apply` gave ``cuda_graphs=True`` (PEFT / wrappers unwrapped), or None."""
    from .model_utils import unwrap_model

    return unwrap_model(model).__dict__.get(_MANAGER_ATTR)
