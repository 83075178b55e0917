"""The ESP-aware raw port: esptool --port socket://... against the virtual ESP32 with its
straps modelled. The bridge resets the chip into the bootloader itself, follows
CHANGE_BAUDRATE, and resets the chip into its application when the client leaves."""

import os
import socket
import struct
import subprocess
import time

import pytest

from conftest import esptool_cmd, spell
from test_esptool import assert_no_wrong_baud, sim_events
from test_reset import bootloader_entries, last_mode, pins_and_modes, wait_mode

MiB = 1024 * 1024
ADDRESS = 0x10000


def raw_url(bridge):
    return f"socket://127.0.0.1:{bridge.raw_port}"


@pytest.fixture
def raw_demo(demo):
    """The demo fixture already serves a raw port of its own (bridge.raw_port)."""
    return demo


def esptool_raw(version, bridge, *args, baud=None, stub=True):
    cmd = [str(esptool_cmd(version)), "--port", raw_url(bridge)]
    if baud:
        cmd += ["--baud", str(baud)]
    if not stub:
        cmd += ["--no-stub"]
    cmd += [spell(version, args[0]), *args[1:]]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    out = r.stdout + r.stderr
    assert r.returncode == 0, f"{' '.join(cmd)}:\n{out}\nbridge log:\n{bridge.log.text()}"
    return out


@pytest.mark.parametrize("version", [4, 5])
def test_raw_port_full_cycle(raw_demo, version, tmp_path):
    bridge = raw_demo()
    wait_mode(bridge, "app")
    image = tmp_path / "image.bin"
    image.write_bytes(os.urandom(MiB))
    out = esptool_raw(version, bridge, "chip-id")
    assert "ESP32" in out
    for baud in (115200, 921600):
        out = esptool_raw(version, bridge, "write-flash", hex(ADDRESS), str(image), baud=baud)
        assert "Hash of data verified" in out
    esptool_raw(version, bridge, "verify-flash", hex(ADDRESS), str(image), baud=921600)
    back = tmp_path / "back.bin"
    esptool_raw(version, bridge, "read-flash", hex(ADDRESS), hex(MiB), str(back), baud=921600)
    assert back.read_bytes() == image.read_bytes()
    small = tmp_path / "small.bin"
    small.write_bytes(os.urandom(64 * 1024))
    out = esptool_raw(version, bridge, "write-flash", hex(ADDRESS), str(small), stub=False)
    assert "Hash of data verified" in out
    esptool_raw(version, bridge, "erase-flash", baud=921600)
    erased = tmp_path / "erased.bin"
    esptool_raw(version, bridge, "read-flash", hex(ADDRESS), hex(4096), str(erased))
    assert erased.read_bytes() == b"\xff" * 4096
    # Every session entered the bootloader with full timing, and the chip is back in its
    # application after the last client left.
    wait_mode(bridge, "app")
    entries = bootloader_entries(pins_and_modes(bridge))
    assert len(entries) == 8, entries
    assert all(e["en_low_us"] >= 100_000 for e in entries), entries
    assert all(e["io0_hold_us"] is None or e["io0_hold_us"] >= 50_000 for e in entries), entries
    bauds = [e for e in sim_events(bridge) if e["event"] == "baud"]
    assert any(e["to"] == 921600 for e in bauds), bauds
    assert_no_wrong_baud(bridge)


def slip(payload):
    return b"\xc0" + payload.replace(b"\xdb", b"\xdb\xdd").replace(b"\xc0", b"\xdb\xdc") + b"\xc0"


def command(op, data):
    return slip(struct.pack("<BBHI", 0, op, len(data), 0) + data)


def read_frames(sock, want, timeout=5):
    sock.settimeout(0.2)
    buf = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and buf.count(b"\xc0") < 2 * want:
        try:
            buf += sock.recv(4096)
        except socket.timeout:
            pass
    return buf


def test_split_change_baudrate_and_vanishing_client(raw_demo, tmp_path):
    bridge = raw_demo()
    wait_mode(bridge, "app")
    s = socket.create_connection(("127.0.0.1", bridge.raw_port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sync = command(0x08, b"\x07\x07\x12\x20" + b"\x55" * 32)
    got = b""
    for _ in range(30):  # esptool keeps syncing until the chip (being reset) answers
        s.sendall(sync)
        got = read_frames(s, 1, timeout=0.3)
        if b"\xc0\x01\x08" in got:
            break
    assert b"\xc0\x01\x08" in got, got
    time.sleep(0.2)
    read_frames(s, 8, timeout=0.3)
    change = command(0x0F, struct.pack("<II", 921600, 0))
    s.sendall(change[:7])
    time.sleep(0.1)
    s.sendall(change[7:])
    reply = read_frames(s, 1)
    assert b"\xc0\x01\x0f" in reply, reply
    s.close()  # gone right after the switch
    bridge.log.wait_for("client disconnected")
    bridge.log.wait_for("so does the UART")
    wait_mode(bridge, "app")
    # The next client starts at the configured rate again, and flashes.
    out = esptool_raw(5, bridge, "chip-id")
    assert "ESP32" in out
    assert_no_wrong_baud(bridge)


def test_raw_monitor_never_enters_the_bootloader(raw_demo):
    bridge = raw_demo()
    wait_mode(bridge, "app")
    mark = sim_events(bridge)[-1]["t_us"]
    s = socket.create_connection(("127.0.0.1", bridge.raw_port))
    s.sendall(b"status\r\n")
    got = b""
    s.settimeout(0.5)
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        try:
            got += s.recv(4096)
        except socket.timeout:
            pass
    s.close()
    assert b"hello from the virtual ESP32" in got, got
    assert b"got: status" in got, got
    edges = [e for e in pins_and_modes(bridge, mark) if e["event"] in ("en", "io0")]
    assert not edges, edges
    assert last_mode(bridge) == "app"
