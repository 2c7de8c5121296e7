"""``python -m bench memory``: peak RSS of one dispatcher draining a backlog.

One real ``outbox dispatch --until-idle`` process drains ``--count`` pending
messages (default 100,000) on the instant sink channel, as in ``bench drain``; the
process reports its own peak resident set size (``getrusage``'s ``ru_maxrss``) when
it exits. Messages of every template on all three channels, with distinct vars, so
that every renderer and every compiled template is resident.

Target: peak RSS under 150 MB.
"""

from __future__ import annotations

import argparse

from bench._common import (
    Target,
    Workers,
    add_common_arguments,
    dispatcher_env,
    fresh_database,
    print_header,
    report,
    scalar,
    seed_messages,
    seed_recipients,
    summarize,
    table,
    vacuum,
    write_json,
)

USERS = 1000
MIX = [
    ("push", "price_alert"),
    ("push", "position_failure_sl"),
    ("email", "price_alert"),
    ("email", "position_failure_sl"),
    ("telegram", "price_alert"),
    ("telegram", "position_failure_sl"),
]
"""Channel and template of each share of the backlog; push gets the larger share."""


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench memory",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_common_arguments(parser)
    parser.add_argument("--count", type=int, default=100_000, help="messages (%(default)s)")
    args = parser.parse_args(argv)
    if args.quick:
        args.count, args.rounds = 600, 1
    return args


def one_run(url: str, count: int) -> tuple[float, float]:
    """Drain ``count`` messages with one dispatcher: (peak RSS MB, messages/s)."""
    shares = [count // 2 // 2] * 2 + [count // 2 // 4] * 4
    shares[0] += count - sum(shares)
    for (channel, template), share in zip(MIX, shares, strict=True):
        seed_messages(url, share, channel=channel, template=template, users=USERS)
    vacuum(url, "outbox.message", "outbox.attempt")
    workers = Workers([["outbox", "--until-idle"]], dispatcher_env(url))
    try:
        workers.ready()
        started = workers.go()
        seconds = workers.wait(timeout=max(600.0, count / 50)) - started
    except BaseException:
        workers.kill()
        raise
    left = int(scalar(url, "SELECT count(*) FROM outbox.message"))
    if left:
        raise RuntimeError(f"{left} messages left after the dispatcher exited")
    return workers.peak_rss_mb[0], count / seconds


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    facts = print_header(
        "memory",
        args,
        f"{args.count:,} messages (push half, email and"
        f" telegram a quarter each), 1 dispatcher, rounds {args.rounds}",
    )
    peaks, rates = [], []
    with fresh_database(args.database_url, "memory") as url:
        seed_recipients(url, USERS)
        for round_ in range(1, args.rounds + 1):
            peak, rate = one_run(url, args.count)
            peaks.append(peak)
            rates.append(rate)
            print(f"  round {round_}: peak RSS {peak:.1f} MB ({rate:,.0f} messages/s)", flush=True)
    peak = summarize(peaks)
    print(
        table(
            ["messages", "peak RSS MB median (min..max)", "worst"],
            [[f"{args.count:,}", peak.cell("{:.1f}"), f"{peak.high:.1f}"]],
            "Dispatcher memory",
        )
    )
    write_json(args.json, {"machine": facts, "args": vars(args), "peak_rss_mb": peaks})
    return report(
        [Target("peak RSS, worst round", peak.high, 150.0, at_least=False, unit=" MB")],
        check=args.check,
        quick=args.quick,
    )
