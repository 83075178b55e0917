"""The timing of the strap sequences the bridge drives, measured from guest/strap-watcher.py's
log, with the observer's own lateness kept apart from the bridge's timing.

The watcher samples the gpio-sim lines; each change it logs comes with the window it happened
in: after the last sample that still showed the old levels, and by the first that showed the
new ones. Under software emulation, and more so with the host busy, a sample can come tens of
milliseconds late. So a pulse measured between two logged changes is not one number but an
interval: with its start in (a1, b1] and its end in (a2, b2], its length lies in (a2 - b1,
b2 - a1). Against a minimum the bridge must keep:

- lower bound >= minimum: the pulse was long enough, whatever the observer's lateness: "ok";
- upper bound < minimum: the pulse was too short, whatever the observer's lateness: "short",
  a failure of the bridge, never excused;
- otherwise the observer's windows are too wide to decide: "undecided". These are counted and
  shown, and only a limited share of them is tolerated (see check()): a run where the observer
  could decide too little proves nothing and fails.

What is measured (the minimums esptool's own sequences have; the bridge plans 10 ms more):
- "EN low": every EN pulse, from EN falling to EN rising: >= 100 ms;
- "IO0 hold": every bootloader entry (EN rising while IO0 is low), from EN rising to IO0
  rising: >= 50 ms. When IO0 fell in the same window as EN rose (the bridge lowers IO0 10 ms
  before it releases EN), the hold is still bounded the same way: IO0 was low after EN rose
  from the later of the two, which lies in that window too. When EN and IO0 both rise within
  one window, their order was not seen: that entry is "undecided" (it may also have been a
  plain reset into the application).
"""

from dataclasses import dataclass

EN_LOW_MIN = 0.100
IO0_HOLD_MIN = 0.050


@dataclass
class Change:
    """One logged change: the levels after it, and the window (after, by] it happened in."""

    after: float
    by: float
    en: bool
    io0: bool
    text: str


@dataclass
class Pulse:
    """A measured pulse: its length lies in (low, high)."""

    kind: str  # "EN low" or "IO0 hold"
    low: float
    high: float
    minimum: float
    at: float  # when it started (guest monotonic seconds), to find it in the log
    order_seen: bool = True  # False: its two edges fell in one window, in an unknown order

    @property
    def verdict(self):
        if not self.order_seen:
            return "undecided"
        if self.low >= self.minimum:
            return "ok"
        if self.high < self.minimum:
            return "short"
        return "undecided"

    def __str__(self):
        order = "" if self.order_seen else ", both edges in one window"
        return (f"{self.kind} at {self.at:.3f}: {max(self.low, 0) * 1000:.1f}..{self.high * 1000:.1f} ms "
                f"(>= {self.minimum * 1000:.0f} ms: {self.verdict}{order})")


def parse(text):
    """The changes in a strap-watcher log, in order; comments and blank lines skipped."""
    out = []
    for line in text.splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        after, by, en, io0 = line.split()[:4]
        out.append(Change(float(after), float(by), en == "high", io0 == "high", line))
    return out


def pulses(changes):
    """Every EN-low pulse and every bootloader entry's IO0 hold in `changes`."""
    out = []
    en_fell = None  # the change at which EN went low
    entry = None  # the change at which EN rose with IO0 still low
    prev = None
    for c in changes:
        if prev is not None:
            if entry is not None and (c.io0 or not c.en):
                # IO0 rose (or, not expected, EN fell again first): the hold ends here.
                out.append(Pulse("IO0 hold", c.after - entry.by, c.by - entry.after, IO0_HOLD_MIN, entry.after))
                entry = None
            if prev.en and not c.en:
                en_fell = c
            if not prev.en and c.en:
                if en_fell is not None:
                    out.append(Pulse("EN low", c.after - en_fell.by, c.by - en_fell.after, EN_LOW_MIN,
                                     en_fell.after))
                en_fell = None
                if not c.io0:
                    entry = c
                elif not prev.io0 and c.io0:
                    # EN and IO0 rose within one window, in an order not seen: a bootloader
                    # entry with too short a hold, or IO0 released first (a reset into the app).
                    out.append(Pulse("IO0 hold", c.after - c.by, c.by - c.after, IO0_HOLD_MIN, c.after,
                                     order_seen=False))
        prev = c
    return out


def check(measured, at_least, max_undecided_share):
    """Failures (texts) for `measured` pulses of one kind: any provably short one; fewer than
    `at_least` decided ones; more undecided than `max_undecided_share` of them all."""
    short = [p for p in measured if p.verdict == "short"]
    ok = [p for p in measured if p.verdict == "ok"]
    undecided = [p for p in measured if p.verdict == "undecided"]
    kind = measured[0].kind if measured else "pulses"
    problems = [f"provably too short: {p}" for p in short]
    if len(ok) < at_least:
        problems.append(f"{kind}: only {len(ok)} of {len(measured)} shown long enough, {at_least} needed")
    if len(undecided) > max_undecided_share * len(measured):
        problems.append(f"{kind}: {len(undecided)} of {len(measured)} undecided (the watcher sampled too "
                        f"late around them), more than {max_undecided_share:.0%} allowed")
    return problems


def report(measured):
    """One line per pulse, for the test's output."""
    return "\n".join(str(p) for p in measured)
