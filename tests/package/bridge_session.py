#!/usr/bin/env python3
"""A short bridge session against a packaged esp-bridge binary, natively or under qemu-user.

    bridge_session.py -- RUNNER... BINARY

starts `BINARY --device <a pty made here> --listen 127.0.0.1:PORT --control none` (prefixed
by RUNNER, e.g. `qemu-arm -cpu arm1176`), connects a raw TCP client, sends bytes through to
the pty and bytes from the pty back to the client, sets a baud rate only termios2 can express
(250000, through RFC 2217 SET-BAUDRATE) and reads it back from the pty, then stops the bridge
with SIGTERM and expects exit status 0.

Under qemu-user this needs QEMU 10.2 or later: older ones answer TCGETS2, with which serialport
configures every tty, with ENOSYS (scripts/build-debs fetches one).

Used by scripts/build-debs (not collected by pytest).
"""

import fcntl
import os
import select
import socket
import struct
import subprocess
import sys
import tempfile
import time

TO_DEVICE = b"hello ESP32 \x00\x01\x7f\x80 from the client\n"
FROM_DEVICE = b"ets Jun  8 2016 00:22:57\r\nrst:0x1 (POWERON_RESET),boot:0x13\r\n"
ODD_BAUD = 250000
# RFC 2217 SET-BAUDRATE (client 1, server reply 101) inside a telnet subnegotiation.
IAC, SB, SE, COM_PORT_OPTION = 255, 250, 240, 44
SET_BAUDRATE = bytes([IAC, SB, COM_PORT_OPTION, 1]) + struct.pack(">I", ODD_BAUD) + bytes([IAC, SE])
BAUDRATE_REPLY = bytes([IAC, SB, COM_PORT_OPTION, 101]) + struct.pack(">I", ODD_BAUD)
# struct termios2: 4 flags, c_line, 19 control chars, then the exact input and output speeds.
TERMIOS2 = struct.Struct("4I B 19s 2I")
TCGETS2 = 0x802C542A


def device_speed(master):
    return TERMIOS2.unpack(fcntl.ioctl(master, TCGETS2, bytes(TERMIOS2.size)))[-1]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def connect(port, proc, deadline):
    """The bridge under qemu takes a moment to listen: retry until it does or dies."""
    while True:
        try:
            return socket.create_connection(("127.0.0.1", port), timeout=1)
        except OSError:
            if proc.poll() is not None:
                raise SystemExit(f"the bridge exited with {proc.returncode} before listening")
            if time.monotonic() > deadline:
                raise SystemExit("the bridge did not listen within 30 s")
            time.sleep(0.2)


def read_pty(master, want, conn, seconds):
    """Bytes at the device, and what the client was sent meanwhile (a refusal ends the wait)."""
    got, told = b"", b""
    end = time.monotonic() + seconds
    while len(got) < want and time.monotonic() < end:
        ready, _, _ = select.select([master, conn], [], [], 0.2)
        if master in ready:
            got += os.read(master, 4096)
        if conn in ready:
            try:
                chunk = conn.recv(4096)
            except ConnectionResetError:
                break
            if not chunk:
                break
            told += chunk
    return got, told


def read_client(conn, until, seconds):
    got = b""
    end = time.monotonic() + seconds
    while until not in got and time.monotonic() < end:
        conn.settimeout(max(0.1, end - time.monotonic()))
        try:
            chunk = conn.recv(4096)
        except (socket.timeout, ConnectionResetError):
            break
        if not chunk:
            break
        got += chunk
    return got


def main(argv):
    if "--" not in argv:
        raise SystemExit(__doc__)
    command = argv[argv.index("--") + 1 :]
    master, slave = os.openpty()
    device = os.ttyname(slave)
    port = free_port()
    with tempfile.NamedTemporaryFile("w", suffix=".toml") as config, tempfile.TemporaryFile() as log:
        # An empty configuration: built-in defaults, whatever /etc/esp-bridge.toml says here.
        proc = subprocess.Popen(
            command
            + ["--config", config.name, "--device", device, "--listen", f"127.0.0.1:{port}",
               "--raw-listen", "127.0.0.1:0", "--control", "none"],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        verdict = "FAILED"
        try:
            conn = connect(port, proc, time.monotonic() + 30)
            with conn:
                # The bridge speaks first (telnet negotiation, or why it cannot serve): wait for
                # that, so that a refusal is read before our bytes could make the close a reset.
                conn.settimeout(15)
                told = conn.recv(4096)
                conn.sendall(TO_DEVICE)
                at_device, more = read_pty(master, len(TO_DEVICE), conn, 15)
                told += more
                if at_device != TO_DEVICE:
                    told += read_client(conn, b"\n", 5)
                    raise SystemExit(f"the device got {at_device!r}; the client was told {told!r}")
                os.write(master, FROM_DEVICE)
                at_client = told + read_client(conn, FROM_DEVICE, 15)
                if FROM_DEVICE not in at_client:
                    raise SystemExit(f"the client got {at_client!r}, not {FROM_DEVICE!r}")
                conn.sendall(SET_BAUDRATE)
                reply = read_client(conn, BAUDRATE_REPLY, 15)
                if BAUDRATE_REPLY not in reply:
                    raise SystemExit(f"no SET-BAUDRATE {ODD_BAUD} reply; the client got {reply!r}")
                if device_speed(master) != ODD_BAUD:
                    raise SystemExit(f"the pty runs at {device_speed(master)} baud, not {ODD_BAUD}")
                verdict = (
                    f"ok: {len(TO_DEVICE)} bytes to the device, {len(FROM_DEVICE)} back, "
                    f"the device set to {ODD_BAUD} baud"
                )
        finally:
            proc.terminate()
            try:
                status = proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                status = proc.wait()
            if verdict == "FAILED" or status != 0:
                log.seek(0)
                sys.stderr.write(log.read().decode(errors="replace"))
        if status != 0:
            raise SystemExit(f"the bridge exited with status {status} on SIGTERM (expected 0)")
    print(f"bridge session {verdict}")


if __name__ == "__main__":
    main(sys.argv[1:])
