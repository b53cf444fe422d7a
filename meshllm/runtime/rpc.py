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


def worker_layers(layers: int, shares: Sequence[float]) -> int:
    """The repeating layers a host without a GPU offloads to its workers: their part of
    the model's `layers` (`shares`: the host's, then each worker's), one at least."""
    part = sum(shares[1:]) / (sum(shares) or 1.0)
    return min(layers, max(1, round(layers * part)))


def split_args(
    worker_ports: Sequence[int],
    shares: Sequence[float],
    *,
    host_gpus: int = 0,
    layers: int | None = None,
) -> list[str]:
    """llama-server flags that give each worker's RPC server (reached on a local port,
    a tunnel to that worker) and the host its share of the model's layers.

    `shares`: the host's, then each worker's. llama-server lists the RPC servers
    first among its devices, then the host's `host_gpus` GPUs, which split the host's
    share evenly; every layer is offloaded. A host without a GPU has no device of its
    own: the layers it keeps are the ones not offloaded, so `--n-gpu-layers` is the
    workers' part of the model's `layers`, plus the output layer, which llama-server
    counts as one more (it offloads from the last layer down)."""
    if not worker_ports or len(shares) != len(worker_ports) + 1:
        raise ValueError("a split needs at least one worker, and one share per member")
    servers = ",".join(f"{LOOPBACK}:{port}" for port in worker_ports)
    host, workers = shares[0], list(shares[1:])
    if host_gpus > 0:
        devices, offloaded = [*workers, *[host / host_gpus] * host_gpus], 999
    else:
        offloaded = 999 if layers is None else worker_layers(layers, shares) + 1
        devices = workers
    split = ",".join(f"{share:.4f}" for share in devices)
    return ["--rpc", servers, "--n-gpu-layers", str(offloaded), "--tensor-split", split]
