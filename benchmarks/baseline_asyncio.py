"""
The baseline: a minimal AudioSocket server that paces audio the way the original did —
asyncio, one task per connection looping on C{await asyncio.sleep(0.02)} and writing a
320-byte silence frame each time round. It reads and discards what the peer sends.

It measures what it sends exactly as the real server's legs do (gaps between consecutive
frames of a connection, in the same fixed buckets) and writes its cumulative stats as JSON
to C{--stats FILE} on SIGUSR1, so L{legs} reads both servers the same way.

    python benchmarks/baseline_asyncio.py --ports 9000-9009 --stats /tmp/stats.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import struct
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from audiosocket.calltool import parse_ports  # noqa: E402
from audiosocket.clock import Histogram  # noqa: E402

HEADER = struct.Struct(">BH")
SILENCE = HEADER.pack(0x10, 320) + bytes(320)


class Stats:
    def __init__(self):
        self.active = 0
        self.connections = 0
        self.frames = 0
        self.gaps = Histogram()

    def dump(self, path: str) -> None:
        data = {
            "active": self.active,
            "connections": self.connections,
            "frames": self.frames,
            "gap_bounds_ms": list(self.gaps.bounds),
            "gap_counts": list(self.gaps.counts),
            "gap_max_ms": self.gaps.max_ms,
        }
        tmp = Path(path + ".tmp")
        tmp.write_text(json.dumps(data))
        tmp.replace(path)


STATS = Stats()


async def discard(reader: asyncio.StreamReader) -> None:
    while True:
        header = await reader.readexactly(3)
        kind, length = HEADER.unpack(header)
        if length:
            await reader.readexactly(length)
        if kind == 0x00:
            return


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    loop = asyncio.get_running_loop()
    STATS.active += 1
    STATS.connections += 1
    reading = asyncio.ensure_future(discard(reader))
    last = None
    try:
        while not reading.done():
            # The original's pacing: sleep 20 ms, send, repeat (drift accumulates).
            await asyncio.sleep(0.02)
            writer.write(SILENCE)
            now = loop.time()
            if last is not None:
                STATS.gaps.observe((now - last) * 1000.0)
            last = now
            STATS.frames += 1
    except (ConnectionError, asyncio.IncompleteReadError):
        pass
    finally:
        STATS.active -= 1
        reading.cancel()
        writer.close()


async def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ports", type=parse_ports, required=True)
    parser.add_argument("--stats", required=True)
    args = parser.parse_args(argv)
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGUSR1, STATS.dump, args.stats)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    servers = [
        await asyncio.start_server(handle, "127.0.0.1", port, backlog=1024) for port in args.ports
    ]
    STATS.dump(args.stats)  # "ready"
    await stop.wait()
    for server in servers:
        server.close()


if __name__ == "__main__":
    asyncio.run(main())
