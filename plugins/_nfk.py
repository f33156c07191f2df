"""NormalFloat-k codebooks, two-level blockwise NF-b quantization and the LQ decomposition.

Shared by the ``lq`` quantizer and the ``lqlora`` variant (Guo et al., *LQ-LoRA*, arXiv 2311.12023).

**NF-b codebook** (``nf_code(b)``, b = 2..8): bitsandbytes' ``create_normal_map`` generalised from
16 to ``2^b`` levels, as LQ-LoRA's ``create_normal_float_scheme`` does, with the same
``delta = 0.9677083`` for every b::

    positives = Phi^-1(linspace(delta, 0.5, 2^(b-1) + 1)[:-1])    2^(b-1) values
    negatives = -Phi^-1(linspace(delta, 0.5, 2^(b-1))[:-1])        2^(b-1) - 1 values
    code      = sort(positives, 0, negatives) / max                 2^b values in [-1, 1], an exact 0

computed exactly as bitsandbytes does (float32 linspace, float64 ``Phi^-1``, float32 division),
so ``nf_code(4)`` *is* the NF4 code.

**Two-level blockwise format** (``NfConfig(bits, b0, B0, b1, B1)``), for the weight ``W``
(``out x in``) flattened row-major to ``w`` (``n`` values; blocks may span rows, the last may be short):

1. ``s1[j] = max |w|`` over block ``j`` of ``B0`` weights (``nb = ceil(n / B0)`` blocks);
2. ``offset = min_j s1[j]`` (fp32), ``r = s1 - offset >= 0``;
3. ``s2[g] = max r`` over group ``g`` of ``B1`` first-level scales, stored in ``b1`` (bf16/fp16/fp32);
4. ``c0[j] = round(r[j] / s2[g] * (2^b0 - 1))`` clamped to ``[0, 2^b0 - 1]`` (unsigned ``b0``-bit);
5. the scale used to quantize *and* dequantize is ``scale[j] = c0[j] * (s2[g] / (2^b0 - 1)) + offset``;
6. ``code[i] = nearest NF-b value to w[i] / scale[j]`` (outside [-1, 1]: the end codes);
   ``w_hat[i] = nf_code(b)[code[i]] * scale[j]``.

This is LQ-LoRA's ``blockwise_absmax`` + ``quantize_with_scheme`` (``blockwise-nf``). Storage is
``b + b0/B0 + b1/(B0 B1)`` bits per weight plus one fp32 offset per matrix; codes are packed as a
little-endian bitstream (``pack_bits``): code ``i`` occupies bits ``[b i, b i + b)``.

**LQ decomposition** (``lq_decompose``): ``Q = 0``; repeat ``(L1, L2) = SVD_k(W - Q)``,
``Q = quant(W - L1 L2)`` until ``||W - Q - L1 L2||_F`` stops falling (at most ``iters`` times); the
lowest-error iterate is returned (the authors' code returns the one after the rise). With Fisher
information ``F`` (``out x in``) the SVD is of ``D_r (W - Q) D_c`` with ``D_r = sqrt(mean_j F)``,
``D_c = sqrt(mean_i F)``, unscaled afterwards, and the error is ``||sqrt(F) * (W - Q - L1 L2)||_F``.
``SVD_k`` is exact for matrices up to 2048 wide, else randomized (10 oversampling, 2 power
iterations, a fixed seed, so the result is reproducible).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import Any, NamedTuple

import torch

DELTA = 0.9677083
SCALE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
SCALE_BITS = {"bf16": 16, "fp16": 16, "fp32": 32}
#: LQ-LoRA's configuration grid
GRID: dict[str, tuple[Any, ...]] = {"bits": (2, 3, 4, 8), "b0": (2, 3, 4, 8), "B0": (16, 32, 64),
                                    "b1": ("bf16", "fp16", "fp32"), "B1": (16, 64, 256)}
EXACT_SVD_MAX = 2048
OVERSAMPLING = 10
FISHER_FLOOR = 1e-3  # row/column Fisher weights are floored at this fraction of their mean


@dataclass(frozen=True)
class NfConfig:
    """One quantization configuration: ``bits`` per weight, ``b0``-bit first-level scales per ``B0``
    weights, ``b1`` second-level scales per ``B1`` first-level ones."""

    bits: int
    b0: int
    B0: int
    b1: str
    B1: int

    @property
    def bits_per_param(self) -> float:
        """``b + b0/B0 + b1/(B0 B1)`` (the per-matrix fp32 offset is not counted)."""
        return self.bits + self.b0 / self.B0 + SCALE_BITS[self.b1] / (self.B0 * self.B1)

    def as_dict(self) -> dict[str, Any]:
        return {"bits": self.bits, "b0": self.b0, "B0": self.B0, "b1": self.b1, "B1": self.B1}


@cache
def _nf_code(bits: int) -> torch.Tensor:
    from scipy.stats import norm

    half = 2 ** (bits - 1)
    pos = norm.ppf(torch.linspace(DELTA, 0.5, half + 1)[:-1].numpy()).tolist()
    neg = (-norm.ppf(torch.linspace(DELTA, 0.5, half)[:-1].numpy())).tolist()
    values = torch.tensor(pos + [0.0] + neg, dtype=torch.float32).sort().values
    return values / values.max()


def nf_code(bits: int) -> torch.Tensor:
    """The ``2^bits`` NormalFloat values in ascending order (fp32; see the module docstring)."""
    if not 2 <= bits <= 8:
        raise ValueError(f"NF codebooks exist for 2..8 bits, got {bits}")
    return _nf_code(bits).clone()


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes in ``[0, 2^bits)`` into ``ceil(n bits / 8)`` bytes (little-endian bitstream)."""
    n = codes.numel()
    flat = codes.reshape(-1).to(torch.int64)
    if bits == 8:
        return flat.to(torch.uint8)
    groups = -(-n // 8)
    flat = torch.cat([flat, flat.new_zeros(groups * 8 - n)]).view(groups, 8)
    word = (flat << (bits * torch.arange(8, device=flat.device))).sum(dim=1)  # 8 codes -> `bits` bytes
    out = (word[:, None] >> (8 * torch.arange(bits, device=flat.device))) & 0xFF
    return out.reshape(-1)[: -(-n * bits // 8)].to(torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """The ``n`` codes (int64) that :func:`pack_bits` stored in ``packed``."""
    if bits == 8:
        return packed.reshape(-1)[:n].to(torch.int64)
    groups = -(-n // 8)
    data = packed.reshape(-1).to(torch.int64)
    data = torch.cat([data, data.new_zeros(groups * bits - data.numel())]).view(groups, bits)
    word = (data << (8 * torch.arange(bits, device=data.device))).sum(dim=1)
    codes = (word[:, None] >> (bits * torch.arange(8, device=data.device))) & ((1 << bits) - 1)
    return codes.reshape(-1)[:n]


class NfState(NamedTuple):
    """Unpacked two-level state of one matrix (see the module docstring)."""

    codes: torch.Tensor  # int64 [n]
    scale_codes: torch.Tensor  # int64 [nb], b0-bit
    scale2: torch.Tensor  # [ceil(nb / B1)] in the b1 dtype
    offset: torch.Tensor  # fp32 scalar


def block_scales(scale_codes: torch.Tensor, scale2: torch.Tensor, offset: torch.Tensor, cfg: NfConfig) -> torch.Tensor:
    """``scale[j] = c0[j] * (s2[g] / (2^b0 - 1)) + offset`` (fp32) for every first-level block."""
    nb = scale_codes.numel()
    step = scale2.float() / ((1 << cfg.b0) - 1)
    padded = torch.cat([scale_codes, scale_codes.new_zeros(scale2.numel() * cfg.B1 - nb)])
    return (padded.float().view(-1, cfg.B1) * step[:, None]).reshape(-1)[:nb] + offset.float()


def _blocks(flat: torch.Tensor, size: int) -> torch.Tensor:
    pad = -flat.numel() % size
    return torch.cat([flat, flat.new_zeros(pad)]).view(-1, size) if pad else flat.view(-1, size)


def _first_level(r: torch.Tensor, offset: torch.Tensor, cfg: NfConfig
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Steps 3-5 for the shifted absmaxes ``r``: ``(c0, s2, scale)``."""
    sdtype = SCALE_DTYPES[cfg.b1]
    s2 = _blocks(r, cfg.B1).amax(dim=1).clamp(max=torch.finfo(sdtype).max).to(sdtype)
    levels = (1 << cfg.b0) - 1
    per_block = s2.float().repeat_interleave(cfg.B1)[: r.numel()]
    safe = torch.where(per_block > 0, per_block, torch.ones_like(per_block))
    c0 = torch.round(r / safe * levels).clamp(0, levels).to(torch.int64)
    c0 = torch.where(per_block > 0, c0, torch.zeros_like(c0))
    return c0, s2, block_scales(c0, s2, offset, cfg)


def _nearest_codes(blocks: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """Index of the nearest NF-b value to ``blocks / scale`` (0 where the scale is 0)."""
    code = _nf_code(bits).to(blocks.device)
    x = torch.where(scale[..., None] > 0, blocks / torch.where(scale > 0, scale, 1.0)[..., None], 0.0)
    return torch.bucketize(x, (code[1:] + code[:-1]) / 2)


def quantize_flat(w: torch.Tensor, cfg: NfConfig) -> NfState:
    """Two-level NF-b quantization of a flat vector (see the module docstring)."""
    w = w.reshape(-1).float()
    blocks = _blocks(w, cfg.B0)
    s1 = blocks.abs().amax(dim=1)
    offset = s1.min()
    c0, s2, scale = _first_level(s1 - offset, offset, cfg)
    codes = _nearest_codes(blocks, scale, cfg.bits).reshape(-1)[: w.numel()]
    return NfState(codes, c0, s2, offset.reshape(()))


def dequantize_flat(codes: torch.Tensor, scale: torch.Tensor, cfg: NfConfig) -> torch.Tensor:
    """``w_hat[i] = nf_code(b)[code[i]] * scale[i // B0]`` (fp32, flat)."""
    n = codes.numel()
    values = _nf_code(cfg.bits).to(scale.device)[codes]
    return (_blocks(values, cfg.B0) * scale[:, None]).reshape(-1)[:n]


def fake_quantize(m: torch.Tensor, cfg: NfConfig) -> torch.Tensor:
    """``deq(quant(m))`` with the same numbers as the packed module's ``dequantize()``."""
    state = quantize_flat(m.reshape(-1), cfg)
    scale = block_scales(state.scale_codes, state.scale2, state.offset, cfg)
    return dequantize_flat(state.codes, scale, cfg).view_as(m)


def config_errors(m: torch.Tensor, configs: list[NfConfig], fisher: torch.Tensor | None = None,
                  chunk_elements: int = 1 << 23) -> list[float]:
    """``||m - fake_quantize(m, c)||_F^2`` (Fisher-weighted when given) for every config ``c``,
    batched over configs that share ``B0`` and ``bits`` (the same numbers as :func:`fake_quantize`)."""
    flat = m.reshape(-1).float()
    weights = fisher.reshape(-1).float() if fisher is not None else None
    out = [0.0] * len(configs)
    for B0 in sorted({c.B0 for c in configs}):
        blocks = _blocks(flat, B0)
        wblocks = _blocks(weights, B0) if weights is not None else None
        s1 = blocks.abs().amax(dim=1)
        offset = s1.min()
        scales: dict[tuple[int, str, int], torch.Tensor] = {}
        for bits in sorted({c.bits for c in configs if c.B0 == B0}):
            code = _nf_code(bits).to(flat.device)
            chosen = [i for i, c in enumerate(configs) if c.B0 == B0 and c.bits == bits]
            step = max(1, chunk_elements // blocks.numel())
            for start in range(0, len(chosen), step):
                part = chosen[start:start + step]
                for i in part:
                    c = configs[i]
                    if (c.b0, c.b1, c.B1) not in scales:
                        scales[(c.b0, c.b1, c.B1)] = _first_level(s1 - offset, offset, c)[2]
                scale = torch.stack([scales[(configs[i].b0, configs[i].b1, configs[i].B1)] for i in part])
                deq = code[_nearest_codes(blocks[None], scale, bits)] * scale[..., None]
                sq = (blocks[None] - deq).square()
                if wblocks is not None:
                    sq = sq * wblocks[None]
                for i, e in zip(part, sq.sum(dim=(1, 2), dtype=torch.float64).tolist()):
                    out[i] = e
    return out


# --------------------------------------------------------------------------- LQ decomposition


def svd_k(a: torch.Tensor, k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``L1 = U_k sqrt(S_k)`` (``out x k``), ``L2 = sqrt(S_k) V_k^T`` (``k x in``); zero-padded to ``k``
    when ``a`` has fewer singular values."""
    out_f, in_f = a.shape
    l1, l2 = a.new_zeros(out_f, k), a.new_zeros(k, in_f)
    kk = min(k, out_f, in_f)
    if kk == 0:
        return l1, l2
    if min(out_f, in_f) <= EXACT_SVD_MAX or kk + OVERSAMPLING >= min(out_f, in_f):
        u, s, vh = torch.linalg.svd(a, full_matrices=False)
    else:  # randomized range finder (Halko et al.) with a fixed seed
        g = torch.Generator(device=a.device).manual_seed(seed)
        omega = torch.randn(in_f, kk + OVERSAMPLING, generator=g, device=a.device, dtype=a.dtype)
        y = a @ omega
        for _ in range(2):
            y = a @ (a.T @ torch.linalg.qr(y).Q)
        q = torch.linalg.qr(y).Q
        ub, s, vh = torch.linalg.svd(q.T @ a, full_matrices=False)
        u = q @ ub
    root = s[:kk].clamp_min(0).sqrt()
    l1[:, :kk] = u[:, :kk] * root
    l2[:kk] = root[:, None] * vh[:kk]
    return l1, l2


def fisher_weights(fisher: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``D_r = sqrt(mean_j F)``, ``D_c = sqrt(mean_i F)``, floored at ``FISHER_FLOOR`` of their mean
    (rows the calibration never reached would otherwise divide by zero when unscaling)."""
    rows, cols = fisher.float().mean(dim=1).sqrt(), fisher.float().mean(dim=0).sqrt()
    if not rows.max() > 0:  # no information at all: unweighted
        return torch.ones_like(rows), torch.ones_like(cols)
    return rows.clamp_min(FISHER_FLOOR * rows.mean()), cols.clamp_min(FISHER_FLOOR * cols.mean())


def low_rank(a: torch.Tensor, k: int, weights: tuple[torch.Tensor, torch.Tensor] | None = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """``SVD_k(a)``, or with row/column weights ``SVD_k(D_r a D_c)`` unscaled: ``L1 / D_r``, ``L2 / D_c``."""
    if weights is None:
        return svd_k(a, k)
    rows, cols = weights
    l1, l2 = svd_k(rows[:, None] * a * cols[None, :], k)
    return l1 / rows[:, None], l2 / cols[None, :]


def weighted_error(residual: torch.Tensor, fisher: torch.Tensor | None = None) -> float:
    """``||R||_F^2``, or ``||sqrt(F) * R||_F^2`` with Fisher information ``F``."""
    if fisher is None:
        return float(residual.double().square().sum())
    return float((fisher.double() * residual.double().square()).sum())


class Decomposition(NamedTuple):
    l1: torch.Tensor  # out x k
    l2: torch.Tensor  # k x in
    q: torch.Tensor  # deq(Q), out x in fp32
    payload: Any  # what ``quant`` returned beside deq(Q) (the quantized module)
    error: float  # ||W - Q - L1 L2||_F^2 (Fisher-weighted when given)
    iterations: int


def lq_decompose(w: torch.Tensor, k: int, quant: Callable[[torch.Tensor], tuple[torch.Tensor, Any]],
                 iters: int = 100, fisher: torch.Tensor | None = None) -> Decomposition:
    """``W ~= Q + L1 L2`` by alternating ``SVD_k`` and quantization (see the module docstring).

    ``quant(M)`` returns ``(deq(quant(M)), payload)`` with ``deq`` as ``out x in`` fp32.
    """
    w = w.float()
    weights = fisher_weights(fisher) if fisher is not None else None
    q = torch.zeros_like(w)
    best: Decomposition | None = None
    for t in range(max(1, iters)):
        l1, l2 = low_rank(w - q, k, weights)
        lowrank = l1 @ l2
        q_new, payload = quant(w - lowrank)
        err = weighted_error(w - q_new.float() - lowrank, fisher)
        if best is not None and not err < best.error:
            break
        best = Decomposition(l1, l2, q_new.float(), payload, err, t + 1)
        q = best.q
    assert best is not None
    return best

