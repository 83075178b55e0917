#!/usr/bin/env python3
"""In the guest: follows the EN and IO0 levels the bridge drives on gpio-sim lines, hands each
change to the host's virtual ESP32 over /dev/ttyS2 (its --control-unix protocol: a line
"en=high io0=low", answered with a line), and logs it with its time.

    strap-watcher.py LOG en:NAME=VALUE_PATH... io0:NAME=VALUE_PATH

EN is high only while every en: line is (two GPIOs wired to EN after a remap). A log line is
"<monotonic s, when the change was seen> <en high|low> <io0 high|low> NAME=0|1 ...".
Runs until /run/strap-watcher-stop exists.
"""

import os
import sys
import time
import tty

log_path, *specs = sys.argv[1:]
lines = []  # (role, name, path)
for spec in specs:
    role, _, rest = spec.partition(":")
    name, _, path = rest.partition("=")
    lines.append((role, name, path))

port = os.open("/dev/ttyS2", os.O_RDWR | os.O_NOCTTY)
tty.setraw(port)
log = open(log_path, "a", buffering=1)


def high(path):
    with open(path) as f:
        return f.read(1) == "1"


def word(level):
    return "high" if level else "low"


last = None
while not os.path.exists("/run/strap-watcher-stop"):
    levels = [(role, name, high(path)) for role, name, path in lines]
    en = all(v for role, _, v in levels if role == "en")
    io0 = all(v for role, _, v in levels if role == "io0")
    if (en, io0) != last:
        seen = time.monotonic()
        os.write(port, f"en={word(en)} io0={word(io0)}\n".encode())
        answer = b""
        while not answer.endswith(b"\n"):
            answer += os.read(port, 64)
        named = " ".join(f"{name}={int(v)}" for _, name, v in levels)
        log.write(f"{seen:.6f} {word(en)} {word(io0)} {named}\n")
        last = (en, io0)
    time.sleep(0.0005)
