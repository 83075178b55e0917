"""Connects esptool to a port N times with its default reset, the way `esptool chip-id`
does, and prints one line per attempt. Run with the Python of an esptool venv:

    python esptool_connect.py URL COUNT

Each attempt opens the port, resets the chip into the bootloader (esptool's classic reset:
only that one is used for rfc2217 ports), syncs and detects the chip, then closes."""

import sys

import esptool
from esptool.cmds import detect_chip

url, count = sys.argv[1], int(sys.argv[2])
major = int(esptool.__version__.split(".")[0])
mode = "default-reset" if major >= 5 else "default_reset"
ok = 0
for attempt in range(count):
    try:
        esp = detect_chip(url, 115200, mode, connect_attempts=1)
        name = esp.CHIP_NAME
        esp._port.close()
        ok += 1
        print(f"attempt {attempt}: connected to {name}", flush=True)
    except Exception as e:  # report and go on: the test counts
        print(f"attempt {attempt}: FAILED {type(e).__name__}: {e}", flush=True)
print(f"connected {ok} of {count}")
