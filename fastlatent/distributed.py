"""Data parallelism over ``torch.distributed`` with results that do not depend on the
number of processes.

One process is the default and needs no launcher: every helper here is then the identity
(or a no-op). Under ``torchrun`` (``RANK``/``WORLD_SIZE`` in the environment) the CLI
calls :func:`init` once; from then on the helpers talk to the other processes.

Global semantics (what the training loops build on):
- every rank holds the whole global batch (the same seeded shuffle); its share is the
  batch's micro-batches dealt round-robin (:func:`deal`), so each micro-batch is computed
  exactly as one process would compute it;
- losses are scaled by global counts (tokens, prompts) before backward, so the gradients
  of all ranks are **summed** (:func:`all_reduce_gradients`) once per optimiser step and
  every rank applies the same update to the same weights;
- what a whole batch decides (the GRPO advantage pool, the logged values, whether a
  signal stops the run) is gathered or reduced so every rank sees the same numbers.

The engine calls the model's submodules directly, not a wrapper's ``forward``, so DDP's
forward-driven bucketing does not apply; the gradients are all-reduced in flat buckets
after accumulation instead (what DDP does under ``no_sync`` for gradient accumulation).
Only rank 0 writes files (:func:`is_main`).
"""

from __future__ import annotations

import datetime as _dt
import os
from collections.abc import Iterable, Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")

FAILURE_KEY = "fastlatent/failure"
BUCKET_BYTES = 64 * 2**20


def launched() -> bool:
    """Whether a launcher (``torchrun``) started this process as one of several."""
    return "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def init(device: str, timeout_minutes: float) -> torch.device:
    """Join the process group torchrun set up (NCCL for CUDA, gloo for the CPU); returns
    this rank's device (``cuda:LOCAL_RANK`` for ``auto``/``cuda``)."""
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device}: CUDA is not available on this machine")
        if ":" in device:
            raise ValueError(f"--device {device}: under torchrun each process takes the GPU "
                             "of its LOCAL_RANK; pass --device cuda or auto")
        if local >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK {local} but only {torch.cuda.device_count()} GPUs "
                             "are visible; lower --nproc-per-node")
        chosen = torch.device("cuda", local)
        torch.cuda.set_device(chosen)
    else:
        chosen = torch.device("cpu")
    dist.init_process_group("nccl" if use_cuda else "gloo",
                            timeout=_dt.timedelta(minutes=timeout_minutes),
                            device_id=chosen if use_cuda else None)
    return chosen


def backend() -> str | None:
    return dist.get_backend() if active() else None


def close() -> None:
    """Leave the process group (on every exit path)."""
    if active():
        dist.destroy_process_group()


def deal(items: Sequence[T]) -> list[tuple[int, T]]:
    """This rank's share of ``items`` as (index, item): items r, r + W, r + 2W, ... for
    rank r of W (all of them in one process)."""
    return [(i, items[i]) for i in range(rank(), len(items), world_size())]


def rounds(n: int) -> int:
    """How many of ``n`` dealt items the busiest rank holds: the number of loop rounds
    every rank runs when a collective sits inside the loop."""
    return -(-n // world_size())


def all_reduce_gradients(params: Iterable[torch.nn.Parameter]) -> None:
    """Sum every parameter's gradient over the ranks (a missing gradient counts as zero),
    in flat buckets of at most 64 MiB per dtype."""
    if not active():
        return
    params = [p for p in params if p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for p in params:
        by_dtype.setdefault(p.grad.dtype, []).append(p.grad)
    for grads in by_dtype.values():
        bucket: list[torch.Tensor] = []
        size = 0
        for g in grads:
            bucket.append(g)
            size += g.numel() * g.element_size()
            if size >= BUCKET_BYTES:
                _reduce_bucket(bucket)
                bucket, size = [], 0
        if bucket:
            _reduce_bucket(bucket)


def _reduce_bucket(grads: list[torch.Tensor]) -> None:
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    for g, part in zip(grads, flat.split([g.numel() for g in grads]), strict=True):
        g.copy_(part.view_as(g))


def sum_floats(*values: float) -> list[float]:
    """Each value summed over the ranks (float64)."""
    if not active():
        return [float(v) for v in values]
    t = torch.tensor(values, dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t)
    return t.tolist()


def gather_dealt(local: dict[int, T]) -> dict[int, T]:
    """The union of every rank's ``{index: value}`` (picklable values, e.g. CPU tensors or
    prediction rows), the same on every rank."""
    if not active():
        return dict(local)
    parts: list[Any] = [None] * world_size()
    dist.all_gather_object(parts, local)
    merged: dict[int, T] = {}
    for part in parts:
        merged.update(part)
    return merged


def agreed_signal(local: int | None) -> int | None:
    """A stop signal any rank received (the largest number), so all ranks stop after the
    same step."""
    if not active():
        return local
    t = torch.tensor([local or 0], dtype=torch.int64, device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item()) or None


def broadcast(value: T) -> T:
    """Rank 0's ``value`` on every rank."""
    if not active():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def broadcast_parameters(module: torch.nn.Module) -> None:
    """Rank 0's weights and buffers on every rank (as DDP does when it wraps a model)."""
    if not active():
        return
    with torch.no_grad():
        for t in [*module.parameters(), *module.buffers()]:
            dist.broadcast(t.data, src=0)


def barrier() -> None:
    if active():
        dist.barrier()


def _comm_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if backend() == "nccl" \
        else torch.device("cpu")


def _store():
    try:
        return dist.distributed_c10d._get_default_store()
    except (AttributeError, RuntimeError, ValueError):
        return None


def report_failure(message: str) -> None:
    """Leave this rank's error where the other ranks can read it (the launcher's
    rendezvous store), so rank 0's run.json names the rank that failed and why."""
    store = _store() if active() else None
    if store is None:
        return
    try:
        if not store.check([FAILURE_KEY]):
            store.set(FAILURE_KEY, f"rank {rank()}: {message}")
    except (RuntimeError, OSError):
        pass


def failure_elsewhere() -> str | None:
    """The message another rank left with :func:`report_failure`, if any."""
    store = _store() if active() else None
    if store is None:
        return None
    try:
        if store.check([FAILURE_KEY]):
            return store.get(FAILURE_KEY).decode("utf-8", "replace")
    except (RuntimeError, OSError):
        return None
    return None
