"""Boots the cached Debian image (tests/vm/build-image) under qemu for system tests that need a
real kernel, systemd and gpio-sim. Standard library only.

    from vm import VM, image_dir
    with VM(image_dir(), work_dir, forwards=[2217]) as v:
        v.put(some_binary, "esp-bridge")             # files in: the guest sees /mnt/host/...
        v.start(guest_script)                        # bash, run as /mnt/host/run-in-guest.sh
        v.wait_for_file("ready")                     # the guest touched /mnt/host/ready
        port = v.host_port(2217)                     # 127.0.0.1:port reaches guest :2217
        ...                                          # v.ttyS1 is the guest's /dev/ttyS1
        v.signal("host-done")                        # a file the guest may wait for
        v.wait_exit()                                # the guest script ended, the VM is off
        assert v.rc() == 0, v.diagnostics()

The guest runs the script once from a timer-started unit after boot (systemd is up, the
network is configured), writes its output to guest.log and its status to guest.rc in the
share, and powers off. The image is booted with snapshot=on: nothing a test does reaches it.

Environment:
  ESP_BRIDGE_CACHE       cache root (default ~/.cache/esp-bridge); the image is in vm/current
  ESP_BRIDGE_VM_IMAGE    use this image directory instead
  ESP_BRIDGE_VM_ACCEL    "tcg" (default) or "kvm" where a real KVM runs Debian's kernel
  ESP_BRIDGE_VM_CONSOLE  also copy the guest console to this process's stderr when set
"""

import ctypes
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CACHE = Path(os.environ.get("ESP_BRIDGE_CACHE", Path.home() / ".cache" / "esp-bridge"))
GUEST_SHARE = "/mnt/host"

# Linux: ask the kernel to SIGKILL qemu when the thread that started it ends, so a test runner
# that is itself killed cannot leave a VM running. (Start VMs from a thread that outlives them,
# as pytest's main thread does.)
_PR_SET_PDEATHSIG = 1


def die_with_parent():
    """For Popen(preexec_fn=...): the child is SIGKILLed when this thread ends, in a process
    group of its own."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass
    # Own process group: a Ctrl-C in the terminal reaches only the test, whose cleanup then
    # stops the child in order.
    os.setpgid(0, 0)


class VMError(Exception):
    """The VM could not do what was asked; the message carries the diagnostics."""


def image_dir():
    """The image directory tests/vm/build-image made (or ESP_BRIDGE_VM_IMAGE)."""
    path = Path(os.environ.get("ESP_BRIDGE_VM_IMAGE", CACHE / "vm" / "current"))
    missing = [f for f in ("base.img", "vmlinuz", "initrd.img") if not (path / f).exists()]
    if missing:
        raise VMError(
            f"no VM image at {path} (missing {', '.join(missing)}): build it with "
            f"'sudo {HERE / 'build-image'}' (needs root once; about 2-5 minutes)"
        )
    return path.resolve()


def build_image(force=False):
    """Runs tests/vm/build-image (a no-op when the cached image is current); returns its
    directory. Its progress goes to this process's stderr."""
    cmd = [str(HERE / "build-image")] + (["--force"] if force else [])
    result = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    if result.returncode != 0:
        raise VMError(f"{HERE / 'build-image'} failed with exit {result.returncode} (its messages are above)")
    return Path(result.stdout.strip().splitlines()[-1])


def free_ports(n):
    """n distinct free TCP ports on 127.0.0.1 (free now; qemu binds them a moment later)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _tail(path, lines=60):
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return "(none)"
    return "\n".join(text.splitlines()[-lines:]) or "(empty)"


class VM:
    """One qemu run of the cached image. Use as a context manager: leaving it kills qemu."""

    def __init__(
        self,
        image,
        work_dir,
        forwards=(),
        serial_socket=True,
        ttyS2=False,
        ttyS3=False,
        ttyS4=False,
        memory_mb=1024,
        timeout=600,
        append="",
    ):
        """image: the directory with base.img, vmlinuz, initrd.img (see image_dir()).
        work_dir: where this run's files go (share/, console.log, qemu.log); unique per run.
        forwards: guest TCP ports to reach from the host at 127.0.0.1:host_port(guest_port).
        serial_socket: back the guest's /dev/ttyS1 with the unix socket self.ttyS1, which qemu
            listens on (a host program connects, e.g. `esp-bridge sim --connect-unix`).
        ttyS2: back the guest's /dev/ttyS2 with the unix socket self.ttyS2, which qemu connects
            to (every second until someone listens there), e.g. the sim's --control-unix socket
            for a guest-side relay of GPIO edges. The guest must set that port `raw -echo`,
            or its tty echoes the answers back as requests.
        ttyS3: back the guest's /dev/ttyS3 with the unix socket self.ttyS3, which qemu listens
            on as on ttyS1's: a second board's UART.
        ttyS4: back the guest's /dev/ttyS4 with the unix socket self.ttyS4, which qemu connects
            to as to ttyS2's: a second board's strap relay. A PC has four ISA serial ports
            (ttyS0-3), so this one is a PCI serial card, and the kernel is told to make room
            for a fifth port (8250.nr_uarts=5; Debian's kernel sets up four).
        timeout: seconds from start() until qemu is killed whatever happens."""
        self.image = Path(image)
        self.work = Path(work_dir)
        self.share = self.work / "share"
        self.console_log = self.work / "console.log"
        self.qemu_log = self.work / "qemu.log"
        self.forwards = list(forwards)
        self.memory_mb = memory_mb
        self.timeout = timeout
        self.append = append
        self.ports = {}
        self.proc = None
        self.started_at = None
        self._timer = None
        self.expired = False
        self._sockdir = None
        self.share.mkdir(parents=True, exist_ok=True)
        # A unix socket path must fit in 108 bytes; pytest's tmp_path may not leave room.
        sockdir = self.work
        if len(str(sockdir)) > 90:
            self._sockdir = tempfile.mkdtemp(prefix="esp-vm-")
            sockdir = Path(self._sockdir)
        self.ttyS1 = sockdir / "ttyS1.sock" if serial_socket else None
        self.ttyS2 = sockdir / "ttyS2.sock" if ttyS2 else None
        self.ttyS3 = sockdir / "ttyS3.sock" if ttyS3 else None
        self.ttyS4 = sockdir / "ttyS4.sock" if ttyS4 else None
        self.accel = os.environ.get("ESP_BRIDGE_VM_ACCEL", "tcg")

    # -- files in and out -------------------------------------------------------------------

    def put(self, src, name=None, mode=None):
        """Copies a host file into the share; the guest sees it at /mnt/host/<name>."""
        dst = self.share / (name or Path(src).name)
        shutil.copyfile(src, dst)
        os.chmod(dst, mode if mode is not None else (os.stat(src).st_mode & 0o777))
        return f"{GUEST_SHARE}/{dst.name}"

    def write(self, name, text, mode=0o644):
        """Writes a file into the share; the guest sees it at /mnt/host/<name>."""
        dst = self.share / name
        dst.write_text(text)
        os.chmod(dst, mode)
        return f"{GUEST_SHARE}/{name}"

    def signal(self, name):
        """Creates an empty file in the share, for a guest script waiting on it."""
        (self.share / name).touch()

    def read(self, name, default=None):
        try:
            return (self.share / name).read_text(errors="replace")
        except FileNotFoundError:
            return default

    def rc(self):
        """The guest script's exit status, or None if it has not finished."""
        text = self.read("guest.rc")
        if text is None:
            return None
        try:
            return int(text.strip())
        except ValueError:
            return None

    def guest_log(self):
        return self.read("guest.log", "(no guest.log: the guest script never started)")

    def diagnostics(self, lines=80):
        """Everything useful after a failure, as one text."""
        parts = [
            f"--- guest.log (rc {self.rc()}) ---\n{self.guest_log()}",
            f"--- console.log (last {lines} lines) ---\n{_tail(self.console_log, lines)}",
            f"--- qemu.log ---\n{_tail(self.qemu_log, lines)}",
        ]
        if (self.share / "journal.log").exists():
            parts.append(f"--- guest journal (last {lines} lines) ---\n{_tail(self.share / 'journal.log', lines)}")
        if self.started_at is not None:
            parts.append(f"--- {time.monotonic() - self.started_at:.1f}s since qemu started ---")
        return "\n".join(parts)

    # -- running ----------------------------------------------------------------------------

    def host_port(self, guest_port):
        return self.ports[guest_port]

    def _command(self):
        if self.accel == "kvm":
            accel = ["-accel", "kvm", "-cpu", "host"]
        else:
            # /dev/kvm on these hosts cannot run a stock Debian kernel: software emulation,
            # one host thread per guest CPU.
            accel = ["-accel", "tcg,thread=multi", "-cpu", "max"]
        fwd = "".join(f",hostfwd=tcp:127.0.0.1:{self.ports[g]}-:{g}" for g in self.forwards)
        append = f"root=/dev/vda rw console=ttyS0 quiet panic=-1 {self.append}"
        if self.ttyS4 is not None:
            append += " 8250.nr_uarts=5"
        cmd = [
            "qemu-system-x86_64", *accel, "-smp", "2", "-m", str(self.memory_mb),
            "-display", "none", "-nodefaults", "-no-user-config", "-no-reboot",
            "-kernel", str(self.image / "vmlinuz"),
            "-initrd", str(self.image / "initrd.img"),
            # panic=-1 with -no-reboot: a guest kernel panic ends qemu at once.
            "-append", " ".join(append.split()),
            # snapshot=on: writes go to a throw-away overlay, the cached image stays pristine.
            "-drive", f"file={self.image / 'base.img'},format=raw,if=virtio,snapshot=on",
            "-virtfs", f"local,path={self.share},mount_tag=hostshare,security_model=none,id=hs",
            # romfile=: no iPXE option ROM, nothing here boots from the network.
            "-netdev", f"user,id=n0{fwd}", "-device", "virtio-net-pci,netdev=n0,romfile=",
            "-serial", f"file:{self.console_log}",
        ]
        # ISA serial ports are numbered in the order given: console, ttyS1, ttyS2, ttyS3; a port
        # before one in use but unused itself is there, connected to nothing. A board's UART is
        # a socket qemu listens on, a strap relay one qemu connects to (and reconnects to).
        isa = [(1, self.ttyS1, "server=on,wait=off"), (2, self.ttyS2, "server=off,reconnect=1"),
               (3, self.ttyS3, "server=on,wait=off")]
        last = max((n for n, path, _ in isa if path is not None), default=0)
        for n, path, mode in isa[:last]:
            if path is None:
                cmd += ["-serial", "null"]
            else:
                cmd += ["-chardev", f"socket,id=s{n},path={path},{mode}", "-serial", f"chardev:s{n}"]
        if self.ttyS4 is not None:
            cmd += [
                "-chardev", f"socket,id=s4,path={self.ttyS4},server=off,reconnect=1",
                "-device", "pci-serial,chardev=s4",
            ]
        return cmd

    def start(self, guest_script):
        """Writes the guest script and boots. Returns once qemu runs (and its ttyS1 socket
        exists); the guest is still booting."""
        if shutil.which("qemu-system-x86_64") is None:
            raise VMError(
                f"qemu-system-x86_64 not found: run '{HERE / 'build-image'}' as root "
                "(it installs qemu-system-x86), or apt-get install qemu-system-x86"
            )
        for stale in ("guest.log", "guest.rc", "journal.log"):
            (self.share / stale).unlink(missing_ok=True)
        self.write("run-in-guest.sh", guest_script, 0o755)
        # A free port can be taken by someone else before qemu binds it: then try new ones.
        for _ in range(3):
            self.ports = dict(zip(self.forwards, free_ports(len(self.forwards))))
            for listened in self._listened():
                listened.unlink(missing_ok=True)
            with open(self.qemu_log, "wb") as log:
                self.proc = subprocess.Popen(
                    self._command(),
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    preexec_fn=die_with_parent,
                )
            self.started_at = time.monotonic()
            if self._wait_started():
                break
            text = _tail(self.qemu_log)
            if "hostfwd" not in text and "forwarding rule" not in text:
                raise VMError(f"qemu exited at start with {self.proc.returncode}:\n{text}")
        else:
            raise VMError(f"qemu could not bind its forwarded ports three times:\n{_tail(self.qemu_log)}")
        self._timer = threading.Timer(self.timeout, self._expire)
        self._timer.daemon = True
        self._timer.start()
        if os.environ.get("ESP_BRIDGE_VM_CONSOLE"):
            threading.Thread(target=self._echo_console, daemon=True).start()
        return self

    def _listened(self):
        """The unix sockets qemu listens on (the boards' UARTs)."""
        return [p for p in (self.ttyS1, self.ttyS3) if p is not None]

    def _wait_started(self):
        """True once qemu runs with its sockets set up; False if it exited."""
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            if all(p.exists() for p in self._listened()):
                return True
            time.sleep(0.05)
        self.kill()
        missing = " ".join(str(p) for p in self._listened() if not p.exists())
        raise VMError(f"qemu started but did not create {missing} within 30 s:\n{_tail(self.qemu_log)}")

    def _expire(self):
        if self.proc is not None and self.proc.poll() is None:
            self.expired = True
            self.kill()

    def _echo_console(self):
        import sys

        with open(self.console_log, "rb") as f:
            while self.proc is not None and self.proc.poll() is None:
                data = f.read()
                if data:
                    sys.stderr.write(data.decode(errors="replace"))
                else:
                    time.sleep(0.2)

    def _remaining(self, timeout):
        left = self.timeout - (time.monotonic() - self.started_at)
        return left if timeout is None else min(timeout, left)

    def _fail(self, what):
        expired = f" (the VM's overall timeout of {self.timeout}s expired)" if self.expired else ""
        return VMError(f"{what}{expired}\n{self.diagnostics()}")

    def wait_for_file(self, name, timeout=None):
        """Waits until the guest creates /mnt/host/<name>; returns its host path. Fails (with
        the diagnostics) if qemu exits or the time runs out first."""
        path = self.share / name
        deadline = time.monotonic() + self._remaining(timeout)
        while not path.exists():
            if self.proc.poll() is not None:
                raise self._fail(f"the VM stopped (qemu exit {self.proc.returncode}) before the guest created {name}")
            if time.monotonic() > deadline:
                raise self._fail(f"the guest did not create {name} in time")
            time.sleep(0.1)
        return path

    def wait_exit(self, timeout=None):
        """Waits for the guest to power off (qemu exits); returns the guest script's status."""
        try:
            self.proc.wait(max(0.0, self._remaining(timeout)))
        except subprocess.TimeoutExpired:
            self.kill()
            raise self._fail("the VM did not power off in time") from None
        if self.rc() is None:
            raise self._fail(f"the VM stopped (qemu exit {self.proc.returncode}) without a guest.rc")
        return self.rc()

    def kill(self):
        """Stops qemu (if running) for good. Safe to call more than once."""
        if self._timer is not None:
            self._timer.cancel()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def close(self):
        self.kill()
        if self._sockdir is not None:
            shutil.rmtree(self._sockdir, ignore_errors=True)
            self._sockdir = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False
