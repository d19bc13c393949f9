"""``python -m bench [all|listener|relay|xoauth2|retry|sendmail|maildrop|embedded|crash-mail|
storm|metrics|quorum] [options]``: see
bench/README.md."""

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
    parser.add_argument("which", nargs="?", choices=("all", "listener", "relay", "xoauth2", "retry", "sendmail",
                                                     "maildrop", "embedded", "crash-mail", "storm", "metrics",
                                                     "quorum"),
                        default="all")
    parser.add_argument("--events", type=int, default=10_000, help="listener: events per listener (10000)")
    parser.add_argument("--mails", type=int, default=2000, help="relay: mails per row (2000)")
    parser.add_argument("--fresh-mails", type=int, default=300,
                        help="relay: mails for the new-connection-per-mail row (300)")
    parser.add_argument("--rounds", type=int, default=4,
                        help="relay: interleaved rounds per row, each of mails/rounds mails (4)")
    parser.add_argument("--xoauth2-mails", type=int, default=1000,
                        help="xoauth2: mails per row, password AUTH against XOAUTH2 (1000)")
    parser.add_argument("--retry-mails", type=int, default=1000,
                        help="retry: mails per throughput round (1000; 0: memory rows only)")
    parser.add_argument("--retry-rounds", type=int, default=3, help="retry: interleaved rounds per throughput row (3)")
    parser.add_argument("--retry-waiting", type=int, default=10_000,
                        help="retry: mails waiting in a retry queue for the memory rows (10000; 0: idle rows only)")
    parser.add_argument("--retry-via-relay", action="store_true",
                        help="retry: also a memory row where the relay itself moves them to retry (~4 min more)")
    parser.add_argument("--sendmail-runs", type=int, default=40,
                        help="sendmail: submissions each for opsrelay-sendmail, msmtp and python -c pass (40)")
    parser.add_argument("--ssmtp-runs", type=int, default=5, help="sendmail: submissions of ssmtp, ~1.1 s each (5)")
    parser.add_argument("--crashes", type=int, default=100,
                        help="crash-mail: crashes with a busy supervisord (100); the idle run has a quarter (>= 10)")
    parser.add_argument("--storm-seconds", type=float, default=30.0,
                        help="storm: seconds of crash storm for opsrelay and for crashmail each (30)")
    parser.add_argument("--scrape-waiting", type=int, default=10_000,
                        help="metrics: mails waiting on outbound while scraped (10000; a tenth as many dead)")
    parser.add_argument("--scrapes", type=int, default=50, help="metrics: scrapes per latency row (50)")
    parser.add_argument("--metrics-mails", type=int, default=2000,
                        help="metrics: mails per relay turn, metrics off and on (2000)")
    parser.add_argument("--metrics-rounds", type=int, default=5,
                        help="metrics: rounds, each one turn with metrics off and one on (5)")
    parser.add_argument("--quorum-events", type=int, default=2000,
                        help="quorum: events published per queue type, classic and quorum (2000)")
    parser.add_argument("--quorum-mails", type=int, default=1000,
                        help="quorum: mails per relay turn, classic and quorum (1000)")
    parser.add_argument("--quorum-rounds", type=int, default=5,
                        help="quorum: rounds, each one relay turn per queue type (5)")
    args = parser.parse_args(argv)
    if args.retry_mails == 1 or min(args.retry_mails, args.retry_waiting, args.ssmtp_runs) < 0 \
            or args.retry_rounds < 1 or args.sendmail_runs < 1:
        parser.error("--retry-mails must be 0 or at least 2, --retry-rounds and --sendmail-runs at least 1, "
                     "--retry-waiting and --ssmtp-runs at least 0")
    if min(args.events, args.mails // max(args.rounds, 1), args.fresh_mails // max(args.rounds, 1)) < 2 \
            or args.rounds < 1:
        parser.error("--rounds must be at least 1, and --events, --mails/rounds and --fresh-mails/rounds at least 2")
    if args.crashes < 2 or args.storm_seconds < 1:
        parser.error("--crashes must be at least 2 and --storm-seconds at least 1")
    if args.scrape_waiting < 10 or args.scrapes < 1 or args.metrics_mails < 500 or args.metrics_rounds < 1:
        parser.error("--scrape-waiting must be at least 10, --scrapes and --metrics-rounds at least 1, "
                     "--metrics-mails at least 500")
    if args.quorum_events < 1 or args.quorum_mails < 100 or args.quorum_rounds < 1:
        parser.error("--quorum-events and --quorum-rounds must be at least 1, --quorum-mails at least 100")

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
    if args.which in ("all", "xoauth2"):
        from bench import xoauth2_throughput

        xoauth2_throughput.run(args.xoauth2_mails, min(args.rounds, 3))
    if args.which in ("all", "retry"):
        from bench import retry_load

        retry_load.run(args.retry_mails, args.retry_rounds, args.retry_waiting, args.retry_via_relay)
    if args.which in ("all", "sendmail"):
        from bench import sendmail_latency

        sendmail_latency.run(args.sendmail_runs, args.ssmtp_runs)
    if args.which in ("all", "maildrop"):
        from bench import maildrop_latency

        maildrop_latency.run(args.sendmail_runs)
    if args.which in ("all", "embedded"):
        from bench import embedded

        embedded.latency(args.events)
    if args.which in ("all", "crash-mail"):
        from bench import embedded

        embedded.crash_to_mail(args.crashes)
    if args.which in ("all", "storm"):
        from bench import crash_storm

        crash_storm.run(args.storm_seconds)
    if args.which in ("all", "metrics"):
        from bench import metrics_scrape

        metrics_scrape.run(args.scrape_waiting, args.scrapes, args.metrics_mails, args.metrics_rounds)
    if args.which in ("all", "quorum"):
        from bench import quorum

        quorum.run(args.quorum_events, args.quorum_mails, args.quorum_rounds)
    print(f"bench took {time.monotonic() - began:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
