"""
C{twistd audiosocket}: the command-line options and C{makeService}.

    twistd -n audiosocket --config etc/audiosocket.toml     # foreground
    twistd audiosocket --config /etc/audiosocket.toml        # daemon (twistd.pid, twistd.log)

A bad config file stops start-up with one line naming the file and the key, and exit code 1.

No option takes a secret (a command line is visible to every user of the machine): the API
token is read from the environment variable that C{[api] token_env} names.
"""

from __future__ import annotations

import sys

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
    ]
    optFlags = [
        ["check", None, "Validate the config file and exit (0 when valid)."],
    ]

    def postOptions(self):
        try:
            self["loaded"] = load_config(self["config"])
        except ConfigError as e:
            # One line, no traceback: twistd prints UsageError as "<prog>: <message>".
            raise usage.UsageError(str(e)) from None
        if self["check"]:
            print("{}: ok".format(self["config"]))
            sys.exit(0)


def makeService(options):
    from audiosocket.service import makeService as make

    try:
        return make(options["loaded"], install_signals=True)
    except ConfigError as e:
        # A setting only the service can judge (a directory file, a provider's secret).
        sys.exit("audiosocket: {}".format(e))
