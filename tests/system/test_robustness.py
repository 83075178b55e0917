"""Bad input, busy ports, missing and vanishing devices: each gets a clear log line, and the
next client is served."""

import os
import socket
import struct
import time

import serial

from conftest import Pty
from test_pyserial import device_speed

IAC, SB, SE, DO, WILL = 255, 250, 240, 253, 251
COM_PORT = 44


def sb(cmd, value=b""):
    return bytes([IAC, SB, COM_PORT, cmd]) + value.replace(b"\xff", b"\xff\xff") + bytes([IAC, SE])


def server_replies(data):
    """Decodes the server's COM-PORT replies: list of (code, value)."""
    out = []
    i = 0
    while i < len(data):
        if data[i] == IAC and i + 1 < len(data) and data[i + 1] == SB:
            j = i + 3
            value = bytearray()
            code = data[j]
            j += 1
            while j + 1 < len(data) and not (data[j] == IAC and data[j + 1] == SE):
                if data[j] == IAC and data[j + 1] == IAC:
                    value.append(IAC)
                    j += 2
                else:
                    value.append(data[j])
                    j += 1
            out.append((code, bytes(value)))
            i = j + 2
        else:
            i += 1
    return out


def recv_until(sock, predicate, timeout=5.0):
    sock.settimeout(0.2)
    buf = bytearray()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(65536)
            if not chunk:
                break
            buf.extend(chunk)
            if predicate(bytes(buf)):
                break
        except socket.timeout:
            pass
    return bytes(buf)


def raw_client(bridge):
    s = socket.create_connection(("127.0.0.1", bridge.port))
    s.sendall(bytes([IAC, WILL, COM_PORT, IAC, DO, COM_PORT]))
    return s


def pyserial_roundtrip(bridge, device):
    ser = serial.serial_for_url(bridge.url, timeout=2, baudrate=115200)
    try:
        ser.write(b"ping")
        assert device.read(4) == b"ping"
        device.write(b"pong")
        assert ser.read(4) == b"pong"
    finally:
        ser.close()


def test_malformed_telnet_is_logged_and_survived(bridge_on, device):
    bridge = bridge_on()
    s = raw_client(bridge)
    junk = (
        sb(1, b"\x00\x01")  # SET-BAUDRATE with 2 bytes instead of 4
        + sb(99)  # unknown command
        + bytes([IAC, SB, 24, 1, IAC, SE])  # subnegotiation of an option never agreed
        + bytes([IAC, 0x20])  # unknown telnet command
        + bytes([IAC, SB, COM_PORT, 2, 8, IAC, 0x99])  # subnegotiation cut short by junk
        + os.urandom(2000).replace(b"\xff", b"")  # plain garbage data goes to the device
        + sb(1, struct.pack(">I", 0))  # a valid query after all that
    )
    s.sendall(junk)
    data = recv_until(s, lambda d: any(c == 101 for c, _ in server_replies(d)))
    assert (101, struct.pack(">I", 115200)) in server_replies(data)
    s.close()
    bridge.log.wait_for("ignored input from the client")
    bridge.log.wait_for("needs a 4-byte value")
    bridge.log.wait_for("unknown COM-PORT-OPTION command 99")
    device.drain()
    pyserial_roundtrip(bridge, device)


def test_one_megabyte_subnegotiation_is_bounded(bridge_on, device):
    bridge = bridge_on()
    s = raw_client(bridge)
    s.sendall(bytes([IAC, SB, COM_PORT, 0]) + b"a" * 1_000_000 + bytes([IAC, SE]))
    s.sendall(sb(2, b"\x00"))
    data = recv_until(s, lambda d: any(c == 102 for c, _ in server_replies(d)))
    assert (102, b"\x08") in server_replies(data)
    s.close()
    bridge.log.wait_for("subnegotiation for option 44 of 1000001 bytes")
    pyserial_roundtrip(bridge, device)


def test_extreme_baud_rates(bridge_on, device):
    bridge = bridge_on()
    s = raw_client(bridge)
    s.sendall(sb(1, struct.pack(">I", 0)))
    data = recv_until(s, lambda d: any(c == 101 for c, _ in server_replies(d)))
    assert (101, struct.pack(">I", 115200)) in server_replies(data), "0 queries the rate"
    # Outside 50..20000000 the UART keeps its rate, and the reply says the rate in force
    # (RFC 2217 lets the server answer with its real value; pyserial then reports it).
    for absurd in (1, 2, 49, 2**31, 0xFFFFFFFF, 20_000_001):
        s.sendall(sb(1, struct.pack(">I", absurd)))
        data = recv_until(s, lambda d: any(c == 101 for c, _ in server_replies(d)))
        (value,) = [v for c, v in server_replies(data) if c == 101]
        assert value == struct.pack(">I", 115200), absurd
        assert device_speed(device.master) == 115200, absurd
    bridge.log.wait_for("client asked for 4294967295 baud, outside 50 to 20000000")
    for edge in (50, 20_000_000, 115200):
        s.sendall(sb(1, struct.pack(">I", edge)))
        data = recv_until(s, lambda d: any(c == 101 for c, _ in server_replies(d)))
        (value,) = [v for c, v in server_replies(data) if c == 101]
        # The edges of the range are applied when the tty takes them (a pty takes any).
        assert value == struct.pack(">I", edge), edge
    s.close()
    bridge.log.wait_for("client disconnected")
    pyserial_roundtrip(bridge, device)


def test_a_second_client_watches_and_is_told_who_writes_when_it_wants_to(bridge_on, device, tmp_path):
    cfg = tmp_path / "wait.toml"
    cfg.write_text("[network]\nclaim_wait_secs = 2\n")
    bridge = bridge_on("--config", str(cfg))
    first = serial.serial_for_url(bridge.url, timeout=2)
    try:
        first.write(b"mine")
        assert device.read(4) == b"mine"
        # A second client opens normally (pyserial's open is all answered) and sees the
        # board's output.
        watcher = serial.serial_for_url(bridge.url, timeout=2)
        second = raw_client(bridge)
        recv_until(second, lambda d: d.endswith(bytes([IAC, WILL, 3])))  # the greeting
        device.write(b"for all")
        assert first.read(7) == b"for all"
        assert watcher.read(7) == b"for all"
        recv_until(second, lambda d: b"for all" in d)
        # It wants to write while the first one is active: it waits, then is told who
        # writes, and is closed; its bytes never reach the device.
        t = time.monotonic()
        second.sendall(b"theirs")
        said = recv_until(second, lambda d: b"closing" in d, timeout=10)
        assert b"being written by 127.0.0.1:%d" % first._socket.getsockname()[1] in said, said
        assert 1.5 < time.monotonic() - t < 8
        assert recv_until(second, lambda d: False, timeout=2) == b"", "it is closed"
        second.close()
        watcher.close()
        bridge.log.wait_for("could not write")
        assert device.read(6, timeout=0.5) == b""
        # The first client is unaffected.
        first.write(b"still here")
        assert device.read(10) == b"still here"
    finally:
        first.close()


def test_second_client_takes_over_when_configured(bridge_on, device, tmp_path):
    cfg = tmp_path / "replace.toml"
    cfg.write_text('[network]\nsecond_client = "replace"\n')
    bridge = bridge_on("--config", str(cfg))
    first = raw_client(bridge)
    first.sendall(b"first")
    assert device.read(5) == b"first"
    # After the first writer's protected seconds, a newcomer takes over at once.
    time.sleep(5.2)
    pyserial_roundtrip(bridge, device)
    data = recv_until(first, lambda d: b"writes to this board now" in d)
    assert b"this connection goes on watching" in data
    bridge.log.wait_for("takes the board over")
    # The old writer still watches.
    device.write(b"after")
    recv_until(first, lambda d: b"after" in d)
    first.close()


def test_missing_device_then_device_appears(bridge_on, tmp_path):
    link = tmp_path / "ttyESP"
    bridge = bridge_on(device_path=link)
    s = socket.create_connection(("127.0.0.1", bridge.port))
    data = recv_until(s, lambda d: d.endswith(b"\n"))
    assert b"does not exist" in data
    s.close()
    bridge.log.wait_for("does not exist: check [serial] device")
    p = Pty()
    try:
        os.symlink(p.path, link)
        pyserial_roundtrip(bridge, p)
    finally:
        p.close()


def test_device_vanishes_mid_session_and_comes_back(bridge_on, tmp_path):
    link = tmp_path / "ttyUSB"
    first = Pty()
    os.symlink(first.path, link)
    bridge = bridge_on(device_path=link)
    s = raw_client(bridge)
    s.sendall(b"hello")
    assert first.read(5) == b"hello"
    first.close()  # like a USB adapter being unplugged
    got = recv_until(s, lambda d: False, timeout=5)
    s.close()
    assert b"failed or disappeared" in got
    bridge.log.wait_for("serial device failed or vanished")
    second = Pty()
    try:
        os.unlink(link)
        os.symlink(second.path, link)
        pyserial_roundtrip(bridge, second)
    finally:
        second.close()


def test_sigterm_tells_the_client_and_exits_cleanly(bridge_on, device):
    bridge = bridge_on()
    # A raw client: pyserial raises on a closed connection before handing over what it
    # received last, so it cannot show the notice reliably.
    s = raw_client(bridge)
    s.sendall(b"last words")
    assert device.read(10) == b"last words"
    s.sendall(b" and more")
    assert bridge.stop() == 0
    assert device.read(9) == b" and more", "input sent before SIGTERM still reaches the device"
    got = recv_until(s, lambda d: False, timeout=3)
    s.close()
    assert b"service is shutting down" in got
    assert "SIGTERM received" in bridge.log.text()
