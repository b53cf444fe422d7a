"""Which node serves which model (sans-I/O).

`election` holds the spec's auto-assignment priorities, the per-model
election groups and the fit rule (size x 1.1 within the memory budget);
`memory` measures that budget (NVML, a share of RAM, or `--max-vram`).
See docs/design.md, "Placement".
"""
