"""meshllm's benchmark harness: one command, figures as JSON and PNG, a table to quote.

Run from the repository root:

    .venv/bin/python -m bench              # every section below, ~3-4 minutes
    .venv/bin/python -m bench --quick      # smoke run, ~40 s
    .venv/bin/python -m bench proxy        # one section
    bench/run [ARGS]                       # the same, with the venv's python

Sections (`all` runs them in this order):

    proxy        one node: through the node vs direct to llama-server
    remote       lite client -> tunnel -> host vs direct (and vs the host's API)
    tunnel       tunnel bulk throughput vs a raw aioquic stream, same QUIC config
    convergence  N = 2, 4, 8 real nodes: agreement after a join and after a kill -9
    probes       simulated probe/gossip traffic, detection and join at N = 10..100
    traffic      gossip and probe bytes per node: N = 2, 4, 8 real nodes (endpoint
                 counters) next to the simulation; then simulated N = 100..1000
    split        tensor split of a realistic-shape model (~835 MB, generated): over
                 the QUIC tunnel vs llama.cpp's RPC over TCP vs solo; loads, bulk
    router       two replicas vs one behind a lite client; 200 streaming clients
                 for 60 s: errors, time to first token, memory, open files
    versions     this tree's node vs another tree's (not in `all`; --base-repo)

Each section starts the real nodes it needs (`meshllm up` in a temp home, on
the demo model; `tunnel` runs the tunnel code in two processes of its own,
`probes` the in-process simulation), measures side by side in one interleaved
run, always stops them, writes `bench/results/SECTION.json` (machine info,
timestamps, every figure and ratio) and `bench/results/SECTION.png` (tracked
files: a run replaces the committed figures; `--results DIR` writes elsewhere),
and prints a markdown table that the README quotes. Timings are ratios or differences between paths
measured in the same run, never absolute numbers from different runs: the
machines are small and shared.

Sections live in `bench/sections.py`; the load generator is `bench/httpclient.py`,
a minimal asyncio HTTP/1.1 keep-alive client used identically for every path.
"""
