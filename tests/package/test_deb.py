"""The Debian packages as dpkg and lintian see them (built by scripts/build-debs).

The amd64 package must exist (scripts/build-debs amd64); the arm64 and armhf ones are checked
too when they are there. Nothing is installed: dpkg-deb reads the packages, the maintainer
scripts run against stub commands in a temporary root (DPKG_ROOT).
"""

import gzip
import hashlib
import os
import re
import shutil
import stat
import subprocess
import tarfile
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DEB_DIR = Path(os.environ.get("ESP_BRIDGE_DEB_DIR", REPO / "target" / "debian"))
PACKAGE = "esp-bridge"


def changelog_version():
    first = (REPO / "debian" / "changelog").read_text().splitlines()[0]
    m = re.match(r"^esp-bridge \(([^)]+)\) \S+; urgency=\w+$", first)
    assert m, f"debian/changelog's first line is not a changelog entry: {first!r}"
    return m.group(1)


VERSION = changelog_version()
# Raspberry Pi OS (Bookworm, every image, Lite included) has these; nothing else may be needed.
RASPBERRY_PI_OS_HAS = {"libc6", "libgcc-s1"}


def deb_path(arch):
    return DEB_DIR / f"{PACKAGE}_{VERSION}_{arch}.deb"


# amd64 always (a missing one fails every test below, saying how to build it); the others
# when scripts/build-debs built them.
ARCHS = ["amd64"] + [a for a in ("arm64", "armhf") if deb_path(a).is_file()]


@pytest.fixture(autouse=True, scope="module")
def amd64_is_built():
    if not deb_path("amd64").is_file():
        pytest.fail(f"{deb_path('amd64')} is missing: build it with scripts/build-debs amd64", pytrace=False)


def dpkg_deb(*args):
    return subprocess.run(["dpkg-deb", *args], check=True, capture_output=True).stdout


def control(arch):
    """The control file's fields (continuation lines joined with newlines)."""
    fields, key = {}, None
    for line in dpkg_deb("--field", str(deb_path(arch))).decode().splitlines():
        if line.startswith(" ") and key:
            fields[key] += "\n" + line
        else:
            key, _, value = line.partition(":")
            fields[key] = value.strip()
    return fields


def members(arch):
    """path -> (mode, uid, gid, bytes or None) of the data archive."""
    out = {}
    with tempfile.TemporaryFile() as f:
        f.write(dpkg_deb("--fsys-tarfile", str(deb_path(arch))))
        f.seek(0)
        with tarfile.open(fileobj=f) as tar:
            for m in tar.getmembers():
                data = tar.extractfile(m).read() if m.isfile() else None
                out[m.name.removeprefix("./").rstrip("/")] = (m.mode, m.uid, m.gid, data, m.type)
    return out


def control_file(arch, name):
    with tempfile.TemporaryDirectory() as d:
        subprocess.run(["dpkg-deb", "--control", str(deb_path(arch)), d], check=True)
        p = Path(d) / name
        return p.read_bytes() if p.exists() else None


@pytest.fixture(scope="module")
def amd64_files():
    return members("amd64")


# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_name_version_architecture(arch):
    c = control(arch)
    assert c["Package"] == PACKAGE
    assert c["Version"] == VERSION
    assert c["Architecture"] == arch
    cargo = (REPO / "Cargo.toml").read_text()
    crate_version = re.search(r'^version = "([^"]+)"', cargo, re.M).group(1)
    assert VERSION == f"{crate_version}-1", "debian/changelog and Cargo.toml disagree"
    assert c["Section"] == "electronics" and c["Priority"] == "optional"
    assert re.match(r"^.+ <[^@ ]+@[^@ ]+>$", c["Maintainer"])


@pytest.mark.parametrize("arch", ARCHS)
def test_description(arch):
    short, _, extended = control(arch)["Description"].partition("\n")
    assert 10 < len(short) <= 80 and not short.endswith(".")
    assert "RFC 2217" in short and "Raspberry Pi" in short
    paragraphs = extended.split("\n .\n")
    assert len(paragraphs) >= 2, extended
    assert "esptool" in extended and "setup-pi" in extended
    assert all(len(line) <= 80 for line in extended.splitlines())


@pytest.mark.parametrize("arch", ARCHS)
def test_dependencies_are_on_raspberry_pi_os(arch):
    c = control(arch)
    for field in ("Pre-Depends", "Recommends", "Suggests"):
        assert field not in c, f"{field}: {c.get(field)}"
    depends = [d.strip() for d in c.get("Depends", "").split(",") if d.strip()]
    names = {re.match(r"[a-z0-9.+-]+", d).group(0) for d in depends}
    assert names <= RASPBERRY_PI_OS_HAS, f"Depends on {names - RASPBERRY_PI_OS_HAS}"
    if arch == "armhf":
        assert not depends, "the armhf binary is static: it must depend on nothing"
    else:
        assert "libc6" in names


def test_binary_links_only_libc(amd64_files, tmp_path):
    binary = tmp_path / "esp-bridge"
    binary.write_bytes(amd64_files["usr/bin/esp-bridge"][3])
    dynamic = subprocess.run(["readelf", "-d", str(binary)], check=True, capture_output=True, text=True).stdout
    needed = set(re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", dynamic))
    assert needed <= {"libc.so.6", "libgcc_s.so.1", "libm.so.6", "ld-linux-x86-64.so.2"}, needed
    assert not any("udev" in n for n in needed)


EXPECTED_FILES = {
    # path: (mode, source in the repository or None)
    "usr/bin/esp-bridge": (0o755, None),
    "etc/esp-bridge.toml": (0o644, "config/esp-bridge.toml"),
    "usr/share/doc/esp-bridge/esp-bridge.toml": (0o644, "config/esp-bridge.toml"),
    "usr/lib/systemd/system-generators/esp-bridge-generator": (0o755, "packaging/esp-bridge-generator"),
    "usr/lib/systemd/system/esp-bridge.service": (0o644, "packaging/esp-bridge.service"),
    "usr/lib/systemd/system/esp-bridge.socket": (0o644, "packaging/esp-bridge.socket"),
    "usr/share/man/man1/esp-bridge.1.gz": (0o644, None),
    "usr/lib/udev/rules.d/60-esp-bridge-gpio.rules": (0o644, "packaging/60-esp-bridge-gpio.rules"),
    "usr/lib/udev/rules.d/61-esp-bridge-uart.rules": (0o644, "packaging/61-esp-bridge-uart.rules"),
    "usr/share/doc/esp-bridge/copyright": (0o644, "debian/copyright"),
    "usr/share/doc/esp-bridge/changelog.Debian.gz": (0o644, None),
    "usr/share/doc/esp-bridge/README.md": (0o644, "README.md"),
    "usr/share/lintian/overrides/esp-bridge": (0o644, "debian/esp-bridge.lintian-overrides"),
}


@pytest.mark.parametrize("arch", ARCHS)
def test_files_owners_and_modes(arch):
    files = members(arch)
    regular = {p: v for p, v in files.items() if v[4] == tarfile.REGTYPE}
    assert set(regular) == set(EXPECTED_FILES), f"unexpected: {set(regular) ^ set(EXPECTED_FILES)}"
    for path, (mode, uid, gid, data, _) in files.items():
        assert (uid, gid) == (0, 0), path
        if path in EXPECTED_FILES:
            assert stat.S_IMODE(mode) == EXPECTED_FILES[path][0], f"{path}: {oct(mode)}"
            source = EXPECTED_FILES[path][1]
            if source:
                assert data == (REPO / source).read_bytes(), f"{path} differs from {source}"
        else:
            assert stat.S_IMODE(mode) == 0o755, f"directory {path}: {oct(mode)}"


@pytest.mark.parametrize("arch", ARCHS)
def test_conffiles(arch):
    assert control_file(arch, "conffiles") == b"/etc/esp-bridge.toml\n"


@pytest.mark.parametrize("arch", ARCHS)
def test_md5sums_cover_every_file(arch):
    listed = {}
    for line in control_file(arch, "md5sums").decode().splitlines():
        digest, path = line.split("  ", 1)
        listed[path] = digest
    files = {p: v[3] for p, v in members(arch).items() if v[4] == tarfile.REGTYPE}
    assert set(listed) == set(files)
    for path, data in files.items():
        assert hashlib.md5(data).hexdigest() == listed[path], path


def test_units_socket_started_service_only_by_it(amd64_files):
    service = amd64_files["usr/lib/systemd/system/esp-bridge.service"][3].decode()
    socket_unit = amd64_files["usr/lib/systemd/system/esp-bridge.socket"][3].decode()
    assert not re.search(r"^\[Install\]", service, re.M), "the service must be started by the socket only"
    assert re.search(r"^\[Install\]\nWantedBy=sockets.target$", socket_unit, re.M)
    assert re.search(r"^ExecStart=/usr/bin/esp-bridge$", service, re.M)
    assert re.search(r"^MemoryMax=\d+M$", service, re.M)
    # The anchor holds the control socket; the boards' ports come from the generator.
    assert re.search(r"^ListenStream=/run/esp-bridge/control.sock\nFileDescriptorName=control$", socket_unit, re.M)
    generator = amd64_files["usr/lib/systemd/system-generators/esp-bridge-generator"][3].decode()
    assert 'exec /usr/bin/esp-bridge generate-units "$@"' in generator
    postinst = control_file("amd64", "postinst").decode()
    assert "#DEBHELPER#" not in postinst
    assert "deb-systemd-helper enable esp-bridge.socket" in postinst
    # daemon-reload (the generator) before the sockets restart.
    reload_at = postinst.index("systemctl daemon-reload")
    assert reload_at < postinst.index("deb-systemd-invoke restart esp-bridge.socket")
    # Nothing starts the service itself: a running one may be stopped (it keeps the sockets it
    # was given, so it stops before the sockets restart) or try-restarted, and the next
    # connection starts it again.
    service_lines = [line for line in postinst.splitlines() if "esp-bridge.service" in line and "deb-systemd-invoke" in line]
    for line in service_lines:
        assert re.search(r"deb-systemd-invoke (stop|try-restart) ", line), line
    stop_at = postinst.index("deb-systemd-invoke stop esp-bridge.service")
    assert reload_at < stop_at < postinst.index("deb-systemd-invoke restart esp-bridge.socket")
    assert "deb-systemd-helper enable esp-bridge.service" not in postinst
    prerm = control_file("amd64", "prerm").decode()
    assert "deb-systemd-invoke stop esp-bridge.service esp-bridge.socket" in prerm
    postrm = control_file("amd64", "postrm").decode()
    assert "deb-systemd-helper purge esp-bridge.socket" in postrm


@pytest.mark.parametrize("script", ["postinst", "prerm", "postrm"])
def test_maintainer_scripts_are_valid_sh(script, tmp_path):
    body = control_file("amd64", script)
    assert body.startswith(b"#!/bin/sh\n") and b"#DEBHELPER#" not in body
    (tmp_path / script).write_bytes(body)
    subprocess.run(["sh", "-n", str(tmp_path / script)], check=True)


def test_man_page(amd64_files, tmp_path):
    page = gzip.decompress(amd64_files["usr/share/man/man1/esp-bridge.1.gz"][3])
    assert page == (REPO / "packaging" / "esp-bridge.1").read_bytes()
    # It names every command and long option the binary's --help shows.
    binary = tmp_path / "esp-bridge"
    binary.write_bytes(amd64_files["usr/bin/esp-bridge"][3])
    binary.chmod(0o755)
    text = page.decode().replace("\\-", "-")
    help_text = subprocess.run([str(binary), "--help"], check=True, capture_output=True, text=True).stdout
    commands = re.findall(r"^  ([a-z][a-z-]+)\s{2,}", help_text.split("Commands:")[1].split("Options:")[0], re.M)
    assert "setup-pi" in commands
    for name in [c for c in commands if c != "help"]:
        assert re.search(rf"^\.B {re.escape(name)}$", text, re.M), f"the man page has no entry for {name}"
        sub = subprocess.run([str(binary), name, "--help"], check=True, capture_output=True, text=True).stdout
        for option in set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]+)", sub)) - {"--help"}:
            assert option in text, f"the man page does not mention {name} {option}"
    if shutil.which("man"):
        check = subprocess.run(
            ["man", "--warnings", "-E", "UTF-8", "-l", "-Tutf8", "-Z", str(REPO / "packaging" / "esp-bridge.1")],
            capture_output=True,
            text=True,
            env={**os.environ, "MANWIDTH": "80", "LC_ALL": "C.UTF-8"},
        )
        assert check.returncode == 0 and not check.stderr.strip(), check.stderr


def test_copyright_is_machine_readable(amd64_files):
    text = amd64_files["usr/share/doc/esp-bridge/copyright"][3].decode()
    assert text.startswith("Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\n")
    assert re.search(r"^Files: \*\nCopyright: .+\nLicense: MIT or Apache-2.0$", text, re.M)
    for name in ("MIT", "Apache-2.0"):
        assert re.search(rf"^License: {re.escape(name)}\n ", text, re.M), f"no {name} text"
    assert 'license = "MIT OR Apache-2.0"' in (REPO / "Cargo.toml").read_text()


def test_changelog(amd64_files):
    text = gzip.decompress(amd64_files["usr/share/doc/esp-bridge/changelog.Debian.gz"][3]).decode()
    assert text == (REPO / "debian" / "changelog").read_text()
    assert text.startswith(f"esp-bridge ({VERSION}) ")
    assert re.search(r"^ -- .+ <.+>  \w{3}, \d{2} \w{3} \d{4} \d{2}:\d{2}:\d{2} [+-]\d{4}$", text, re.M)


@pytest.mark.parametrize("arch", ARCHS)
def test_lintian_clean(arch):
    if not shutil.which("lintian"):
        pytest.fail("lintian is missing: scripts/build-debs installs it (apt-get install lintian)", pytrace=False)
    r = subprocess.run(
        ["lintian", "--pedantic", "--display-info", "--fail-on", "error,warning", str(deb_path(arch))],
        capture_output=True,
        text=True,
    )
    tags = [line for line in r.stdout.splitlines() if re.match(r"^[EWIPX]: ", line)]
    assert r.returncode == 0 and not tags, "\n".join(tags) + r.stderr


# ---------------------------------------------------------------------------------------------
# The maintainer scripts' own logic, run for real against stubs (no package is installed).


class Scripts:
    """The amd64 package's maintainer scripts, run with DPKG_ROOT=root and stub commands."""

    def __init__(self, tmp_path, model):
        self.root = tmp_path / "root"
        (self.root / "proc/device-tree").mkdir(parents=True)
        if model is not None:
            (self.root / "proc/device-tree/model").write_bytes(model.encode() + b"\0")
        self.state = self.root / "var/lib/esp-bridge"
        self.log = tmp_path / "calls.log"
        self.log.write_text("")
        bin_dir = tmp_path / "bin"
        bin_dir.mkdir()
        for name in ("esp-bridge", "deb-systemd-helper", "deb-systemd-invoke", "systemctl"):
            stub = bin_dir / name
            stub.write_text(f'#!/bin/sh\necho "{name} $*" >>"{self.log}"\nexit ${{STUB_EXIT:-0}}\n')
            stub.chmod(0o755)
        self.path = f"{bin_dir}:/usr/bin:/bin"
        self.dir = tmp_path / "scripts"
        self.dir.mkdir()
        for name in ("postinst", "prerm", "postrm"):
            body = control_file("amd64", name).decode()
            # cargo-deb's snippets call /usr/bin/deb-systemd-helper by its full path when it
            # exists, which would change this machine's units: only our own part runs here.
            body = re.sub(
                r"# Automatically added by cargo-deb\n.*?# End automatically added section\n", "", body, flags=re.S
            )
            (self.dir / name).write_text(body)
            (self.dir / name).chmod(0o755)

    def run(self, script, *args, **env):
        r = subprocess.run(
            [str(self.dir / script), *args],
            env={"PATH": self.path, "DPKG_ROOT": str(self.root), **env},
            capture_output=True,
            text=True,
        )
        assert r.returncode == 0, f"{script} {args}: {r.returncode}\n{r.stdout}{r.stderr}"
        calls = self.log.read_text().splitlines()
        self.log.write_text("")
        return calls, r.stdout + r.stderr


def test_first_install_on_a_pi_runs_setup_pi(tmp_path):
    s = Scripts(tmp_path, "Raspberry Pi 4 Model B Rev 1.5")
    calls, _ = s.run("postinst", "configure", "")
    assert calls == [f"esp-bridge setup-pi --root {s.root}"]
    # An upgrade leaves the boot files alone.
    calls, _ = s.run("postinst", "configure", "0.1.0-1")
    assert calls == []


def test_setup_pi_is_skipped_off_a_pi_or_when_asked(tmp_path):
    for model in ("Pine64 RockPro64 v2.1", None):
        s = Scripts(tmp_path / str(model).replace(" ", "_"), model)
        assert s.run("postinst", "configure", "")[0] == []
    s = Scripts(tmp_path / "optout", "Raspberry Pi Zero W Rev 1.1")
    calls, out = s.run("postinst", "configure", "", ESP_BRIDGE_NO_SETUP_PI="1")
    assert calls == [] and "sudo esp-bridge setup-pi" in out


def test_a_failing_setup_pi_does_not_fail_the_install(tmp_path):
    s = Scripts(tmp_path, "Raspberry Pi 3 Model B Rev 1.2")
    calls, out = s.run("postinst", "configure", "", STUB_EXIT="1")
    assert calls == [f"esp-bridge setup-pi --root {s.root}"]
    assert "run: sudo esp-bridge setup-pi" in out


def test_remove_reverts_and_a_later_install_sets_up_again(tmp_path):
    s = Scripts(tmp_path, "Raspberry Pi 4 Model B Rev 1.5")
    s.state.mkdir(parents=True)
    (s.state / "setup-pi.toml").write_text("# recorded changes\n")
    calls, _ = s.run("prerm", "remove")
    assert calls == [f"esp-bridge setup-pi --revert --root {s.root}"]
    assert (s.state / "setup-pi.after-remove").exists()
    # Reinstalled from the config-files state: postinst gets the old version, yet sets up.
    calls, _ = s.run("postinst", "configure", "0.1.0-1")
    assert calls == [f"esp-bridge setup-pi --root {s.root}"]
    assert not (s.state / "setup-pi.after-remove").exists()
    # An upgrade's prerm does nothing of the sort.
    assert s.run("prerm", "upgrade", "0.1.1-1")[0] == []


def test_purge_removes_the_state_unless_a_revert_failed(tmp_path):
    s = Scripts(tmp_path, "Raspberry Pi 4 Model B Rev 1.5")
    (s.state / "setup-pi").mkdir(parents=True)
    (s.state / "setup-pi.toml").write_text("# could not be reverted\n")
    _, out = s.run("postrm", "purge")
    assert (s.state / "setup-pi.toml").exists() and "keeping" in out
    (s.state / "setup-pi.toml").unlink()
    s.run("postrm", "remove")
    assert s.state.exists()
    # What the service kept of its boards' chips (its StateDirectory=, a link to systemd's
    # private directory of a DynamicUser service) goes too.
    chips = s.root / "var/lib/private/esp-bridge-chips"
    chips.mkdir(parents=True)
    (chips / "chip-lab1").write_text("chip=ESP32\n")
    (s.root / "var/lib/esp-bridge-chips").symlink_to("private/esp-bridge-chips")
    s.run("postrm", "purge")
    assert not s.state.exists()
    assert not chips.exists() and not (s.root / "var/lib/esp-bridge-chips").is_symlink()


def test_every_path_the_binary_points_to_is_in_the_package(amd64_files):
    """Hints in error messages name files (the example configuration, the control socket's
    unit...): each packaged path the binary mentions must be in the package."""
    binary = amd64_files["usr/bin/esp-bridge"][3]
    # (std's own /usr/lib/debug/.build-id lookup is not a hint.)
    mentioned = {m for m in re.findall(rb"/usr/(?:share|lib)/[A-Za-z0-9_./-]+", binary)
                 if not m.startswith(b"/usr/lib/debug/")}
    assert mentioned, "no packaged paths found in the binary"
    packaged = {"/" + p for p in amd64_files}
    # The binary's strings lie back to back, so a scan can run on into the next one
    # (".../esp-bridge.serviceboard"): a mention that starts with a packaged file's path and
    # goes on with letters is that file.
    files = sorted((p for p in packaged if not p.endswith("/")), key=len, reverse=True)

    def packaged_path(m):
        m = m.rstrip(".")
        return m in packaged or any(m.startswith(f) and m[len(f)].isalpha() for f in files
                                    if len(m) > len(f))

    missing = sorted(m.decode() for m in mentioned if not packaged_path(m.decode()))
    assert not missing, missing
