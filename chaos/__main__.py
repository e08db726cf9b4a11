"""`python -m chaos [--scenario NAME ...] [--smoke]`: run the chaos scenarios, print one summary
line each (and what went wrong under a failing one), exit 1 if any invariant failed."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import subprocess
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path

from benchmarks.servers import REPO
from chaos.scenarios import SCENARIOS, Context, Result, Scale, run


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m chaos", description=__doc__)
    parser.add_argument(
        "--scenario",
        action="append",
        choices=sorted(SCENARIOS),
        help="run only this scenario (repeatable); default: all, Postgres last",
    )
    parser.add_argument(
        "--smoke", action="store_true", help="tiny scale: checks the harness, not the service"
    )
    parser.add_argument("--disconnects", type=int, help="override the number of disconnects")
    parser.add_argument("--seed", type=int, default=20261126)
    parser.add_argument("--workdir", type=Path, help="where service logs go (default: a temp dir)")
    parser.add_argument("--json", type=Path, help="also write the results here as JSON")
    return parser.parse_args(argv)


def _commit() -> str:
    done = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    return done.stdout.strip() or "unknown"


async def main_async(args: argparse.Namespace) -> list[Result]:
    scale = Scale.smoke() if args.smoke else Scale()
    if args.disconnects is not None:
        scale = dataclasses.replace(scale, disconnects=args.disconnects)
    names = [name for name in SCENARIOS if not args.scenario or name in args.scenario]
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="chaos-"))
    workdir.mkdir(parents=True, exist_ok=True)
    ctx = Context(workdir, scale, args.seed)
    print(
        f"chaos: {', '.join(names)} ({'smoke' if args.smoke else 'full'} scale), "
        f"commit {_commit()}, logs in {workdir}",
        flush=True,
    )
    results = []
    for name in names:
        result = await run(name, ctx)
        results.append(result)
        print(result.line, flush=True)
        if not result.ok:
            for problem in result.problems:
                print(f"    {problem}", flush=True)
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    results = asyncio.run(main_async(args))
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "at": datetime.now(UTC).isoformat(),
                    "commit": _commit(),
                    "results": [
                        {
                            "name": r.name,
                            "ok": r.ok,
                            "line": r.line,
                            "seconds": round(r.seconds, 1),
                            "problems": r.problems,
                        }
                        for r in results
                    ],
                },
                indent=2,
            )
        )
    failed = [r.name for r in results if not r.ok]
    print(f"chaos: {len(results) - len(failed)} passed, {len(failed)} failed", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
