"""Opening the two file descriptors the data-plane engine works on: the TUN queues and the UDP socket.

Kept apart from the engine so the backend can configure the device (address, MTU, routes via
pyroute2) between opening it and handing the fds over, and so tests can open devices without
a daemon. Nothing here touches packets.
"""

from __future__ import annotations

import fcntl
import os
import socket
import struct

TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
IFF_MULTI_QUEUE = 0x0100
IFF_VNET_HDR = 0x4000
IFNAMSIZ = 16
#: The kernel's limit on a TUN device's queues (MAX_TAP_QUEUES); the engine's own is lower.
MAX_TAP_QUEUES = 256

#: Socket buffers flanneld never raised. With UDP GRO every queued datagram is a 64 KiB buffer, so
#: 4 MiB (this machine's rmem_max) overflowed under 4 TCP streams (RcvbufErrors, 10-25k
#: retransmits in 4 s); 16 MiB, granted through the *BUFFORCE options, gave none.
SOCKET_BUFFER = 16 * 1024 * 1024
SO_SNDBUFFORCE = getattr(socket, "SO_SNDBUFFORCE", 32)
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)


def _tunsetiff(fd: int, name: str, flags: int) -> str:
    ifr = struct.pack("16sH22x", name.encode(), flags)
    out = fcntl.ioctl(fd, TUNSETIFF, ifr)
    return out[:IFNAMSIZ].split(b"\0", 1)[0].decode()


def open_tun(
    name: str = "flannel%d", queues: int = 1, vnet_hdr: bool = False
) -> tuple[str, list[int]]:
    """Create (or attach to) a TUN device in IFF_TUN|IFF_NO_PI mode; return its name and fds.

    With queues > 1 the device is IFF_MULTI_QUEUE and each fd is one queue (the kernel spreads
    flows over them), so each engine worker reads its own. With vnet_hdr every read and write
    carries a virtio_net_hdr, which is what lets the engine ask for 64 KiB TSO frames.
    The fds are non-blocking and close-on-exec. Raises OSError (with the kernel's errno).
    """
    if not 1 <= queues <= MAX_TAP_QUEUES:
        raise ValueError(f"queues must be 1..{MAX_TAP_QUEUES}, not {queues}")
    if not name or len(name.encode()) >= IFNAMSIZ:
        raise ValueError(f"bad TUN name {name!r}")
    flags = IFF_TUN | IFF_NO_PI
    if queues > 1:
        flags |= IFF_MULTI_QUEUE
    if vnet_hdr:
        flags |= IFF_VNET_HDR
    fds: list[int] = []
    try:
        for _ in range(queues):
            fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
            fds.append(fd)
            # the first queue resolves a "%d" template; the others attach to that name
            name = _tunsetiff(fd, name, flags)
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return name, fds


def open_udp_socket(bind_ip: str, port: int) -> socket.socket:
    """A non-blocking UDP socket bound to bind_ip:port with large (SOCKET_BUFFER) buffers.

    The *BUFFORCE options go past net.core.{r,w}mem_max when we hold CAP_NET_ADMIN; without it
    the plain options give what the sysctls allow.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        for force, plain in (
            (SO_RCVBUFFORCE, socket.SO_RCVBUF),
            (SO_SNDBUFFORCE, socket.SO_SNDBUF),
        ):
            try:
                sock.setsockopt(socket.SOL_SOCKET, force, SOCKET_BUFFER)
            except OSError:
                sock.setsockopt(socket.SOL_SOCKET, plain, SOCKET_BUFFER)
        sock.bind((bind_ip, port))
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock
