"""The real pyserial RFC 2217 client against the real binary, with a pty as the device."""

import fcntl
import logging
import struct
import termios
import time

import serial

# struct termios2 on Linux: 4 flags, c_line, 19 control chars, then the two exact speeds.
TERMIOS2 = struct.Struct("4I B 19s 2I")
TCGETS2 = 0x802C542A


def device_speed(master_fd):
    """The exact baud rate of the pty's slave side, as the bridge set it."""
    raw = fcntl.ioctl(master_fd, TCGETS2, bytes(TERMIOS2.size))
    fields = TERMIOS2.unpack(raw)
    return fields[-1]


def device_cflag(master_fd):
    return termios.tcgetattr(master_fd)[2]


def open_client(bridge, **kw):
    return serial.serial_for_url(f"{bridge.url}?logging=warning", timeout=1, **kw)


def test_open_is_immediate_and_without_warnings(bridge_on, caplog):
    bridge = bridge_on()
    caplog.set_level(logging.WARNING, logger="pySerial.rfc2217")
    start = time.monotonic()
    ser = open_client(bridge)
    elapsed = time.monotonic() - start
    ser.close()
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert not warnings, [r.getMessage() for r in warnings]
    # Open = negotiation poll + settings round + DTR + RTS + 2 purges, each costing pyserial
    # at least one 50 ms poll: about 0.3 s when the server answers at once. A server that
    # made pyserial wait for its 3 s network timeout anywhere would blow this bound.
    assert elapsed < 1.5, f"open took {elapsed:.2f} s"
    bridge.log.wait_for("client disconnected")


def claim(ser, device):
    """Makes the client the board's writer: it sends a byte (which reaches the device)."""
    ser.write(b"w")
    assert device.read(1) == b"w"


def test_baud_rates_reach_the_device_exactly(bridge_on, device):
    bridge = bridge_on()
    ser = open_client(bridge, baudrate=57600)
    try:
        # Until it sends something for the chip the client only watches: the rate it was
        # given is acknowledged to it, and the device keeps the board's.
        assert ser.baudrate == 57600
        assert device_speed(device.master) == 115200
        claim(ser, device)
        assert device_speed(device.master) == 57600, "what it set while watching applies"
        for rate in (921600, 9600, 250000, 1234567, 74880, 115200):
            ser.baudrate = rate
            assert device_speed(device.master) == rate, rate
    finally:
        ser.close()


def test_format_settings_are_acknowledged(bridge_on, device):
    bridge = bridge_on()
    ser = open_client(bridge)
    try:
        claim(ser, device)
        # A pty forces 8 data bits and no parity, so those are checked by the server's
        # acknowledgement (pyserial raises on a rejected value); CSTOPB survives on a pty.
        for size in (7, 8):
            ser.bytesize = size
        for parity in ("E", "O", "N"):
            ser.parity = parity
        ser.stopbits = 2
        assert device_cflag(device.master) & termios.CSTOPB
        ser.stopbits = 1
        assert not device_cflag(device.master) & termios.CSTOPB
    finally:
        ser.close()


def test_dtr_rts_break_and_modem_state(bridge_on):
    bridge = bridge_on()
    ser = open_client(bridge)
    try:
        for value in (False, True, False):
            ser.dtr = value
            ser.rts = not value
        ser.break_condition = True
        ser.break_condition = False
        ser.send_break(0.05)
        # The server must send NOTIFY-MODEMSTATE, or pyserial raises here.
        assert ser.cts in (True, False)
        assert ser.cd in (True, False)
    finally:
        ser.close()


def test_all_byte_values_both_ways(bridge_on, device):
    bridge = bridge_on()
    ser = open_client(bridge)
    try:
        payload = bytes(range(256)) * 64
        ser.write(payload)
        assert device.read(len(payload)) == payload
        device.write(payload)
        got = ser.read(len(payload))
        assert got == payload
    finally:
        ser.close()


def test_purge_receive_buffer_drops_stale_device_data(bridge_on, device):
    bridge = bridge_on()
    ser = open_client(bridge)
    try:
        device.write(b"stale data from before the purge\n")
        time.sleep(0.3)
        ser.reset_input_buffer()
        ser.reset_output_buffer()
        device.write(b"fresh")
        assert ser.read(5) == b"fresh"
    finally:
        ser.close()

