"""Choosing the next token from logits: greedy, or temperature + nucleus (top-p) sampling.

Sampling draws from ``softmax(logits / temperature)`` restricted to the smallest set of most likely tokens
whose probabilities sum to at least ``top_p`` (renormalised), with the request's own ``torch.Generator``, so
a seeded request draws the same tokens whatever other rows share its batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch


class Sampled(Protocol):
    temperature: float
    top_p: float


def sample_one(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> int:
    """One token id drawn from the 1-D ``logits`` (see the module docstring)."""
    probs = torch.softmax(logits.detach().float().cpu() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        before = sorted_probs.cumsum(-1) - sorted_probs  # mass of the tokens ranked above each one
        keep = before < top_p                               # always keeps the most likely token
        sorted_probs = torch.where(keep, sorted_probs, torch.zeros_like(sorted_probs))
        probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
    return int(torch.multinomial(probs / probs.sum(), 1, generator=generator))


def next_tokens(logits: torch.Tensor, requests: Sequence[Sampled],
                generators: Sequence[torch.Generator | None]) -> list[int]:
    """Next token of every row of ``logits`` ``[B, V]``: argmax where temperature is 0, else sampled."""
    chosen = logits.argmax(dim=-1).tolist()
    for row, (req, gen) in enumerate(zip(requests, generators)):
        if req.temperature > 0:
            assert gen is not None
            chosen[row] = sample_one(logits[row], req.temperature, req.top_p, gen)
    return chosen
