"""
A private, real Asterisk for the tests, and the "phones" that call through it.

L{Asterisk} boots the Asterisk installed under C{ASTERISK_PREFIX} in a temporary directory of
its own (its own C{asterisk.conf}, C{modules.conf} with C{autoload = no}, C{manager.conf},
C{logger.conf}), never touching a system install. Its dialplan is the project's own
C{etc/asterisk/extensions.conf}, included as it is, plus a test-only context of resident
phones; the only thing that differs from a deployment is where the server listens, which the
project's dialplan already takes from globals (C{AUDIOSOCKET_AI_<extension>}) that a test sets
over AMI.

The AMI account the server uses is the C{[audiosocket]} user of the project's own
C{etc/asterisk/manager.conf} (same read/write classes; only the secret differs), so a class
the dialer needs and the example lacks fails here.

A phone is a UDP socket speaking RTP (ulaw, 160 bytes every 20 ms for the whole call), reached
by Asterisk as C{UnicastRTP/127.0.0.1:<port>}. It timestamps every packet it receives: what the
server sent, as a phone hears it. Keys are pressed with AMI C{PlayDTMF ... Receive: true}.

Start and stop are synchronous (fixture code); everything during a call runs on the reactor.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import struct
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
from twisted.internet import defer, protocol
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.task import LoopingCall
from twisted.protocols.basic import LineReceiver

ETC = Path(__file__).resolve().parents[2] / "etc" / "asterisk"

#: Modules the project's dialplan and these tests need (C{autoload = no}).
MODULES = [
    "pbx_config.so",
    "res_rtp_asterisk.so",
    "res_rtp_multicast.so",  # chan_rtp needs it
    "chan_rtp.so",
    "res_audiosocket.so",
    "app_audiosocket.so",
    "app_dial.so",
    "app_senddtmf.so",  # the PlayDTMF manager action
    "codec_ulaw.so",
    "func_uuid.so",
    "func_db.so",
    "func_cut.so",  # the visitor context reads the hand-off with CUT()
    "func_logic.so",
    "func_strings.so",
    "func_channel.so",
    "bridge_simple.so",
    "bridge_native_rtp.so",
    "res_timing_timerfd.so",
]

#: Resident phones, for the tests only: what a deployment's directory would point at.
#: C{Local/<apartment>@pbx-phones/n} rings the phone whose RTP port the test stored in AstDB
#: under C{pbxphone/<apartment>} (9XX: after 2 s of ringing); C{busy} and C{noanswer} are a
#: busy line and one that rings unanswered.
PHONES_CONTEXT = """
[pbx-phones]
exten => busy,1,Busy(5)
exten => _9XX,1,Ringing()
 same => n,Wait(2)
 same => n,Dial(UnicastRTP/127.0.0.1:${DB(pbxphone/${EXTEN})}/c(ulaw))
 same => n,Hangup()
exten => noanswer,1,Ringing()
 same => n,Wait(600)
exten => _X.,1,Dial(UnicastRTP/127.0.0.1:${DB(pbxphone/${EXTEN})}/c(ulaw))
 same => n,Hangup()
"""

WARNING_RE = re.compile(r"\b(WARNING|ERROR)\[")


def free_port() -> int:
    from ports import free_ports

    return free_ports(1)[0]


def manager_user(path: Path, user: str) -> list[str]:
    """The option lines of C{[user]} in a manager.conf (comments dropped)."""
    lines, inside = [], False
    for raw in path.read_text().splitlines():
        line = raw.split(";", 1)[0].strip()
        if not line:
            continue
        if line.startswith("["):
            inside = line == "[{}]".format(user)
            continue
        if inside:
            lines.append(line)
    if not lines:
        raise ValueError("{} has no [{}] user".format(path, user))
    return lines


class Asterisk:
    """
    One private Asterisk process.

    @ivar ami_port: its manager port on 127.0.0.1.
    @ivar server_user, server_secret: the AMI account the doorman server logs in with.
    @ivar test_user, test_secret: the tests' own AMI account (every class).
    """

    BOOT_TIMEOUT_S = 30.0

    def __init__(self, prefix: str):
        self.prefix = Path(prefix)
        self.binary = self.prefix / "sbin" / "asterisk"
        # The control socket's path must fit in sun_path: a short temp dir, not tmp_path.
        self.dir = Path(tempfile.mkdtemp(prefix="ast-"))
        self.conf = self.dir / "etc" / "asterisk.conf"
        self.log_path = self.dir / "log" / "full"
        self.console_path = self.dir / "console.log"
        self.ami_port = free_port()
        self.server_user = "audiosocket"
        self.server_secret = secrets.token_hex(8)
        self.test_user = "pbxtest"
        self.test_secret = secrets.token_hex(8)
        self.process: subprocess.Popen | None = None
        self._console = None

    # -- configuration ---------------------------------------------------------------------

    def _env(self) -> dict:
        env = dict(os.environ)
        lib = str(self.prefix / "lib")
        env["LD_LIBRARY_PATH"] = lib + (":" + env["LD_LIBRARY_PATH"] if env.get("LD_LIBRARY_PATH") else "")
        return env

    def write_config(self) -> None:
        d = self.dir
        for sub in ("etc", "lib", "db", "data", "spool", "run", "log", "agi", "keys"):
            (d / sub).mkdir(exist_ok=True)
        docs = self.prefix / "var" / "lib" / "asterisk" / "documentation"
        if not (d / "data" / "documentation").exists():
            (d / "data" / "documentation").symlink_to(docs)
        etc = d / "etc"
        (etc / "asterisk.conf").write_text(
            "[directories]\n"
            "astetcdir => {d}/etc\n"
            "astmoddir => {p}/lib/asterisk/modules\n"
            "astvarlibdir => {d}/lib\n"
            "astdbdir => {d}/db\n"
            "astkeydir => {d}/keys\n"
            "astdatadir => {d}/data\n"
            "astagidir => {d}/agi\n"
            "astspooldir => {d}/spool\n"
            "astrundir => {d}/run\n"
            "astlogdir => {d}/log\n"
            "astsbindir => {p}/sbin\n"
            "[options]\n"
            "verbose = 3\n"
            "nocolor = yes\n"
            "transmit_silence = no\n".format(d=d, p=self.prefix)
        )
        (etc / "modules.conf").write_text(
            "[modules]\nautoload = no\n" + "".join("load => {}\n".format(m) for m in MODULES)
        )
        (etc / "logger.conf").write_text(
            "[general]\ndateformat = %F %T.%3q\n"
            "[logfiles]\nfull => notice,warning,error,verbose(3),dtmf\n"
        )
        for quiet in ("cdr.conf", "cel.conf", "features.conf", "acl.conf", "udptl.conf",
                      "ccss.conf", "indications.conf", "stasis.conf"):
            (etc / quiet).write_text("")  # present, so their absence is not logged
        (etc / "rtp.conf").write_text("[general]\nrtpstart = 20000\nrtpend = 40000\nstrictrtp = no\n")
        # The project's AMI user (its classes as shipped), with a secret of our own.
        server = [
            line for line in manager_user(ETC / "manager.conf", self.server_user)
            if not line.replace(" ", "").startswith("secret=")
        ]
        (etc / "manager.conf").write_text(
            "[general]\nenabled = yes\nport = {port}\nbindaddr = 127.0.0.1\n\n"
            "[{user}]\nsecret = {secret}\n{lines}\n\n"
            "[{tuser}]\nsecret = {tsecret}\ndeny = 0.0.0.0/0.0.0.0\n"
            "permit = 127.0.0.1/255.255.255.255\nread = all\nwrite = all\n".format(
                port=self.ami_port,
                user=self.server_user,
                secret=self.server_secret,
                lines="\n".join(server),
                tuser=self.test_user,
                tsecret=self.test_secret,
            )
        )
        # The project's dialplan, included as shipped, and the test phones.
        (etc / "extensions.conf").write_text(
            '#include "{}"\n{}'.format(ETC / "extensions.conf", PHONES_CONTEXT)
        )

    # -- process ---------------------------------------------------------------------------

    def rx(self, command: str, timeout: float = 10.0) -> str:
        """Run one CLI command on the running Asterisk (C{asterisk -rx})."""
        out = subprocess.run(
            [str(self.binary), "-C", str(self.conf), "-rx", command],
            env=self._env(),
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        return out.stdout

    def start(self) -> None:
        assert self.process is None
        self.write_config()
        self._console = open(self.console_path, "wb")
        self.process = subprocess.Popen(
            [str(self.binary), "-f", "-n", "-C", str(self.conf)],
            env=self._env(),
            stdin=subprocess.DEVNULL,
            stdout=self._console,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + self.BOOT_TIMEOUT_S
        while True:
            if self.process.poll() is not None:
                raise RuntimeError("asterisk exited at start; see {}".format(self.console_path))
            try:
                if "fully booted" in self.rx("core waitfullybooted", timeout=5).lower():
                    break
            except subprocess.TimeoutExpired:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("asterisk did not boot; see {}".format(self.console_path))
            time.sleep(0.05)
        missing = [m for m in MODULES if m not in self.rx("module show like .so")]
        if missing:
            self.stop()
            raise RuntimeError("asterisk did not load {}".format(", ".join(missing)))

    def kick_manager(self, username: str) -> int:
        """
        Close every AMI session of C{username} from Asterisk's side (CLI C{manager kick
        session <fd>}, the file descriptors read from C{manager show connected}); returns how
        many were kicked.
        """
        lines = [line.split() for line in self.rx("manager show connected").splitlines()]
        header = next((l for l in lines if "FileDes" in l), None)
        if header is None:
            raise RuntimeError("no 'manager show connected' table: {}".format(lines))
        # Counted from the end: the header's "IP Address" is two words.
        column = header.index("FileDes") - len(header)
        fds = [l[column] for l in lines if l and l[0] == username and len(l) >= -column]
        for fd in fds:
            self.rx("manager kick session {}".format(fd))
        return len(fds)

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            try:
                self.rx("core stop now", timeout=10)
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if self._console is not None:
            self._console.close()
            self._console = None

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    # -- the log ---------------------------------------------------------------------------

    def log_mark(self) -> int:
        """Where the log ends now; L{log_since} reads what came after."""
        try:
            return self.log_path.stat().st_size
        except FileNotFoundError:
            return 0

    def log_since(self, mark: int) -> list[str]:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(mark)
                return f.read().decode("utf-8", "replace").splitlines()
        except FileNotFoundError:
            return []

    def problems_since(self, mark: int) -> list[str]:
        """Asterisk's WARNING and ERROR lines logged after C{mark}."""
        return [line for line in self.log_since(mark) if WARNING_RE.search(line)]


# -- AMI, for the tests ---------------------------------------------------------------------


class TestAmi(LineReceiver):
    """
    A small AMI client for driving Asterisk from the tests (independent of the server's own
    dialer): actions answered by ActionID, and every event offered to the listeners.
    """

    delimiter = b"\r\n"

    def __init__(self):
        self.banner = None
        self._lines: list[str] = []
        self._waiting: dict[str, defer.Deferred] = {}
        self._ids = iter(range(1, 1 << 62))
        self.listeners: list = []
        self.lost = defer.Deferred()

    def lineReceived(self, line):
        text = line.decode("utf-8", "replace")
        if self.banner is None:
            self.banner = text
            return
        if text:
            self._lines.append(text)
            return
        message: dict[str, str] = {}
        for item in self._lines:
            key, _, value = item.partition(":")
            key = key.strip().lower()
            if key == "output":  # a Command's output, one header per line
                message.setdefault("output", []).append(value.strip())
            else:
                message.setdefault(key, value.strip())
        self._lines = []
        if "response" in message:
            d = self._waiting.pop(message.get("actionid", ""), None)
            if d is not None:
                d.callback(message)
        elif "event" in message:
            for listener in list(self.listeners):
                listener(message)

    def action(self, name: str, **headers) -> defer.Deferred:
        action_id = "t{}".format(next(self._ids))
        lines = ["Action: {}".format(name), "ActionID: {}".format(action_id)]
        for key, value in headers.items():
            values = value if isinstance(value, list) else [value]
            lines.extend("{}: {}".format(key, v) for v in values)
        d = defer.Deferred()
        self._waiting[action_id] = d
        self.transport.write(("\r\n".join(lines) + "\r\n\r\n").encode())
        return d

    async def checked(self, name: str, **headers) -> dict:
        response = await self.action(name, **headers).addTimeout(10, self._reactor)
        if response.get("response", "").lower() != "success":
            raise RuntimeError("AMI {} failed: {}".format(name, response))
        return response

    def connectionLost(self, reason):
        for d in self._waiting.values():
            d.errback(reason)
        self._waiting.clear()
        self.lost.callback(None)


async def connect_ami(reactor, asterisk: Asterisk) -> TestAmi:
    ami = TestAmi()
    ami._reactor = reactor
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", asterisk.ami_port), ami)
    await ami.checked(
        "Login", Username=asterisk.test_user, Secret=asterisk.test_secret, Events="call"
    )
    return ami


# -- phones -----------------------------------------------------------------------------------


def _ulaw_table() -> np.ndarray:
    u = ~np.arange(256, dtype=np.int32) & 0xFF
    sign = u & 0x80
    exponent = (u >> 4) & 0x07
    mantissa = u & 0x0F
    magnitude = (((mantissa << 3) + 0x84) << exponent) - 0x84
    return np.where(sign, -magnitude, magnitude).astype(np.int16)


ULAW = _ulaw_table()
#: A peak above this (of 32767) in a 20 ms packet is sound, not silence.
SPEECH_PEAK = 500
#: An inter-arrival longer than this, with sound on both sides, is a stall inside speech.
STALL_MS = 50.0


class Phone(protocol.DatagramProtocol):
    """
    A phone on a UDP port: sends ulaw RTP every 20 ms from the first packet Asterisk sends it
    (that tells it where Asterisk listens) until its channel hangs up, and keeps the arrival
    time and loudness of every packet it receives.

    @ivar channel: the Asterisk channel name (C{UnicastRTP/127.0.0.1:<port>-...}) once seen.
    @ivar hung_up_by: C{"phone"} when the test hung it up, C{"pbx"} when Asterisk did.
    """

    def __init__(self, reactor, name: str):
        self.reactor = reactor
        self.name = name
        self.port = None
        self.listening = None
        self.remote = None
        self.channel: str | None = None
        #: The channel running AudioSocket() for this phone's call (a resident's Local;1).
        self.audiosocket_channel: str | None = None
        self.uniqueid: str | None = None
        self.arrivals: list[float] = []
        self.payload_types: set[int] = set()
        self.loud: list[bool] = []
        self.sent = 0
        self.digits: list[str] = []
        self.hung_up_by: str | None = None
        self.cause: str | None = None
        self.answered = defer.Deferred()  # first packet from Asterisk
        self.channel_seen = defer.Deferred()
        self.hung_up = defer.Deferred()
        self._hangup_requested = False
        self._seq = secrets.randbelow(1 << 16)
        self._ts = secrets.randbelow(1 << 32)
        self._ssrc = secrets.randbelow(1 << 32)
        self._payload = bytes([0xFF]) * 160  # ulaw silence
        self._loop = LoopingCall(self._send)
        self._loop.clock = reactor

    def listen(self) -> "Phone":
        self.listening = self.reactor.listenUDP(0, self, interface="127.0.0.1")
        self.port = self.listening.getHost().port
        return self

    @property
    def prefix(self) -> str:
        return "UnicastRTP/127.0.0.1:{}-".format(self.port)

    @property
    def dial(self) -> str:
        return "UnicastRTP/127.0.0.1:{}/c(ulaw)".format(self.port)

    def datagramReceived(self, data, addr):
        now = self.reactor.seconds()
        if len(data) < 12:
            return
        payload = np.frombuffer(data[12:], dtype=np.uint8)
        self.payload_types.add(data[1] & 0x7F)
        self.arrivals.append(now)
        self.loud.append(bool(payload.size) and int(np.abs(ULAW[payload]).max()) > SPEECH_PEAK)
        if self.remote is None:
            self.remote = addr
            self.answered.callback(self)
            if self.hung_up_by is None:
                self._loop.start(0.02, now=True)

    def _send(self):
        if self.remote is None or self.transport is None:
            return
        header = struct.pack(
            "!BBHII", 0x80, 0, self._seq & 0xFFFF, self._ts & 0xFFFFFFFF, self._ssrc
        )
        self.transport.write(header + self._payload, self.remote)
        self._seq += 1
        self._ts += 160
        self.sent += 1

    # -- AMI events ----------------------------------------------------------------------------

    def event(self, message: dict) -> None:
        name = message.get("event", "").lower()
        channel = message.get("channel", "")
        if not channel.startswith(self.prefix):
            return
        if name == "newchannel" and self.channel is None:
            self.channel = channel
            self.audiosocket_channel = self.audiosocket_channel or channel
            self.uniqueid = message.get("uniqueid")
            self.channel_seen.callback(channel)
        elif name == "hangup" and channel == self.channel and not self.hung_up.called:
            self.hung_up_by = "phone" if self._hangup_requested else "pbx"
            self.cause = message.get("cause-txt") or message.get("cause")
            self.ended_at = self.reactor.seconds()
            self.stop()
            self.hung_up.callback(self)

    async def press(self, ami: TestAmi, digits: str, gap: float = 0.25) -> None:
        """Press keys on this phone: Asterisk takes them as received from it."""
        from twisted.internet.task import deferLater

        for i, digit in enumerate(digits):
            if i:
                await deferLater(self.reactor, gap, lambda: None)
            if self.hung_up.called:
                return
            await ami.checked(
                "PlayDTMF", Channel=self.channel, Digit=digit, Duration="120", Receive="true"
            )
            self.digits.append(digit)

    async def hangup(self, ami: TestAmi) -> None:
        """Hang up this phone (as its user would)."""
        if self.hung_up.called:
            return
        self._hangup_requested = True
        await ami.checked("Hangup", Channel=self.channel)

    def stop(self) -> None:
        if self._loop.running:
            self._loop.stop()

    def close(self) -> defer.Deferred:
        self.stop()
        if self.listening is not None:
            listening, self.listening = self.listening, None
            return defer.maybeDeferred(listening.stopListening)
        return defer.succeed(None)

    # -- the report ----------------------------------------------------------------------------

    def report(self) -> dict:
        """What this phone heard: inter-arrival figures, stalls inside speech, and who hung up."""
        arrivals = np.asarray(self.arrivals)
        gaps = np.diff(arrivals) * 1000.0 if arrivals.size > 1 else np.zeros(0)
        stalls = [
            round(float(g), 1)
            for i, g in enumerate(gaps)
            if g > STALL_MS and self.loud[i] and self.loud[i + 1]
        ]
        figures = {}
        if gaps.size:
            figures = {
                "p50_ms": round(float(np.percentile(gaps, 50)), 2),
                "p99_ms": round(float(np.percentile(gaps, 99)), 2),
                "max_ms": round(float(gaps.max()), 2),
            }
        return {
            "phone": self.name,
            "hung_up_by": self.hung_up_by,
            "cause": self.cause,
            "packets_in": int(arrivals.size),
            "payload_types": sorted(self.payload_types),
            "packets_out": self.sent,
            "speech_s": round(sum(self.loud) * 0.02, 2),
            **figures,
            "stalls_in_speech": stalls,
            "digits_pressed": "".join(self.digits),
            "gaps_ms": [round(float(g), 2) for g in gaps],
        }
