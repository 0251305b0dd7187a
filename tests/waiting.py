"""The suite's one way to wait for something: poll a condition until it holds or time runs out.

Waits are bounded and return whether the condition held, so the caller's assert names what
was expected; nothing here measures speed (a timeout only bounds a hang).
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_until(pred: Callable[[], object], timeout: float = 15.0, interval: float = 0.05) -> bool:
    """Poll pred() until it is true or timeout seconds pass; pred's last verdict."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(interval)
    return bool(pred())


async def wait_until_async(
    pred: Callable[[], object], timeout: float = 3.0, interval: float = 0.02
) -> bool:
    """wait_until for coroutines: sleeps on the event loop between polls; pred may be a
    coroutine function (e.g. an etcd read)."""

    async def verdict() -> bool:
        v = pred()
        if inspect.isawaitable(v):
            v = await v
        return bool(v)

    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while loop.time() < end:
        if await verdict():
            return True
        await asyncio.sleep(interval)
    return await verdict()


def poll_value(
    read: Callable[[], T], done: Callable[[T], bool], timeout: float = 15.0, interval: float = 0.05
) -> T:
    """Read a value until done(value) holds or timeout passes; the last value read (so the
    caller's assert shows what it was)."""
    end = time.monotonic() + timeout
    value = read()
    while not done(value) and time.monotonic() < end:
        time.sleep(interval)
        value = read()
    return value
