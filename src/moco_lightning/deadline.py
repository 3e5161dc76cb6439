"""Wait for a blocking call no longer than a deadline: DNS lookups ignore socket timeouts and can hang offline."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["call_with_deadline"]

T = TypeVar("T")


def call_with_deadline(fn: Callable[[], T], timeout: float, what: str) -> T:
    """``fn()`` run in a daemon thread: its result, or the exception it raised.

    Args:
        fn: the blocking call.
        timeout: seconds to wait for it.
        what: the call in words, for the error ("resolving example.org").

    Raises:
        TimeoutError: ``fn`` did not return within ``timeout`` seconds (its thread is left to end on its own).

    """
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["result"] = fn()
        except BaseException as err:  # noqa: BLE001 - re-raised in the caller's thread below
            outcome["error"] = err

    thread = threading.Thread(target=run, name=what, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise TimeoutError(f"{what} did not finish within {timeout:g} s (no network?)")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]
