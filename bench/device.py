#!/usr/bin/env python3
"""The benchmark's stand-in device: a pseudo-terminal whose master side this process plays.

    device.py echo     everything read from the master is written back (the echo device)
    device.py sink     reads and counts; "expect N" on stdin -> prints "done" once N bytes came
    device.py source   "send N" on stdin -> writes N pattern bytes, prints "sent"; counts what
                       it reads like sink ("expect N")

It prints the slave's path on stdout, then serves until stdin closes or SIGTERM. The same
single-threaded loop (poll + os.read/os.write, 64 KiB at a time) plays the device for every
server, so it costs each of them the same. The slave is kept open here as well, so the pty
never hangs up between a server's close and its next open (servers open per client).
"""

import os
import pty
import select
import signal
import sys
import tty

CHUNK = 65536
# 0..254 repeated: never 0xFF, so no telnet escaping anywhere on the path.
PATTERN = bytes(range(255)) * (CHUNK // 255 + 2)


def main():
    mode = sys.argv[1]
    master, slave = pty.openpty()
    tty.setraw(master)
    tty.setraw(slave)
    path = os.ttyname(slave)
    os.set_blocking(master, False)
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    sys.stdout.write(path + "\n")
    sys.stdout.flush()

    stdin = sys.stdin.fileno()
    pending = bytearray()  # echo: bytes read, not yet written back
    to_send = 0  # source: bytes still to write
    sent_off = 0
    count = 0  # sink: bytes seen
    expect = None
    poller = select.poll()
    poller.register(stdin, select.POLLIN)
    poller.register(master, select.POLLIN)
    stdin_buf = b""
    while True:
        want_out = bool(pending) or to_send > 0
        want_in = not (mode == "echo" and len(pending) >= 4 * CHUNK)
        poller.modify(master, (select.POLLIN if want_in else 0) | (select.POLLOUT if want_out else 0))
        for fd, ev in poller.poll():
            if fd == stdin:
                data = os.read(stdin, 4096)
                if not data:
                    return
                stdin_buf += data
                while b"\n" in stdin_buf:
                    line, stdin_buf = stdin_buf.split(b"\n", 1)
                    word, _, arg = line.decode().partition(" ")
                    if word == "expect":
                        expect = count + int(arg)
                        if count >= expect:
                            print("done", flush=True)
                            expect = None
                    elif word == "send":
                        to_send += int(arg)
                    elif word == "drain":
                        # Throw away whatever is queued on the master side.
                        try:
                            while os.read(master, CHUNK):
                                pass
                        except OSError:
                            pass
                        print("drained", flush=True)
                continue
            if ev & select.POLLIN:
                try:
                    data = os.read(master, CHUNK)
                except (BlockingIOError, InterruptedError):
                    data = b""
                if mode == "echo":
                    pending += data
                else:
                    # sink and source count what they read: the benchmark's down client sends
                    # one byte first (its claim on esp-bridge) and waits for "expect 1".
                    count += len(data)
                    if expect is not None and count >= expect:
                        print("done", flush=True)
                        expect = None
            if ev & select.POLLOUT:
                try:
                    if pending:
                        n = os.write(master, pending[:CHUNK])
                        del pending[:n]
                    elif to_send > 0:
                        n = os.write(master, PATTERN[sent_off:sent_off + min(to_send, CHUNK)])
                        sent_off = (sent_off + n) % 255
                        to_send -= n
                        if to_send == 0:
                            print("sent", flush=True)
                except (BlockingIOError, InterruptedError):
                    pass


if __name__ == "__main__":
    main()
