"""Addresses and listening sockets chosen by the process that listens.

A port probed free by one process and bound later by another is a race (another process can take
it in between) and, across nodes, the wrong host's port. So every listener here is bound once, by
the process that will serve on it, and the bound socket itself is handed to the server.
"""

from __future__ import annotations

import fcntl
import socket
import struct

SIOCGIFADDR = 0x8915  # Linux ioctl: the IPv4 address of an interface


def bind_listener(host: str, port: int = 0) -> tuple[int, int]:
    """A TCP socket listening on `host:port` only (port 0: one the kernel picks).

    Returns (file descriptor, port). The caller owns the descriptor: hand it to the server
    (`torch.distributed.TCPStore(master_listen_fd=...)`) or close it with `os.close`.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
    except OSError as err:
        sock.close()
        raise OSError(err.errno, f"cannot listen on {host}:{port}: {err.strerror}") from None
    bound_port = sock.getsockname()[1]
    return sock.detach(), bound_port


def interface_address(name: str) -> str:
    """The IPv4 address of network interface `name` (e.g. "eth0"), like NCCL_SOCKET_IFNAME chooses one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            packed = fcntl.ioctl(s.fileno(), SIOCGIFADDR, struct.pack("256s", name.encode()[:15]))
        except OSError as err:
            known = ", ".join(n for _, n in socket.if_nameindex())
            raise ValueError(f"network interface {name!r} has no IPv4 address here ({err.strerror}); "
                             f"interfaces on this node: {known}") from None
    return socket.inet_ntoa(packed[20:24])


def listen_address(address: str, interface: str, node_ip: str) -> str:
    """Where a server on this node listens: `address` if set, else `interface`'s address, else `node_ip`.

    `node_ip` is the node's address as Ray knows it (reachable from the other nodes; 127.0.0.1 for
    a local head), so the default needs no setting on a single machine or a simple cluster.
    """
    if address:
        return address
    if interface:
        return interface_address(interface)
    return node_ip
