"""Blocking work off the event loop in a daemon thread, for work a shutdown must not wait for.

NOTE: ``asyncio.to_thread`` runs in the loop's default executor, whose threads the interpreter
joins at exit: a server stopped while it verified a large model waited for the verification to
end (minutes with 23 models) and ignored further signals. A daemon thread ends with the process.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import threading
from collections.abc import Callable
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")
_numbers = itertools.count(1)
_unfinished: set[str] = set()  # the names of daemon work still running in this process


def unfinished() -> list[str]:
    """Daemon work still running (say, a model still being verified at shutdown)."""
    return sorted(_unfinished)


async def in_daemon_thread(fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """``fn(*args, **kwargs)`` in a new daemon thread; its result (or exception) here."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(outcome: T | None, error: BaseException | None) -> None:
        if future.done():
            return  # the awaiting task was cancelled: the result is dropped
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(outcome)  # type: ignore[arg-type]

    name = f"foldserve-{getattr(fn, '__name__', 'work')}-{next(_numbers)}"

    def run() -> None:
        result: T | None = None
        error: BaseException | None = None
        try:
            result = fn(*args, **kwargs)
        except BaseException as exc:  # handed to the awaiting task as it is
            error = exc
        finally:
            _unfinished.discard(name)
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
            loop.call_soon_threadsafe(settle, result, error)

    _unfinished.add(name)
    threading.Thread(target=run, name=name, daemon=True).start()
    return await future
