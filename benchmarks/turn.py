"""
Turn latency: from the end of the visitor's speech to the first frame of our reply, with
cached TTS and the rules NLU, the recogniser being a local fake of the Whisper API that
answers a fixed transcript at once — so what is left is our own overhead (endpointing
decision, the HTTP round trip to 127.0.0.1, NLU, TTS cache, the clock's next tick) beyond
the endpointing silence C{audio.visitor_silence_ms}.

Each call streams a short silence, then the same espeak-ng utterance several times with
pauses between; the fake transcript ("meu nome é Carlos") names no apartment, so every
turn is answered with the same fixed (preloaded, cached) prompt. The client timestamps
every received frame; a turn's latency is the arrival of the first speech frame after
the utterance's last loud sample.

    python benchmarks/turn.py                 # 2 calls × 12 turns
    python benchmarks/turn.py --calls 3 --turns 10 --json turn.json
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (  # noqa: E402
    FakeWhisper,
    Server,
    free_ports,
    machine,
    table,
    write_config,
    write_json,
)

TRANSCRIPT = "meu nome é Carlos"
UTTERANCE = "Bom dia, meu nome é Carlos."
RATE = 8000
LOUD = 32768 * 10 ** (-45.0 / 20)


def utterance() -> tuple[bytes, float]:
    """The visitor's speech at 8 kHz, and the time (s) of its last loud sample."""
    from audiosocket.audio import resample
    from audiosocket.speech.espeak import EspeakEngine

    pcm, native = EspeakEngine().synthesize(UTTERANCE)
    pcm = resample(pcm, native, RATE)
    a = np.abs(np.frombuffer(pcm, dtype="<i2").astype(np.int32))
    loud = np.flatnonzero(a > LOUD)
    return pcm, (loud[-1] + 1) / RATE


def silence(seconds: float) -> bytes:
    return bytes(2 * int(RATE * seconds))


def loud_frames(pcm: bytes) -> np.ndarray:
    frames = np.frombuffer(pcm, dtype="<i2").astype(np.float64).reshape(-1, 160)
    return np.sqrt((frames * frames).mean(axis=1)) > LOUD


async def calls(reactor, port: int, outbound: bytes, n: int, seconds: float):
    from twisted.internet.defer import Deferred, gatherResults

    from audiosocket.callclient import CallOptions, Pacer, _place_call

    pacer = Pacer(reactor)
    options = [CallOptions(host="127.0.0.1", port=port, hangup_after=seconds) for _ in range(n)]
    running = [
        Deferred.fromCoroutine(_place_call(o, reactor, outbound, None, pacer)) for o in options
    ]
    return await gatherResults(running)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="End of speech → first reply frame.")
    parser.add_argument("--calls", type=int, default=2)
    parser.add_argument("--turns", type=int, default=12, help="turns per call")
    parser.add_argument("--silence-ms", type=int, default=700, help="audio.visitor_silence_ms")
    parser.add_argument(
        "--nice", type=int, default=0, help="server priority (e.g. -10 on a shared machine, as root)"
    )
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args(argv)

    whisper = FakeWhisper(TRANSCRIPT)
    speech, speech_end = utterance()
    lead, pause = 3.0, 4.0
    period = len(speech) / (2 * RATE) + pause
    outbound = silence(lead) + (speech + silence(pause)) * args.turns
    seconds = len(outbound) / (2 * RATE) + 0.5

    rows, latencies = [], []
    with tempfile.TemporaryDirectory(prefix="bench-turn-") as tmp:
        tmp = Path(tmp)
        api_port = free_ports(1)[0]
        ai = write_config(
            tmp / "turn.toml",
            extensions=1,
            api_port=api_port,
            speech={"stt": "whisper", "whisper": {"url": whisper.url}},
            audio={"visitor_silence_ms": args.silence_ms},
            flow={
                "prompts": {
                    "keypad_hint": "Diga o apartamento.",
                    "ask_apartment": "Qual apartamento?",
                }
            },
        )["ai_ports"][0]
        # The greeting "Olá." keeps the lead short.
        text = (
            (tmp / "turn.toml")
            .read_text()
            .replace('greeting = "Condomínio Apoena, em que posso ajudar?"', 'greeting = "Olá."')
        )
        (tmp / "turn.toml").write_text(text)
        server = Server(tmp / "turn.toml", api_port, cpu=0, nice=args.nice)
        try:
            server.wait_ready()
            time.sleep(2.0)  # the prompts' preload into the TTS cache
            from twisted.internet.task import react

            results = []

            def run(reactor):
                from twisted.internet.defer import Deferred

                d = Deferred.fromCoroutine(calls(reactor, ai, outbound, args.calls, seconds))
                return d.addCallback(results.extend)

            try:
                react(run)
            except SystemExit as e:
                if e.code:
                    raise
        finally:
            server.stop()
            whisper.stop()

    for c, report in enumerate(results):
        loud = loud_frames(report.received_pcm)
        arrivals = np.array(report.arrivals_s)
        for k in range(args.turns):
            end = lead + k * period + speech_end
            after = np.flatnonzero((arrivals > end) & loud)
            if not len(after):
                continue
            latency = arrivals[after[0]] - end
            if latency > period:
                continue  # no reply to this turn
            latencies.append(latency * 1000.0)
            rows.append({"call": c, "turn": k, "latency_ms": latency * 1000.0})
    if not latencies:
        print("no turn was answered; see the server log")
        return 1
    lat = np.array(latencies)
    over = lat - args.silence_ms
    summary = {
        "turns": len(lat),
        "expected_turns": args.calls * args.turns,
        "silence_ms": args.silence_ms,
        "latency_p50_ms": float(np.percentile(lat, 50)),
        "latency_p99_ms": float(np.percentile(lat, 99)),
        "latency_max_ms": float(lat.max()),
        "overhead_p50_ms": float(np.percentile(over, 50)),
        "overhead_p99_ms": float(np.percentile(over, 99)),
        "overhead_max_ms": float(over.max()),
    }
    print("machine: " + machine())
    print()
    print(
        table(
            [summary],
            [
                ("turns", "turns"),
                ("silence_ms", "silence_ms"),
                ("latency_p50_ms", "end of speech → reply p50 ms"),
                ("latency_p99_ms", "p99 ms"),
                ("overhead_p50_ms", "overhead p50 ms"),
                ("overhead_p99_ms", "overhead p99 ms"),
                ("overhead_max_ms", "overhead max ms"),
            ],
        )
    )
    write_json(args.json, {"machine": machine(), "summary": summary, "turns": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
