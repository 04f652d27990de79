"""Errors a user can act on. The CLI prints them as one line and exits with code 2."""

import signal
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType


class BnfoldError(Exception):
    """A problem with the user's input or request (bad file, bad option), not a bug in bnfold."""


def os_problem(exc: OSError) -> str:
    """An operating-system failure in one line: the path it concerns, and what went wrong."""
    reason = exc.strerror or type(exc).__name__
    return f"{exc.filename}: {reason}" if exc.filename else reason


class OptionError(BnfoldError):
    """An option's value is refused. ``option`` is the API's name of it (a field of FoldOptions or
    VerifyOptions, a keyword argument); the CLI says its flag instead (:meth:`named`)."""

    def __init__(self, option: str, problem: str) -> None:
        super().__init__(f"{option}: {problem}")
        self.option, self.problem = option, problem

    def named(self, name: str) -> str:
        """The message with the option called ``name`` (a CLI flag)."""
        return f"{name}: {self.problem}"


class Terminated(BaseException):
    """SIGTERM arrived: raised like KeyboardInterrupt, so that every cleanup on the way runs."""


@contextmanager
def model_text() -> Iterator[None]:
    """Protobuf hands back a name that is not valid UTF-8 as bytes, and refuses it when it is
    written into another message: such a model is bad input, found where it is first written."""
    try:
        yield
    except UnicodeDecodeError:
        raise BnfoldError("a name in the model is not valid UTF-8") from None


@contextmanager
def enough_memory(what: str, hint: str) -> Iterator[None]:
    """MemoryError is the environment's limit, not a bug: one line saying what ran out, and what to try."""
    try:
        yield
    except MemoryError:
        raise BnfoldError(f"not enough memory {what}; {hint}") from None


@contextmanager
def quiet_numpy() -> Iterator[None]:
    """No numpy warning reaches the user: every condition it would warn of is checked explicitly
    (bnfold.fold.safety) and reported as a reason or a hazard."""
    import warnings

    import numpy as np

    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise Terminated()


def handle_termination() -> None:
    """Turn SIGTERM into :class:`Terminated` in this process (the main thread only can)."""
    try:
        signal.signal(signal.SIGTERM, _terminate)
    except ValueError:  # not the main thread
        pass
