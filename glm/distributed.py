"""Process groups for tensor- and data-parallel inference, rank-0 I/O, and the few collectives the front ends
need. World size 1 (no launcher) is the plain path: no process group, and every helper here passes its input
through.

A job of `world = data-parallel x tensor-parallel` processes is started by torchrun or the DeepSpeed launcher
(RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT; OMPI_COMM_WORLD_* under MPI). Ranks
`d*tp .. d*tp + tp-1` hold replica d of the model (consecutive ranks, so a replica stays on one node); the
ranks with the same tensor-parallel rank form a data-parallel group. Collectives inside a replica run on gloo
(CPU) or NCCL (CUDA, one device per local rank) with a timeout; Python objects (queries, results) go over
gloo groups that wait longer, because they wait for a person typing or for a slower replica. Only rank 0
prints (other ranks' stdout goes to /dev/null), reads stdin and writes files.

The first rank to fail posts its error to the job's store (`stop_job`; `session` does it for any error),
and every other rank, polling the store, exits with it: no rank is left waiting in a collective (NCCL
notices a lost peer only at the timeout).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime
import os
import pickle
import sys
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

DEFAULT_TIMEOUT_S = 600.0
# Waits for a person typing a query, or for a data-parallel replica that is slower on its share.
PATIENT_TIMEOUT = datetime.timedelta(days=7)
FAILURE_POLL_S = 0.5  # how often each rank looks for another rank's failure in the job's store

T = TypeVar("T")


@dataclass(frozen=True)
class Parallel:
    """This process's place in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    tensor_parallel_size: int = 1
    timeout_s: float = DEFAULT_TIMEOUT_S
    tensor_group: Any = None  # collectives inside this model replica
    data_group: Any = None  # objects among the ranks of this tensor-parallel rank (gloo)
    object_group: Any = None  # objects over the whole job (gloo)
    replica_object_group: Any = None  # objects inside this model replica (gloo)

    @property
    def data_parallel_size(self) -> int:
        return self.world_size // self.tensor_parallel_size

    @property
    def tensor_rank(self) -> int:
        return self.rank % self.tensor_parallel_size

    @property
    def data_rank(self) -> int:
        return self.rank // self.tensor_parallel_size

    @property
    def tensor_leader(self) -> int:
        """The global rank of tensor-parallel rank 0 of this replica."""
        return self.data_rank * self.tensor_parallel_size

    @property
    def is_main(self) -> bool:
        return self.rank == 0


_current = Parallel()


def current() -> Parallel:
    """The job set up by `initialize` (a single process before that)."""
    return _current


def is_main() -> bool:
    return _current.is_main


def launcher_env(environ: dict[str, str] | None = None) -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun / the DeepSpeed launcher, or MPI; (0, 1, 0) without."""
    env = os.environ if environ is None else environ
    for prefix in ("", "OMPI_COMM_WORLD_"):
        size = prefix + ("WORLD_SIZE" if not prefix else "SIZE")
        if size in env:
            try:
                rank, world = int(env[prefix + "RANK"]), int(env[size])
                local = int(env.get(prefix + "LOCAL_RANK", rank))
            except (KeyError, ValueError):
                raise ValueError(f"{prefix}RANK and {size} must both be set to integers") from None
            if not 0 <= rank < world:
                raise ValueError(f"rank {rank} is not in a world of {world} processes")
            return rank, world, local
    return 0, 1, 0


def resolve_sizes(world_size: int, tensor_parallel: int | None, data_parallel: int | None) -> tuple[int, int]:
    """(tensor-parallel size, data-parallel size): the one not given is the world size divided by the other;
    neither given is one replica over the whole world."""
    if tensor_parallel is None and data_parallel is None:
        data_parallel = 1
    for name, value in (("--tensor-parallel-size", tensor_parallel), ("--data-parallel-size", data_parallel)):
        if value is not None and (value < 1 or world_size % value):
            raise ValueError(
                f"{name} {value} must divide the world size {world_size} (the processes launched): start "
                f"them with torchrun --nproc-per-node {value} or MP_SIZE={value} bash scripts/..."
            )
    tensor_parallel = tensor_parallel or world_size // data_parallel
    data_parallel = data_parallel or world_size // tensor_parallel
    if tensor_parallel * data_parallel != world_size:
        raise ValueError(
            f"data-parallel {data_parallel} x tensor-parallel {tensor_parallel} is not the world size "
            f"{world_size}: launch {tensor_parallel * data_parallel} processes or change the sizes"
        )
    return tensor_parallel, data_parallel


def initialize(
    tensor_parallel_size: int | None = None,
    data_parallel_size: int | None = None,
    device: str | torch.device = "cpu",
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> Parallel:
    """Join the job the launcher started (a no-op in a single process) and build its groups."""
    global _current, _failures
    rank, world, local_rank = launcher_env()
    tp, _ = resolve_sizes(world, tensor_parallel_size, data_parallel_size)
    if world == 1:
        _current = Parallel(timeout_s=timeout_s)
        return _current
    if "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
        raise ValueError("MASTER_ADDR and MASTER_PORT must be set (torchrun and deepspeed set them)")
    cuda = torch.cuda.is_available() if str(device) == "auto" else torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.set_device(local_rank)
    timeout = datetime.timedelta(seconds=timeout_s)
    if not dist.is_initialized():
        # NCCL: device_id binds the communicators to this rank's GPU at once (not guessed at the first
        # collective); the timeout is the NCCL watchdog's too
        options = {"device_id": torch.device("cuda", local_rank)} if cuda else {}
        backend = "nccl" if cuda else "gloo"
        dist.init_process_group(backend, rank=rank, world_size=world, timeout=timeout, **options)
    # Every rank creates every group, in the same order (torch.distributed requires it).
    replicas = [list(range(d * tp, (d + 1) * tp)) for d in range(world // tp)]
    tensor_groups = [dist.new_group(ranks, timeout=timeout) for ranks in replicas]
    data_groups = [
        dist.new_group(list(range(t, world, tp)), backend="gloo", timeout=PATIENT_TIMEOUT) for t in range(tp)
    ]
    object_group = dist.new_group(list(range(world)), backend="gloo", timeout=PATIENT_TIMEOUT)
    replica_object_groups = [dist.new_group(ranks, backend="gloo", timeout=timeout) for ranks in replicas]
    _current = Parallel(
        rank,
        world,
        local_rank,
        tp,
        timeout_s,
        tensor_groups[rank // tp],
        data_groups[rank % tp],
        object_group,
        replica_object_groups[rank // tp],
    )
    if _failures is None:
        _failures = FailureWatch(rank, timeout)
    if rank != 0:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - for the life of the process
    return _current


def shutdown() -> None:
    global _current, _failures
    if _failures is not None:
        _failures.stop()
        _failures = None
    if dist.is_initialized():
        dist.destroy_process_group()
    _current = Parallel()


class FailureWatch:
    """This rank's line to the job's store (the launcher's, at MASTER_ADDR:MASTER_PORT): `post` records
    a failure (the first posted wins), and a thread ends this process when another rank has posted one."""

    def __init__(self, rank: int, timeout: datetime.timedelta) -> None:
        self.rank = rank
        # per launch attempt: torchrun restarts a job on the same store
        self.key = f"glm/failed/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
        # a connection of its own: the process group's may be busy in a long wait
        host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
        self.store = dist.TCPStore(host, port, is_master=False, timeout=timeout)
        self._stopped = threading.Event()
        threading.Thread(target=self._watch, name="glm-failure-watch", daemon=True).start()

    def post(self, reason: str) -> None:
        with contextlib.suppress(Exception):  # the store is gone: so is rank 0, and the job is ending
            self.store.compare_set(self.key, "", f"{self.rank}\n{reason}")

    def stop(self) -> None:
        self._stopped.set()

    def _watch(self) -> None:
        while not self._stopped.wait(FAILURE_POLL_S):
            try:
                if not self.store.check([self.key]):
                    continue
                rank, reason = self.store.get(self.key).decode().split("\n", 1)
            except Exception:  # the store went away (rank 0 ended): there is nothing more to hear
                return
            if int(rank) != self.rank and not self._stopped.is_set():
                message = f"error: {rank_prefix()}rank {rank} failed, so the job stops: {reason}"
                print(message, file=sys.stderr, flush=True)
                os._exit(1)  # the main thread may be waiting in a collective that will never complete
            return


_failures: FailureWatch | None = None


def stop_job(reason: str) -> None:
    """Make every other rank of the job exit with `reason` (the first reason any rank gives wins); this
    rank goes on and ends itself. A no-op in a single process."""
    if _failures is not None:
        _failures.post(reason)


def compute_device(requested: str | torch.device) -> torch.device:
    """`cuda` means this rank's own GPU (its local rank) in a multi-process job."""
    device = torch.device(requested)
    if device.type == "cuda" and device.index is None and _current.world_size > 1:
        return torch.device("cuda", _current.local_rank)
    return device


# ------------------------------------------------------------------------------------------ command lines


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _is_communication_error(error: BaseException) -> bool:
    base = getattr(dist, "DistError", ())
    text = str(error).lower()
    words = ("gloo", "nccl", "connection closed", "connection reset", "timed out")
    return isinstance(error, base) or any(word in text for word in words)


def _reason(error: BaseException) -> str:
    if isinstance(error, SystemExit):
        return f"it exited with status {error.code}"
    if isinstance(error, KeyboardInterrupt):
        return "it was interrupted"
    return f"{type(error).__name__}: {_first_line(error)}"


def rank_prefix() -> str:
    """'[rank r] ' for error messages of a rank other than 0 in a multi-process job."""
    return f"[rank {_current.rank}] " if _current.rank else ""


@contextlib.contextmanager
def session(args: argparse.Namespace) -> Iterator[Parallel]:
    """Set up the job for a command line (from its parallelism flags) and tear it down.

    A lost rank (it exited, or hung past the timeout) is one clear error and exit status 1 here, never a
    hang; the launcher then stops the remaining ranks.
    """
    parallel = initialize(
        getattr(args, "tensor_parallel_size", None),
        getattr(args, "data_parallel_size", 1),  # only the evaluator spreads samples over replicas
        getattr(args, "device", None) or "auto",
        getattr(args, "distributed_timeout", DEFAULT_TIMEOUT_S),
    )
    try:
        yield parallel
    except BaseException as error:
        if not (isinstance(error, SystemExit) and not error.code):
            stop_job(_reason(error))
        if parallel.world_size > 1 and _is_communication_error(error):
            print(
                f"error: {rank_prefix()}lost contact with another rank of the job (it exited, or did not "
                f"answer within {parallel.timeout_s:g} s; see its own output): {_first_line(error)}",
                file=sys.stderr,
                flush=True,
            )
            sys.stdout.flush()
            os._exit(1)  # a collective still pending in the background would block the interpreter's exit
        if isinstance(error, SystemExit) and not error.code:
            shutdown()
        raise
    shutdown()


# ---------------------------------------------------------------------------------------- rank-0 input


def broadcast_object(value: T, group: Any = None, src: int = 0) -> T:
    """Rank `src`'s value on every rank of the gloo `group` (default: the whole job).

    The receivers wait as long as their group lets them (a person typing); the sender waits at most the
    job's timeout for them to take it, so a hung receiver is an error, not a hang.
    """
    if _current.world_size == 1:
        return value
    group = _current.object_group if group is None else group
    timeout = datetime.timedelta(seconds=_current.timeout_s)
    size = torch.zeros(1, dtype=torch.long)
    if _current.rank == src:
        data = torch.frombuffer(bytearray(pickle.dumps(value)), dtype=torch.uint8)
        size[0] = data.numel()
        for tensor in (size, data):
            dist.broadcast(tensor, src=src, group=group, async_op=True).wait(timeout)
        return value
    dist.broadcast(size, src=src, group=group)
    data = torch.empty(int(size[0]), dtype=torch.uint8)
    dist.broadcast(data, src=src, group=group, async_op=True).wait(timeout)
    return pickle.loads(ctypes.string_at(data.data_ptr(), data.numel()))  # no numpy: not a dependency


def input_on_main(prompt: str) -> str:
    """input(prompt) at rank 0, the same line on every rank; EOFError on every rank at end of input."""
    line: str | None = None
    if _current.is_main:
        try:
            line = input(prompt)
        except EOFError:
            line = None
    line = broadcast_object(line)
    if line is None:
        raise EOFError
    return line


# -------------------------------------------------------------------------------- data-parallel evaluation


def data_parallel_share(items: Sequence[T]) -> list[T]:
    """This replica's items, as the original's DistributedSampler(shuffle=False) deals them: the list padded
    by repetition to a multiple of the replicas, then item i to replica i mod replicas."""
    replicas, rank = _current.data_parallel_size, _current.data_rank
    if replicas == 1 or not items:
        return list(items)
    padded = -(-len(items) // replicas) * replicas
    return [items[i % len(items)] for i in range(rank, padded, replicas)]


def gather_data_parallel(results: Sequence[T], total: int) -> list[T]:
    """Every replica's results for its `data_parallel_share`, in the original order, padding dropped."""
    replicas = _current.data_parallel_size
    if replicas == 1:
        return list(results)
    shares: list[Any] = [None] * replicas
    dist.all_gather_object(shares, list(results), group=_current.data_group)
    if total == 0:
        return []
    per_replica = -(-total // replicas)
    for rank, share in enumerate(shares):
        if len(share) != per_replica:
            raise RuntimeError(f"replica {rank} returned {len(share)} results for {per_replica} items")
    return [shares[i % replicas][i // replicas] for i in range(total)]


# ------------------------------------------------------------------------- one decision per decoding step


_FAILED = -1  # a step's done flag when rank 0's strategy raised


@dataclass(frozen=True)
class _Failure:
    """What rank 0 broadcasts in place of a result it failed to compute."""

    message: str


class SynchronizedStrategy:
    """A decoding strategy whose every step is decided by tensor-parallel rank 0 and broadcast to the rest.

    The all-gathered logits are identical on every rank, so identically seeded ranks would draw the same
    tokens anyway; broadcasting rank 0's choice (new last tokens, source beams, done flag: a few int64 per
    row) makes that hold even where random streams differ between devices, and keeps every rank's KV cache
    reordered the same way. Only rank 0 runs the wrapped strategy.
    """

    def __init__(self, strategy: Any, parallel: Parallel) -> None:
        self.strategy = strategy
        self.parallel = parallel
        self.num_beams = strategy.num_beams
        self.batch_size = strategy.batch_size
        self._done = False

    @property
    def is_done(self) -> bool:
        return self._done

    def _broadcast(self, tensor: Tensor) -> Tensor:
        dist.broadcast(tensor, src=self.parallel.tensor_leader, group=self.parallel.tensor_group)
        return tensor

    def forward(
        self, logits: Tensor, tokens: Tensor, *args: Any, **kwargs: Any
    ) -> tuple[Tensor, Tensor | None]:
        batch = logits.shape[0]
        beams = self.num_beams
        # [done, has_source, source (B*beams), last tokens (B*beams)]
        step = torch.empty(2 + 2 * batch * beams, dtype=torch.long, device=tokens.device)
        if self.parallel.tensor_rank == 0:
            try:
                new_tokens, source = self.strategy.forward(logits, tokens, *args, **kwargs)
                if new_tokens.shape[1] != beams:
                    raise RuntimeError(f"strategy returned {new_tokens.shape[1]} beams, expected {beams}")
            except Exception:  # the others wait for this step: they fail it too, and all stay in step
                step[0] = _FAILED
                self._broadcast(step)
                raise
            step[0], step[1] = int(self.strategy.is_done), int(source is not None)
            if source is not None:
                step[2 : 2 + batch * beams] = source.flatten()
            step[2 + batch * beams :] = new_tokens[:, :, -1].flatten()
            self._broadcast(step)
            self._done = bool(step[0])
            return new_tokens, source
        self._broadcast(step)
        if step[0] == _FAILED:
            raise RuntimeError("the strategy failed on tensor-parallel rank 0 (its log has the error)")
        self._done = bool(step[0])
        last = step[2 + batch * beams :].view(batch, beams, 1).to(tokens.dtype)
        if not step[1]:
            return torch.cat((tokens, last), dim=-1), None
        source = step[2 : 2 + batch * beams].view(batch, beams)
        rows = torch.arange(batch, device=tokens.device)[:, None]
        return torch.cat((tokens[rows, source], last), dim=-1), source

    def finalize(self, tokens: Tensor) -> list[list[list[int]]]:
        outputs: Any = None
        self._done = False
        if self.parallel.tensor_rank == 0:
            try:
                outputs = self.strategy.finalize(tokens)
            except Exception as error:
                broadcast_object(_Failure(_first_line(error)), *self._objects)
                raise
        outputs = broadcast_object(outputs, *self._objects)
        if isinstance(outputs, _Failure):
            raise RuntimeError(f"the strategy failed on tensor-parallel rank 0: {outputs.message}")
        return outputs

    @property
    def _objects(self) -> tuple[Any, int]:
        return self.parallel.replica_object_group, self.parallel.tensor_leader


def synchronized(strategy: T) -> T:
    """`strategy` made to agree across the tensor-parallel ranks (itself when there is one)."""
    if _current.tensor_parallel_size == 1 or isinstance(strategy, SynchronizedStrategy):
        return strategy
    return SynchronizedStrategy(strategy, _current)  # type: ignore[return-value]
