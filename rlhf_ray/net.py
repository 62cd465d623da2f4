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


def route_source_address(peer: str) -> str:
    """The local address this host's routing table uses to reach `peer` (no packet is sent).

    A peer on another node is reached from the interface on the shared network, a peer on this
    host's loopback from 127.0.0.1: the address other members of a group can connect back to.
    """
    family = socket.AF_INET6 if ":" in peer else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        try:
            s.connect((peer, 9))  # UDP connect only selects a route; the port is never contacted
        except OSError as err:
            raise OSError(err.errno, f"no route from this node to {peer}: {err.strerror}") from None
        return s.getsockname()[0]


def interface_of(address: str) -> str:
    """The name of this host's network interface that holds IPv4 `address` (e.g. "eth0" for the node's IP)."""
    names = [name for _, name in socket.if_nameindex()]
    for name in names:
        try:
            if interface_address(name) == address:
                return name
        except ValueError:  # an interface without an IPv4 address
            continue
    raise ValueError(f"no network interface of this node has the address {address}; interfaces: {', '.join(names)}")


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
