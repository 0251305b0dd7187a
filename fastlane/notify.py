"""systemd's sd_notify, without a library: one datagram to $NOTIFY_SOCKET.

flanneld runs as `Type=notify` and sends READY=1 once the subnet file is written and
the backend runs; units ordered after it (docker, kubelet) wait for exactly that.
"""

from __future__ import annotations

import os
import socket


def sd_notify(state: str = "READY=1") -> bool:
    """Send `state`; False when not run under systemd (no socket) or the send failed."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return False
    if path.startswith("@"):
        path = "\0" + path[1:]  # abstract namespace
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(path)
            s.sendall(state.encode())
        return True
    except OSError:
        return False
