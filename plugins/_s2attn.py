"""Shifted sparse attention (S²-Attn) of LongLoRA (Chen et al. 2023, arXiv 2309.12307, section 3.2).

``q, k, v``: ``batch x heads x N x head_dim`` (keys/values already repeated to the query heads). The
``N`` tokens are split into groups of ``G`` (``N`` divisible by ``G``); every head attends causally
inside its group only:

- heads ``[0, H//2)``: groups ``[0, G), [G, 2G), ...``;
- heads ``[H//2, H)`` (the shifted half): groups ``[0, G/2), [G/2, 3G/2), ..., [N - G/2, N)``.

The paper's non-flash code realises the shift with ``roll(-G/2)`` on q, k, v and ``roll(+G/2)`` on the
output, which wraps the last ``G/2`` tokens into the first group, so early tokens attend to late ones
(a causal leak). Here the shifted half uses the boundaries of the paper's flash-attn kernel (extra
``cu_seqlens`` at ``G/2`` offsets): the first and last half groups are separate groups of ``G/2``
tokens, and no token ever attends to a later one. With ``G = N`` there is one group and nothing to
exchange between groups, so no head is shifted: S²-Attn is then exactly full causal attention (as is
``shift=False`` with any ``G`` equal to ``N``).

An optional ``mask`` (``batch x 1|heads x N x N``, bool ``True`` = attend, or additive float) is cut
into the same diagonal blocks and then replaces the plain causal mask (it must itself be causal:
transformers' causal masks with padding are).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from adapterhub.registry import AdapterhubError


def _attend_groups(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, groups: int,
                   scale: float | None) -> torch.Tensor:
    """Causal attention inside each of ``groups`` equal consecutive groups of the tokens of ``q, k, v``.

    Returns ``batch x heads x tokens x head_dim``. Without a mask the groups are folded into the head
    dimension (a 4-d causal SDPA call: torch's fused kernels keep memory linear in N).
    """
    b, h, n, _ = q.shape
    size = n // groups

    def fold(x: torch.Tensor) -> torch.Tensor:
        return x.reshape(b, h * groups, size, x.shape[-1])

    if mask is None:
        out = F.scaled_dot_product_attention(fold(q), fold(k), fold(v), is_causal=True, scale=scale)
        return out.reshape(b, h, n, -1)
    index = torch.arange(n, device=q.device).view(groups, size)
    block = mask[:, :, index[:, :, None], index[:, None, :]]  # batch x 1|h x groups x size x size
    split = [x.reshape(b, h, groups, size, x.shape[-1]) for x in (q, k, v)]
    return F.scaled_dot_product_attention(*split, attn_mask=block, scale=scale).reshape(b, h, n, -1)


def _check(n: int, group_size: int) -> None:
    if group_size <= 0 or n % group_size:
        raise AdapterhubError(f"S²-Attn: the sequence length {n} must be divisible by the group size {group_size} "
                              "(pad or cut the sequences, or change longlora's group_ratio)")
    if group_size % 2:
        raise AdapterhubError(f"S²-Attn: the group size must be even to shift by half a group, got {group_size}")


def s2_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group_size: int | None = None, *,
                 mask: torch.Tensor | None = None, scale: float | None = None, shift: bool = True) -> torch.Tensor:
    """S²-Attn of ``q, k, v`` (``batch x heads x N x head_dim``), ``group_size`` ``G`` (default ``N/4``).

    Returns ``batch x heads x N x head_dim``. ``shift=False`` leaves every head unshifted.
    """
    if q.dim() != 4 or k.shape != q.shape or v.shape[:3] != q.shape[:3]:
        raise AdapterhubError(f"S²-Attn expects q, k, v of shape batch x heads x N x head_dim with equal heads, got "
                              f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    b, h, n, _ = q.shape
    g = n // 4 if group_size is None else int(group_size)
    _check(n, g)
    if mask is not None and mask.shape[-2:] != (n, n):
        raise AdapterhubError(f"S²-Attn: the mask must be {n} x {n} over the last two dims, got {tuple(mask.shape)}")
    half = h // 2 if shift and g < n else h
    if half == h:
        return _attend_groups(q, k, v, mask, n // g, scale)
    # split (not slice) so that backward concatenates gradients instead of zero-filling full tensors
    (q0, q1), (k0, k1), (v0, v1) = (x.split([half, h - half], dim=1) for x in (q, k, v))
    m0 = m1 = mask
    if mask is not None and mask.shape[1] != 1:
        m0, m1 = mask.split([half, h - half], dim=1)
    out0 = _attend_groups(q0, k0, v0, m0, n // g, scale) if half else None
    s = g // 2
    sizes = [s, n - g, s] if n > g else [s, s]  # [0, G/2) | [G/2, 3G/2) ... [N - 3G/2, N - G/2) | [N - G/2, N)
    pieces, at = [], 0
    for qs, ks, vs, size in zip(q1.split(sizes, 2), k1.split(sizes, 2), v1.split(sizes, 2), sizes):
        ms = m1[..., at:at + size, at:at + size] if m1 is not None else None
        pieces.append(_attend_groups(qs, ks, vs, ms, 1 if size == s else size // g, scale))
        at += size
    out1 = torch.cat(pieces, dim=2)
    return out1 if out0 is None else torch.cat([out0, out1], dim=1)
