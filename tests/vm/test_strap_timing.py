"""tests/vm/straps.py on made-up watcher logs: how the bridge's timing is told apart from the
observer's lateness. No VM; runs in milliseconds."""

from straps import check, parse, pulses


def log(*rows):
    """A strap-watcher log from (after_ms, by_ms, en, io0) rows."""
    return "\n".join(f"{a / 1000:.6f} {b / 1000:.6f} {'high' if en else 'low'} {'high' if io0 else 'low'} g22={int(en)}"
                     for a, b, en, io0 in rows) + "\n# 100 samples; longest gap 1.0 ms; 0 gaps over 5 ms\n"


def verdicts(text):
    return [(p.kind, p.verdict) for p in pulses(parse(text))]


def bootloader_entry(en_rise_window=(1, 1), io0_rise_at=200):
    """EN low at 0, IO0 low at 100, EN up at 120 (seen in a window of the given widths before
    and after), IO0 up at io0_rise_at; every other edge seen within 1 ms."""
    before, after = en_rise_window
    return log((-5, -5, True, True), (-1, 0, False, True), (99, 100, False, False),
               (120 - before, 120 + after, True, False), (io0_rise_at - 1, io0_rise_at, True, True))


def test_a_sequence_seen_closely_is_decided():
    assert verdicts(bootloader_entry()) == [("EN low", "ok"), ("IO0 hold", "ok")]
    p = pulses(parse(bootloader_entry()))
    assert 0.118 < p[0].low < p[0].high < 0.123
    assert 0.077 < p[1].low < p[1].high < 0.082


def test_a_provably_short_hold_fails_whatever_the_windows():
    # IO0 rose 30 ms after EN, both seen within 1 ms: too short however late the observer was.
    assert verdicts(bootloader_entry(io0_rise_at=150)) == [("EN low", "ok"), ("IO0 hold", "short")]


def test_a_late_sample_leaves_the_measure_undecided_not_failed():
    # The case: EN's rise seen 25 ms late makes the hold look like 35 ms; the window
    # says it may have been up to 60 ms, so it is not counted either way.
    text = bootloader_entry(en_rise_window=(25, 25), io0_rise_at=180)
    assert verdicts(text) == [("EN low", "undecided"), ("IO0 hold", "undecided")]
    hold = pulses(parse(text))[1]
    assert hold.low < 0.050 <= hold.high


def test_io0_falling_in_the_window_en_rises_in_still_bounds_the_hold():
    # The watcher missed the 10 ms with both low: EN rose and IO0 fell in one window.
    text = log((-5, -5, True, True), (-1, 0, False, True), (112, 121, True, False), (199, 200, True, True))
    assert verdicts(text) == [("EN low", "ok"), ("IO0 hold", "ok")]
    hold = pulses(parse(text))[1]
    assert 0.077 < hold.low < hold.high < 0.089


def test_edges_in_one_window_are_undecided_whatever_its_width():
    text = log((-5, -5, True, True), (-1, 0, False, True), (99, 100, False, False), (110, 190, True, True))
    assert verdicts(text) == [("EN low", "ok"), ("IO0 hold", "undecided")]


def test_a_plain_reset_has_no_hold():
    assert verdicts(log((0, 0, True, True), (9, 10, False, True), (129, 130, True, True))) == [("EN low", "ok")]
    assert verdicts(log((0, 0, True, True), (9, 10, False, True), (59, 60, True, True))) == [("EN low", "short")]


def test_check_limits_the_undecided_and_never_excuses_a_short_one():
    ok = pulses(parse(bootloader_entry()))[:1] * 3
    undecided = pulses(parse(bootloader_entry(en_rise_window=(25, 25), io0_rise_at=180)))[:1]
    short = pulses(parse(log((0, 0, True, True), (9, 10, False, True), (59, 60, True, True))))
    assert check(ok + undecided, at_least=3, max_undecided_share=0.25) == []
    assert len(check(ok + undecided * 2, at_least=3, max_undecided_share=0.25)) == 1
    assert len(check(ok[:2] + undecided, at_least=3, max_undecided_share=0.5)) == 1
    problems = check(ok + short, at_least=3, max_undecided_share=0.25)
    assert len(problems) == 1 and "provably too short" in problems[0]
