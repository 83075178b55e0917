"""The real esptool (4.x and 5.x) through the real binary in front of the virtual ESP32:
plain rfc2217:// URLs, automatic reset into the bootloader, the stub, baud changes."""

import json
import os
import signal
import subprocess
import time

import pytest

from conftest import esptool_cmd, spell

MiB = 1024 * 1024
ADDRESS = 0x10000


def esptool(version, bridge, *args, baud=None, timeout=300, check=True):
    cmd = [str(esptool_cmd(version)), "--port", bridge.url]
    if baud:
        cmd += ["--baud", str(baud)]
    cmd += [spell(version, a) if i == 0 else a for i, a in enumerate(args)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    output = result.stdout + result.stderr
    if check:
        assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{output}\nbridge log:\n{bridge.log.text()}"
    return output


def sim_events(bridge):
    if not bridge.events.exists():
        return []
    return [json.loads(line) for line in bridge.events.read_text().splitlines() if line.strip()]


def assert_no_wrong_baud(bridge):
    """No byte from the client reached the chip at the wrong rate. (The chip's own log may
    meet the host at another rate, e.g. while pyserial opens at 9600 before esptool sets
    115200: that garbles only what the app prints, as on real hardware.)"""
    bad = [
        e for e in sim_events(bridge) if e.get("event") == "wrong_baud" and e.get("dir") == "rx"
    ]
    assert not bad, f"the virtual ESP32 received bytes at the wrong baud rate: {bad[:5]}"


@pytest.fixture
def random_image(tmp_path):
    path = tmp_path / "image.bin"
    path.write_bytes(os.urandom(MiB))
    return path


@pytest.mark.parametrize("version", [4, 5])
def test_chip_id_with_plain_url(demo, version):
    bridge = demo()
    out = esptool(version, bridge, "chip-id")
    assert "ESP32" in out
    assert "MAC:" in out
    assert "ign_set_control" not in bridge.url
    assert_no_wrong_baud(bridge)


@pytest.mark.parametrize("version", [4, 5])
@pytest.mark.parametrize("baud", [115200, 921600])
def test_write_verify_read_erase(demo, version, baud, random_image, tmp_path):
    bridge = demo()
    out = esptool(version, bridge, "write-flash", hex(ADDRESS), str(random_image), baud=baud)
    assert "Hash of data verified" in out
    if baud != 115200:
        assert "Changing baud rate to 921600" in out or "Changed." in out, out
    esptool(version, bridge, "verify-flash", hex(ADDRESS), str(random_image), baud=baud)
    readback = tmp_path / "readback.bin"
    esptool(version, bridge, "read-flash", hex(ADDRESS), hex(MiB), str(readback), baud=baud)
    assert readback.read_bytes() == random_image.read_bytes()
    esptool(version, bridge, "erase-flash", baud=baud)
    erased = tmp_path / "erased.bin"
    esptool(version, bridge, "read-flash", hex(ADDRESS), hex(4096), str(erased), baud=baud)
    assert erased.read_bytes() == b"\xff" * 4096
    assert_no_wrong_baud(bridge)
    # --after hard-reset (the default) leaves the chip running its application.
    modes = [e for e in sim_events(bridge) if e.get("event") == "mode"]
    assert modes and modes[-1].get("mode") == "app", modes[-3:]


@pytest.mark.parametrize("version", [4, 5])
def test_client_vanishing_mid_flash_leaves_the_port_usable(demo, version, random_image):
    bridge = demo()
    cmd = [str(esptool_cmd(version)), "--port", bridge.url, spell(version, "write-flash"),
           hex(ADDRESS), str(random_image)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    # Wait until the flash is under way, then kill the client without a goodbye.
    deadline = time.monotonic() + 120
    line = ""
    while "Writing at" not in line and time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    bridge.log.wait_for("client disconnected", timeout=20)
    small = random_image.parent / "small.bin"
    small.write_bytes(os.urandom(16 * 1024))
    out = esptool(version, bridge, "write-flash", hex(ADDRESS), str(small))
    assert "Hash of data verified" in out
    assert_no_wrong_baud(bridge)
