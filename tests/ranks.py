"""Run a function in N processes joined by a gloo process group on 127.0.0.1, as torchrun would start them."""

from __future__ import annotations

import multiprocessing.forkserver
import os
import socket
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.multiprocessing as mp

# Ranks are forked from a server that has imported these once; a spawned rank would import them again, which
# takes seconds each on a loaded 2-core machine (the first meta-device build pulls in torch._dynamo and
# sympy). The server itself runs no torch code, so forking it is safe.
PRELOAD = [
    "torch",
    "torch._dynamo",
    "torch._meta_registrations",
    "torch.fx.experimental.symbolic_shapes",
    "glm.loading",
    "glm.tensor_parallel",
    "glm.decoding.batch",
]
multiprocessing.forkserver.set_forkserver_preload(PRELOAD)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launcher_env(rank: int, world_size: int, port: int) -> dict[str, str]:
    return {
        "RANK": str(rank),
        "WORLD_SIZE": str(world_size),
        "LOCAL_RANK": str(rank),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
    }


def _entry(rank: int, fn: Callable[..., Any], world_size: int, port: int, args: tuple) -> None:
    os.environ.update(launcher_env(rank, world_size, port))
    torch.set_num_threads(1)
    fn(rank, *args)


def run_ranks(fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 120.0) -> None:
    """fn(rank, *args) in `world_size` spawned processes; a child's exception is re-raised here."""
    context = mp.start_processes(
        _entry,
        args=(fn, world_size, free_port(), args),
        nprocs=world_size,
        join=False,
        start_method="forkserver",
    )
    deadline = time.monotonic() + timeout
    while not context.join(timeout=1.0):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            raise TimeoutError(f"{world_size} ranks did not finish within {timeout} s")


def subprocess_env(**extra: str) -> dict[str, str]:
    """The environment for a child python: this interpreter's path, one thread per process."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(p for p in sys.path if p), **extra)
    return env
