"""`LitesparkAdamW`: torch's AdamW update in one Triton launch per parameter group, writing next forward's casts.

Under ``bf16=True`` (autocast) the weights stay fp32 and every forward casts them to bf16. torch's fused AdamW
reads and writes every fp32 weight, then the next forward reads each weight again to cast it. Here the update
kernel (`litespark_kernels.ops.optim`) also writes the bf16 copy while the new weight is in registers, into the
model's `CastShadow` (`litespark_hf.casting`), which the Litespark forward uses instead of casting. It also leaves
the gradients untouched (torch's fused kernel writes back grad / grad_scale), and takes the folded gradient clip
(``grad_scale``) that the Trainer integration sets.

Same update as ``torch.optim.AdamW(amsgrad=False, maximize=False)``, same ``state_dict`` layout (``step``,
``exp_avg``, ``exp_avg_sq``; ``step`` kept on the CPU), so checkpoints load either way. Parameters that the
kernel does not take (not fp32, not contiguous, not on CUDA) are updated by the reference (torch ops).

Frozen rows/columns: ``optimizer.set_frozen({param: (dim, keep_mask)})`` before ``step()`` leaves, in that step
only, the rows (dim 0) or columns (dim 1) of ``param`` where ``keep_mask`` is False untouched, bit for bit: the
weight, its ``exp_avg`` / ``exp_avg_sq`` and its low-precision copy; the kept elements get the usual update and
the parameter's step count advances as usual. The same launch does it (no save-and-restore pass, no host sync);
this is how SAT (`litespark_hf.sat`, ``sat_freeze_omitted``) freezes the omitted weights with this optimizer.

Sharded parameters (FSDP2's ``fully_shard``: ``torch.distributed.tensor.DTensor`` weights and gradients): each
process updates its local shards (AdamW is elementwise, so that is the exact update at any world size) in the same
one launch per group, on the ``_local_tensor`` of the weight, gradient and moments. The moments are DTensors with
the weight's mesh and placements (``zeros_like`` of the weight, as torch's AdamW makes them) and ``step`` the same
CPU scalar, so ``torch.distributed.checkpoint.state_dict``'s get/set_optimizer_state_dict (accelerate's sharded
checkpoints) save and load this optimizer's state as they do torch's. No low-precision copy is kept for DTensor
weights (FSDP2's mixed precision casts the gathered weights itself); a process whose shard of a small weight is
empty only advances its step count. Frozen masks (`set_frozen`) are over the full weight and sliced to the shard.
"""

from __future__ import annotations

import torch
from litespark_kernels._dispatch import _is_dtensor
from litespark_kernels.ops.optim import adamw_step

from .casting import CastShadow, attach_cast_shadow, detach_cast_shadow


class LitesparkAdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay), one fused launch per parameter group; see the module docstring.

    Args:
        params: parameters or parameter groups, as for any torch optimizer.
        lr, betas, eps, weight_decay: as ``torch.optim.AdamW`` (same defaults).
        model: a Litespark-patched model whose fused projection weights are among ``params``: the optimizer keeps
            their low-precision copies current (`CastShadow`) so that its training forward casts nothing.
        shadow_dtype: the autocast dtype of the training forward (``torch.bfloat16`` under ``bf16=True``,
            ``torch.float16`` under ``fp16=True``); no copies without it.
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, *, model: torch.nn.Module | None = None,
                 shadow_dtype: torch.dtype | None = None):
        if isinstance(lr, torch.Tensor):
            raise ValueError("lr as a tensor is not supported by LitesparkAdamW; pass a float")
        if not lr >= 0.0:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not eps >= 0.0:
            raise ValueError(f"Invalid epsilon value: {eps}")
        if not 0.0 <= betas[0] < 1.0 or not 0.0 <= betas[1] < 1.0:
            raise ValueError(f"Invalid betas: {betas}")
        if not weight_decay >= 0.0:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        self._caches: dict = {}
        self._frozen: dict | None = None
        self.shadow: CastShadow | None = None
        if model is not None and shadow_dtype is not None:
            shadow = attach_cast_shadow(model, shadow_dtype)
            if shadow is not None:
                mine = {p for g in self.param_groups for p in g["params"]}
                if all(p in mine for p in shadow.params) and not any(_is_dtensor(p) for p in mine):
                    self.shadow = shadow
                else:  # weights this optimizer does not update would go stale in the copy
                    detach_cast_shadow(model)

    def set_frozen(self, frozen: dict[torch.Tensor, tuple[int, torch.Tensor]] | None) -> None:
        """Freeze rows/columns in the next `step` only: ``{param: (dim, keep_mask)}``, ``keep_mask`` a bool (or
        uint8) tensor of length ``param.shape[dim]`` on the parameter's device; where it is False the weight, its
        moments and its shadow are left bit-for-bit unchanged by that step. The next `step` consumes the mapping
        (it applies to that step only); ``None`` or ``{}`` withdraws it. Entries for parameters this optimizer does
        not update, or that have no gradient at the step, are ignored; masks are checked when the step runs."""
        self._frozen = dict(frozen) if frozen else None

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        frozen_map, self._frozen = self._frozen, None
        grad_scale = self.__dict__.get("grad_scale")  # the folded clip (litespark_hf.trainer) sets it per step
        shadow = self.shadow
        if shadow is not None and not shadow.alive:
            shadow = self.shadow = None
        live = shadow is not None and shadow.consistent()
        views = shadow.param_views if live else None
        updated: list[torch.Tensor] = []
        drop_shadow = False
        for gi, group in enumerate(self.param_groups):
            # per tensor that the kernel updates: weight, gradient, moments, shadow, frozen mask, step count (the
            # local shards for a DTensor); all_steps: every parameter with a gradient (an empty shard included)
            ps, gs, ms, vs, ss, fz, steps, all_steps = [], [], [], [], [], [], [], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("LitesparkAdamW does not support sparse gradients")
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0, dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                elif state["step"].device.type != "cpu":  # loaded from a fused/capturable torch optimizer
                    state["step"] = state["step"].detach().to("cpu", torch.float32)
                all_steps.append(state["step"])
                f = frozen_map.get(p) if frozen_map is not None else None
                if _is_dtensor(p):
                    drop_shadow = drop_shadow or shadow is not None
                    p_, g_, m_, v_, f = _local_shards(p, state, f)
                    updated.append(p)
                    if p_.numel() == 0:  # this process holds none of the weight
                        continue
                    ps.append(p_)
                    gs.append(g_)
                    ms.append(m_)
                    vs.append(v_)
                    ss.append(None)
                else:
                    if p.numel() == 0:
                        continue
                    ps.append(p)
                    gs.append(p.grad)
                    ms.append(state["exp_avg"])
                    vs.append(state["exp_avg_sq"])
                    ss.append(views.get(p) if views is not None else None)
                fz.append(f)
                steps.append(state["step"])
            if all_steps:
                torch._foreach_add_(all_steps, 1.0)
            if not ps:
                continue
            values = torch.stack(steps).tolist()
            buckets: dict[float, list[int]] = {}
            for i, s in enumerate(values):
                buckets.setdefault(s, []).append(i)
            beta1, beta2 = group["betas"]
            for bi, (s, idx) in enumerate(sorted(buckets.items())):  # one bucket unless a weight missed a step
                sh = [ss[i] for i in idx]
                fr = [fz[i] for i in idx]
                adamw_step([ps[i] for i in idx], [gs[i] for i in idx], [ms[i] for i in idx], [vs[i] for i in idx],
                           lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
                           weight_decay=group["weight_decay"], step=int(s), grad_scale=grad_scale,
                           shadows=sh if any(x is not None for x in sh) else None,
                           frozen=fr if any(x is not None for x in fr) else None,
                           cache=self._caches.setdefault((gi, bi), {}))
            updated.extend(ps)
        if drop_shadow:  # weights sharded after the copies were made (accelerate's FSDP2 prepare): none to keep
            shadow.alive = False
            shadow = self.shadow = None
        if updated:
            torch.autograd.graph.increment_version(updated)  # the kernel wrote them without torch seeing it
        if shadow is not None:
            if live:
                shadow.stepped()
            else:
                shadow.fill()
        return loss


def _local_shards(p, state: dict, frozen):
    """The local tensors of a DTensor weight, its gradient and moments (moments and gradient brought to the
    weight's placements if they differ), and a frozen ``(dim, keep)`` over the full weight cut to the shard."""
    mesh, placements = p.device_mesh, p.placements
    g = p.grad
    if not _is_dtensor(g):
        raise RuntimeError("LitesparkAdamW: a DTensor parameter with a plain-tensor gradient")
    if (g.device_mesh is not mesh and g.device_mesh != mesh) or g.placements != placements:
        g = g.redistribute(mesh, placements)
    for key in ("exp_avg", "exp_avg_sq"):
        t = state[key]
        if not _is_dtensor(t):
            raise RuntimeError(f"LitesparkAdamW: {key} of a DTensor parameter is a plain tensor")
        if (t.device_mesh is not mesh and t.device_mesh != mesh) or t.placements != placements:
            state[key] = t.redistribute(mesh, placements)
    p_ = p._local_tensor
    if frozen is not None:
        dim, keep = frozen
        if not isinstance(dim, int) or not -p.dim() <= dim < p.dim():
            raise ValueError(f"frozen dim {dim!r} for a parameter of shape {tuple(p.shape)}")
        dim %= p.dim()
        if not torch.is_tensor(keep) or keep.dim() != 1 or keep.numel() != p.shape[dim]:
            raise ValueError(f"frozen keep mask must be a vector of length {p.shape[dim]} (dim {dim} of shape "
                             f"{tuple(p.shape)})")
        if p_.shape[dim] != p.shape[dim]:  # sharded along the frozen dimension: this shard's part of the mask
            from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

            shape, offset = compute_local_shape_and_global_offset(p.shape, mesh, placements)
            keep = keep[offset[dim]:offset[dim] + shape[dim]]
        frozen = (dim, keep)
    return p_, g._local_tensor, state["exp_avg"]._local_tensor, state["exp_avg_sq"]._local_tensor, frozen
