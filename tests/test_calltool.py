"""
Tests for L{audiosocket.calltool}, the C{audiosocket-call} command line: that it is what the
console script and C{python -m} run. Its argument parsing is pinned in
C{tests/test_callclient.py} beside the client it drives.
"""

import subprocess
import sys
from importlib.metadata import entry_points

from audiosocket import calltool


def test_console_script_is_calltool_main():
    """The installed C{audiosocket-call} script runs L{calltool.main}."""
    (script,) = entry_points(group="console_scripts", name="audiosocket-call")
    assert script.load() is calltool.main


def test_module_runs_as_the_tool():
    """
    C{python -m audiosocket.calltool} (how the benchmarks start the load generator) is the
    command line: a bad argument is argparse's usage and status 2.
    """
    done = subprocess.run(
        [sys.executable, "-m", "audiosocket.calltool", "not-a-target"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert done.stderr.startswith("usage: audiosocket-call")
