"""Fixtures for the VM system tests: a real Debian bookworm booted under qemu (tests/vm/vm.py),
with systemd, journald, gpio-sim and a real kernel UART on /dev/ttyS1.

Run them with tests/vm/run (it builds the image first, as root). Every test here is marked
`vm`. Environment, beside vm.py's own (ESP_BRIDGE_CACHE, ESP_BRIDGE_VM_*):
  ESP_BRIDGE_BIN     the binary under test, copied into the guest (default target/release/...)
  ESP_BRIDGE_VENV5   a venv with esptool 5.x on the host
"""

import importlib.util
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))

import vm as vmlib  # noqa: E402


def _system_helpers():
    """tests/system/conftest.py as a plain module (its helpers, not its fixtures), under a name
    of its own so it cannot clash with either conftest."""
    path = ROOT / "tests" / "system" / "conftest.py"
    spec = importlib.util.spec_from_file_location("esp_bridge_system_helpers", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


system = _system_helpers()
BIN = system.BIN
LogReader = system.LogReader
SIM_BIN = system.SIM_BIN
esptool_cmd = system.esptool_cmd
GUEST_HELPERS = HERE / "guest"


def start_sim(v, *args, uart=None, control=None):
    """The virtual ESP32 on the VM's /dev/ttyS1, its straps driven from ttyS2 (or on the UART
    and relay given, e.g. v.ttyS3 and v.ttyS4 for a second board); with its log."""
    uart = uart or v.ttyS1
    control = control or v.ttyS2
    sim = subprocess.Popen(
        [str(SIM_BIN), "--connect-unix", str(uart), "--control-unix", str(control), *args],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        preexec_fn=vmlib.die_with_parent,
    )
    return sim, LogReader(sim.stderr)


def failure_context(v, sim_log, *more):
    """What to print when a step fails: the sim's log, the guest's strap log and its log.
    more: (name, sim log, strap log file) of further boards' sims."""

    def context():
        sims = "".join(f"\n--- sim {name} ---\n{log.text()}\n--- {straps} ---\n{v.read(straps, '')}"
                       for name, log, straps in more)
        return (f"\n--- sim ---\n{sim_log.text()}\n--- straps.log ---\n{v.read('straps.log', '')}{sims}"
                f"\n--- guest ---\n{v.guest_log()}")

    return context


def wait_for_guest(v, flag, timeout, context, ports=(2217, 2218)):
    """Waits for the guest's `flag` file; then the host URLs of its RFC 2217 and raw ports
    (guest ports `ports`)."""
    try:
        v.wait_for_file(flag, timeout=timeout)
    except Exception as e:
        pytest.fail(f"{e}{context()}", pytrace=False)
    rfc, raw = ports
    return f"rfc2217://127.0.0.1:{v.host_port(rfc)}", f"socket://127.0.0.1:{v.host_port(raw)}"


def stop(proc):
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def slow_link_esptool_cfg(tmp_path):
    """The VM's user-mode network under software emulation adds latency: an esptool config
    that gives SYNC the time a slow link needs (the bootloader entry itself is the bridge's)."""
    cfg = tmp_path / "esptool.cfg"
    cfg.write_text("[esptool]\nsync_timeout = 2\nmem_end_rom_timeout = 2\ntimeout = 10\n")
    return cfg


def run_esptool(url, *args, cfg=None, timeout=400):
    """esptool 5 on the host: (exit status, output, seconds)."""
    cmd = [str(esptool_cmd(5)), "--port", url, *args]
    env = {**os.environ, **({"ESPTOOL_CFGFILE": str(cfg)} if cfg else {})}
    start = time.monotonic()
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    return r.returncode, r.stdout + r.stderr, time.monotonic() - start


def pytest_configure(config):
    config.addinivalue_line("markers", "vm: boots the Debian VM image under qemu (run with tests/vm/run)")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if Path(str(item.fspath)).is_relative_to(HERE):
            item.add_marker(pytest.mark.vm)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"rep_{report.when}", report)


@pytest.fixture(scope="session")
def vm_image():
    """The image directory; built by tests/vm/build-image if missing or out of date."""
    try:
        return vmlib.build_image()
    except vmlib.VMError as e:
        pytest.fail(str(e), pytrace=False)


@pytest.fixture
def esp_bridge_bin():
    if not BIN.exists():
        pytest.fail(f"{BIN} is missing: run 'cargo build --release' (or set ESP_BRIDGE_BIN)", pytrace=False)
    return BIN


@pytest.fixture
def boot(vm_image, tmp_path, request):
    """boot(guest_script, forwards=(), files=(), **vm_kwargs) -> a started vm.VM.

    files: host paths to copy into the share; the guest helpers (tests/vm/guest/*) are always
    there, e.g. /mnt/host/gpio-sim-pi.sh. The VM is killed after the test; if the test failed,
    the guest's log, console and journal are printed."""
    started = []

    def start(guest_script, forwards=(), files=(), **kwargs):
        v = vmlib.VM(vm_image, tmp_path / f"vm{len(started)}", forwards=forwards, **kwargs)
        started.append(v)
        for helper in sorted(GUEST_HELPERS.iterdir()):
            if helper.is_file():  # not a __pycache__ left by a local run
                v.put(helper)
        for f in files:
            v.put(f)
        return v.start(guest_script)

    yield start
    failed = any(getattr(request.node, f"rep_{w}", None) and getattr(request.node, f"rep_{w}").failed for w in ("setup", "call"))
    for v in started:
        v.close()
        if failed:
            print(f"\n===== VM diagnostics ({v.work}) =====\n{v.diagnostics()}", file=sys.stderr)
