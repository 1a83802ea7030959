"""
C{audiosocket-fake-pbx}: the dialer's other end, for trying a whole call without Asterisk.

It serves the HTTP dialer's webhook (C{[dialer] kind = "http"}, C{url =
"http://127.0.0.1:9000/"}). On each POST it does what Asterisk's dialplan does once the
resident answers: it connects an AudioSocket leg to the request's C{audiosocket} address with
the request's C{leg_uuid} (the dial's own UUID: the return port refuses the visitor's session
C{uuid}), then presses the keys it was told (C{--dtmf 2:1} presses 1 two seconds in) or
streams a WAV, and prints what the resident's leg heard. With C{--ring S} the resident
answers only after S seconds of ringing.

It honours the dialer's cancel (C{{"event": "cancel", "uuid", "leg_uuid"}}, sent when the
server no longer expects that leg: the visitor hung up, the ring window passed): a phone still
ringing is not answered, a leg already connected is hung up. A cancel for a leg it does not
know is answered 200 all the same (cancel is idempotent).

    audiosocket-fake-pbx --listen 9000 --dtmf 2:1
"""

from __future__ import annotations

import argparse
import json
import sys

from twisted.internet import defer, task
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger
from twisted.web import resource, server

from audiosocket.callclient import CallOptions, CallTracker, place_call


class Webhook(resource.Resource):
    """Answers the dialer's POST with 200 and places the resident's call."""

    isLeaf = True
    log = Logger()

    def __init__(
        self, reactor, *, dtmf=(), wav=None, wav_at=0.0, seconds=60.0, ring_s=0.0,
        out=sys.stdout,
    ):
        super().__init__()
        self._reactor = reactor
        self._dtmf = tuple(dtmf)
        self._wav = wav
        self._wav_at = wav_at
        self._seconds = seconds
        self._ring_s = ring_s
        self._out = out
        #: The requests received, and a Deferred of each resident call's report (L{None}
        #: for a call cancelled before it was answered).
        self.requests: list[dict] = []
        self.calls: list[defer.Deferred] = []
        #: The cancel events received.
        self.cancels: list[dict] = []
        #: leg_uuid → (the ringing timer's Deferred, the call's tracker), while it lasts.
        self._live: dict[str, tuple[defer.Deferred, CallTracker]] = {}

    def render_POST(self, request):
        try:
            body = json.loads(request.content.read())
            if isinstance(body, dict) and body.get("event") == "cancel":
                return self._cancel(request, body)
            host, port = body["audiosocket"].rsplit(":", 1)
            options = CallOptions(
                host=host,
                port=int(port),
                uuid=body["leg_uuid"],
                dtmf=self._dtmf,
                wav=self._wav,
                wav_at=self._wav_at,
                hangup_after=self._seconds,
            )
        except (ValueError, KeyError, TypeError) as e:
            request.setResponseCode(400)
            return json.dumps({"error": "bad_request", "detail": str(e)}).encode()
        self.requests.append(body)
        print(
            "ringing {} for apartment {} ({}) → {} with leg UUID {}".format(
                body.get("dial"),
                body.get("apartment"),
                body.get("resident"),
                body["audiosocket"],
                options.uuid,
            ),
            file=self._out,
            flush=True,
        )
        tracker = CallTracker()
        ringing = task.deferLater(self._reactor, self._ring_s, lambda: None)
        self._live[options.uuid] = (ringing, tracker)

        def answered(_):
            return defer.Deferred.fromCoroutine(
                place_call(options, self._reactor, tracker=tracker)
            ).addCallback(self._done)

        def not_answered(failure):
            failure.trap(defer.CancelledError)
            print("cancelled before answering: leg {}".format(options.uuid), file=self._out,
                  flush=True)
            return None

        d = ringing.addCallbacks(answered, not_answered)
        d.addBoth(self._over, options.uuid, tracker)
        self.calls.append(d)
        request.setHeader(b"content-type", b"application/json")
        return b'{"accepted": true}'

    def _over(self, result, leg_uuid, tracker):
        if self._live.get(leg_uuid, (None, None))[1] is tracker:
            del self._live[leg_uuid]
        return result

    def _cancel(self, request, body):
        leg_uuid = body.get("leg_uuid")
        if not isinstance(leg_uuid, str):
            raise KeyError("leg_uuid")
        self.cancels.append(body)
        live = self._live.pop(leg_uuid, None)
        print("cancel of leg {}: {}".format(
            leg_uuid, "hanging up" if live is not None else "nothing to stop"),
            file=self._out, flush=True)
        if live is not None:
            ringing, tracker = live
            tracker.hang_up_all()  # a connected leg hangs up; one connecting never does
            if not ringing.called:
                ringing.cancel()
        request.setHeader(b"content-type", b"application/json")
        return b'{"cancelled": true}'


    def _done(self, report):
        print(report.summary(), file=self._out, flush=True)
        return report


def _dtmf(text: str):
    at, _, digits = text.partition(":")
    try:
        return float(at), digits
    except ValueError:
        raise argparse.ArgumentTypeError("expected SECONDS:DIGITS, e.g. 2:1") from None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="audiosocket-fake-pbx", description=__doc__.split("\n\n")[1])
    parser.add_argument("--listen", default="tcp:9000:interface=127.0.0.1", help="endpoint or port")
    parser.add_argument("--dtmf", type=_dtmf, action="append", default=[], metavar="S:DIGITS")
    parser.add_argument("--wav", help="a WAV the resident says (e.g. 'sim')")
    parser.add_argument("--seconds", type=float, default=60.0, help="hang up after N seconds")
    parser.add_argument("--ring", type=float, default=0.0, help="answer after N seconds")
    args = parser.parse_args(argv)
    listen = args.listen if ":" in args.listen else "tcp:{}:interface=127.0.0.1".format(args.listen)

    async def run(reactor):
        site = server.Site(Webhook(
            reactor, dtmf=args.dtmf, wav=args.wav, seconds=args.seconds, ring_s=args.ring))
        port = await serverFromString(reactor, listen).listen(site)
        print("fake PBX webhook on http://127.0.0.1:{}/".format(port.getHost().port), flush=True)
        await defer.Deferred()  # until interrupted

    task.react(lambda reactor: defer.Deferred.fromCoroutine(run(reactor)))
    return 0
