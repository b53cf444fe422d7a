"""Run llama.cpp's server tests against llama-server, then through a node, and compare.

Usage: python -m tests.llama_suite [--target llama-server|node|both] [PYTEST ARGS...]
(PYTEST ARGS default to the whole `unit/` directory, slow tests excluded). Prints the
counts of each run and the tests that pass directly but not through the node; exits 1
when there is any.
"""

from __future__ import annotations

import argparse
import sys
import time

from tests.llama_suite.run import compare, run_suite


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.llama_suite", description=__doc__)
    parser.add_argument("--target", choices=("llama-server", "node", "both"), default="both")
    args, pytest_args = parser.parse_known_args()
    targets = ["llama-server", "node"] if args.target == "both" else [args.target]
    results = {}
    for target in targets:
        started = time.monotonic()
        results[target] = run_suite(target, pytest_args or ["unit"])
        outcomes = results[target]
        passed = sum(o == "passed" for o in outcomes.values())
        print(
            f"{target}: {passed} of {len(outcomes)} passed in {time.monotonic() - started:.0f} s",
            flush=True,
        )
    if len(results) < 2:
        return 0
    regressions, gains = compare(results["llama-server"], results["node"])
    for test in regressions:
        print(f"  passes against llama-server, not through the node: {test}")
    for test in gains:
        print(f"  passes through the node only: {test}")
    print(f"{len(regressions)} regressions through the node")
    return 1 if regressions else 0


if __name__ == "__main__":
    sys.exit(main())
