"""``python -m bench [all|listener|relay] [--events N] [--mails N] [--fresh-mails N] [--rounds R]``."""

from __future__ import annotations

import argparse
import logging
import os
import platform
import sys
import time


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description="opsrelay against bare aiosmtplib and "
                                     "superlance's crashmail; see bench/README.md.")
    parser.add_argument("which", nargs="?", choices=("all", "listener", "relay"), default="all")
    parser.add_argument("--events", type=int, default=10_000, help="listener: events per listener (10000)")
    parser.add_argument("--mails", type=int, default=2000, help="relay: mails per row (2000)")
    parser.add_argument("--fresh-mails", type=int, default=300,
                        help="relay: mails for the new-connection-per-mail row (300)")
    parser.add_argument("--rounds", type=int, default=4,
                        help="relay: interleaved rounds per row, each of mails/rounds mails (4)")
    args = parser.parse_args(argv)
    if min(args.events, args.mails // max(args.rounds, 1), args.fresh_mails // max(args.rounds, 1)) < 2 \
            or args.rounds < 1:
        parser.error("--rounds must be at least 1, and --events, --mails/rounds and --fresh-mails/rounds at least 2")

    # aiormq logs every failed connect while the broker restarts; the tables say what matters.
    for noisy in ("aiormq", "aio_pika"):
        logging.getLogger(noisy).setLevel(logging.CRITICAL)
    print(f"opsrelay bench, {time.strftime('%Y-%m-%d %H:%M %Z')}: {platform.platform()}, "
          f"Python {platform.python_version()}, {os.cpu_count()} CPU(s)", flush=True)
    began = time.monotonic()
    if args.which in ("all", "listener"):
        from bench import listener_latency

        listener_latency.run(args.events)
    if args.which in ("all", "relay"):
        from bench import relay_throughput

        relay_throughput.run(args.mails, args.fresh_mails, args.rounds)
    print(f"bench took {time.monotonic() - began:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
