"""Several processes, one run: PyTorch's own distributed runtime, as ``torchrun`` or
``accelerate launch`` start it (both set ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``).

Data parallel, the way DDP does it, without wrapping the model: every rank builds the same
model and adapters (same seed), each optimizer step's *global* batch (``--batch-size`` ×
processes rows, bucketed by length exactly as one process would) is cut into one slice per
rank, and before the step the gradients of the trainable parameters are averaged with one
``all_reduce`` (:meth:`Parallel.reduce`). Each rank's loss is weighted by its share of the
batch's loss units (rows, or labelled tokens for language models), so the averaged gradient is
the gradient of the global batch's mean loss, the same as one process with the whole batch
(up to float summation order). Adapters are small: one flat all-reduce per step moves a few
MB, where DDP's per-bucket reduction during backward would overlap little; and the model stays
an ordinary ``nn.Module`` whose forward hooks (answer-only head, prefix cache) keep working.

``--fsdp`` shards each transformer block with FSDP2 (:func:`shard_blocks`); FSDP reduces
those blocks' gradients itself (averaged), the rest (embeddings, head) takes the all-reduce.

Only rank 0 touches the run folder; other ranks get what it reads (the plan, a checkpoint)
through :func:`broadcast_bytes`. Nothing here unpickles: objects travel as JSON bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from leantune.core.errors import LeantuneError

IGNORE = -100
MESSAGE_BYTES = 2048


@dataclass(frozen=True)
class World:
    """This process's place among the run's processes (one process: rank 0 of 1)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0: the one process that writes."""
        return self.rank == 0

    @property
    def parallel(self) -> bool:
        return self.size > 1


def launched() -> bool:
    """Started by torchrun / accelerate launch (the environment names a rank and a world)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def launch_rank() -> int:
    """The rank the launcher gave this process (0 without a launcher), before joining."""
    return int(os.environ.get("RANK", "0")) if launched() else 0


def speaks(error: BaseException | None = None) -> bool:
    """Whether this process prints: rank 0, or any rank for an error only it may report."""
    return launch_rank() == 0 or bool(getattr(error, "every_rank", False))


def current() -> World:
    """The process group this process has joined, or a world of one."""
    if not (dist.is_available() and dist.is_initialized()):
        return World()
    return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def join(use_cuda: bool, timeout_s: float) -> World:
    """Join the process group the launcher describes: NCCL on CUDA, gloo on CPU. A collective
    that waits longer than ``timeout_s`` (a rank died or hangs) fails instead of waiting for
    ever. Without a launcher, or when joined already, nothing happens."""
    if not launched() or (dist.is_available() and dist.is_initialized()):
        return current()
    if not dist.is_available():
        raise LeantuneError("this PyTorch build has no torch.distributed; run one process")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local)
    try:
        dist.init_process_group(
            "nccl" if use_cuda else "gloo", timeout=timedelta(seconds=timeout_s)
        )
    except (RuntimeError, ValueError) as e:
        raise LeantuneError(
            f"could not join the other processes ({str(e).splitlines()[0]}); check the "
            "launcher's --rdzv-endpoint / MASTER_ADDR and MASTER_PORT"
        ) from None
    return current()


def leave(together: bool = True) -> None:
    """Leave the process group. ``together`` (after a run that ended well on every rank): wait
    for the others first, so no rank tears its connections down while a peer still uses them
    (gloo can abort the process at exit otherwise)."""
    if dist.is_available() and dist.is_initialized():
        if together:
            dist.barrier()
        dist.destroy_process_group()


def collective_device() -> torch.device:
    """Where collectives run: the rank's GPU under NCCL, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# ---------------------------------------------------------------------------- agreement


def broadcast_bytes(data: bytes | None) -> bytes:
    """Rank 0's ``data`` on every rank (other ranks pass None)."""
    world = current()
    if not world.parallel:
        return data or b""
    device = collective_device()
    size = torch.tensor([len(data or b"")], dtype=torch.long, device=device)
    dist.broadcast(size, 0)
    buffer = torch.zeros(int(size.item()), dtype=torch.uint8, device=device)
    if world.main and data:
        buffer.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
    dist.broadcast(buffer, 0)
    return bytes(buffer.cpu().numpy().tobytes())


def broadcast_json(value: Any) -> Any:
    """Rank 0's JSON-able ``value`` on every rank."""
    text = json.dumps(value).encode() if current().main else None
    return json.loads(broadcast_bytes(text).decode())


def _gather_messages(message: str) -> list[str]:
    device = collective_device()
    raw = message.encode()[:MESSAGE_BYTES]
    mine = torch.zeros(MESSAGE_BYTES + 1, dtype=torch.uint8, device=device)
    if raw:
        mine[0] = 1
        mine[1 : len(raw) + 1] = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
    every = [torch.zeros_like(mine) for _ in range(current().size)]
    dist.all_gather(every, mine)
    return [
        bytes(t[1:].cpu().numpy().tobytes()).rstrip(b"\0").decode(errors="replace") if t[0] else ""
        for t in every
    ]


def together(step: Callable[[], Any], what: str) -> Any:
    """Run ``step`` on every rank; when it fails on any rank, every rank stops with that
    rank's one line (a lone failing rank would leave the others waiting in a collective)."""
    world = current()
    if not world.parallel:
        return step()
    result, message = None, ""
    error: Exception | None = None
    try:
        result = step()
    except LeantuneError as e:
        error, message = e, str(e)
    except Exception as e:  # said by every rank, raised on its own
        error, message = e, f"{type(e).__name__}: {e}"
    messages = _gather_messages(message)
    failed = [(r, m) for r, m in enumerate(messages) if m]
    if not failed:
        return result
    if error is not None and not isinstance(error, LeantuneError):
        raise error
    rank, line = failed[0]
    raise LeantuneError(line if rank == world.rank else f"rank {rank} stopped in {what}: {line}")


def agree(value: Any, what: str) -> None:
    """Stop every rank, before training, when the ranks see different ``value`` (the data's
    fingerprint, the options): they were not started with the same command and files."""
    world = current()
    if not world.parallel:
        return
    digest = hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).digest()
    device = collective_device()
    mine = torch.frombuffer(bytearray(digest), dtype=torch.uint8).to(device)
    every = [torch.zeros_like(mine) for _ in range(world.size)]
    dist.all_gather(every, mine)
    odd = [r for r, t in enumerate(every) if not torch.equal(t, every[0])]
    if odd:
        raise LeantuneError(
            f"the processes of this run disagree on {what} (rank {odd[0]} differs from rank 0); "
            "start every process with the same command, options and data files"
        )


def gather_tensors(tensor: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's ``tensor`` (same shape and dtype on every rank), on every rank."""
    world = current()
    if not world.parallel:
        return [tensor]
    device = collective_device()
    every = [torch.zeros_like(tensor, device=device) for _ in range(world.size)]
    dist.all_gather(every, tensor.to(device))
    return [t.cpu() for t in every]


# ---------------------------------------------------------------------------- the step


def loss_units(batch: Mapping[str, torch.Tensor]) -> int:
    """What the batch's loss averages over: rows, or for token labels the labelled tokens
    that are predicted (transformers shifts causal labels by one)."""
    labels = batch["labels"]
    if labels.dim() == 1:
        return len(labels)
    return int((labels[:, 1:] != IGNORE).sum())


def rank_slice(rows: int, world: World) -> tuple[int, int]:
    """This rank's contiguous share of ``rows``: sizes differ by at most one."""
    base, extra = divmod(rows, world.size)
    start = world.rank * base + min(world.rank, extra)
    return start, start + base + (1 if world.rank < extra else 0)


class Parallel:
    """The data-parallel side of the training loop (:mod:`leantune.train.loop`): which part
    of each global batch this rank computes, with what weight, and the gradient average."""

    def __init__(self, world: World) -> None:
        self.world = world

    def split(self, batch: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], float]:
        """This rank's rows of ``batch`` and the weight of their mean loss: the rank's share
        of the batch's loss units × processes (gradients are averaged). A rank left without
        rows computes the batch's first row at weight 0: every rank takes part in each step."""
        rows = len(batch["labels"])
        start, end = rank_slice(rows, self.world)
        if start == end:
            return {k: v[:1] for k, v in batch.items()}, 0.0
        mine = {k: v[start:end] for k, v in batch.items()}
        total = loss_units(batch)
        return mine, (loss_units(mine) * self.world.size / total if total else 0.0)

    def reduce(self, params: Sequence[nn.Parameter], sums: Sequence[float]) -> list[float]:
        """Average the gradients of ``params`` over the ranks (in place; those FSDP reduces
        itself are left alone) and sum ``sums`` (losses, flags); returns the sums. A gradient
        no rank has stays None, as it would in one process."""
        local = [p for p in params if not is_dtensor(p)]
        device = collective_device()
        grads = [
            p.grad.detach().reshape(-1).float().to(device)
            if p.grad is not None
            else torch.zeros(p.numel(), device=device)
            for p in local
        ]
        flags = [float(p.grad is not None) for p in local]
        flat = torch.cat([*grads, torch.tensor(flags + list(sums), device=device)])
        dist.all_reduce(flat)
        offset, given = 0, flat[sum(g.numel() for g in grads) :]
        for i, p in enumerate(local):
            n = p.numel()
            if given[i] > 0:
                grad = (flat[offset : offset + n] / self.world.size).view_as(p)
                p.grad = grad.to(p.device, p.dtype)
            offset += n
        return given[len(local) :].tolist()


def is_dtensor(t: torch.Tensor) -> bool:
    """A parameter FSDP2 shards (a DTensor): FSDP reduces its gradient."""
    return type(t).__name__ == "DTensor" or type(getattr(t, "data", None)).__name__ == "DTensor"


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor, detached: a sharded one gathered from every rank (a collective)."""
    t = t.detach()
    return t.full_tensor() if is_dtensor(t) else t  # type: ignore[attr-defined]


def like(full: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``full`` laid out as ``target``: sharded the same way when ``target`` is sharded."""
    if not is_dtensor(target):
        return full.to(target.device, target.dtype)
    from torch.distributed.tensor import distribute_tensor

    spec: Any = target
    return distribute_tensor(
        full.to(spec.device_mesh.device_type).to(target.dtype), spec.device_mesh, spec.placements
    )


def clip_gradients(params: Sequence[nn.Parameter], max_norm: float) -> float:
    """Clip the gradients' total norm to ``max_norm`` and return the norm before clipping:
    ``torch.nn.utils.clip_grad_norm_``, which also takes a mix of FSDP-sharded gradients (their
    squares summed over the ranks) and whole ones (the same on every rank)."""
    grads = [p.grad for p in params if p.grad is not None]
    sharded = [g for g in grads if is_dtensor(g)]
    if not sharded:
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    device = collective_device()
    squares = torch.zeros((), dtype=torch.float64, device=device)
    for g in sharded:
        squares += g.to_local().detach().double().pow(2).sum().to(device)  # type: ignore[attr-defined]
    dist.all_reduce(squares)
    for g in grads:
        if not is_dtensor(g):
            squares += g.detach().double().pow(2).sum().to(device)
    norm = float(squares.sqrt())
    coef = min(max_norm / (norm + 1e-6), 1.0)
    if coef < 1.0:
        for g in grads:
            g.mul_(coef)
    return norm


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a transformer: the largest list of modules of one class."""
    best: list[nn.Module] = []
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len({type(m) for m in module}) == 1:
            size = sum(p.numel() for p in module.parameters())
            if size > sum(p.numel() for b in best for p in b.parameters()):
                best = list(module)
    return best


def shard_blocks(model: nn.Module) -> list[nn.Module]:
    """FSDP2 (``fully_shard``) on each transformer block, frozen weights and adapters alike:
    a block's weights are gathered for its forward and backward and freed after; its trainable
    gradients are reduce-scattered (averaged). Embeddings and the head stay whole on every
    rank (their gradients take :meth:`Parallel.reduce`); the model stays the same class of
    module, so the forward passes that call its body directly keep working."""
    if not current().parallel and not launched():
        raise LeantuneError(
            "--fsdp shards the model over the processes torchrun starts; run under torchrun "
            "or accelerate launch (or drop --fsdp)"
        )
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    blocks = transformer_blocks(model)
    if not blocks:
        raise LeantuneError("--fsdp found no transformer blocks (a list of layers) to shard")
    device = next(model.parameters()).device
    mesh = init_device_mesh(device.type, (current().size,))
    for block in blocks:
        fully_shard(block, mesh=mesh)
    return blocks


def settle(model: nn.Module) -> None:
    """Put every FSDP-sharded module of ``model`` back in its sharded state. Each sharded
    block is its own FSDP root, and a root keeps its whole weights after a forward (for the
    backward that usually follows): after an evaluation the model's parameters would be those
    temporary whole tensors, not the sharded ones the optimizer and checkpoints hold."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


@contextmanager
def whole(blocks: Sequence[nn.Module]) -> Iterator[None]:
    """Inside: every sharded parameter of ``blocks`` is replaced by a plain copy of the whole
    tensor (gathered: a collective), so code that reads the model (counting or saving the
    adapter) sees ordinary tensors; after: the sharded parameters are back, untouched."""
    swapped: list[tuple[nn.Module, str, nn.Parameter]] = []
    for block in blocks:
        settle(block)
    try:
        for block in blocks:
            for module in block.modules():
                for name, param in list(module._parameters.items()):
                    if param is not None and is_dtensor(param):
                        swapped.append((module, name, param))
                        whole_param = nn.Parameter(full_tensor(param), param.requires_grad)
                        module._parameters[name] = whole_param
        yield
    finally:
        for module, name, param in swapped:
            module._parameters[name] = param


class LostContact(LeantuneError):
    """A collective failed: another process of the run died, hangs or cannot be reached.
    Every surviving rank says it (rank 0 may be the one that died)."""

    every_rank = True


def lost_contact(error: Exception, run: Any) -> LostContact:
    first = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
    return LostContact(
        f"rank {current().rank}: another process of this run stopped or cannot be reached "
        f"({first}); nothing half-written is kept: the last checkpoint in {run} stands. "
        "Start the same command again with --resume"
    )
