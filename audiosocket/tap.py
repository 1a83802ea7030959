"""
C{twistd audiosocket}: the command-line options and C{makeService}.

    twistd -n audiosocket --config etc/audiosocket.toml     # foreground
    twistd audiosocket --config /etc/audiosocket.toml        # daemon (twistd.pid, twistd.log)

Every start-up failure ends the process with a non-zero status and one line saying why,
so a service manager's restart-on-failure fires and the operator reads the cause:

    - a bad config file, or a required secret variable unset: one line naming the file and
      the key (not twistd's usage text), exit 1, before anything starts;
    - what only a start can tell (the API port busy, the state directory in use by another
      server): raised by C{startService} before the reactor runs, printed as one line, exit
      1 (in daemon mode twistd's parent prints it and exits 1);
    - what fails once the reactor runs (the embedded Redis not coming up): one line in the
      log, the reactor stopped, exit 1 (in daemon mode the parent has already returned, and
      the daemon itself exits 1).

Unset secret variables that are not required are warnings (on C{--check}, and in the log at
start-up).

No option takes a secret (a command line is visible to every user of the machine): the API
token is read from the environment variable that C{[api] token_env} names.
"""

from __future__ import annotations

import atexit
import os
import sys
from pathlib import Path

import attrs

from twisted.python import usage

from audiosocket.config import ConfigError, load_config


class Options(usage.Options):
    synopsis = "--config FILE"
    longdesc = (
        "Serve the AI virtual doorman to Asterisk AudioSocket() calls. All settings are in the "
        "TOML config file; see etc/audiosocket.toml."
    )
    optParameters = [
        ["config", "c", "etc/audiosocket.toml", "The TOML config file."],
        [
            "state-dir",
            None,
            None,
            "Where the embedded Redis and the lock live, instead of [server] state_dir "
            "(e.g. /var/lib/audiosocket for a packaged install).",
        ],
    ]
    optFlags = [
        ["check", None, "Validate the config file and exit (0 when valid)."],
    ]

    def postOptions(self):
        try:
            config = load_config(self["config"])
        except ConfigError as e:
            # SystemExit, not UsageError: twistd prints its whole usage text before a
            # UsageError's message; a config mistake needs only the one line naming the key.
            raise SystemExit("audiosocket: {}".format(e)) from None
        if self["state-dir"]:
            config = attrs.evolve(
                config,
                server=attrs.evolve(config.server, state_dir=Path(self["state-dir"]).absolute()),
            )
        unset = config.unset_secrets()
        required = [u for u in unset if u.required]
        if required:
            raise SystemExit(
                "\n".join("audiosocket: {}: {}".format(config.path, u) for u in required)
            )
        if self["check"]:
            for u in unset:
                print("audiosocket: warning: {}: {}".format(config.path, u), file=sys.stderr)
            print("{}: ok".format(self["config"]))
            sys.exit(0)
        self["loaded"] = config


def _one_line(errors: tuple) -> None:
    """Print the start-up errors twistd would show as a traceback as one line instead."""
    previous = sys.excepthook

    def hook(kind, value, tb):
        if issubclass(kind, errors):
            # twistd has pointed sys.stderr at its log by now: write to the real one.
            stream = sys.__stderr__ or sys.stderr
            stream.write("audiosocket: {}\n".format(value))
            stream.flush()
        else:
            previous(kind, value, tb)

    sys.excepthook = hook


def _exit_status(service) -> None:
    """
    End the process with C{service.exit_code} when it is set (a start-up failure after the
    reactor ran). twistd itself always returns 0 once the reactor has stopped; this runs last,
    after twistd has removed its pidfile, and stdout/stderr are flushed first.
    """

    def at_exit():
        code = getattr(service, "exit_code", 0)
        if code:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)

    atexit.register(at_exit)


def makeService(options):
    from audiosocket.redisproc import RedisStartError
    from audiosocket.service import StartupError
    from audiosocket.service import makeService as make

    try:
        service = make(options["loaded"], install_signals=True)
    except ConfigError as e:
        # A setting only the service can judge (a directory file, a provider's secret).
        sys.exit("audiosocket: {}".format(e))
    _one_line((StartupError, RedisStartError))
    _exit_status(service)
    return service
