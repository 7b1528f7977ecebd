"""Start a coroutine at once, in the caller, and make a task of it only if it has to wait.

NOTE: most inference requests never wait (the body is in, the admission gate open, a small
model runs at once in the caller's task): a task per request, and the loop's turn before it
starts, cost more than such a request's own work. Python 3.12's eager task factory does this;
this server runs on 3.11 too, so the few lines are here. A request that does wait continues in a
task that drives the coroutine on from where it stopped, in the same context (its request id).
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Coroutine
from typing import Any


def start(
    loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, None]
) -> asyncio.Task[None] | None:
    """Run ``coro`` until it first waits; None when it finished, else the task that goes on."""
    context = contextvars.copy_context()
    try:
        waited = context.run(coro.send, None)
    except StopIteration:
        return None
    return loop.create_task(_go_on(coro, waited), context=context)


async def _go_on(coro: Coroutine[Any, Any, None], waited: Any) -> None:
    """Drive ``coro`` as its own task would: wait for what it waits for, then resume it, and
    hand it the outcome (a cancellation of this task included)."""
    while True:
        try:
            if waited is None:
                await asyncio.sleep(0)  # a bare yield: it only gave the loop a turn
            else:
                # NOTE: as a task does with a future its coroutine yields: the future marked
                # itself as being waited on, and would refuse a second await otherwise.
                waited._asyncio_future_blocking = False
                await waited
        except BaseException as exc:  # its result is the coroutine's to handle
            try:
                waited = coro.throw(exc)
            except StopIteration:
                return
            continue
        try:
            waited = coro.send(None)
        except StopIteration:
            return
