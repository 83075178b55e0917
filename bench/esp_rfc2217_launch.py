"""Runs esptool's own esp_rfc2217_server (the installed package, unchanged) on loopback only:
it binds its listening socket to all interfaces, so bind() is redirected to 127.0.0.1 first.

    python esp_rfc2217_launch.py SERIALPORT -p TCPPORT
"""

import socket
import sys

_bind = socket.socket.bind


def _loopback_bind(self, address):
    if self.family == socket.AF_INET and address[0] in ("", "0.0.0.0"):
        address = ("127.0.0.1",) + tuple(address[1:])
    return _bind(self, address)


socket.socket.bind = _loopback_bind

from esp_rfc2217_server import main  # noqa: E402

if __name__ == "__main__":
    main(sys.argv[1:])
