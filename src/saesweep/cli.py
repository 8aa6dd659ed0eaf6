"""What the command-line apps (report.py, steer.py, evaluate.py) share: a saesweep error, whose message
names the bad value and what is allowed, is printed as that one message, without a traceback
(HYDRA_FULL_ERROR=1 shows it)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TypeVar

from hydra.errors import CompactHydraException

from saesweep.errors import SaesweepError

T = TypeVar("T")


class CommandError(CompactHydraException):
    """Hydra prints only the text of a CompactHydraException."""


def errors_without_traceback(task: Callable[..., T]) -> Callable[..., T]:
    @functools.wraps(task)
    def wrapper(*args, **kwargs) -> T:
        try:
            return task(*args, **kwargs)
        except SaesweepError as error:
            raise CommandError(f"error: {error}\n  ({type(error).__name__})") from error

    return wrapper
