"""Training in several processes (``torchrun``): the process group, the rank context and DDP.

``torchrun --nproc_per_node W -m adapterhub train ...`` starts W processes with ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` set. :func:`setup` sees them and initialises the
default process group once per process (gloo on CPU; nccl when CUDA is available, each process on
``cuda:LOCAL_RANK``); it is destroyed when the process exits. A group the caller initialised itself is
used as is and left alone. Outside torchrun, :func:`setup` returns a one-process context whose every
method is the identity, so a single-process run takes exactly the code path it always took.

The data contract (:meth:`DistContext.shard`): with ``--batch-size B`` per process, every rank draws the
same global micro-batch of ``W*B`` rows that a one-process run with batch ``W*B`` draws, and rank ``k``
keeps rows ``[k*B, (k+1)*B)``. Rank k's loss ``L_k`` is the mean over its ``n_k`` label tokens; it is
back-propagated as ``L_k * W * n_k / N`` (``N = Σ n_k``, known on every rank from the global batch), so
DDP's gradient mean ``(1/W) Σ_k ∇(L_k W n_k / N) = ∇(Σ_k n_k L_k / N)`` is the gradient of the global
batch's token mean -- the one-process gradient, also when prompt masking gives ranks unequal counts.
Without dropout the trained adapters equal the one-process run's to fp32 rounding; with dropout each rank
draws its own masks (:meth:`DistContext.seed_step`), so the runs agree in distribution only.

Tied tensors (Tied-LoRA, VeRA) are one ``nn.Parameter`` shared by several layers; :meth:`DistContext.wrap`
must run after ``apply`` (which ties them), so DDP registers that Parameter once and reduces its summed
gradient once. Frozen base weights are not broadcast (every rank loads the same base); the trainable
tensors are broadcast from rank 0 when DDP wraps the model.
"""

from __future__ import annotations

import atexit
import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import nn

from adapterhub.registry import AdapterhubError

IGNORE = -100
T = TypeVar("T")
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def torchrun_env() -> tuple[int, int, int] | None:
    """``(rank, world, local_rank)`` from torchrun's environment, or None outside torchrun."""
    if not all(k in os.environ for k in TORCHRUN_ENV):
        return None
    try:
        rank, world, local = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    except ValueError:
        raise AdapterhubError("RANK, WORLD_SIZE and LOCAL_RANK must be integers (as torchrun sets them), got "
                              f"{os.environ['RANK']!r}, {os.environ['WORLD_SIZE']!r}, "
                              f"{os.environ['LOCAL_RANK']!r}") from None
    if world < 1 or not 0 <= rank < world or local < 0:
        raise AdapterhubError(f"inconsistent torchrun environment: RANK={rank}, WORLD_SIZE={world}, "
                              f"LOCAL_RANK={local}")
    return rank, world, local


def is_main_process() -> bool:
    """True on rank 0 and outside torchrun (usable before :func:`setup`: it reads the group or ``RANK``)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    env = torchrun_env()
    return env is None or env[0] == 0


@dataclass
class DistContext:
    """Where this process stands: ``rank`` of ``world``; ``device`` to train on (None: where the model is)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        """True under a process group with more than one process."""
        return self.world > 1

    def barrier(self) -> None:
        """Wait until every rank gets here."""
        if self.enabled:
            import torch.distributed as dist

            dist.barrier()

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        """Element-wise sum of ``values`` over the ranks (float64)."""
        if not self.enabled:
            return list(values)
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64, device=self._comm_device())
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.tolist()

    def mean(self, value: float) -> float:
        """The mean of ``value`` over the ranks."""
        return self.all_reduce_sum([value])[0] / self.world

    def broadcast_str(self, text: str | None) -> str | None:
        """Rank 0's ``text`` on every rank (sent as UTF-8 bytes in a tensor; nothing is pickled)."""
        if not self.enabled:
            return text
        import torch.distributed as dist

        dev = self._comm_device()
        raw = b"" if text is None else text.encode("utf-8")
        size = torch.tensor([len(raw) if text is not None else -1], dtype=torch.long, device=dev)
        dist.broadcast(size, src=0)
        n = int(size.item())
        buf = torch.zeros(max(n, 0), dtype=torch.uint8, device=dev)
        if self.is_main and n > 0:
            buf.copy_(torch.frombuffer(bytearray(raw), dtype=torch.uint8))
        if n > 0:
            dist.broadcast(buf, src=0)
        return None if n < 0 else bytes(buf.cpu().tolist()).decode("utf-8")

    def seed_step(self, seed: int, step: int) -> None:
        """Several processes: reseed torch's RNG (dropout) from ``(seed, step, rank)``, so the ranks draw
        different masks and a resumed run draws the same ones. One process: nothing (its stream is checkpointed).

        With dropout the masks of ``W`` processes of ``B`` rows cannot be those of one process of ``W*B`` rows,
        so such a run equals the one-process run in distribution, not bit for bit (no dropout: to fp32 rounding).
        """
        if self.enabled:
            torch.manual_seed(((seed * 1_000_003 + step) * 65_537 + self.rank) % (1 << 63))

    def shard(self, ids: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
        """This rank's rows of a global micro-batch and the factor its mean loss is scaled by (module doc).

        ``labels`` is ``[rows, seq]`` for a causal LM (token ``t`` predicts label ``t+1``, so the count skips
        column 0) or ``[rows]`` (one label per row). One process: the batch as is and 1.0.
        """
        if not self.enabled:
            return ids, labels, 1.0
        rows = len(ids)
        if rows % self.world:
            raise AdapterhubError(f"a global batch of {rows} rows does not split over {self.world} processes")
        b = rows // self.world
        mine = slice(self.rank * b, (self.rank + 1) * b)
        counted = labels[:, 1:] if labels.dim() > 1 else labels
        total = int((counted != IGNORE).sum())
        n = int((counted[mine] != IGNORE).sum())
        ids_k, labels_k = ids[mine], labels[mine]
        if total == 0:
            return ids_k, labels_k, 1.0  # no label anywhere: the loss is undefined, as in one process
        if n == 0:  # this rank has no label: a finite dummy loss with weight 0 keeps DDP's reduction in step
            return ids_k, ids_k.clone() if labels.dim() > 1 else torch.zeros_like(labels_k), 0.0
        return ids_k, labels_k, self.world * n / total

    def no_sync(self, net: nn.Module, sync: bool) -> contextlib.AbstractContextManager[None]:
        """``net.no_sync()`` unless ``sync`` (the last micro-batch of an accumulated step) or one process."""
        if sync or not self.enabled or not hasattr(net, "no_sync"):
            return contextlib.nullcontext()
        return net.no_sync()

    def wrap(self, module: nn.Module) -> nn.Module:
        """``module`` in ``DistributedDataParallel`` (after ``apply`` and any tying), or as is in one process.

        Only the trainable tensors are registered with DDP: frozen parameters and buffers are listed as
        ``_ddp_params_and_buffers_to_ignore``, so they are neither broadcast nor reduced.
        """
        if not self.enabled:
            return module
        from torch.nn.parallel import DistributedDataParallel

        frozen = [n for n, p in module.named_parameters() if not p.requires_grad]
        if not any(p.requires_grad for p in module.parameters()):
            raise AdapterhubError("nothing to train: the spec leaves every parameter frozen")
        frozen += [n for n, _ in module.named_buffers()]
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, frozen)
        ids = [self.device.index] if self.device is not None and self.device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=ids)  # buffers are ignored: never synced

    def _comm_device(self) -> torch.device:
        return self.device if self.device is not None and self.device.type == "cuda" else torch.device("cpu")


def setup() -> DistContext:
    """The context of this process; under torchrun, initialise the process group first (once)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        env = torchrun_env()
        local = env[2] if env is not None else 0
        return DistContext(rank, world, local, _device(dist.get_backend(), local))
    env = torchrun_env()
    if env is None:
        return DistContext()
    if not dist.is_available():
        raise AdapterhubError("started by torchrun, but this torch build has no torch.distributed")
    rank, world, local = env
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        if local >= torch.cuda.device_count():
            raise AdapterhubError(f"LOCAL_RANK {local} but only {torch.cuda.device_count()} CUDA device(s); "
                                  "start at most one process per GPU (--nproc_per_node)")
        torch.cuda.set_device(local)
    dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world)
    atexit.register(teardown)
    return DistContext(rank, world, local, _device(backend, local))


def teardown() -> None:
    """Destroy the default process group if it is still up (registered with ``atexit`` by :func:`setup`)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _device(backend: str, local: int) -> torch.device | None:
    return torch.device("cuda", local) if backend == "nccl" else None


def on_main(ctx: DistContext, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T | None:
    """``fn(*args, **kwargs)`` on rank 0 only (writes a user keeps); every rank then waits at a barrier.
    Other ranks get None. If rank 0 fails, it raises and torchrun stops the others."""
    result = fn(*args, **kwargs) if ctx.is_main else None
    ctx.barrier()
    return result
