# -*- test-case-name: tests.test_callclient -*-
"""
C{audiosocket-call}: the command line of the AudioSocket client (L{audiosocket.callclient}).

It parses the arguments into a L{CallOptions} and L{RunOptions}, places one call
(L{place_call}) or, with C{--calls N} or C{--ports}, the load (L{place_calls}, one shared
L{Pacer}), and prints the report, as text or C{--json}; the exit status is 0 when every call
was clean, 1 otherwise, 2 for a bad argument. Ctrl-C hangs every call up and still prints.

    audiosocket-call 127.0.0.1:8080 --wav visitor.wav --dtmf 3:101# --record heard.wav
    audiosocket-call 127.0.0.1:8080 --calls 100 --ramp 2 --ports 8080-8099 --json
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from attrs import frozen
from twisted.internet.defer import Deferred
from twisted.internet.task import react

from audiosocket import wire
from audiosocket.callclient import (
    CallOptions,
    CallTracker,
    Pacer,
    aggregate,
    aggregate_summary,
    dtmf_schedule,
    options_for_calls,
    place_call,
    place_calls,
)


@frozen
class RunOptions:
    """What the command line says beyond one call's options."""

    calls: int = 1
    ramp_s: float = 0.0
    json: bool = False
    verbose: bool = False
    ports: tuple[int, ...] = ()


def _host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT")
    host = host.removeprefix("[").removesuffix("]")
    try:
        number = int(port)
    except ValueError:
        raise argparse.ArgumentTypeError(f"port {port!r} is not a number") from None
    if not 1 <= number <= 65535:
        raise argparse.ArgumentTypeError(f"port {number} is not between 1 and 65535")
    return host, number


def parse_ports(text: str) -> tuple[int, ...]:
    """
    C{"8080-8099"}, C{"8080,8085"} or a mix (C{"8080-8083,9000"}) as a tuple of ports.

    @raise ValueError: naming the part that is not a port or a range.
    """
    ports: list[int] = []
    for part in text.split(","):
        part = part.strip()
        low, sep, high = part.partition("-")
        try:
            first = int(low)
            last = int(high) if sep else first
        except ValueError:
            raise ValueError(f"{part!r} is not a port or a range like 8080-8099") from None
        if not (1 <= first <= 65535 and 1 <= last <= 65535):
            raise ValueError(f"{part!r}: ports go from 1 to 65535")
        if last < first:
            raise ValueError(f"{part!r}: the range ends before it starts")
        ports.extend(range(first, last + 1))
    return tuple(ports)


def _ports_arg(text: str) -> tuple[int, ...]:
    try:
        return parse_ports(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _dtmf_entry(text: str) -> tuple[float, str]:
    at, sep, digits = text.partition(":")
    try:
        entry = (float(at), digits)
        dtmf_schedule([entry])
    except ValueError as e:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not SECONDS:DIGITS (e.g. 2.5:101#): {e}"
        ) from None
    if not sep:
        raise argparse.ArgumentTypeError(f"{text!r} is not SECONDS:DIGITS (e.g. 2.5:101#)")
    return entry


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="audiosocket-call",
        description="Place AudioSocket calls the way Asterisk does, and measure them.",
    )
    parser.add_argument("target", type=_host_port, metavar="HOST:PORT")
    parser.add_argument(
        "--uuid",
        help="the call's UUID (default: random); to play a resident's leg on a return port, "
        "the leg_uuid of the dial request (the log dialer logs it)",
    )
    parser.add_argument("--wav", help="a 16-bit WAV to stream (any rate, mono or stereo)")
    parser.add_argument(
        "--wav-at", type=float, default=0.0, metavar="S", help="start the WAV S seconds in"
    )
    parser.add_argument(
        "--rate",
        type=int,
        default=8000,
        choices=sorted(wire.KIND_OF_RATE),
        help="the call's sample rate (default 8000; 16000 sends kind 0x12)",
    )
    parser.add_argument(
        "--dtmf",
        type=_dtmf_entry,
        action="append",
        default=[],
        metavar="S:DIGITS",
        help="send DIGITS starting S seconds in, 250 ms apart (repeatable)",
    )
    parser.add_argument("--record", metavar="OUT.wav", help="record what the call hears")
    parser.add_argument(
        "--seconds", type=float, metavar="N", help="hang up (close TCP) after N seconds"
    )
    parser.add_argument(
        "--no-audio", action="store_true", help="send no audio frames, only UUID and DTMF"
    )
    parser.add_argument("--connect-timeout", type=float, default=5.0, metavar="S", help="default 5")
    parser.add_argument("--calls", type=int, default=1, metavar="N", help="concurrent calls")
    parser.add_argument(
        "--ramp", type=float, default=0.0, metavar="S", help="spread the starts over S seconds"
    )
    parser.add_argument(
        "--ports",
        type=_ports_arg,
        action="append",
        default=[],
        metavar="RANGE",
        help="spread the calls round-robin over these ports of HOST instead of PORT"
        " (8080-8099, 8080,8085; repeatable)",
    )
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.add_argument("-v", "--verbose", action="store_true", help="log to stderr")
    return parser


def parse_args(argv: Sequence[str] | None = None) -> tuple[CallOptions, RunOptions]:
    """
    Parse the command line into the call's options and the run's; a bad argument exits
    with argparse's usage message (status 2).
    """
    parser = _parser()
    args = parser.parse_args(argv)
    if args.calls < 1:
        parser.error("--calls must be at least 1")
    if args.ramp < 0:
        parser.error("--ramp must not be negative")
    if args.uuid is not None and args.calls > 1:
        parser.error("--uuid names one call; --calls N gives each call its own")
    if args.wav is not None and not Path(args.wav).is_file():
        parser.error(f"--wav: no such file: {args.wav}")
    host, port = args.target
    try:
        options = CallOptions(
            host=host,
            port=port,
            uuid=args.uuid,
            wav=args.wav,
            wav_at=args.wav_at,
            rate=args.rate,
            dtmf=args.dtmf,
            record=args.record,
            hangup_after=args.seconds,
            send_audio=not args.no_audio,
            connect_timeout=args.connect_timeout,
            keep_audio=args.record is not None,
        )
    except ValueError as e:
        parser.error(str(e))
    ports = tuple(p for group in args.ports for p in group)
    return options, RunOptions(
        calls=args.calls, ramp_s=args.ramp, json=args.json, verbose=args.verbose, ports=ports
    )


async def _run(reactor, options: CallOptions, run: RunOptions) -> None:
    tracker = CallTracker()
    # Ctrl-C: hang up, wait for the connections to close, still print the report.
    reactor.addSystemEventTrigger("before", "shutdown", tracker.hang_up_all)
    if run.calls == 1 and not run.ports:
        report = await place_call(options, reactor, tracker=tracker)
        ok = report.ok
        output = json.dumps(report.to_dict(), indent=2) if run.json else report.summary()
    else:
        pacer = Pacer(reactor)
        reports = await place_calls(
            options_for_calls(options, run.calls, run.ports or None),
            run.ramp_s,
            reactor,
            tracker=tracker,
            pacer=pacer,
        )
        ok = all(r.ok for r in reports)
        totals = aggregate(reports, pacer)
        if run.json:
            output = json.dumps(
                {"aggregate": totals, "calls": [r.to_dict() for r in reports]}, indent=2
            )
        else:
            output = aggregate_summary(totals)
    print(output)
    if not ok:
        raise SystemExit(1)


def _start_logging(verbose: bool) -> None:
    from twisted.logger import (
        FilteringLogObserver,
        LogLevel,
        LogLevelFilterPredicate,
        globalLogBeginner,
        textFileLogObserver,
    )

    level = LogLevel.info if verbose else LogLevel.warn
    observer = FilteringLogObserver(
        textFileLogObserver(sys.stderr), [LogLevelFilterPredicate(defaultLogLevel=level)]
    )
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)


def main(argv: Sequence[str] | None = None) -> int:
    """The C{audiosocket-call} console script: 0 for a clean call, 1 otherwise."""
    options, run = parse_args(argv)
    _start_logging(run.verbose)
    try:
        react(lambda reactor: Deferred.fromCoroutine(_run(reactor, options, run)))
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 1
    return 0  # pragma: no cover - react always exits


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
