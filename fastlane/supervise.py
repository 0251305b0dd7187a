"""Background tasks that never die silently.

An asyncio task that raises is only noticed when someone awaits it; the daemon's loops
(watcher, renewal, rules resync, subnet file, blackhole route, backend reconcile and engine
watch) are awaited only at shutdown, so before this module an unexpected exception in one
of them stopped that job for good and nobody heard of it.

The policy (docs/drop-in.md, "Failure handling"):

- Every loop the daemon runs after start-up is *restarted* after a failure, with the cause
  logged in one line (the traceback only at -v=2) and a back-off of 1 s doubling to 30 s
  (reset once the loop has run for a minute). Each of them rebuilds its state when it
  starts (the watcher re-lists etcd, the renewal reads the current lease, a resync checks
  everything), so a restart is always safe, and the data plane keeps forwarding meanwhile:
  this is what flanneld does too, whose goroutines log and carry on.
- A loop that must not run in a degraded way is supervised with ``fatal=`` instead: its
  failure calls that function with one line and the daemon exits 1 so that systemd
  restarts the whole process.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

log = logging.getLogger("fastlane")

INITIAL_BACKOFF = 1.0
MAX_BACKOFF = 30.0
#: a run this long counts as healthy: the next failure starts the back-off afresh
HEALTHY_AFTER = 60.0


def describe(exc: BaseException) -> str:
    """One line: the exception's type and message (no newline, bounded)."""
    text = " ".join(str(exc).split())
    if len(text) > 300:
        text = text[:297] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


async def supervise(
    name: str,
    factory: Callable[[], Awaitable[None]],
    *,
    forever: bool = True,
    fatal: Callable[[str], None] | None = None,
    initial: float = INITIAL_BACKOFF,
    cap: float = MAX_BACKOFF,
) -> None:
    """Run ``factory()`` and restart it after a failure (see the module docstring).

    ``forever``: the loop is not supposed to return; returning counts as a failure.
    ``fatal``: instead of restarting, report the failure to this function and stop.
    """
    loop = asyncio.get_running_loop()
    delay = initial
    while True:
        started = loop.time()
        try:
            await factory()
            if not forever:
                return
            cause = "stopped unexpectedly"
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            cause = describe(exc)
            log.debug("%s failed", name, exc_info=True)
        if fatal is not None:
            fatal(f"{name} failed: {cause}")
            return
        if loop.time() - started >= HEALTHY_AFTER:
            delay = initial
        log.error("%s failed: %s; restarting it in %gs", name, cause, delay)
        await asyncio.sleep(delay)
        delay = min(delay * 2, cap)


def spawn(name: str, factory: Callable[[], Awaitable[None]], **kwargs) -> asyncio.Task[None]:
    """``supervise`` as a named task."""
    return asyncio.create_task(supervise(name, factory, **kwargs), name=name)
