"""The .deb in a booted Debian that looks like a Raspberry Pi: apt install, the generated board
sockets listening on 2217 and 2218 and `esp-bridge status` answering, the boot files changed
and backed up, the udev rule for the Pi's UARTs installed, a flash through the forwarded ports
with resets through gpio-sim lines named like the Pi's; then two boards, as README's "Many
boards" describes them: the TOML rewritten into [[board]] tables, lab1 on /dev/ttyS1 (EN
GPIO22, IO0 GPIO10, ports 2217/2218) and lab2 on /dev/ttyS3 (EN GPIO23, IO0 GPIO24, ports
2219/2220), each with its own virtual ESP32 on the host, put into effect with `esp-bridge
apply`, `esp-bridge status` and the generated sockets of both, both boards flashed through
their forwarded ports (raw and RFC 2217), each put into its bootloader by its own lines only;
lab2's EN remapped in the TOML and put into effect with `esp-bridge apply` while the service
runs, and lab2 flashed through the new line; lab1's output in the journal (`journal = true`:
the service then runs without a client and from boot) and on its console port (2230): the
boot log its chip prints when it is powered up again with no client connected, found with
`journalctl -u esp-bridge BOARD=lab1` and replayed with timestamps by the console; lab1's chip identified (`esp-bridge identify lab1`,
through its GPIO lines) and its identity kept across a restart of the service; an upgrade that keeps the edited config and
listens again on both boards' ports, and apt purge restoring the boot files byte for byte and
leaving no unit, generated or not, and no listener."""

import datetime
import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import (ROOT, esptool_cmd, failure_context, run_esptool, slow_link_esptool_cfg, start_sim, stop,
                      wait_for_guest)

FIXTURE = ROOT / "tests" / "fixtures" / "pi" / "bookworm" / "root" / "boot" / "firmware"
ADDRESS = 0x10000

# The first board (default, then lab1) has EN on GPIO22 and IO0 on GPIO10, relayed over ttyS2
# to its chip. lab2's EN is wired to GPIO23 first and to GPIO27 after the remap (the other one
# floats high on its pull-up, so its EN is low when either is), its IO0 to GPIO24, relayed over
# ttyS4 to its own chip.
GUEST_SCRIPT = r"""
set -euo pipefail
H=/mnt/host
say() { echo "== $* (uptime $(cut -d' ' -f1 /proc/uptime)s)"; }
fail() { echo "FAIL: $*"; exit 1; }
wait_host() { for _ in $(seq 1 9000); do [ -e "$H/$1" ] && return; sleep 0.1; done; fail "no $1 from the host"; }
# A failed check that later steps do not depend on: noted in failures.txt, the script goes on.
note() { echo "FAIL (going on): $*" | tee -a $H/failures.txt; }
listens() { ss -Hltn "sport = :$1" | grep -q .; }
# The documented steps after editing the file, `esp-bridge check-config` then `esp-bridge
# apply`, with the service running as it does on a Pi once a client came. Should they refuse
# (e.g. the lines the running service itself holds), that is noted, and the steps are done
# again with the service stopped, so that the rest of the test still runs.
apply_config() {
    local rc=0
    esp-bridge check-config > $H/check-$1.txt 2>&1 && esp-bridge apply > $H/apply-$1.txt 2>&1 || rc=$?
    tail -n 5 $H/check-$1.txt
    cat $H/apply-$1.txt 2> /dev/null || true
    [ $rc = 0 ] && return
    note "check-config or apply ($1) exited $rc with the service running: $(grep -ih 'in use\|error' $H/check-$1.txt $H/apply-$1.txt 2> /dev/null | head -3)"
    systemctl stop esp-bridge.service
    esp-bridge check-config > $H/check-$1.txt 2>&1 || { cat $H/check-$1.txt; fail "check-config ($1) refuses the file with the service stopped"; }
    esp-bridge apply > $H/apply-$1.txt 2>&1 || { cat $H/apply-$1.txt; fail "esp-bridge apply ($1) failed with the service stopped"; }
    cat $H/apply-$1.txt
}
systemctl is-system-running --wait >/dev/null || { systemctl --failed --no-pager; fail "system not running"; }

say "a Raspberry Pi's boot files (Bookworm layout)"
mkdir -p /boot/firmware
cp $H/config.txt $H/cmdline.txt /boot/firmware/
cp /boot/firmware/config.txt /root/config.orig
cp /boot/firmware/cmdline.txt /root/cmdline.orig

say "GPIO lines named like the Pi's, pulled up like a board's"
eval "$(bash $H/gpio-sim-pi.sh)"
for p in "$GPIO22_PULL" "$GPIO10_PULL" "$GPIO23_PULL" "$GPIO24_PULL" "$GPIO27_PULL"; do echo pull-up > "$p"; done
# A port the kernel did not find has type 0 (PORT_UNKNOWN).
for n in 1 2 3 4; do
    [ "$(cat /sys/class/tty/ttyS$n/type 2> /dev/null || echo 0)" != 0 ] || fail "no UART behind /dev/ttyS$n"
done
stty -F /dev/ttyS2 115200 raw -echo
stty -F /dev/ttyS4 115200 raw -echo
python3 $H/strap-watcher.py $H/straps.log "en:g22=$GPIO22_VALUE" "io0:g10=$GPIO10_VALUE" \
    --port /dev/ttyS4 $H/straps-lab2.log "en:g23=$GPIO23_VALUE" "en:g27=$GPIO27_VALUE" "io0:g24=$GPIO24_VALUE" &

say "apt install ./esp-bridge.deb"
# This x86 VM has no device tree: tell the package it is setting up a Pi, as an image build does.
ESP_BRIDGE_SETUP_PI=1 DEBIAN_FRONTEND=noninteractive apt-get install -y -q $H/esp-bridge-1.deb
systemctl is-active esp-bridge.socket || fail "the socket is not active after install"
# The package's generator made the boards' socket units from the shipped /etc/esp-bridge.toml.
[ -x /usr/lib/systemd/system-generators/esp-bridge-generator ] || fail "no generator installed"
for k in rfc2217 raw; do
    [ -e /run/systemd/generator/esp-bridge-default-$k.socket ] || fail "no generated esp-bridge-default-$k.socket"
    systemctl is-active esp-bridge-default-$k.socket || fail "esp-bridge-default-$k.socket is not active"
done
listens 2217 || fail "nothing listens on 2217"
listens 2218 || fail "nothing listens on 2218"
systemctl is-active esp-bridge.service && fail "the service runs before any client connected"
systemctl enable --now esp-bridge.socket
systemctl enable --now esp-bridge.socket
grep -qx 'enable_uart=1' /boot/firmware/config.txt || fail "enable_uart=1 missing"
grep -qx 'dtoverlay=disable-bt' /boot/firmware/config.txt || fail "dtoverlay=disable-bt missing"
grep -qx 'dtparam=uart0=on' /boot/firmware/config.txt || fail "dtparam=uart0=on missing"
grep -q 'console=serial0' /boot/firmware/cmdline.txt && fail "serial console still on cmdline.txt"
grep -q 'console=tty1' /boot/firmware/cmdline.txt || fail "cmdline.txt lost console=tty1"
ls -R /var/lib/esp-bridge
[ -n "$(find /var/lib/esp-bridge -name 'config.txt*' -type f)" ] || fail "no backup of config.txt"
[ -e /run/reboot-required ] || fail "no reboot-required notice"
getent group gpio >/dev/null || fail "group gpio was not created"
[ "$(stat -c %G "$GPIOSIM_DEV")" = gpio ] || fail "$GPIOSIM_DEV is not group gpio: $(ls -l $GPIOSIM_DEV)"

say "the udev rule that names the Pi's UARTs"
rules=/usr/lib/udev/rules.d/61-esp-bridge-uart.rules
[ -f $rules ] || fail "$rules is not installed"
if udevadm verify --help > /dev/null 2>&1; then
    udevadm verify $rules || note "udevadm verify $rules failed"
else
    # systemd 253 brought `udevadm verify`; bookworm has 252. udev reads every rules file for
    # `udevadm test` and names the file and line of anything it cannot parse.
    # Its program names no UART here (an x86 VM has no device tree) and exits 1: expected.
    echo "udevadm $(udevadm --version) has no verify: looking for complaints in udevadm test"
    udevadm test /sys/class/tty/ttyS3 > $H/udevadm-test.txt 2>&1 || true
    grep -q 'esp-bridge uart-name ttyS3' $H/udevadm-test.txt || note "udev did not run $rules for ttyS3 (udevadm-test.txt)"
    grep -iE "61-esp-bridge-uart\.rules:[0-9]+.*(invalid|unknown|ignoring)" $H/udevadm-test.txt &&
        note "udev complains about $rules (udevadm-test.txt)"
fi

say "configure the UART of this VM (a Pi uses /dev/serial0) and apply it"
sed -i 's|^device = .*|device = "/dev/ttyS1"|' /etc/esp-bridge.toml
esp-bridge check-config > /dev/null
esp-bridge apply
esp-bridge status | tee $H/status.txt
systemctl is-active esp-bridge.service || fail "esp-bridge status did not start the service"
touch $H/ready-1
wait_host phase-1-done

say "two boards: the first one's device and ports into a [[board]] of its own, lab2 beside it"
# As README's "Many boards" says: device leaves [serial], listen and raw_listen leave [network].
sed -i -e '/^device = /d' -e '/^listen = /d' -e '/^raw_listen = /d' /etc/esp-bridge.toml
cat >> /etc/esp-bridge.toml << 'TOML'

# lab1: the first board, EN and IO0 on [control.gpio]'s GPIO22 and GPIO10; its output in the
# journal, and on a console port.
[[board]]
name = "lab1"
device = "/dev/ttyS1"
listen = ["0.0.0.0:2217"]
raw_listen = ["0.0.0.0:2218"]
console_listen = ["0.0.0.0:2230"]
[board.serial]
journal = true

# lab2: the VM's second UART, its own EN and IO0.
[[board]]
name = "lab2"
device = "/dev/ttyS3"
listen = ["0.0.0.0:2219"]
raw_listen = ["0.0.0.0:2220"]
[board.control.gpio]
reset = "GPIO23"
boot = "GPIO24"
TOML
apply_config two-boards
esp-bridge status | tee $H/status-2.txt
for b in lab1 lab2; do
    for k in rfc2217 raw; do
        [ -e /run/systemd/generator/esp-bridge-$b-$k.socket ] || fail "no generated esp-bridge-$b-$k.socket"
        systemctl is-active esp-bridge-$b-$k.socket || fail "esp-bridge-$b-$k.socket is not active"
    done
done
for port in 2217 2218 2219 2220 2230; do listens $port || fail "nothing listens on $port"; done
systemctl is-active esp-bridge-lab1-console.socket || fail "esp-bridge-lab1-console.socket is not active"
# lab1's output goes to the journal: the service runs with no client, and from boot.
systemctl is-active esp-bridge.service || fail "the service does not run after apply although lab1 sends its output to the journal"
[ -L /run/systemd/generator/multi-user.target.wants/esp-bridge.service ] || fail "the generator did not make multi-user.target want the service"
systemctl show -p WantedBy --value esp-bridge.service | tee $H/wanted-by.txt | grep -qw multi-user.target ||
    fail "systemd does not start the service at boot: WantedBy=$(cat $H/wanted-by.txt)"
for k in rfc2217 raw; do
    [ -e /run/systemd/generator/esp-bridge-default-$k.socket ] && fail "esp-bridge-default-$k.socket still generated"
    systemctl is-active esp-bridge-default-$k.socket && fail "esp-bridge-default-$k.socket still active"
done
touch $H/ready-2
wait_host phase-2-done
# lab1's chip was powered up again by the host while no client was connected.
journalctl -u esp-bridge BOARD=lab1 -o json --no-pager > $H/lab1-journal.json
journalctl -u esp-bridge BOARD=lab1 --no-pager | grep -F 'App image MD5' | tail -3

say "identify lab1's chip through its GPIO lines; kept across a restart"
esp-bridge identify lab1 2>&1 | tee $H/identify-lab1.txt || note "esp-bridge identify lab1 failed: $(cat $H/identify-lab1.txt)"
systemctl restart esp-bridge.service
esp-bridge status | tee $H/status-identified.txt
ls -l /var/lib/esp-bridge-chips/ || note "no /var/lib/esp-bridge-chips"

say "remap lab2's EN from GPIO23 to GPIO27: edit its table, esp-bridge apply (the service runs)"
systemctl is-active esp-bridge.service || note "the service does not run before the remap"
sed -i 's|^reset = "GPIO23"|reset = "GPIO27"|' /etc/esp-bridge.toml
grep -q '^reset = "GPIO27"' /etc/esp-bridge.toml || fail "the sed did not remap EN"
apply_config remap
# On the watcher's clock: lab2's EN may go low through GPIO23 only before this, GPIO27 after.
python3 -c 'import time; print(time.monotonic())' > $H/remapped-at
touch $H/ready-3
wait_host phase-3-done
journalctl -u esp-bridge.service -o json --no-pager > $H/bridge-journal.json

say "upgrade to a higher version keeps the edited config"
DEBIAN_FRONTEND=noninteractive apt-get install -y -q $H/esp-bridge-2.deb
dpkg-query -W -f='${Version}\n' esp-bridge | tee $H/version-after-upgrade
grep -q '^reset = "GPIO27"' /etc/esp-bridge.toml || fail "the upgrade lost the edited config"
grep -q '^name = "lab2"' /etc/esp-bridge.toml || fail "the upgrade lost the [[board]] tables"
systemctl is-active esp-bridge.socket || fail "the socket is not active after the upgrade"
for port in 2217 2218 2219 2220 2230; do listens $port || fail "not listening on $port after the upgrade"; done
esp-bridge status | tee $H/status-after-upgrade.txt

say "apt purge"
DEBIAN_FRONTEND=noninteractive apt-get purge -y -q esp-bridge
cmp /root/config.orig /boot/firmware/config.txt || fail "config.txt not restored byte for byte"
cmp /root/cmdline.orig /boot/firmware/cmdline.txt || fail "cmdline.txt not restored byte for byte"
for f in /usr/bin/esp-bridge /etc/esp-bridge.toml /var/lib/esp-bridge \
         /usr/lib/systemd/system/esp-bridge.socket /usr/lib/systemd/system/esp-bridge.service \
         /usr/lib/systemd/system-generators/esp-bridge-generator \
         /run/systemd/generator/esp-bridge-{default,lab1,lab2}-{rfc2217,raw}.socket \
         /run/systemd/generator/esp-bridge-lab1-console.socket \
         /run/systemd/generator/esp-bridge.socket.wants \
         /run/systemd/generator/multi-user.target.wants/esp-bridge.service \
         /var/lib/esp-bridge-chips /var/lib/private/esp-bridge-chips \
         /etc/systemd/system/sockets.target.wants/esp-bridge.socket; do
    [ -e "$f" ] && fail "$f left behind after purge"
done
systemctl list-unit-files --no-legend | grep esp-bridge && fail "unit files still known after purge"
systemctl list-units --all --plain --no-legend 'esp-bridge*' | grep . && fail "units still loaded after purge"
for port in 2217 2218 2219 2220 2230; do listens $port && fail "still listening on $port after purge"; done
systemctl is-active esp-bridge.service && fail "the service still runs after purge"
ss -Hlx | grep -F /run/esp-bridge/ && fail "the control socket still listens after purge"
getent passwd esp-bridge && fail "a user esp-bridge was left"
touch /run/strap-watcher-stop
say "done"
# Notes in failures.txt fail the test on the host, after its own checks.
"""


def repack_with_version(deb, version, out):
    """The same package rebuilt under a higher version, as an upgrade would bring."""
    with tempfile.TemporaryDirectory() as d:
        subprocess.run(["dpkg-deb", "-R", str(deb), f"{d}/p"], check=True)
        control = Path(d, "p", "DEBIAN", "control")
        lines = [f"Version: {version}" if l.startswith("Version:") else l
                 for l in control.read_text().splitlines()]
        control.write_text("\n".join(lines) + "\n")
        subprocess.run(["dpkg-deb", "--root-owner-group", "-b", f"{d}/p", str(out)],
                       check=True, capture_output=True)


def sim_events(path):
    """The sim's event log so far (complete lines only: the sim may be writing the next)."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in text.split("\n")[:-1] if line.strip()]


def downloads(events):
    return sum(1 for e in events if e["event"] == "mode" and e["mode"] == "download")


def status_boards(text):
    """`esp-bridge status` as {board: its lines}; a board's first line is NAME<TAB>state."""
    boards = {}
    name = None
    for line in text.splitlines():
        if line and not line.startswith("\t"):
            name = line.split("\t")[0]
            boards[name] = line
        elif name is not None:
            boards[name] += "\n" + line
    return boards


def strap_changes(log):
    """The watcher's log as (after, {line name: level}) per change."""
    out = []
    for line in log.splitlines():
        if line.strip() and not line.startswith("#"):
            after, _by, _en, _io0, *named = line.split()
            out.append((float(after), dict((n.split("=")[0], n.split("=")[1]) for n in named)))
    return out


def app_md5(flash):
    """What the virtual chip prints at boot for its flash (the file it keeps): the MD5 of the
    64 KiB at 0x10000 (lab1's image there, and what an earlier, longer image left after it)."""
    return hashlib.md5(flash.read_bytes()[ADDRESS:ADDRESS + 64 * 1024]).hexdigest()[:16].encode()


STAMP = rb"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}) "


def stamped(stamp):
    """The time (UTC) a console line's stamp says."""
    return datetime.datetime.strptime(stamp.decode(), "%Y-%m-%d %H:%M:%S.%f").replace(
        tzinfo=datetime.timezone.utc).timestamp()


def console_replay(port, needle, after, context, timeout=60):
    """What a board's console port sends, from its first line, until a line with `needle`
    stamped after `after` (the guest's clock is the host's) has come (connecting again while
    the forwarded port is not through yet). An earlier boot's line with the same text does
    not count."""
    got = b""
    deadline = time.monotonic() + timeout
    pattern = re.compile(STAMP + rb"[^\n]*" + re.escape(needle) + rb"[^\n]*\n")
    while time.monotonic() < deadline:
        got = b""
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as c:
                c.settimeout(5)
                while time.monotonic() < deadline:
                    chunk = c.recv(65536)
                    if not chunk:
                        break
                    got += chunk
                    if any(stamped(m.group(1)) >= after for m in pattern.finditer(got)):
                        return got
        except OSError:
            pass
        time.sleep(1)
    pytest.fail(f"the console never showed {needle!r}: {got[-3000:]!r}{context()}", pytrace=False)


def test_deb_install_flash_remap_upgrade_purge(boot, esp_bridge_bin, tmp_path):
    esptool_cmd(5)
    debs = sorted((ROOT / "target" / "debian").glob("esp-bridge_*_amd64.deb"))
    if not debs:
        pytest.fail("no amd64 .deb: run scripts/build-debs amd64 first", pytrace=False)
    deb1 = tmp_path / "esp-bridge-1.deb"
    shutil.copy(debs[-1], deb1)
    version = subprocess.run(["dpkg-deb", "-f", str(deb1), "Version"], capture_output=True,
                             text=True, check=True).stdout.strip()
    upstream, _, revision = version.rpartition("-")
    deb2 = tmp_path / "esp-bridge-2.deb"
    repack_with_version(deb1, f"{upstream}-{int(revision) + 1}", deb2)
    v = boot(GUEST_SCRIPT, forwards=[2217, 2218, 2219, 2220, 2230],
             files=[deb1, deb2, FIXTURE / "config.txt", FIXTURE / "cmdline.txt"],
             ttyS2=True, ttyS3=True, ttyS4=True, timeout=1800)
    # The first board's chip (default, then lab1) and lab2's, each with its UART and relay.
    events1, flash1 = tmp_path / "events.jsonl", tmp_path / "flash.bin"
    events2, flash2 = tmp_path / "events-lab2.jsonl", tmp_path / "flash-lab2.bin"
    sim, sim_log = start_sim(v, "--boot", "app", "--event-log", str(events1), "--flash-file", str(flash1))
    sim2, sim2_log = start_sim(v, "--boot", "app", "--event-log", str(events2), "--flash-file", str(flash2),
                               uart=v.ttyS3, control=v.ttyS4)

    context = failure_context(v, sim_log, ("lab2", sim2_log, "straps-lab2.log"))

    cfg = slow_link_esptool_cfg(tmp_path)
    images = {}
    for name, size in (("app", 64), ("lab1", 32), ("lab2", 32), ("lab2-remapped", 32)):
        images[name] = tmp_path / f"{name}.bin"
        images[name].write_bytes(os.urandom(size * 1024))

    def write_flash(url, name, what):
        rc, out, took = run_esptool(url, "write-flash", hex(ADDRESS), str(images[name]), cfg=cfg)
        assert rc == 0 and "Hash of data verified" in out, f"{what}:\n{out}{context()}"
        times[what] = took

    def verify_flash(url, name, what):
        rc, out, took = run_esptool(url, "verify-flash", hex(ADDRESS), str(images[name]), cfg=cfg)
        assert rc == 0 and "digest matched" in out, f"{what}:\n{out}{context()}"
        times[what] = took

    times = {}
    try:
        rfc, raw = wait_for_guest(v, "ready-1", 1200, context)
        write_flash(rfc, "app", "default: write over RFC 2217")
        verify_flash(raw, "app", "default: verify over raw")
        v.signal("phase-1-done")

        _, lab1_raw = wait_for_guest(v, "ready-2", 300, context)
        lab2_rfc, lab2_raw = wait_for_guest(v, "ready-2", 1, context, ports=(2219, 2220))
        write_flash(lab1_raw, "lab1", "lab1: write over raw")
        # From here on only lab2 is flashed: lab1's chip must not be put into its bootloader.
        lab1_seen, lab2_seen = len(sim_events(events1)), sim_events(events2)
        write_flash(lab2_rfc, "lab2", "lab2: write over RFC 2217")
        verify_flash(lab2_raw, "lab2", "lab2: verify over raw")
        lab1_during_lab2 = sim_events(events1)[lab1_seen:]
        # lab1's chip powered off and on (its flash kept) with no client connected: the boot
        # log it prints then goes to the journal, and its console replays it.
        stop(sim)
        lab1_digest = app_md5(flash1)
        powered = time.time()
        sim, sim_log = start_sim(v, "--boot", "app", "--event-log", str(events1), "--flash-file", str(flash1))
        context = failure_context(v, sim_log, ("lab2", sim2_log, "straps-lab2.log"))
        lab1_console = console_replay(v.host_port(2230), b"App image MD5:    " + lab1_digest,
                                      powered - 1, context)
        # The guest identifies lab1 next: give qemu the second it takes to connect lab1's
        # strap relay to the new sim's control socket (reconnect=1).
        time.sleep(2)
        v.signal("phase-2-done")

        wait_for_guest(v, "ready-3", 300, context)
        # (lab1's chip was identified meanwhile, which takes it through its bootloader.)
        lab1_seen = len(sim_events(events1))
        write_flash(lab2_raw, "lab2-remapped", "lab2 after the remap: write over raw")
        lab1_during_lab2 += sim_events(events1)[lab1_seen:]
    finally:
        for phase in (1, 2, 3):
            v.signal(f"phase-{phase}-done")
    guest_rc = v.wait_exit(timeout=600)
    stop(sim)
    stop(sim2)
    print("VM deb flashes: " + ", ".join(f"{k} {s:.1f}s" for k, s in times.items()), file=sys.stderr)
    assert guest_rc == 0, f"guest script failed ({guest_rc})\n{v.diagnostics()}{context()}"

    status = v.read("status.txt", "")
    assert status.startswith("default\tidle: waiting for a client on "), f"status.txt: {status!r}"
    assert ":2217 (RFC 2217)" in status and ":2218 (ESP raw)" in status, f"status.txt: {status!r}"
    # Two boards: each with its ports and device, in status and in what apply said it did.
    for name in ("status-2.txt", "status-after-upgrade.txt"):
        boards = status_boards(v.read(name, ""))
        assert sorted(boards) == ["lab1", "lab2"], f"{name}: {v.read(name)!r}"
        for board, device, rfc_port, raw_port in (("lab1", "/dev/ttyS1", 2217, 2218),
                                                  ("lab2", "/dev/ttyS3", 2219, 2220)):
            text = boards[board]
            assert text.startswith(f"{board}\tidle: waiting for a client on "), f"{name}: {text!r}"
            assert f":{rfc_port} (RFC 2217)" in text and f":{raw_port} (ESP raw)" in text, f"{name}: {text!r}"
            assert f"device {device}: present" in text, f"{name}: {text!r}"
    applied = v.read("apply-two-boards.txt", "")
    for unit in ("default-rfc2217", "default-raw"):
        assert f"stopping esp-bridge-{unit}.socket: no longer in the configuration" in applied, applied
    for unit, port in (("lab1-rfc2217", 2217), ("lab1-raw", 2218), ("lab1-console", 2230),
                       ("lab2-rfc2217", 2219), ("lab2-raw", 2220)):
        assert f"esp-bridge-{unit}.socket: listening on {port}" in applied, applied
    assert "esp-bridge.service: running, and started at boot: board lab1's output goes to the journal" in applied, applied

    # lab1's boot log, printed when its chip was powered up again with nobody connected: in
    # the journal with the board's name, and replayed by its console with the time it came.
    digest = lab1_digest.decode()
    lab1_journal = [json.loads(line) for line in v.read("lab1-journal.json", "").splitlines() if line.strip()]
    # This power-up's (an earlier flash left the same line, before it).
    boot_entries = [j for j in lab1_journal if f"App image MD5:    {digest}" in str(j.get("MESSAGE", ""))
                    and int(j["__REALTIME_TIMESTAMP"]) >= (powered - 1) * 1e6]
    assert boot_entries, f"no boot log of lab1 in `journalctl BOARD=lab1`: {[j.get('MESSAGE') for j in lab1_journal][-20:]}"
    assert all(j.get("BOARD") == "lab1" and j.get("SERIAL_OUTPUT") == "true" for j in boot_entries), boot_entries
    assert any("rst:0x1 (POWERON_RESET)" in str(j.get("MESSAGE", "")) for j in lab1_journal), "the ROM's first line"
    assert not any(j.get("BOARD") == "lab2" for j in lab1_journal), "BOARD= tells the boards apart"
    assert lab1_console.startswith(b"[esp-bridge] board lab1 (/dev/ttyS1): "), lab1_console[:200]
    found = [stamped(m.group(1)) for m in re.finditer(
        STAMP + rb"I \(156\) app_init: App image MD5:    " + digest.encode(), lab1_console)]
    # Stamped when the chip printed it (the guest's clock is the host's: qemu's RTC, no NTP).
    assert any(powered - 1 <= at < powered + 60 for at in found), (powered, found)

    # `esp-bridge identify lab1`: the chip read through lab1's own GPIO lines and the strap
    # relay, kept across a restart of the service (its StateDirectory=).
    assert v.read("identify-lab1.txt", "").strip() == "ESP32 v3.1, MAC 24:0a:c4:12:34:56, 4 MiB flash", v.read("identify-lab1.txt")
    lab1_status = status_boards(v.read("status-identified.txt", "")).get("lab1", "")
    assert "\tchip: ESP32 v3.1, MAC 24:0a:c4:12:34:56, 4 MiB flash (identified " in lab1_status, lab1_status

    # Each chip holds what was written through its own board's ports.
    assert flash1.read_bytes()[ADDRESS:ADDRESS + 32 * 1024] == images["lab1"].read_bytes(), "lab1's flash"
    assert flash2.read_bytes()[ADDRESS:ADDRESS + 32 * 1024] == images["lab2-remapped"].read_bytes(), "lab2's flash"
    # Each chip was put into its bootloader by its own board's lines only: the first board's
    # in its three sessions, lab2's not before its own and in each of its three.
    assert downloads(sim_events(events1)) >= 3, sim_events(events1)
    assert downloads(lab1_during_lab2) == 0, f"lab1's chip into its bootloader while lab2 was flashed: {lab1_during_lab2}"
    assert downloads(lab2_seen) == 0, f"lab2's chip into its bootloader before lab2 was flashed: {lab2_seen}"
    assert downloads(sim_events(events2)) >= 3, sim_events(events2)

    # The lines: GPIO22 for the first board; GPIO23 for lab2 before the remap, GPIO27 after.
    assert any(levels.get("g22") == "0" for _, levels in strap_changes(v.read("straps.log", ""))), v.read("straps.log")
    remapped_at = float(v.read("remapped-at", "0"))
    lab2_straps = strap_changes(v.read("straps-lab2.log", ""))
    en23 = [t for t, levels in lab2_straps if levels.get("g23") == "0"]
    en27 = [t for t, levels in lab2_straps if levels.get("g27") == "0"]
    when = f"remapped at {remapped_at}\n--- straps-lab2.log ---\n{v.read('straps-lab2.log')}"
    assert en23 and max(en23) < remapped_at, f"GPIO23 low at {en23}, {when}"
    assert en27 and min(en27) > remapped_at, f"GPIO27 low at {en27}, {when}"
    # The service said so each time it started.
    journal = [json.loads(line) for line in v.read("bridge-journal.json", "").splitlines() if line.strip()]
    messages = [str(j.get("MESSAGE", "")) for j in journal]
    said = {board: [m for m in messages if f"board {board}: control lines:" in m] for board in ("lab1", "lab2")}
    assert said["lab1"] and all("GPIO22 (EN) and GPIO10 (IO0)" in m for m in said["lab1"]), said
    assert said["lab2"] and "GPIO23 (EN) and GPIO24 (IO0)" in said["lab2"][0], said
    assert "GPIO27 (EN) and GPIO24 (IO0)" in said["lab2"][-1], said
    assert v.read("version-after-upgrade", "").strip().endswith(f"-{int(revision) + 1}")
    # Checks the guest went on after (its notes), last so that a run reports the others too.
    assert not v.read("failures.txt"), f"{v.read('failures.txt')}{context()}"
