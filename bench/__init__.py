"""meshllm's benchmark harness: one command, figures as JSON and PNG, a table to quote.

Run from the repository root:

    .venv/bin/python -m bench              # every section (today: proxy), ~2-3 minutes
    .venv/bin/python -m bench --quick      # smoke run, ~20 s
    .venv/bin/python -m bench proxy        # one section
    bench/run [ARGS]                       # the same, with the venv's python

Each section starts the real nodes it needs (`meshllm up` in a temp home, on
the demo model), measures side by side in one interleaved run, always stops
them, writes `bench/results/SECTION.json` (machine info, timestamps, every
figure and ratio) and `bench/results/SECTION.png`, and prints a markdown table
that the README quotes. Timings are ratios or differences between paths
measured in the same run, never absolute numbers from different runs: the
machines are small and shared.

Sections live in `bench/sections.py`; the load generator is `bench/httpclient.py`,
a minimal asyncio HTTP/1.1 keep-alive client used identically for every path.
"""
