"""torchrun whose single-node stores listen on loopback only: ``python -m captioning.torchrun ARGS``.

torchrun's agent hosts two TCP stores (the c10d rendezvous and the workers' store) and
``TCPStore`` listens on every interface (``::``) whatever host it is given: during single-node
training anyone who can reach the machine could join or corrupt the job (the stores have no
authentication). This module is ``torch.distributed.run`` with one change: a store that the agent
hosts for a loopback host (``127.0.0.1``, ``::1``, ``localhost``) is handed a socket bound to
127.0.0.1 (``TCPStore(master_listen_fd=...)``). ``loopback_args`` is the single-node command line
that uses it:

    python -m captioning.torchrun --nproc-per-node=2 --nnodes=1 --rdzv-backend=c10d \\
        --rdzv-endpoint=127.0.0.1:0 --local-addr=127.0.0.1 -m captioning.train ...

(``--standalone`` would pick ``localhost:0`` and then give the workers the machine's FQDN to meet
at.) With a loopback ``--local-addr`` the collectives' own sockets stay on loopback too:
``GLOO_SOCKET_IFNAME`` and ``NCCL_SOCKET_IFNAME`` default to ``lo``. Multi-node runs, whose stores
must be reachable from the other nodes, pass through unchanged.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import sys
from collections.abc import Sequence
from typing import Any

LOOPBACK = "127.0.0.1"
LOOPBACK_IFNAME = "lo"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def loopback_args(nproc_per_node: int) -> list[str]:
    """torchrun flags for one node whose stores and collectives stay on 127.0.0.1 (a free port)."""
    return [
        f"--nproc-per-node={nproc_per_node}",
        "--nnodes=1",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint={LOOPBACK}:0",  # a free port: each run its own store, so no --rdzv-id is needed
        f"--local-addr={LOOPBACK}",
    ]


def _patch_tcp_store() -> None:
    """Make the stores the agent hosts on a loopback host listen on 127.0.0.1 only."""
    import torch.distributed as dist
    from torch.distributed.elastic.rendezvous import c10d_rendezvous_backend

    base = dist.TCPStore

    class LoopbackTCPStore(base):  # type: ignore[misc, valid-type]
        def __init__(self, host_name: str, port: int, *args: Any, **kwargs: Any) -> None:
            is_master = kwargs.get("is_master", args[1] if len(args) > 1 else False)
            if is_master and is_loopback(host_name) and kwargs.get("master_listen_fd") is None:
                listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    listener.bind((LOOPBACK, port))
                    listener.listen(socket.SOMAXCONN)
                except OSError as exc:
                    listener.close()
                    # Another agent on this machine hosts it (loopback "nodes"): the c10d backend then
                    # joins as a client, but only after a RuntimeError, as TCPStore itself would raise.
                    raise RuntimeError(f"cannot host the store on {LOOPBACK}:{port}: {exc}") from exc
                host_name, port = LOOPBACK, listener.getsockname()[1]
                kwargs["master_listen_fd"] = listener.detach()  # the store owns the socket from here
            super().__init__(host_name, port, *args, **kwargs)

    dist.TCPStore = LoopbackTCPStore  # type: ignore[misc]  # the workers' store (dynamic rendezvous)
    c10d_rendezvous_backend.TCPStore = LoopbackTCPStore  # type: ignore[misc]  # the rendezvous store


def host_rendezvous_store(host: str = LOOPBACK, port: int = 0) -> Any:
    """A c10d rendezvous store hosted by this process (the orchestrator's) rather than by a node's
    agent, so it outlives any node: agents started with ``--rdzv-conf=is_host=0`` meet there, and a
    node that dies and is replaced finds the rendezvous it left. On a loopback ``host`` it listens on
    127.0.0.1 only; else on every interface, as torchrun's own would. ``store.port`` is its port."""
    import torch.distributed as dist

    _patch_tcp_store()
    return dist.TCPStore(
        host, port, is_master=True, multi_tenant=True, wait_for_workers=False, use_libuv=True
    )


def _local_addr(argv: Sequence[str]) -> str | None:
    for i, arg in enumerate(argv):
        if arg == "-m" or not arg.startswith("-"):
            return None  # the training script and its own arguments
        if arg.startswith("--local-addr=") or arg.startswith("--local_addr="):
            return arg.split("=", 1)[1]
        if arg in ("--local-addr", "--local_addr") and i + 1 < len(argv):
            return argv[i + 1]
    return None


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    local = _local_addr(args)
    if local is not None and is_loopback(local):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", LOOPBACK_IFNAME)
        os.environ.setdefault("NCCL_SOCKET_IFNAME", LOOPBACK_IFNAME)
    _patch_tcp_store()
    from torch.distributed.run import main as torchrun_main

    torchrun_main(args)


if __name__ == "__main__":
    main()
