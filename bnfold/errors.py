"""Errors a user can act on. The CLI prints them as one line and exits with code 2."""


import signal
from types import FrameType
from typing import Optional


class BnfoldError(Exception):
    """A problem with the user's input or request (bad file, bad option), not a bug in bnfold."""


class Terminated(BaseException):
    """SIGTERM arrived: raised like KeyboardInterrupt, so that every cleanup on the way runs."""


def _terminate(signum: int, frame: Optional[FrameType]) -> None:
    raise Terminated()


def handle_termination() -> None:
    """Turn SIGTERM into :class:`Terminated` in this process (the main thread only can)."""
    try:
        signal.signal(signal.SIGTERM, _terminate)
    except ValueError:  # not the main thread
        pass
