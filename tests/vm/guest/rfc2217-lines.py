#!/usr/bin/env python3
"""In the guest: a minimal RFC 2217 client that sets DTR and RTS as told on stdin, so a guest
script can hold the bridge's control lines where it wants them and look at the GPIO lines.

    rfc2217-lines.py HOST PORT

Reads commands, one a line: "dtr on", "dtr off", "rts on", "rts off" (SET-CONTROL 8, 9, 11,
12); answers each with "ok" once the server acknowledged it (its SET-CONTROL reply with the
same value), or "error: ..." and exits. End of input closes the connection.

Use it as a bash coprocess:
    coproc CLIENT { python3 rfc2217-lines.py 127.0.0.1 2217; }
    echo "rts on" >&"${CLIENT[1]}"; read -r answer <&"${CLIENT[0]}"
"""

import socket
import sys
import time

IAC, WILL, DO, SB, SE = 255, 251, 253, 250, 240
COM_PORT = 44
SET_CONTROL = 5
SERVER_OFFSET = 100  # the server's replies are the command + 100
COMMANDS = {"dtr on": 8, "dtr off": 9, "rts on": 11, "rts off": 12}


def replies(data):
    """The server's COM-PORT replies in `data`: (code, value) pairs."""
    out = []
    i = 0
    while i + 3 < len(data):
        if data[i] == IAC and data[i + 1] == SB and data[i + 2] == COM_PORT:
            end = data.find(bytes([IAC, SE]), i + 3)
            if end < 0:
                break
            out.append((data[i + 3], data[i + 4:end].replace(b"\xff\xff", b"\xff")))
            i = end + 2
        else:
            i += 1
    return out


def main():
    host, port = sys.argv[1], int(sys.argv[2])
    s = socket.create_connection((host, port), timeout=30)
    s.sendall(bytes([IAC, WILL, COM_PORT, IAC, DO, COM_PORT]))
    received = bytearray()
    for line in sys.stdin:
        cmd = line.strip()
        if cmd not in COMMANDS:
            print(f"error: unknown command {cmd!r}", flush=True)
            return 1
        value = COMMANDS[cmd]
        before = len(replies(received))
        s.sendall(bytes([IAC, SB, COM_PORT, SET_CONTROL, value, IAC, SE]))
        deadline = time.monotonic() + 30
        while (SET_CONTROL + SERVER_OFFSET, bytes([value])) not in replies(received)[before:]:
            if time.monotonic() > deadline:
                print(f"error: no reply to {cmd!r} within 30 s", flush=True)
                return 1
            chunk = s.recv(4096)
            if not chunk:
                print(f"error: the server closed the connection after {cmd!r}", flush=True)
                return 1
            received += chunk
        print("ok", flush=True)
    s.close()
    return 0


sys.exit(main())
