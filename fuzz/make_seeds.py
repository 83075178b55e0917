#!/usr/bin/env python3
"""Writes the hand-made seed corpus (corpus/<target>/seed-*). Run it after changing a seed;
the files are committed so that a fuzz run needs no Python.

The seeds are the streams the bridge meets in practice, so the fuzzer starts from deep in
the protocol instead of having to discover telnet and SLIP framing by itself."""

import struct
from pathlib import Path

HERE = Path(__file__).resolve().parent
IAC, DONT, DO, WONT, WILL, SB, SE, NOP = 255, 254, 253, 252, 251, 250, 240, 241
ECHO, SGA, BINARY, COM_PORT = 1, 3, 0, 44


def sb(cmd, value=b""):
    return bytes([IAC, SB, COM_PORT, cmd]) + value.replace(b"\xff", b"\xff\xff") + bytes([IAC, SE])


def esc(data):
    return data.replace(b"\xff", b"\xff\xff")


def slip(payload):
    return b"\xc0" + payload.replace(b"\xdb", b"\xdb\xdd").replace(b"\xc0", b"\xdb\xdc") + b"\xc0"


def esptool_sync():
    return slip(bytes([0, 0x08, 36, 0, 0, 0, 0, 0, 7, 7, 0x12, 0x20]) + b"\x55" * 32)


def esptool_change_baud(baud):
    return slip(bytes([0, 0x0F, 8, 0, 0, 0, 0, 0]) + struct.pack("<II", baud, 0))


def chip_reply(op, status):
    return slip(bytes([1, op, len(status), 0, 0, 0, 0, 0]) + status)


# pyserial 3.5's rfc2217 open: its option requests, then every port setting, DTR/RTS, purge.
PYSERIAL_OPEN = (
    bytes([IAC, DO, ECHO, IAC, WILL, SGA, IAC, DO, SGA, IAC, DO, COM_PORT, IAC, WILL, COM_PORT])
    + sb(1, struct.pack(">I", 115200))
    + sb(2, b"\x08")
    + sb(3, b"\x01")
    + sb(4, b"\x01")
    + sb(5, b"\x01")
    + sb(5, b"\x08")
    + sb(5, b"\x0b")
    + sb(12, b"\x03")
    + sb(0)
    + sb(7)
)


def rfc2217_seeds():
    yield "seed-pyserial-open", PYSERIAL_OPEN
    yield "seed-set-baudrate", b"".join(
        sb(1, struct.pack(">I", b))
        for b in (0, 9600, 115200, 921600, 0xFFFF, 0xFFFFFFFF, 115200, 115200)
    )
    yield "seed-iac-heavy", (
        esc(b"\xff" * 64) + b"ab" + bytes([IAC, NOP, IAC, 244]) + esc(bytes(range(256)))
        + bytes([IAC, DONT, ECHO, IAC, WONT, BINARY, IAC, DO, 24])
    )
    yield "seed-esptool-frames", (
        PYSERIAL_OPEN + sb(5, b"\x09") + sb(5, b"\x0b") + sb(5, b"\x08") + sb(5, b"\x0c")
        + esc(esptool_sync()) + sb(1, struct.pack(">I", 115200))
        + esc(esptool_change_baud(921600)) + sb(1, struct.pack(">I", 921600))
    )
    yield "seed-oversized-subnegotiation", (
        bytes([IAC, SB, COM_PORT, 0]) + b"x" * 300 + bytes([IAC, SE]) + b"after"
    )
    yield "seed-malformed", (
        sb(1, b"\x00\x01") + sb(99) + bytes([IAC, SB, 24, 1, IAC, SE]) + bytes([IAC, 0x20])
        + bytes([IAC, SB, COM_PORT, 2, 8, IAC, 0x99]) + sb(8) + b"data" + sb(9)
    )


def raw_script(steps):
    """The esp_raw target's input: per step a header (top bit: device; low 7: length)."""
    out = bytearray()
    for side, data in steps:
        for i in range(0, len(data), 127):
            part = data[i:i + 127]
            out.append((0x80 if side == "dev" else 0) | len(part))
            out += part
    return bytes(out)


def esp_raw_seeds():
    sync = esptool_sync()
    yield "seed-esptool-sync", raw_script(
        [("cli", sync[:3]), ("cli", sync[3:]), ("dev", chip_reply(0x08, b"\x00\x00\x00\x00"))]
    )
    yield "seed-change-baudrate", raw_script(
        [("cli", sync), ("dev", chip_reply(0x08, b"\x00\x00")),
         ("cli", esptool_change_baud(921600)), ("dev", chip_reply(0x0F, b"\x00\x00")),
         ("cli", esptool_change_baud(460800)), ("dev", chip_reply(0x0F, b"\x01\x05"))]
    )
    yield "seed-escaped-baud", raw_script(
        [("cli", sync), ("cli", esptool_change_baud(0x000EDBC0)),
         ("dev", chip_reply(0x0F, b"\x00\x00\x00\x00"))]
    )
    yield "seed-terminal", raw_script(
        [("dev", b"rst:0x1 (POWERON_RESET),boot:0x13 (SPI_FAST_FLASH_BOOT)\r\n"),
         ("cli", b"help\r\n"), ("dev", b"\xc0\xdb garbage \xc0")]
    )


def flash_script(steps):
    """The flash_rate target's input: per step a header (top two bits: 0 client, 1 device,
    3 time passes; low 6: length, or for time 20 ms units)."""
    out = bytearray()
    for side, data in steps:
        if side == "wait":
            out.append(0xC0 | data)
            continue
        for i in range(0, len(data), 63):
            part = data[i:i + 63]
            out.append((0x40 if side == "dev" else 0) | len(part))
            out += part
    return bytes(out)


def request(op, data):
    return slip(bytes([0, op]) + len(data).to_bytes(2, "little") + bytes(4) + data)


def stub_upload():
    return (request(0x05, bytes(16)) + request(0x07, bytes([0xC0]) * 40)
            + request(0x06, bytes([0, 0, 0, 0, 0x58, 0xE6, 0x0B, 0x40])))


def flash_rate_seeds():
    sync = esptool_sync()
    ohai = slip(b"OHAI")
    ok = chip_reply(0x0F, b"\x00\x00")
    base = [("cli", sync), ("dev", chip_reply(0x08, b"\x00\x00\x00\x00")), ("cli", stub_upload()),
            ("dev", ohai)]
    yield "seed-fast", flash_script(
        base + [("dev", ok), ("wait", 2), ("dev", ok), ("cli", esptool_change_baud(460800)),
                ("cli", request(0x0D, bytes(4)))])
    yield "seed-recovery", flash_script(
        base + [("dev", ok), ("wait", 40), ("wait", 40), ("dev", chip_reply(0x08, b"\x00\x00\x00\x00")),
                ("wait", 6), ("dev", chip_reply(0x05, b"\x00\x00\x00\x00")),
                ("dev", chip_reply(0x07, b"\x00\x00\x00\x00")),
                ("dev", chip_reply(0x06, b"\x00\x00\x00\x00")), ("dev", ohai)])
    yield "seed-no-answer", flash_script(base + [("cli", request(0x0D, bytes(4))), ("wait", 40)])


def main():
    for target, seeds in (("rfc2217_engine", rfc2217_seeds()), ("esp_raw", esp_raw_seeds()),
                          ("flash_rate", flash_rate_seeds())):
        d = HERE / "corpus" / target
        d.mkdir(parents=True, exist_ok=True)
        for name, data in seeds:
            (d / name).write_bytes(data)
    d = HERE / "corpus" / "config"
    d.mkdir(parents=True, exist_ok=True)
    (d / "seed-minimal.toml").write_text('[serial]\ndevice = "/dev/ttyUSB0"\nbaud = 921600\n')
    (d / "seed-modem-replace.toml").write_text(
        '[serial]\ndevice = "/dev/ttyUSB0"\nparity = "even"\nstop_bits = 2\n'
        '[network]\nlisten = ["127.0.0.1:2217", "[::1]:2217"]\nsecond_client = "replace"\n'
        'keepalive_secs = 2\nidle_exit_secs = 600\n'
        '[control]\nbackend = "modem"\nmode = "direct"\nafter_disconnect = "release"\n'
    )
    (d / "seed-gpio-offsets.toml").write_text(
        '[control]\nbackend = "gpio"\n[control.gpio]\nreset = 22\nboot = 10\n'
        'chip = "gpiochip0"\nactive_low = false\ndrive = "open-drain"\nbias = "pull-up"\n'
    )
    # The shipped file itself, by a link, so the seed never drifts from it.
    link = d / "seed-shipped-esp-bridge.toml"
    if not link.is_symlink():
        link.symlink_to("../../../config/esp-bridge.toml")


if __name__ == "__main__":
    main()
