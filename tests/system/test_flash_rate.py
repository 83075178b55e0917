"""The raw port runs the flasher stub at the board's flash_baud, whatever rate the client asked
for (the flash-rate issue): real esptool 4 (legacy stub) and 5 (esp-flasher-stub) through
`socket://` into `esp-bridge demo --pace`, the virtual ESP32 paced at the wire rate and
recording the rate every loader command arrived at.
"""

import json
import os
import subprocess
import textwrap

import pytest

from conftest import esptool_cmd, spell

MiB = 1 << 20
FLASH = 921_600


def events(bridge):
    if not bridge.events.exists():
        return []
    return [json.loads(line) for line in bridge.events.read_text().splitlines() if line.strip()]


def esptool(version, bridge, *args, timeout=400, env=None):
    cmd = [str(esptool_cmd(version)), "--port", f"socket://127.0.0.1:{bridge.raw_port}", *args]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                       env={**os.environ, **(env or {})})
    return r, r.stdout + r.stderr


def commands(evs, *names):
    return [e for e in evs if e["event"] == "command" and e["name"] in names]


def garbled(evs):
    return [e for e in evs if e["event"] in ("wrong_baud", "over_max_baud")]


@pytest.mark.parametrize("version", [4, 5])
def test_esptool_flashes_at_flash_baud_with_and_without_b(demo, tmp_path, version):
    """No `-b` (esptool's 115200) and `-b 460800`: either way the stub runs at 921600 for the
    bulk, no byte at a wrong rate; read-flash gives back every byte; verify-flash agrees."""
    bridge = demo("--pace", "--flash-baud", str(FLASH))
    images = {}
    for label, extra in (("no-b", []), ("b460800", ["-b", "460800"])):
        images[label] = tmp_path / f"{label}.bin"
        images[label].write_bytes(os.urandom(MiB))
        start = len(events(bridge))
        r, out = esptool(version, bridge, *extra, spell(version, "write-flash"), "0x10000",
                         str(images[label]))
        assert r.returncode == 0 and "Hash of data verified" in out, out + bridge.log.text()[-3000:]
        evs = events(bridge)[start:]
        stub = [e for e in evs if e["event"] == "stub"]
        assert [e["kind"] for e in stub] == ["legacy" if version == 4 else "flasher"], stub
        bulk = commands(evs, "FLASH_DEFL_DATA", "FLASH_DATA")
        assert len(bulk) >= MiB // 16384, f"{label}: {len(bulk)} data blocks"
        assert {e["baud"] for e in bulk} == {FLASH}, f"{label}: {sorted({e['baud'] for e in bulk})}"
        assert not garbled(evs), garbled(evs)[:5]
        # The client's own CHANGE_BAUDRATE (with -b) never reached the stub: the only change
        # the stub saw was the bridge's, to 921600, naming the rate really on the line.
        changes = [e for e in evs if e["event"] == "change_baudrate" and e["loader"] != "rom"]
        assert [(c["new"], c["old"]) for c in changes] == [(FLASH, 115_200), (FLASH, FLASH)], changes
    assert f"flasher stub runs at {FLASH} baud" in bridge.log.text()
    # The last image back, byte for byte, at the flash rate too; verify-flash agrees.
    back = tmp_path / "back.bin"
    start = len(events(bridge))
    r, out = esptool(version, bridge, spell(version, "read-flash"), "0x10000", str(MiB), str(back))
    assert r.returncode == 0, out
    assert back.read_bytes() == images["b460800"].read_bytes()
    reads = commands(events(bridge)[start:], "READ_FLASH")
    assert reads and {e["baud"] for e in reads} == {FLASH}, reads
    r, out = esptool(version, bridge, spell(version, "verify-flash"), "0x10000",
                     str(images["b460800"]))
    assert r.returncode == 0 and "verify OK" in out.replace("Verification successful", "verify OK"), out


@pytest.mark.parametrize("version", [4, 5])
def test_wiring_that_cannot_carry_the_rate_falls_back_and_the_flash_succeeds(demo, tmp_path, version):
    """The virtual board's wiring garbles everything above 460800: the bridge's probe at
    921600 does not come back, the chip is reset and its stub started again at the client's
    rate, and the flash succeeds, said once in the log."""
    bridge = demo("--pace", "--flash-baud", str(FLASH), "--sim-max-baud", "460800")
    image = tmp_path / "app.bin"
    image.write_bytes(os.urandom(128 * 1024))
    r, out = esptool(version, bridge, spell(version, "write-flash"), "0x10000", str(image))
    assert r.returncode == 0 and "Hash of data verified" in out, out + bridge.log.text()[-3000:]
    log = bridge.log.text()
    assert log.count(f"did not answer at {FLASH} baud") == 1, log
    evs = events(bridge)
    bulk = commands(evs, "FLASH_DEFL_DATA", "FLASH_DATA")
    assert bulk and {e["baud"] for e in bulk} == {115_200}, sorted({e["baud"] for e in bulk})
    # Two stub starts: the client's, and the bridge's second one after the reset.
    assert len([e for e in evs if e["event"] == "stub"]) == 2


SPLIT_CLIENT = textwrap.dedent("""
    import sys, time
    import esptool
    from serial.urlhandler import protocol_socket

    mode = sys.argv[1]
    write = protocol_socket.Serial.write

    def split(self, data):
        # Every write in two TCP segments, 3 ms apart (the first half alone may even be a
        # single byte of a frame).
        data = bytes(data)
        half = max(1, len(data) // 2)
        n = write(self, data[:half])
        self._socket.setsockopt(6, 1, 1)  # TCP_NODELAY
        time.sleep(0.003)
        return n + write(self, data[half:])

    if mode == "split":
        protocol_socket.Serial.write = split
    sys.argv = ["esptool"] + sys.argv[2:]
    esptool.main()
""")


@pytest.mark.parametrize("mode", ["split", "whole"])
@pytest.mark.parametrize("version", [4, 5])
def test_the_clients_next_command_waits_for_the_bridges_own_change(demo, tmp_path, version, mode):
    """esptool sends its next command the moment it reads OHAI, which the bridge passes on at
    once: that command arrives while the bridge's own CHANGE_BAUDRATE is in flight, split
    over TCP segments or whole. Nothing interleaves: the flash succeeds, every command the
    chip got arrived intact at the right rate."""
    bridge = demo("--pace", "--flash-baud", str(FLASH))
    image = tmp_path / "app.bin"
    image.write_bytes(os.urandom(64 * 1024))
    script = tmp_path / "client.py"
    script.write_text(SPLIT_CLIENT)
    python = esptool_cmd(version).parent / "python"
    cmd = [str(python), str(script), mode, "--port", f"socket://127.0.0.1:{bridge.raw_port}",
           "-b", "460800", spell(version, "write-flash"), "0x10000", str(image)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    out = r.stdout + r.stderr
    assert r.returncode == 0 and "Hash of data verified" in out, out + bridge.log.text()[-3000:]
    evs = events(bridge)
    assert not garbled(evs), garbled(evs)[:5]
    after_stub = evs[next(i for i, e in enumerate(evs) if e["event"] == "stub"):]
    cmds = [e for e in after_stub if e["event"] == "command"]
    # The bridge's change and probe are the first two commands the stub got; the client's
    # first command (held meanwhile) comes after them, at the flash rate.
    assert [c["name"] for c in cmds[:2]] == ["CHANGE_BAUDRATE", "CHANGE_BAUDRATE"], cmds[:4]
    assert cmds[2]["name"] != "CHANGE_BAUDRATE" and cmds[2]["baud"] == FLASH, cmds[:4]
    assert all(c["baud"] == FLASH for c in cmds[2:]), {c["baud"] for c in cmds}


def test_flash_baud_zero_keeps_the_clients_own_rate(demo, tmp_path):
    """flash_baud 0: esptool's own rate, as before the flash rate existed."""
    bridge = demo("--pace", "--flash-baud", "0")
    image = tmp_path / "app.bin"
    image.write_bytes(os.urandom(64 * 1024))
    r, out = esptool(5, bridge, "-b", "460800", "write-flash", "0x10000", str(image))
    assert r.returncode == 0 and "Hash of data verified" in out, out
    evs = events(bridge)
    bulk = commands(evs, "FLASH_DEFL_DATA", "FLASH_DATA")
    assert {e["baud"] for e in bulk} == {460_800}
    assert "flash_baud" not in bridge.log.text()


@pytest.mark.parametrize("version", [4, 5])
def test_no_stub_erase_and_flash_id_keep_working(demo, tmp_path, version):
    """Without the stub (--no-stub) nothing changes: the ROM gets the client's own change;
    erase-flash and flash-id go through the stub at the flash rate."""
    bridge = demo("--pace", "--flash-baud", str(FLASH))
    image = tmp_path / "app.bin"
    image.write_bytes(os.urandom(16 * 1024))
    start = len(events(bridge))
    r, out = esptool(version, bridge, "--no-stub", "-b", "460800", spell(version, "write-flash"),
                     "0x10000", str(image))
    assert r.returncode == 0, out + bridge.log.text()[-3000:]
    evs = events(bridge)[start:]
    assert not [e for e in evs if e["event"] == "stub"]
    bulk = commands(evs, "FLASH_DATA", "FLASH_DEFL_DATA")
    assert bulk and {e["baud"] for e in bulk} == {460_800}, {e["baud"] for e in bulk}
    for command in ("flash-id", "erase-flash"):
        r, out = esptool(version, bridge, spell(version, command))
        assert r.returncode == 0, out + bridge.log.text()[-3000:]
    assert not garbled(events(bridge))
