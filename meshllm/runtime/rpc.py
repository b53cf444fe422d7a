"""llama.cpp's RPC server for tensor split: how a worker runs it and how a host uses it.

The RPC server has no authentication (its authors call it unsafe on any open
network), so a worker binds it to 127.0.0.1 only and reaches it from the
mesh through its Tunnel; `procutil.listening_addresses` is how that is
checked. `-c` keeps received tensors in a local cache, so loading the same
model again need not send the weights again. Host and workers must run the
same llama.cpp build: RPC refuses a mismatched one.

The ServerSupervisor runs these command lines; the Tunnel carries the connections.
"""

from __future__ import annotations

from collections.abc import Sequence

LOOPBACK = "127.0.0.1"


def rpc_server_command(binary: str, port: int, threads: int | None = None) -> list[str]:
    """A worker's RPC server: on loopback only, with the tensor cache (in `$LLAMA_CACHE`),
    on `threads` CPU threads (None: the RPC server's own default)."""
    command = [binary, "--host", LOOPBACK, "--port", str(port), "--cache"]
    return command if threads is None else [*command, "--threads", str(threads)]


def split_args(worker_ports: Sequence[int], shares: Sequence[float]) -> list[str]:
    """llama-server flags that offload every layer to its devices, the workers' RPC
    servers among them (reached on local ports, each a tunnel to one worker), in
    proportion to `shares`: one per device, in the order llama-server lists them."""
    if not worker_ports:
        raise ValueError("a split needs at least one worker")
    servers = ",".join(f"{LOOPBACK}:{port}" for port in worker_ports)
    split = ",".join(f"{share:.4f}" for share in shares)
    return ["--rpc", servers, "--n-gpu-layers", "999", "--tensor-split", split]
