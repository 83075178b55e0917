#!/usr/bin/env python3
"""In the guest: follows the EN and IO0 levels the bridge drives on gpio-sim lines, hands each
change to the host's virtual ESP32 over /dev/ttyS2 (its --control-unix protocol: a line
"en=high io0=low", answered with a line), and logs it with the window in which it happened.

    strap-watcher.py LOG en:NAME=VALUE_PATH... io0:NAME=VALUE_PATH...
                     [--port PORT LOG en:NAME=VALUE_PATH... io0:NAME=VALUE_PATH...]...

EN is high only while every en: line is (two GPIOs wired to EN after a remap). Each --port
group is another board: its lines go to the virtual ESP32 behind PORT (e.g. /dev/ttyS4), its
changes to its own LOG; all boards' lines are read in the same samples.

gpio-sim's value files cannot be waited on, so the lines are sampled, every half millisecond
or so when the guest gets the CPU. A sample that shows new levels says only that the change
happened after the previous sample read the old ones: under software emulation, or with the
host busy, the gap between two samples can grow to many milliseconds. So each change is logged
with both ends of that window, and whoever measures a pulse from the log knows how far off the
measurement can be (tests/vm/straps.py):

    <after> <by> <en high|low> <io0 high|low> NAME=0|1 ...

the levels changed after <after> (when the last sample with the old levels began reading) and
by <by> (when the first sample with the new levels finished reading), guest CLOCK_MONOTONIC
seconds. The first line is the levels at start (<after> = <by>). Lines starting with '#' are
comments: at the end, how many samples were taken and how far apart they were.

Nothing else may hold a sample up: relaying to the host sim is non-blocking (its answers are
read when they are there), the value files stay open, the garbage collector is off, and the
watcher asks for real-time scheduling (SCHED_FIFO) so that the guest's other work does not
delay it; the host's own scheduling of the VM still can, which is what the windows are for.
Runs until /run/strap-watcher-stop exists; then relays what is still queued (for up to 10 s)
and exits.
"""

import gc
import os
import sys
import time
import tty

STOP = "/run/strap-watcher-stop"
PERIOD = 0.0005


def groups(args):
    """(port, log path, specs) for each board on the command line."""
    out = []
    port = "/dev/ttyS2"
    while args:
        if args[0] == "--port":
            port, args = args[1], args[2:]
        log_path, args = args[0], args[1:]
        specs = []
        while args and args[0] != "--port":
            specs.append(args.pop(0))
        out.append((port, log_path, specs))
    return out


def open_port(path):
    port = os.open(path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
    tty.setraw(port)
    return port


try:
    os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(10))
    policy = "SCHED_FIFO"
except OSError as e:
    policy = f"normal scheduling ({e})"
gc.disable()


def word(level):
    return "high" if level else "low"


class Relay:
    """Requests to the host sim, written as the port takes them; answers read as they come.
    The sim applies the lines in order, so they need not wait for each other's answers."""

    def __init__(self, port):
        self.port = port
        self.pending = b""
        self.unanswered = 0
        self.answers = b""
        self.errors = []

    def send(self, request):
        self.pending += request
        self.unanswered += 1
        self.pump()

    def pump(self):
        if self.pending:
            try:
                self.pending = self.pending[os.write(self.port, self.pending):]
            except BlockingIOError:
                pass
        if self.unanswered:
            try:
                self.answers += os.read(self.port, 256)
            except BlockingIOError:
                return
            *done, self.answers = self.answers.split(b"\n")
            self.unanswered -= len(done)
            self.errors += [a for a in done if a.strip() != b"ok"]


class Board:
    """One board's lines, its relay to its sim and its log."""

    def __init__(self, port, log_path, specs):
        self.lines = []  # (role, name, fd of its value file)
        for spec in specs:
            role, _, rest = spec.partition(":")
            name, _, path = rest.partition("=")
            self.lines.append((role, name, os.open(path, os.O_RDONLY)))
        self.relay = Relay(open_port(port))
        self.log = open(log_path, "a", buffering=1)
        self.last = None

    def read(self):
        # pread at 0 reads a sysfs attribute afresh without reopening it.
        return [(role, name, os.pread(fd, 1, 0) == b"1") for role, name, fd in self.lines]

    def update(self, levels, after, finished):
        """Logs and relays new levels; otherwise moves the relay on."""
        en = all(v for role, _, v in levels if role == "en")
        io0 = all(v for role, _, v in levels if role == "io0")
        if (en, io0) != self.last:
            named = " ".join(f"{name}={int(v)}" for _, name, v in levels)
            self.log.write(f"{after:.6f} {finished:.6f} {word(en)} {word(io0)} {named}\n")
            self.relay.send(f"en={word(en)} io0={word(io0)}\n".encode())
            self.last = (en, io0)
        elif self.relay.pending or self.relay.unanswered:
            self.relay.pump()


boards = [Board(*g) for g in groups(sys.argv[1:])]


def sample():
    """(levels, started, finished): each board's lines' levels, read between `started` and
    `finished`."""
    started = time.monotonic()
    levels = [b.read() for b in boards]
    return levels, started, time.monotonic()


last_started = None
samples = 0
gaps = []  # gaps between samples over 5 ms, for the closing comment
longest = 0.0
next_stop_check = 0.0
while True:
    levels, started, finished = sample()
    samples += 1
    if last_started is not None:
        gap = finished - last_started
        if gap > longest:
            longest = gap
        if gap > 0.005:
            gaps.append(gap)
    for board, board_levels in zip(boards, levels):
        board.update(board_levels, started if last_started is None else last_started, finished)
    last_started = started
    if finished >= next_stop_check:
        next_stop_check = finished + 0.1
        if os.path.exists(STOP):
            break
    time.sleep(PERIOD)

deadline = time.monotonic() + 10
while any(b.relay.pending or b.relay.unanswered for b in boards) and time.monotonic() < deadline:
    for b in boards:
        b.relay.pump()
    time.sleep(0.01)
for b in boards:
    relay = b.relay
    b.log.write(f"# {samples} samples ({policy}); longest gap {longest * 1000:.1f} ms; {len(gaps)} gaps over 5 ms"
                f"{' (' + ', '.join(f'{g * 1000:.0f}' for g in sorted(gaps)[-10:]) + ' ms the longest)' if gaps else ''}\n")
    if relay.unanswered or relay.errors:
        b.log.write(f"# relay: {relay.unanswered} requests unanswered; answers other than ok: {relay.errors[:5]}\n")
