"""audiosocket: an AI virtual doorman for Asterisk's AudioSocket, on Twisted."""

__version__ = "0.1.0"
