"""Command line of the benchmark: `python -m bench [SECTION|all] [--quick]`."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from bench import __doc__ as BENCH_DOC
from bench.common import RESULTS_DIR, Context
from bench.sections import SECTIONS


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    sections = "\n".join(f"  {name:<10} {s.help}" for name, s in SECTIONS.items())
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description=(BENCH_DOC or "").strip(),
        epilog=f"sections:\n  {'all':<10} the sections below (unless marked), in order\n{sections}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "section",
        nargs="?",
        default="all",
        choices=["all", *SECTIONS],
        help="which section to run (default: all)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: fewer requests, shorter rounds",
    )
    parser.add_argument(
        "--results",
        type=Path,
        default=RESULTS_DIR,
        help=f"directory for the JSON and PNG files (default: {RESULTS_DIR})",
    )
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG plots")
    parser.add_argument(
        "--llama-threads",
        type=int,
        default=1,
        metavar="N",
        help="llama-server --threads for the benchmarked nodes (default: 1; 0 keeps llama-server's "
        "default, all cores, whose spinning worker threads make its CPU cost per request swing "
        "tenfold on a small shared machine)",
    )
    parser.add_argument(
        "--llama-threads-http",
        type=int,
        default=96,
        metavar="N",
        help="llama-server --threads-http for the benchmarked nodes (default: 96; 0 keeps "
        "llama-server's own default, about n_parallel + 2 = 6 threads, with which every idle "
        "keep-alive connection pins a thread and 8 or 32 concurrent connections stall for "
        "its 5 s keep-alive timeout, on the direct path and through the node alike)",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="record a py-spy flame graph of the proxy actor during the busiest round "
        "(needs `.venv/bin/pip install py-spy`)",
    )
    parser.add_argument(
        "--node-repo",
        type=Path,
        default=None,
        metavar="DIR",
        help="run the nodes from this meshllm source tree instead of this repository "
        "(to measure another version with the same harness)",
    )
    parser.add_argument(
        "--base-repo",
        type=Path,
        default=None,
        metavar="DIR",
        help="the `versions` section's base: a meshllm source tree (e.g. a git worktree "
        "of an older commit) whose node is measured side by side with this tree's",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    ctx = Context(
        quick=args.quick,
        results_dir=args.results,
        plot=not args.no_plot,
        profile=args.profile,
        llama_threads=args.llama_threads,
        llama_threads_http=args.llama_threads_http,
        node_repo=args.node_repo.resolve() if args.node_repo else None,
        base_repo=args.base_repo.resolve() if args.base_repo else None,
    )
    if args.section == "all":
        names = [name for name, s in SECTIONS.items() if s.in_all]
    else:
        names = [args.section]
    t0 = time.monotonic()
    for name in names:
        print(f"== {name} ==", file=sys.stderr, flush=True)
        text = SECTIONS[name].run(ctx)
        print(f"\n## {name}\n\n{text}\n", flush=True)
    print(
        f"results in {ctx.results_dir} ({time.monotonic() - t0:.0f} s)", file=sys.stderr, flush=True
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
