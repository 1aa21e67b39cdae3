"""Per-layer rules of the book-keeping clipping engine (see :mod:`securefed.privacy.fast_clipping`).

A rule turns what the engine recorded for one layer (its input ``a``, and ``g``, the gradient of
the summed loss with respect to its output) into ``squared_norms`` (each sample's squared
gradient norm over the layer's parameters) and ``accumulate`` (the clipped sum ``sum_i c_i
grad_i`` added into ``p.grad``).

Layers whose weight gradient is a contraction ``a_i^T g_i`` over T positions (Linear,
convolutions, Embedding) get the norm one of two ways (Bu, Mao, Xu 2022, "Scalable and efficient
training of large convolutional neural networks with differential privacy": mixed ghost
clipping): the ghost norm ``||a_i^T g_i||^2 = <a_i a_i^T, g_i g_i^T>`` (Goodfellow 2015; Li,
Tramer, Liang, Hashimoto 2022), two T x T Grams, or the per-sample gradient itself, T D P
multiply-adds a sample. :class:`LayerPlan` names the choice, made per layer by a cost model. The
clipped sum is then the ordinary weight gradient with ``g_i`` scaled by ``c_i`` (book-keeping:
Bu, Wang, Zha, Karypis 2023, "Differentially private optimization on large model at small
cost"), by the native kernel the non-private backward uses, unless the instantiated per-sample
gradients were small enough to keep and are summed directly.

Convolutions: per-sample gradients come from one native weight-gradient call with the batch
folded into the groups (``B * groups`` groups), for any dimension, stride, padding, dilation,
group count and transposition. The ghost norm never unfolds: with U the padded input as (C, L),
``(A A^T)[t, s] = sum_k (U^T U)[i_k(t), i_k(s)]`` where ``i_k(t)`` is where kernel offset k of
output t reads, so one L x L Gram and K gathers replace a K times larger im2col. A transposed
convolution is the adjoint of the convolution with the same weight: its weight gradient is that
convolution's with input and output gradient swapped, so its output gradient is the side the
kernel slides over.

Normalisation layers and PReLU have per-sample gradients as small as their parameters and always
instantiate them. GroupNorm's come from the native group-norm backward run on the batch folded
into the channels, with the mean and inverse deviation its forward saved.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from enum import Enum

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.graph import get_gradient_edge

__all__ = ["LayerPlan", "LayerCosts", "Record", "LayerRule", "ConvRule", "LinearRule", "GroupNormRule",
           "InstanceNormRule", "LayerNormRule", "PReLURule", "EmbeddingRule"]

_aten = torch.ops.aten
# the ghost norm gathers all kernel offsets' Gram entries in one call up to this many entries
_GATHER_AT_ONCE = 1 << 22


class LayerPlan(Enum):
    """How one layer's per-sample norms and clipped sum are computed."""

    GHOST = "ghost"  # Gram-matrix norm, weighted contraction for the sum
    INSTANTIATE = "instantiate"  # per-sample gradients for the norm, weighted contraction for the sum
    INSTANTIATE_AND_KEEP = "instantiate-and-keep"  # per-sample gradients for the norm and the sum


class Record:
    """One call of a layer during the forward pass: its input and where its output's gradient
    arrives (an autograd edge: the output tensor itself is not kept alive)."""

    __slots__ = ("inputs", "edge", "grad_output", "input_version", "stats")

    def __init__(self, inputs: torch.Tensor, output: torch.Tensor) -> None:
        self.inputs = inputs.detach()
        self.edge = get_gradient_edge(output)
        self.grad_output: torch.Tensor | None = None
        self.stats: tuple[torch.Tensor, ...] | None = None  # what a rule keeps from the forward
        # the input edited in place after the layer ran would be read wrong: checked at backward
        self.input_version = inputs._version


def _trainable(param: torch.Tensor | None) -> bool:
    return param is not None and param.requires_grad


def _add_grad(param: torch.Tensor | None, value: torch.Tensor) -> None:
    """``param.grad += value`` (``.grad`` is created if missing)."""
    if _trainable(param):
        value = value.reshape(param.shape).to(param.dtype)
        param.grad = value if param.grad is None else param.grad.add_(value)


def _join(parts: list[torch.Tensor], dim: int) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim)


def _weighted_sum(coefficients: torch.Tensor, per_sample: torch.Tensor) -> torch.Tensor:
    """``sum_i c_i x_i`` for per-sample ``x`` of shape (B, ...)."""
    return (coefficients.to(per_sample.dtype) @ per_sample.reshape(per_sample.shape[0], -1))


def _sum_sq(per_sample: torch.Tensor) -> torch.Tensor:
    flat = per_sample.reshape(per_sample.shape[0], -1)
    return torch.linalg.vecdot(flat, flat)


@dataclass(frozen=True, kw_only=True)
class LayerCosts:
    """Per-sample sizes the engine's cost model weighs (multiply-adds or tensor entries)."""

    gram: int  # multiply-adds of the ghost norm's Gram matrices
    gathers: int  # Gram entries the ghost norm gathers
    contraction: int  # multiply-adds of one per-sample (or the summed) weight gradient
    per_sample: int  # entries of one sample's weight gradient
    activation: int  # entries of the layer's input and output


class LayerRule:
    """Base class: one trainable layer and the way its per-sample quantities are computed."""

    fixed_plan: LayerPlan | None = LayerPlan.INSTANTIATE_AND_KEEP  # None: chosen by costs()

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def on_record(self, record: Record, output: torch.Tensor) -> None:
        """Called by the forward hook; a rule may keep something the forward computed."""

    def costs(self, records: list[Record]) -> LayerCosts:
        raise NotImplementedError

    def squared_norms(self, records: list[Record], plan: LayerPlan) -> tuple[torch.Tensor, object]:
        """(B,) squared per-sample norms, and what ``accumulate`` may reuse (or None)."""
        raise NotImplementedError

    def accumulate(self, records: list[Record], coefficients: torch.Tensor, plan: LayerPlan,
                   kept: object) -> None:
        """Add ``sum_i coefficients[i] * grad_i`` to the layer's ``p.grad``."""
        raise NotImplementedError


def _gram_norms(a: torch.Tensor, g: torch.Tensor, batch: int) -> torch.Tensor:
    """``<a a^T, g g^T>`` per sample for ``a`` (N, D, T), ``g`` (N, P, T), N a multiple of B."""
    if a.shape[-1] == 1:
        return (_sum_sq(a) * _sum_sq(g)).reshape(batch, -1).sum(1)
    gram_a = torch.bmm(a.transpose(1, 2), a)
    gram_g = torch.bmm(g.transpose(1, 2), g)
    return torch.linalg.vecdot(gram_a.reshape(batch, -1), gram_g.reshape(batch, -1))


# -- Linear -----------------------------------------------------------------------------------
class LinearRule(LayerRule):
    def _matrices(self, records: list[Record]) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, D, T) inputs and (B, P, T) output gradients, all calls of the layer joined along T."""
        a = _join([r.inputs.reshape(len(r.inputs), -1, r.inputs.shape[-1]) for r in records], 1)
        g = _join([r.grad_output.reshape(len(r.inputs), -1, r.grad_output.shape[-1]) for r in records], 1)
        return a.transpose(1, 2), g.transpose(1, 2)

    fixed_plan = None

    def costs(self, records):
        m = self.module
        positions = sum(r.inputs[0].numel() // m.in_features for r in records)
        return LayerCosts(gram=positions ** 2 * (m.in_features + m.out_features) if positions > 1 else 0,
                          gathers=0, contraction=positions * m.in_features * m.out_features,
                          per_sample=m.in_features * m.out_features,
                          activation=positions * (m.in_features + m.out_features))

    def squared_norms(self, records, plan):
        m = self.module
        a, g = self._matrices(records)
        batch = a.shape[0]
        total = a.new_zeros(batch)
        kept = None
        if _trainable(m.weight):
            if plan is LayerPlan.GHOST:
                total += _gram_norms(a, g, batch)
            else:
                per_sample = torch.bmm(g, a.transpose(1, 2))
                total += _sum_sq(per_sample)
                kept = per_sample if plan is LayerPlan.INSTANTIATE_AND_KEEP else None
        if _trainable(m.bias):
            total += _sum_sq(g.sum(2))
        return total, kept

    def accumulate(self, records, coefficients, plan, kept):
        m = self.module
        a, g = self._matrices(records)
        if _trainable(m.weight):
            if kept is not None:
                _add_grad(m.weight, _weighted_sum(coefficients, kept))
            else:
                scaled = g * coefficients.to(g.dtype)[:, None, None]
                # (P, B*T) @ (B*T, D): one matrix product for the whole batch
                _add_grad(m.weight, scaled.transpose(0, 1).reshape(g.shape[1], -1)
                          @ a.transpose(1, 2).reshape(-1, a.shape[1]))
        if _trainable(m.bias):
            _add_grad(m.bias, _weighted_sum(coefficients, g.sum(2)))


# -- convolutions -----------------------------------------------------------------------------
@functools.lru_cache(maxsize=256)
def _receptive_index(padded: tuple, grid: tuple, kernel: tuple, stride: tuple, dilation: tuple,
                     device: torch.device) -> torch.Tensor:
    """(K, T): flat index into the padded input of kernel offset k at output position t."""
    n = len(padded)
    flat = torch.zeros((), dtype=torch.long)
    for d in range(n):
        coord = (torch.arange(grid[d]) * stride[d])[:, None] + (torch.arange(kernel[d]) * dilation[d])
        shape = [1] * (2 * n)
        shape[d], shape[n + d] = grid[d], kernel[d]
        flat = flat * padded[d] + coord.reshape(shape)
    return flat.reshape(math.prod(grid), math.prod(kernel)).t().contiguous().to(device)


class ConvRule(LayerRule):
    """Conv1d/2d/3d and ConvTranspose1d/2d/3d, any stride, padding, dilation and groups."""

    fixed_plan = None

    def __init__(self, module: nn.Module) -> None:
        super().__init__(module)
        m = module
        self.spatial = len(m.kernel_size)
        self.transposed = bool(m.transposed)
        # string padding ('same', 'valid') and non-zero padding modes: pad the recorded input
        # explicitly, as the layer's forward does, and run the kernels with zero padding
        self.explicit_pad = isinstance(m.padding, str) or m.padding_mode != "zeros"
        self.padding = [0] * self.spatial if self.explicit_pad else list(m.padding)
        self.pointwise = (not self.transposed and all(k == 1 for k in m.kernel_size)
                          and all(s == 1 for s in m.stride) and not any(self.padding))

    def _input(self, r: Record) -> torch.Tensor:
        m = self.module
        if not self.explicit_pad:
            return r.inputs
        mode = "constant" if m.padding_mode == "zeros" else m.padding_mode
        return F.pad(r.inputs, m._reversed_padding_repeated_twice, mode=mode)

    def _output_padding(self, x: torch.Tensor, g: torch.Tensor) -> list[int]:
        m = self.module
        if not self.transposed:
            return [0] * self.spatial
        # recovered from the shapes, since forward(x, output_size=...) may have chosen it
        return [g.shape[2 + d] - ((x.shape[2 + d] - 1) * m.stride[d] - 2 * self.padding[d]
                                  + m.dilation[d] * (m.kernel_size[d] - 1) + 1)
                for d in range(self.spatial)]

    def _sides(self, r: Record) -> tuple[torch.Tensor, torch.Tensor]:
        """The side the kernel slides over (unfolded) and the other side, both (B*G, C/G, *S).

        A transposed convolution is the adjoint of a convolution with the same weight, so there
        the output gradient is the unfolded side and the input the other.
        """
        x, g = self._input(r), r.grad_output
        if self.transposed:
            x, g = g, x
        n = x.shape[0] * self.module.groups
        return x.reshape(n, -1, *x.shape[2:]), g.reshape(n, -1, *g.shape[2:])

    def costs(self, records):
        m = self.module
        groups, kernel = m.groups, math.prod(m.kernel_size)
        positions = padded = 0
        for r in records:
            unfolded, other = self._sides(r)
            positions += math.prod(other.shape[2:])
            padded += math.prod(s + 2 * p for s, p in zip(unfolded.shape[2:], self.padding))
        d, p = unfolded.shape[1] * kernel, other.shape[1]
        return LayerCosts(gram=groups * (padded ** 2 * unfolded.shape[1] + positions ** 2 * p),
                          gathers=0 if self.pointwise else kernel * positions ** 2,
                          contraction=groups * positions * d * p, per_sample=groups * d * p,
                          activation=positions * (m.in_channels + m.out_channels))

    def _per_sample_weight_grads(self, r: Record) -> torch.Tensor:
        m = self.module
        x, g = self._input(r), r.grad_output
        batch = x.shape[0]
        if self.pointwise and m.groups == 1:
            return torch.bmm(g.reshape(batch, m.out_channels, -1),
                             x.reshape(batch, m.in_channels, -1).transpose(1, 2))
        # fold the batch into the groups: one grouped weight-gradient call gives every sample's
        wshape = (batch * m.weight.shape[0], *m.weight.shape[1:])
        placeholder = x.new_empty(wshape)  # only its shape is read when just grad_weight is asked
        _, grad_weight, _ = _aten.convolution_backward(
            g.reshape(1, -1, *g.shape[2:]), x.reshape(1, -1, *x.shape[2:]), placeholder, None,
            list(m.stride), self.padding, list(m.dilation), self.transposed,
            self._output_padding(x, g), batch * m.groups, [False, True, False])
        return grad_weight.reshape(batch, *m.weight.shape)

    def _unfolded_grams(self, records: list[Record]) -> list[tuple[torch.Tensor, torch.Tensor, int]]:
        """Per record: the flat padded unfolded side, its (K, T) receptive index, and T."""
        m = self.module
        out = []
        for r in records:
            unfolded, other = self._sides(r)
            pad = [p for p in reversed(self.padding) for _ in (0, 1)]
            padded = F.pad(unfolded, pad) if any(pad) else unfolded
            grid = tuple(other.shape[2:])
            index = None if self.pointwise else _receptive_index(
                tuple(padded.shape[2:]), grid, tuple(m.kernel_size), tuple(m.stride),
                tuple(m.dilation), padded.device)
            out.append((padded.reshape(*padded.shape[:2], -1), index, math.prod(grid)))
        return out

    def _ghost_norms(self, records: list[Record]) -> torch.Tensor:
        batch = records[0].inputs.shape[0]
        sides = self._unfolded_grams(records)
        others = [self._sides(r)[1] for r in records]
        others = [o.reshape(*o.shape[:2], -1) for o in others]
        total = others[0].new_zeros(batch)
        for i, (u_i, idx_i, t_i) in enumerate(sides):
            for j, (u_j, idx_j, t_j) in enumerate(sides):
                gram = torch.bmm(u_i.transpose(1, 2), u_j)  # (N, L_i, L_j)
                if idx_i is not None:  # sum the K shifted blocks: the unfolded inputs' Gram
                    gram = self._gather_blocks(gram, idx_i, idx_j)
                other = torch.bmm(others[i].transpose(1, 2), others[j])
                total += torch.linalg.vecdot(gram.reshape(batch, -1), other.reshape(batch, -1))
        return total

    @staticmethod
    def _gather_blocks(gram: torch.Tensor, idx_i: torch.Tensor, idx_j: torch.Tensor) -> torch.Tensor:
        """``sum_k gram[:, idx_i[k]][:, :, idx_j[k]]`` via flat index_select (much faster than
        advanced indexing), all offsets in one call while that stays small."""
        n, width = gram.shape[0], gram.shape[2]
        flat = gram.reshape(n, -1)
        linear = (idx_i[:, :, None] * width + idx_j[:, None, :]).reshape(idx_i.shape[0], -1)
        if n * linear.numel() <= _GATHER_AT_ONCE:
            picked = flat.index_select(1, linear.reshape(-1)).view(n, linear.shape[0], -1).sum(1)
        else:
            picked = sum(flat.index_select(1, row) for row in linear)
        return picked.view(n, idx_i.shape[1], idx_j.shape[1])

    def squared_norms(self, records, plan):
        m = self.module
        batch = records[0].inputs.shape[0]
        total = records[0].inputs.new_zeros(batch)
        kept = None
        if _trainable(m.weight):
            if plan is LayerPlan.GHOST:
                total += self._ghost_norms(records)
            else:
                per_sample = self._per_sample_weight_grads(records[0])
                for r in records[1:]:
                    per_sample = per_sample + self._per_sample_weight_grads(r)
                total += _sum_sq(per_sample)
                kept = per_sample if plan is LayerPlan.INSTANTIATE_AND_KEEP else None
        if _trainable(m.bias):
            total += _sum_sq(self._bias_grads(records))
        return total, kept

    def _bias_grads(self, records: list[Record]) -> torch.Tensor:
        grads = [r.grad_output.reshape(*r.grad_output.shape[:2], -1).sum(2) for r in records]
        return sum(grads[1:], grads[0])

    def accumulate(self, records, coefficients, plan, kept):
        m = self.module
        if _trainable(m.weight):
            if kept is not None:
                _add_grad(m.weight, _weighted_sum(coefficients, kept))
            else:
                for r in records:
                    x, g = self._input(r), r.grad_output
                    scaled = g * coefficients.to(g.dtype).reshape(-1, *([1] * (g.dim() - 1)))
                    _, grad_weight, _ = _aten.convolution_backward(
                        scaled, x, m.weight, None, list(m.stride), self.padding, list(m.dilation),
                        self.transposed, self._output_padding(x, g), m.groups, [False, True, False])
                    _add_grad(m.weight, grad_weight)
        if _trainable(m.bias):
            _add_grad(m.bias, _weighted_sum(coefficients, self._bias_grads(records)))


# -- normalisation layers and PReLU: per-sample gradients are as small as the parameters ----------
def _group_norm_per_sample(x: torch.Tensor, g: torch.Tensor, groups: int, eps: float,
                           stats: tuple[torch.Tensor, ...] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, C) per-sample gamma and beta gradients of a group norm with ``groups`` groups.

    The native group-norm backward, run on the batch folded into the channels (one sample of
    B*C channels in B*groups groups), returns exactly these as its weight and bias gradients:
    one fused pass over ``g`` and ``x``, with PyTorch's own arithmetic. ``stats`` are the
    forward's (mean, rstd), recomputed by the native forward when not recorded.
    """
    batch, channels = x.shape[:2]
    positions = x[0, 0].numel()
    if stats is None:
        _, mean, rstd = _aten.native_group_norm(x, None, None, batch, channels, positions, groups, eps)
    else:
        mean, rstd = stats
    folded = batch * channels
    _, gamma, beta = _aten.native_group_norm_backward(
        g.reshape(1, folded, positions), x.reshape(1, folded, positions), mean.reshape(1, -1),
        rstd.reshape(1, -1), x.new_ones(folded), 1, folded, positions, batch * groups,
        [False, True, True])
    return gamma.view(batch, channels), beta.view(batch, channels)


class _AffineRule(LayerRule):
    """Layers with per-channel gamma/beta: per-sample (B, C) gradients, kept for the sum."""

    def per_sample(self, r: Record) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def _kept(self, records: list[Record]) -> dict[str, torch.Tensor]:
        m = self.module
        sums: dict[str, torch.Tensor] = {}
        for r in records:
            gamma, beta = self.per_sample(r)
            for name, value in (("weight", gamma), ("bias", beta)):
                if _trainable(getattr(m, name, None)):
                    sums[name] = value if name not in sums else sums[name] + value
        return sums

    def squared_norms(self, records, plan):
        kept = self._kept(records)
        total = records[0].inputs.new_zeros(records[0].inputs.shape[0])
        for value in kept.values():
            total += _sum_sq(value)
        return total, kept

    def accumulate(self, records, coefficients, plan, kept):
        for name, value in kept.items():
            _add_grad(getattr(self.module, name), _weighted_sum(coefficients, value))


class GroupNormRule(_AffineRule):
    def on_record(self, record: Record, output: torch.Tensor) -> None:
        node = output.grad_fn
        if type(node).__name__ == "NativeGroupNormBackward0":  # the forward's own mean and rstd
            record.stats = (node._saved_result1, node._saved_result2)

    def per_sample(self, r):
        m = self.module
        return _group_norm_per_sample(r.inputs, r.grad_output, m.num_groups, m.eps, r.stats)


class InstanceNormRule(_AffineRule):
    """InstanceNorm1d/2d/3d with ``affine=True``."""

    def per_sample(self, r):
        m = self.module
        x = r.inputs
        if m.training or not m.track_running_stats:  # per-sample statistics: a group norm
            return _group_norm_per_sample(x, r.grad_output, x.shape[1], m.eps, None)
        # evaluation mode normalises by the running statistics
        normalised = F.instance_norm(x, m.running_mean, m.running_var, use_input_stats=False, eps=m.eps)
        flat = r.grad_output.reshape(*x.shape[:2], -1)
        return torch.linalg.vecdot(flat, normalised.reshape(*x.shape[:2], -1)), flat.sum(2)


class LayerNormRule(_AffineRule):
    def per_sample(self, r):
        m, g = self.module, r.grad_output
        normalised = F.layer_norm(r.inputs, m.normalized_shape, eps=m.eps)
        # sum over everything between the batch dimension and the normalised ones
        flat = (len(g), -1, *m.normalized_shape)
        return (g * normalised).reshape(flat).sum(1), g.reshape(flat).sum(1)


class PReLURule(_AffineRule):
    def per_sample(self, r):
        g = r.grad_output * r.inputs.clamp(max=0)
        batch = g.shape[0]
        if self.module.num_parameters == 1:
            return g.reshape(batch, -1).sum(1, keepdim=True), None
        return g.reshape(batch, g.shape[1], -1).sum(2), None


# -- Embedding: ghost norm over equal-token pairs, index_add for the sum -------------------------
class EmbeddingRule(LayerRule):
    """Always ghost: ``||sum_t e_{k_t} g_t^T||^2 = sum_{t,s} [k_t = k_s] g_t . g_s`` (Li et al. 2022)."""

    fixed_plan = LayerPlan.GHOST

    def _flat(self, records: list[Record]) -> tuple[torch.Tensor, torch.Tensor]:
        m = self.module
        batch = records[0].inputs.shape[0]
        idx = _join([r.inputs.reshape(batch, -1) for r in records], 1)
        g = _join([r.grad_output.reshape(batch, -1, m.embedding_dim) for r in records], 1)
        if m.padding_idx is not None:  # the padding row never receives a gradient
            g = g * (idx != m.padding_idx).unsqueeze(2).to(g.dtype)
        return idx, g

    def squared_norms(self, records, plan):
        idx, g = self._flat(records)
        gram = torch.bmm(g, g.transpose(1, 2))
        same = (idx.unsqueeze(2) == idx.unsqueeze(1)).to(gram.dtype)
        return torch.linalg.vecdot(gram.reshape(len(idx), -1), same.reshape(len(idx), -1)), None

    def accumulate(self, records, coefficients, plan, kept):
        m = self.module
        if not _trainable(m.weight):
            return
        idx, g = self._flat(records)
        scaled = (g * coefficients.to(g.dtype)[:, None, None]).reshape(-1, m.embedding_dim)
        summed = torch.zeros_like(m.weight).index_add_(0, idx.reshape(-1), scaled)
        _add_grad(m.weight, summed)

