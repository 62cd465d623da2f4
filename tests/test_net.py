"""Listening sockets are bound once, by the process that serves on them (no probe-then-bind race)."""

from __future__ import annotations

import errno
import os
import shutil
import socket
import subprocess

import pytest
import torch

from rlhf_ray.net import bind_listener, interface_address, interface_of, listen_address, route_source_address
from rlhf_ray.weight_sync import SyncGroupSpec, join_sync_group


def test_the_bound_port_cannot_be_taken_before_the_store_serves_on_it() -> None:
    fd, port = bind_listener("127.0.0.1")
    try:
        with socket.socket() as other, pytest.raises(OSError) as err:
            other.bind(("127.0.0.1", port))
        assert err.value.errno == errno.EADDRINUSE
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass  # already listening: a client arriving early waits in the backlog instead of failing
    finally:
        os.close(fd)


def test_rank_zero_must_hand_over_its_socket() -> None:
    spec = SyncGroupSpec("127.0.0.1", 1, 2, "gloo", 5.0, generation=0)
    with pytest.raises(ValueError, match="rank 0 of the weight-sync group, and only rank 0"):
        join_sync_group(spec, rank=0)
    fd, port = bind_listener("127.0.0.1")
    try:
        with pytest.raises(ValueError, match="only rank 0"):
            join_sync_group(SyncGroupSpec("127.0.0.1", port, 2, "gloo", 5.0, 0), rank=1, listen_fd=fd)
    finally:
        os.close(fd)


def test_a_single_member_group_works_over_the_handed_over_socket() -> None:
    fd, port = bind_listener("127.0.0.1")
    pg = join_sync_group(SyncGroupSpec("127.0.0.1", port, 1, "gloo", 30.0, generation=0), rank=0, listen_fd=fd)
    t = torch.arange(4.0)
    pg.broadcast(t, 0).wait()
    assert torch.equal(t, torch.arange(4.0))


def test_listen_address_prefers_the_setting_then_the_interface_then_the_node() -> None:
    assert listen_address("10.1.2.3", "lo", "192.0.2.9") == "10.1.2.3"
    assert listen_address("", "lo", "192.0.2.9") == "127.0.0.1"
    assert listen_address("", "", "192.0.2.9") == "192.0.2.9"
    assert interface_address("lo") == "127.0.0.1"
    with pytest.raises(ValueError, match=r"network interface 'nosuch0' has no IPv4 address here.*interfaces on this node: .*lo"):
        interface_address("nosuch0")


def test_a_port_in_use_is_named() -> None:
    fd, port = bind_listener("127.0.0.1")
    try:
        with pytest.raises(OSError, match=f"cannot listen on 127.0.0.1:{port}"):
            bind_listener("127.0.0.1", port)
    finally:
        os.close(fd)


@pytest.mark.skipif(shutil.which("ip") is None, reason="needs iproute2's `ip` as the reference")
def test_interface_and_route_source_match_iproute2() -> None:
    # The reference: the kernel's own answer as `ip` prints it, for every IPv4 address of this host.
    for line in subprocess.run(["ip", "-o", "-4", "addr", "show"], capture_output=True, text=True).stdout.splitlines():
        name, address = line.split()[1], line.split()[3].split("/")[0]
        assert interface_of(address) == name
        route = subprocess.run(["ip", "-o", "route", "get", address], capture_output=True, text=True).stdout.split()
        if "src" in route:
            assert route_source_address(address) == route[route.index("src") + 1]
    assert route_source_address("127.0.0.1") == "127.0.0.1"
    with pytest.raises(ValueError, match="no network interface of this node has the address 203.0.113.77"):
        interface_of("203.0.113.77")
