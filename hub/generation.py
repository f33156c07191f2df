"""Text generation for a batch of requests that each use their own adapter, with continuous batching.

:class:`GenerationEngine` keeps a running batch whose key/value cache is left padded
(:class:`adapterhub.kv_batch.KVBatch`). Each :meth:`~GenerationEngine.step`:

1. admits waiting requests (first come, first served) while fewer than ``max_batch`` run and the distinct
   adapters of the batch fit the pool's ``max_resident``; their prompts are prefilled together in one
   forward (left padded, attention mask, explicit position ids), which gives each its first token, and their
   cache rows are merged into the running batch;
2. decodes one token for every running request in one forward;
3. drops the rows of requests that finished (length, stop token, cancelled, error).

Before every forward ``pool.set_batch`` is given the adapter of each row, so rows with different adapters
(or none) share the base model's matmuls. A stop token (``eos_id`` or one of the request's ``stop_ids``) ends
the request and is not part of ``output_ids``. Greedy when ``temperature`` is 0; otherwise sampled with a
``torch.Generator`` seeded per request (:mod:`adapterhub.sampling`).

``submit`` and ``cancel`` may be called from any thread; ``step`` holds :attr:`GenerationEngine.lock`, which a
server takes to add or remove adapters between steps.
"""

from __future__ import annotations

import inspect
import itertools
import random
import threading
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from adapterhub.registry import AdapterhubError

from .kv_batch import KVBatch, left_pad, positions_of
from .sampling import next_tokens

if TYPE_CHECKING:
    from .adapter_pool import AdapterPool

FINISH_REASONS = ("length", "stop", "error", "cancelled")


@dataclass(eq=False)
class Request:
    """One generation request; ``output_ids`` grows as it runs, ``done`` is set when it finished."""

    id: str
    prompt_ids: list[int]
    adapter: str | None
    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop_ids: frozenset[int] = frozenset()
    output_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "length" | "stop" | "error" | "cancelled"
    error: str | None = None
    done: threading.Event = field(default_factory=threading.Event, repr=False)
    _generator: torch.Generator | None = field(default=None, repr=False)
    _cancelled: bool = field(default=False, repr=False)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the request finished (or ``timeout`` seconds passed); whether it finished."""
        return self.done.wait(timeout)


def _finish(req: Request, reason: str, error: str | None = None) -> bool:
    """Mark ``req`` finished (once); whether this call finished it."""
    if req.done.is_set():
        return False
    req.finish_reason, req.error = reason, error
    req.done.set()
    return True


def _model_max_len(model: nn.Module) -> int | None:
    cfg = getattr(model, "config", None)
    if cfg is None:
        return None
    get = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    return getattr(get, "max_position_embeddings", None) or getattr(get, "n_positions", None)


def _error_text(exc: BaseException) -> str:
    return str(exc) if isinstance(exc, AdapterhubError) else f"{type(exc).__name__}: {exc}"


class GenerationEngine:
    """Continuous batching of generation requests over ``model`` with per-row adapters from ``pool``."""

    def __init__(self, model: nn.Module, pool: AdapterPool | None = None, *, max_batch: int = 32,
                 max_seq_len: int | None = None, eos_id: int | None = None):
        if max_batch < 1:
            raise AdapterhubError(f"max_batch must be >= 1, got {max_batch}")
        from .models import is_causal_lm

        if is_causal_lm(model) is False:
            raise AdapterhubError(f"generation needs a causal language model (a ...ForCausalLM / LMHeadModel); "
                                  f"{type(model).__name__} is not one")
        self.model = model
        self.pool = pool
        self.max_batch = max_batch
        self.max_seq_len = max_seq_len if max_seq_len is not None else _model_max_len(model)
        self.eos_id = eos_id
        cfg = getattr(model, "config", None)
        text_cfg = cfg.get_text_config() if cfg is not None and hasattr(cfg, "get_text_config") else cfg
        self.vocab_size: int | None = getattr(text_cfg, "vocab_size", None)
        self.device = next(model.parameters()).device
        self._keep_last = "logits_to_keep" in inspect.signature(model.forward).parameters
        self.lock = threading.RLock()
        self._queue_lock = threading.Lock()
        self._waiting: deque[Request] = deque()
        self._running: list[Request] = []
        self._batch: KVBatch | None = None
        self._last: torch.Tensor | None = None  # each running row's newest token, not yet in the cache
        self._ids = itertools.count(1)

    # ------------------------------------------------------------------ requests

    def submit(self, prompt_ids: Iterable[int], *, adapter: str | None = None, max_new_tokens: int = 16,
               temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
               stop_ids: Iterable[int] = (), request_id: str | None = None) -> Request:
        """Queue a request (thread-safe); it starts at the next :meth:`step`. Invalid input: AdapterhubError."""
        prompt = self._check_prompt(prompt_ids)
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise AdapterhubError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        if self.max_seq_len is not None and len(prompt) + max_new_tokens > self.max_seq_len:
            raise AdapterhubError(f"prompt ({len(prompt)} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
                                  f"model's maximum sequence length {self.max_seq_len}")
        if not isinstance(temperature, (int, float)) or not temperature >= 0:
            raise AdapterhubError(f"temperature must be >= 0, got {temperature!r}")
        if not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
            raise AdapterhubError(f"top_p must be in (0, 1], got {top_p!r}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise AdapterhubError(f"seed must be an integer, got {seed!r}")
        stops = frozenset(stop_ids)
        if not all(isinstance(s, int) and not isinstance(s, bool) for s in stops):
            raise AdapterhubError(f"stop_ids must be token ids (integers), got {sorted(map(repr, stops))}")
        self._check_adapter(adapter)
        req = Request(request_id or f"req-{next(self._ids)}", prompt, adapter, max_new_tokens, float(temperature),
                      float(top_p), seed, stops)
        if req.temperature > 0:
            req._generator = torch.Generator().manual_seed(seed if seed is not None else random.getrandbits(63))
        with self._queue_lock:
            self._waiting.append(req)
        return req

    def _check_prompt(self, prompt_ids: Iterable[int]) -> list[int]:
        if isinstance(prompt_ids, (str, bytes)):
            raise AdapterhubError("prompt_ids must be a list of token ids, not text (encode it first)")
        try:
            prompt = list(prompt_ids)
        except TypeError:
            raise AdapterhubError(f"prompt_ids must be a list of token ids, got {type(prompt_ids).__name__}") from None
        if not prompt:
            raise AdapterhubError("the prompt is empty: give at least one token")
        bad = [t for t in prompt if isinstance(t, bool) or not isinstance(t, int)
               or t < 0 or (self.vocab_size is not None and t >= self.vocab_size)]
        if bad:
            raise AdapterhubError(f"prompt token ids must be integers in [0, {self.vocab_size}); got {bad[:5]!r}")
        return prompt

    def _check_adapter(self, adapter: str | None) -> None:
        if adapter is None:
            return
        if self.pool is None:
            raise AdapterhubError(f"adapter '{adapter}' requested but this engine has no adapter pool")
        if adapter not in self.pool:
            known = self.pool.names()
            listed = ", ".join(known[:10]) + (f", ... ({len(known)} in all)" if len(known) > 10 else "")
            raise AdapterhubError(f"unknown adapter '{adapter}' (loaded: {listed or 'none'})")

    def cancel(self, request: Request) -> None:
        """Stop ``request``: a waiting one finishes now, a running one at the start of the next step."""
        request._cancelled = True
        with self._queue_lock:
            if request in self._waiting:
                self._waiting.remove(request)
                _finish(request, "cancelled")

    def has_work(self) -> bool:
        with self._queue_lock:
            return bool(self._waiting or self._running)

    def run_until_done(self) -> None:
        while self.has_work():
            self.step()

    # ------------------------------------------------------------------ the loop

    def step(self) -> list[Request]:
        """Admit and prefill waiting requests, decode one token for every running one; the requests that
        finished during this step."""
        with self.lock:
            finished: list[Request] = []
            for req in self._running:
                if req._cancelled and _finish(req, "cancelled"):
                    finished.append(req)
                elif req.adapter is not None and (self.pool is None or req.adapter not in self.pool):
                    if _finish(req, "error", f"adapter '{req.adapter}' was removed while the request ran"):
                        finished.append(req)
            self._retire()
            admitted = self._admit(finished)
            if admitted:
                self._prefill(admitted, finished)
            if self._running:
                self._decode(finished)
            self._retire()
            return finished

    def _admit(self, finished: list[Request]) -> list[Request]:
        """Pop waiting requests that fit (batch size, resident adapters), in arrival order."""
        limit = getattr(self.pool, "max_resident", None)
        adapters = {r.adapter for r in self._running if r.adapter is not None}
        admitted: list[Request] = []
        with self._queue_lock:
            while self._waiting and len(self._running) + len(admitted) < self.max_batch:
                req = self._waiting[0]
                if req._cancelled or (req.adapter is not None and (self.pool is None or req.adapter not in self.pool)):
                    self._waiting.popleft()
                    done = (_finish(req, "cancelled") if req._cancelled else
                            _finish(req, "error", f"adapter '{req.adapter}' was removed before the request started"))
                    if done:
                        finished.append(req)
                    continue
                if limit is not None and req.adapter is not None and req.adapter not in adapters:
                    if len(adapters) >= limit:
                        break  # wait until rows using other adapters finish
                    adapters.add(req.adapter)
                admitted.append(self._waiting.popleft())
        return admitted

    def _forward(self, adapters: Sequence[str | None], **inputs: Any) -> Any:
        with torch.no_grad():
            if self.pool is None:
                return self.model(use_cache=True, **inputs)
            with self.pool.batch(list(adapters)):
                return self.model(use_cache=True, **inputs)

    def _prefill(self, new: list[Request], finished: list[Request]) -> None:
        ids, mask = left_pad([r.prompt_ids for r in new])
        ids, mask = ids.to(self.device), mask.to(self.device)
        extra = {"logits_to_keep": 1} if self._keep_last else {}
        try:
            out = self._forward([r.adapter for r in new], input_ids=ids, attention_mask=mask,
                                position_ids=positions_of(mask), **extra)
        except Exception as exc:  # a failed forward ends these requests, not the engine
            text = _error_text(exc)
            finished.extend(r for r in new if _finish(r, "error", text))
            return
        tokens = next_tokens(out.logits[:, -1], new, [r._generator for r in new])
        batch = KVBatch(out.past_key_values, mask)
        keep = [i for i, (req, tok) in enumerate(zip(new, tokens)) if not self._append(req, tok, finished)]
        if not keep:
            return
        if len(keep) < len(new):
            batch.select(keep)
        last = torch.tensor([tokens[i] for i in keep], dtype=torch.long, device=self.device)
        if self._batch is None:
            self._batch, self._last = batch, last
        else:
            assert self._last is not None
            self._batch.merge(batch)
            self._last = torch.cat([self._last, last])
        self._running.extend(new[i] for i in keep)

    def _decode(self, finished: list[Request]) -> None:
        assert self._batch is not None and self._last is not None
        inputs = self._batch.decode_inputs(self._last)
        try:
            out = self._forward([r.adapter for r in self._running], **inputs)
        except Exception as exc:
            text = _error_text(exc)
            finished.extend(r for r in self._running if _finish(r, "error", text))
            self._running, self._batch, self._last = [], None, None
            return
        self._batch.advanced(out.past_key_values)
        tokens = next_tokens(out.logits[:, -1], self._running, [r._generator for r in self._running])
        for req, tok in zip(self._running, tokens):
            self._append(req, tok, finished)
        self._last = torch.tensor(tokens, dtype=torch.long, device=self.device)

    def _append(self, req: Request, token: int, finished: list[Request]) -> bool:
        """Record ``token`` for ``req``; whether ``req`` is now finished."""
        if req._cancelled:
            reason = "cancelled"
        elif token == self.eos_id or token in req.stop_ids:
            reason = "stop"
        else:
            req.output_ids.append(token)
            if len(req.output_ids) < req.max_new_tokens:
                return False
            reason = "length"
        if _finish(req, reason):
            finished.append(req)
        return True

    def _retire(self) -> None:
        """Drop the rows of finished requests from the running batch."""
        keep = [i for i, r in enumerate(self._running) if not r.done.is_set()]
        if len(keep) == len(self._running):
            return
        if not keep:
            self._running, self._batch, self._last = [], None, None
            return
        assert self._batch is not None and self._last is not None
        self._batch.select(keep)
        self._last = self._last[torch.as_tensor(keep, device=self._last.device)]
        self._running = [self._running[i] for i in keep]


def generate(model: nn.Module, prompts: list[list[int]], adapters: list[str | None], *,
             pool: AdapterPool | None = None, max_new_tokens: int = 16, temperature: float = 0.0,
             seed: int | None = None, eos_id: int | None = None) -> list[list[int]]:
    """Generate for every prompt with its adapter (None: the base model), all in one mixed batch.

    Prompt ``i`` samples with seed ``seed + i`` when ``seed`` is given. Returns the new token ids of each prompt
    (a stop token ends a prompt's output and is not included).
    """
    if len(prompts) != len(adapters):
        raise AdapterhubError(f"{len(prompts)} prompts but {len(adapters)} adapters: give one adapter (or None) "
                              "per prompt")
    engine = GenerationEngine(model, pool, max_batch=max(1, len(prompts)), eos_id=eos_id)
    requests = [engine.submit(p, adapter=a, max_new_tokens=max_new_tokens, temperature=temperature,
                              seed=None if seed is None else seed + i)
                for i, (p, a) in enumerate(zip(prompts, adapters))]
    engine.run_until_done()
    for req in requests:
        if req.finish_reason == "error":
            raise AdapterhubError(f"generation failed for prompt {requests.index(req)}: {req.error}")
    return [req.output_ids for req in requests]
