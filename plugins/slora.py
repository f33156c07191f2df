"""``slora``: many LoRA adapters in one layer, a different one per batch row (S-LoRA / Punica style).

Sheng et al., *S-LoRA: Serving Thousands of Concurrent LoRA Adapters*, 2023, arXiv 2311.03285;
Chen et al., *Punica: Multi-Tenant LoRA Serving*, 2023, arXiv 2310.18547 (BGMV / SGMV kernels).

The layer holds ``slots`` adapters in stacked device buffers (lower ranks zero-padded to ``max_rank``)

    lora_A: slots x max_rank x in,   lora_B: slots x out x max_rank,   scaling: slots,   rank: slots

and a slot per batch row ``s_b`` (``-1``: no adapter). For every row ``b`` of ``x`` (``B x T x in``)

    y_b = base(x_b) + scaling[s_b] * x_b A[s_b]^T B[s_b]^T          (nothing added when s_b = -1)

in one pass, with no Python loop over adapters. The torch reference gathers the rows' A and B
(cut to the batch's largest rank) and runs two batched matmuls; rows without an adapter are left
out and the update is index-added. On CUDA (or with ``ADAPTERHUB_KERNELS=triton``, e.g. on CPU under
``TRITON_INTERPRET=1``) it runs the Triton kernels of :mod:`adapterhub.plugins._slora_kernel`:
BGMV shrink/expand for decode (``T == 1``) and segmented SGMV for prefill, stopping at each slot's
rank and applying its scaling in the kernel. ``ADAPTERHUB_KERNELS=torch`` forces the torch path.

The buffers carry no trainable tensors and are not saved (non-persistent): an
:class:`adapterhub.adapter_pool.AdapterPool` fills the slots from LoRA bundles and sets the rows.
GPT-2's ``Conv1D`` is handled (the update uses ``A``, ``B`` as LoRA stores them). No merge, by design:
a layer serving many adapters at once has no single weight delta.

Decode runs many forwards with the same rows, so under ``torch.no_grad`` / ``inference_mode`` the torch
path keeps the rows' gathered ``A``, ``B`` and scaling of the last :class:`SlotRows` per layer and reuses them
while the rows object and the buffers are unchanged (same tensors, same in-place version, no slot written or
cleared since). The cache costs ``n_active * r * (in + out)`` values per layer and is only kept when that is at
most :data:`GATHER_CACHE_BYTES`; with gradients on it is never used.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from adapterhub.registry import (
    AdapterhubError,
    AdapterLayer,
    ApplyContext,
    ModuleInfo,
    ModuleTypeError,
    NotMergeableError,
    Variant,
    hookimpl,
    param,
)

from ._triton import kernel_mode, triton_available, use_triton
from .lora import adapter_factory

KERNEL_ENV = "ADAPTERHUB_KERNELS"
#: the most bytes one layer keeps of gathered per-row A / B for reuse across forwards with the same rows
GATHER_CACHE_BYTES = 16 * 2**20


@dataclass(frozen=True)
class SLoraParams:
    slots: int = param(8, "adapters held at once (device slots); a batch row picks one", positive=True)
    max_rank: int = param(16, "largest adapter rank a slot holds (lower ranks are zero-padded)", positive=True)


class SlotRows:
    """The slot of every batch row, prepared once per batch (on the device) and shared by all layers.

    ``index`` (``B``, long): slot or -1; ``active`` (long) the rows with an adapter and ``slots`` theirs;
    ``rank_max``: the largest rank among those adapters (the torch path cuts the buffers to it).
    """

    def __init__(self, slots: Sequence[int], rank_max: int, device: torch.device | str):
        host = [int(s) for s in slots]
        self.host_slots = tuple(host)
        self.n_rows = len(host)
        active = [b for b, s in enumerate(host) if s >= 0]
        self.any_active = bool(active) and rank_max > 0
        self.all_active = len(active) == self.n_rows
        self.rank_max = int(rank_max)
        self.index = torch.tensor(host, dtype=torch.long, device=device)
        self.active = torch.tensor(active, dtype=torch.long, device=device)
        self.slots = torch.tensor([host[b] for b in active], dtype=torch.long, device=device)
        self._host_active = active
        self._token_cache: dict[int, Any] = {}

    def kernel_args(self, tokens_per_row: int) -> dict[str, Any]:
        """Int32 tensors for the kernels: per-token slots (BGMV) and per-row segments (SGMV)."""
        t = tokens_per_row
        cached = self._token_cache.get(t)
        if cached is None:
            device = self.index.device
            cached = {
                "token_slots": self.index.to(torch.int32).repeat_interleave(t),
                "seg_start": torch.tensor([b * t for b in self._host_active], dtype=torch.int32, device=device),
                "seg_len": torch.full((len(self._host_active),), t, dtype=torch.int32, device=device),
                "seg_slot": self.slots.to(torch.int32),
            }
            self._token_cache[t] = cached
        return cached


class SlotState:
    """What the layers of one pool share: the current :class:`SlotRows` (None: every row base-only)."""

    def __init__(self) -> None:
        self.rows: SlotRows | None = None


def kernel_requested(*tensors: torch.Tensor) -> bool:
    """Kernels on CUDA (``ADAPTERHUB_KERNELS=auto``), never with ``torch``, anywhere with ``triton``."""
    if kernel_mode() == "triton":
        return triton_available()
    return use_triton(*tensors)


Gathered = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def gather_rows(lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: torch.Tensor, rows: SlotRows) -> Gathered:
    """The active rows' ``A`` (``n x r x in``), ``B`` (``n x out x r``), scaling (``n x 1 x 1``); ``r = rank_max``."""
    r = rows.rank_max
    a = lora_A[:, :r].index_select(0, rows.slots)
    b = lora_B[:, :, :r].index_select(0, rows.slots)
    return a, b, scaling.index_select(0, rows.slots)[:, None, None]


def slora_update_torch(x: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: torch.Tensor,
                       rows: SlotRows, gathered: Gathered | None = None) -> torch.Tensor:
    """The reference: ``scaling[s] * x A[s]^T B[s]^T`` for the active rows of ``x`` (``B x T x in``).

    ``gathered``: :func:`gather_rows` of these buffers and rows, when the caller has it already.
    Returns ``n_active x T x out`` in the buffers' dtype (rows in the order of ``rows.active``).
    """
    a, b, sc = gathered if gathered is not None else gather_rows(lora_A, lora_B, scaling, rows)
    xs = x if rows.all_active else x.index_select(0, rows.active)
    xs = xs.to(lora_A.dtype)
    xa = torch.bmm(xs, a.transpose(1, 2)) * sc  # n x T x r
    return torch.bmm(xa, b.transpose(1, 2))


class SLoraLayer(AdapterLayer):
    """Many LoRA adapters around one Linear / Conv1D; row ``b`` of the batch uses slot ``s_b``.

    Buffers ``lora_A``, ``lora_B``, ``scaling``, ``rank`` (see the module docstring); the pool writes
    them with :meth:`write_slot` / :meth:`clear_slot` and grows them with :meth:`resize`.
    """

    variant = "slora"

    def __init__(self, base_layer: nn.Module, slots: int = 8, max_rank: int = 16, *,
                 state: SlotState | None = None, dtype: torch.dtype | None = None):
        super().__init__(base_layer)
        if self.kind not in SLora.kinds:
            raise ModuleTypeError(f"slora cannot wrap a {type(base_layer).__name__} (it wraps: conv1d, linear)")
        base_layer.requires_grad_(False)
        factory = adapter_factory(base_layer)
        if dtype is not None:
            factory["dtype"] = dtype
        self.slots, self.max_rank = int(slots), int(max_rank)
        self.register_buffer("lora_A", torch.zeros(self.slots, self.max_rank, self.in_features, **factory),
                             persistent=False)
        self.register_buffer("lora_B", torch.zeros(self.slots, self.out_features, self.max_rank, **factory),
                             persistent=False)
        self.register_buffer("scaling", torch.zeros(self.slots, **factory), persistent=False)
        self.register_buffer("rank", torch.zeros(self.slots, dtype=torch.int32, device=factory["device"]),
                             persistent=False)
        self.filled = [False] * self.slots
        self.state = state if state is not None else SlotState()
        self.version = 0  # bumped by every slot write / clear / resize (see _gathered_for)
        self._gather_cache: tuple[Any, ...] | None = None

    # -- slots --------------------------------------------------------------------------------
    def resize(self, slots: int, max_rank: int) -> None:
        """Grow the buffers to ``slots`` x ``max_rank``; existing slots keep their contents."""
        if slots < self.slots or max_rank < self.max_rank:
            raise ValueError("slora buffers only grow")
        if (slots, max_rank) == (self.slots, self.max_rank):
            return
        s, r = self.slots, self.max_rank
        a = self.lora_A.new_zeros(slots, max_rank, self.in_features)
        b = self.lora_B.new_zeros(slots, self.out_features, max_rank)
        a[:s, :r] = self.lora_A
        b[:s, :, :r] = self.lora_B
        sc = self.scaling.new_zeros(slots)
        rk = self.rank.new_zeros(slots)
        sc[:s], rk[:s] = self.scaling, self.rank
        self.lora_A, self.lora_B, self.scaling, self.rank = a, b, sc, rk
        self.filled += [False] * (slots - s)
        self.slots, self.max_rank = slots, max_rank
        self._touch()

    @torch.no_grad()
    def write_slot(self, slot: int, A: torch.Tensor, B: torch.Tensor, scaling: float) -> None:
        """Put one adapter (``A``: ``r x in``, ``B``: ``out x r``) in ``slot``, zero-padded to ``max_rank``."""
        r = A.shape[0]
        if A.shape != (r, self.in_features) or B.shape != (self.out_features, r) or r > self.max_rank:
            raise ValueError(f"slora slot: A {tuple(A.shape)} / B {tuple(B.shape)} do not fit "
                             f"{self.in_features} -> {self.out_features} with rank <= {self.max_rank}")
        blocking = not (A.is_pinned() and self.lora_A.is_cuda)
        self.lora_A[slot, :r].copy_(A, non_blocking=not blocking)
        self.lora_B[slot, :, :r].copy_(B, non_blocking=not blocking)
        if r < self.max_rank:
            self.lora_A[slot, r:].zero_()
            self.lora_B[slot, :, r:].zero_()
        self.scaling[slot] = float(scaling)
        self.rank[slot] = r
        self.filled[slot] = True
        self._touch()

    @torch.no_grad()
    def clear_slot(self, slot: int) -> None:
        """Make ``slot`` add nothing (zero tensors, scaling and rank)."""
        if not self.filled[slot]:
            return
        self.lora_A[slot].zero_()
        self.lora_B[slot].zero_()
        self.scaling[slot] = 0.0
        self.rank[slot] = 0
        self.filled[slot] = False
        self._touch()

    def _touch(self) -> None:
        """The buffers changed: no gathered rows from before may be reused."""
        self.version += 1
        self._gather_cache = None

    def _gathered_for(self, rows: SlotRows) -> Gathered:
        """:func:`gather_rows` for ``rows``, reused from the last forward when nothing it depends on changed.

        Reuse needs the same ``rows`` object, the same buffer tensors with the same in-place versions and the
        same :attr:`version`; only called with gradients off. Kept only up to ``GATHER_CACHE_BYTES``.
        """
        A, B, sc = self.lora_A, self.lora_B, self.scaling
        if A.is_inference() or B.is_inference() or sc.is_inference():  # no in-place version to check
            return gather_rows(A, B, sc, rows)
        key = (self.version, A._version, B._version, sc._version)
        cache = self._gather_cache
        if cache is not None and cache[0] is rows and cache[1] == key and cache[2]() is A and cache[3]() is B \
                and cache[4]() is sc:
            return cache[5]
        gathered = gather_rows(A, B, sc, rows)
        size = sum(t.numel() * t.element_size() for t in gathered)
        self._gather_cache = ((rows, key, weakref.ref(A), weakref.ref(B), weakref.ref(sc), gathered)
                              if size <= GATHER_CACHE_BYTES else None)
        return gathered

    def set_rows(self, slots: Sequence[int] | None) -> None:
        """Standalone use: row ``b`` uses slot ``slots[b]`` (-1 none); None makes every row base-only.

        The rows are shared by every layer of the same ``apply`` (or pool)."""
        if slots is None:
            self.state.rows = None
            return
        bad = [s for s in slots if not -1 <= int(s) < self.slots]
        if bad:
            raise AdapterhubError(f"slora: slot {bad[0]} out of range (-1 .. {self.slots - 1})")
        self.state.rows = SlotRows(slots, self.max_rank, self.lora_A.device)

    # -- forward ------------------------------------------------------------------------------
    def adapted_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """``base(x) + scaling[s_b] * B[s_b] A[s_b] x_b`` for every row ``b`` (see the module docstring)."""
        result = self.base_layer(x, *args, **kwargs)
        rows = self.state.rows
        if rows is None or not rows.any_active:
            return result
        if x.dim() < 2 or x.shape[0] != rows.n_rows:
            raise AdapterhubError(f"slora: the input has {x.shape[0] if x.dim() else 0} rows but the batch was set "
                                  f"for {rows.n_rows} (call pool.set_batch with one adapter per row)")
        n_rows = rows.n_rows
        x3 = x.reshape(n_rows, -1, x.shape[-1])
        out3 = result.view(n_rows, -1, self.out_features) if result.is_contiguous() else None
        if out3 is not None and kernel_requested(x, self.lora_A) and not _needs_grad(x, result):
            from ._slora_kernel import slora_add_

            slora_add_(out3, x3, self.lora_A, self.lora_B, self.scaling, self.rank, rows)
            return result
        gathered = None if torch.is_grad_enabled() else self._gathered_for(rows)
        upd = slora_update_torch(x3, self.lora_A, self.lora_B, self.scaling, rows, gathered).to(result.dtype)
        res3 = result.reshape(n_rows, -1, self.out_features)
        res3 = res3 + upd if rows.all_active else res3.index_add(0, rows.active, upd)
        return res3.reshape(result.shape)

    def delta_weight(self) -> torch.Tensor:
        raise NotMergeableError("slora holds many adapters at once and has no single weight delta (no merge, by "
                                "design); merge one adapter with adapterhub.load + merge instead")

    def trainable_parameters(self) -> list[nn.Parameter]:
        return []

    def extra_repr(self) -> str:
        return f"slots={self.slots}, max_rank={self.max_rank}"


def _needs_grad(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


#: the name the S-LoRA brief uses (``adapterhub.plugins.multilora.MultiLoraLayer`` is another variant's layer)
MultiLoraLayer = SLoraLayer


class SLora(Variant):
    name = "slora"
    Params = SLoraParams
    kinds = frozenset({"linear", "conv1d"})
    summary = "S-LoRA serving layer: `slots` LoRA adapters in stacked buffers, a different one per batch row"
    paper = ("Sheng et al., S-LoRA: Serving Thousands of Concurrent LoRA Adapters, 2023, arXiv 2311.03285; "
             "Chen et al., Punica: Multi-Tenant LoRA Serving, 2023, arXiv 2310.18547")
    mergeable = False

    def trainable_params(self, params: SLoraParams, info: ModuleInfo) -> int:
        """None: the slots are filled by an adapter pool, not trained."""
        self.check_module(info)
        return 0

    def wrap(self, module: nn.Module, params: SLoraParams, ctx: ApplyContext, name: str) -> SLoraLayer:
        self.check_wrappable(module, name)
        state = ctx.share("slora.state", SlotState) if ctx is not None else None
        return SLoraLayer(module, slots=params.slots, max_rank=params.max_rank, state=state)


@hookimpl
def register_variants(register):
    register(SLora)
