"""Watch the underlay interface and say what happens to it: down, up, gone, MTU changed.

flanneld reads the interface (address, MTU) once at start-up, derives FLANNEL_MTU and the
overlay device's MTU from it, writes the subnet file once, and never looks again (only its
vxlan backend re-creates a deleted device, with the MTU of that moment). fastlane does the
same, so a changed MTU takes effect at the next restart, but it logs each change in one line
so that an operator knows why big packets started to fail and what to do.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from pyroute2 import IPRoute

from fastlane.iface import Interface

log = logging.getLogger(__name__)

IFF_UP = 0x1
IFF_LOWER_UP = 0x10000


@dataclass(frozen=True)
class LinkState:
    present: bool
    up: bool = False
    mtu: int = 0


def read_state(index: int) -> LinkState:
    with IPRoute() as ipr:
        try:
            (link,) = ipr.get_links(index)
        except Exception:  # noqa: BLE001 - pyroute2 raises NetlinkError(ENODEV) when gone
            return LinkState(False)
        up = bool(link["flags"] & IFF_UP) and bool(link["flags"] & IFF_LOWER_UP)
        return LinkState(True, up, int(link.get_attr("IFLA_MTU") or 0))


def describe(iface: Interface, old: LinkState, new: LinkState, overlay_mtu: int) -> list[str]:
    """The log lines for one observed change (pure, for tests)."""
    name = iface.name
    if old.present and not new.present:
        return [f"underlay interface {name} is gone; traffic to peers stops until it is back"]
    if not old.present and new.present:
        lines = [f"underlay interface {name} is back"]
    else:
        lines = []
    if old.up and not new.up and new.present:
        lines.append(f"underlay interface {name} is down; traffic to peers stops until it is up")
    if not old.up and new.up:
        lines.append(f"underlay interface {name} is up again")
    if new.present and old.mtu and new.mtu != old.mtu:
        lines.append(
            f"underlay interface {name} MTU changed from {old.mtu} to {new.mtu}; "
            f"FLANNEL_MTU stays {overlay_mtu} until fastlane restarts (as flanneld)"
        )
    return lines


async def watch_link(iface: Interface, overlay_mtu: int, interval: float = 1.0) -> None:
    """Poll the interface every `interval` seconds and log changes; runs until cancelled."""
    state = LinkState(True, True, iface.mtu)
    while True:
        await asyncio.sleep(interval)
        try:
            new = await asyncio.to_thread(read_state, iface.index)
        except OSError as exc:
            log.debug("cannot read %s: %s", iface.name, exc)
            continue
        if new == state:
            continue
        for line in describe(iface, state, new, overlay_mtu):
            log.warning("%s", line)
        # An interface that disappears keeps its last MTU, so a change shows when it is back.
        state = new if new.present else LinkState(False, False, state.mtu)
