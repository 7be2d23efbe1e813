"""The suite runs without network and without HF_*_OFFLINE set (README's `python -m pytest -q`
as typed): tests/conftest.py refuses any connection off this machine at once, so a test that
would reach the hub fails fast, naming the address, instead of hanging on an offline machine."""
import socket
import time

import pytest


def test_remote_connection_is_refused_at_once():
    t0 = time.time()
    with pytest.raises(ConnectionRefusedError, match=r"must not use the network \(connection to \('192\.0\.2\.1', 443\)"):
        socket.create_connection(("192.0.2.1", 443), timeout=30)  # TEST-NET-1: never routable
    assert time.time() - t0 < 5


def test_loopback_still_works():
    """Local sockets (torch.distributed's store, subprocess servers) are not affected."""
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    with socket.create_connection(server.getsockname(), timeout=5):
        conn, _ = server.accept()
        conn.close()
    server.close()
