//! `esp-bridge setup-pi` as the package runs it: the real binary with `--root` on temporary
//! copies of real Raspberry Pi boot files (tests/fixtures/pi), for every shape they come in.

mod common;

use common::{bridge, text};
use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Output;

const CASES_THAT_CHANGE: [&str; 6] = [
    "bookworm",
    "bullseye",
    "hand-edited",
    "miniuart-bt",
    "crlf",
    "no-trailing-newline",
];
const STATE: &str = "var/lib/esp-bridge/setup-pi.toml";

fn fixture(case: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/pi")
        .join(case)
}

/// A fresh copy of the case's root file system.
fn root(case: &str, tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "esp-bridge-setup-pi-{}-{case}-{tag}",
        std::process::id()
    ));
    let _ = fs::remove_dir_all(&dir);
    copy_tree(&fixture(case).join("root"), &dir);
    dir
}

fn copy_tree(from: &Path, to: &Path) {
    fs::create_dir_all(to).expect("temp dir");
    for entry in fs::read_dir(from).expect("fixture dir") {
        let entry = entry.expect("dir entry");
        let (src, dst) = (entry.path(), to.join(entry.file_name()));
        let kind = entry.file_type().expect("file type");
        if kind.is_symlink() {
            std::os::unix::fs::symlink(fs::read_link(&src).expect("link"), &dst).expect("symlink");
        } else if kind.is_dir() {
            copy_tree(&src, &dst);
        } else {
            fs::copy(&src, &dst).expect("copy");
        }
    }
}

/// Every file under `dir` (symlinks as their target), by relative path.
fn tree(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    fn walk(base: &Path, dir: &Path, out: &mut BTreeMap<String, Vec<u8>>) {
        for entry in fs::read_dir(dir).expect("dir") {
            let entry = entry.expect("entry");
            let path = entry.path();
            let rel = path
                .strip_prefix(base)
                .expect("under base")
                .display()
                .to_string();
            let kind = entry.file_type().expect("file type");
            if kind.is_symlink() {
                let target = fs::read_link(&path).expect("link");
                out.insert(rel, target.display().to_string().into_bytes());
            } else if kind.is_dir() {
                walk(base, &path, out);
            } else {
                out.insert(rel, fs::read(&path).expect("file"));
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

/// The tree without setup-pi's own record and backups.
fn boot_tree(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    tree(dir)
        .into_iter()
        .filter(|(k, _)| !k.starts_with("var/lib/esp-bridge"))
        .collect()
}

fn setup_pi(root: &Path, extra: &[&str]) -> Output {
    let mut args = vec![
        OsStr::new("setup-pi"),
        OsStr::new("--root"),
        root.as_os_str(),
    ];
    args.extend(extra.iter().map(OsStr::new));
    bridge(args)
}

fn ok(o: &Output) -> String {
    assert!(o.status.success(), "setup-pi failed: {}", text(o));
    text(o)
}

/// What the case's root must look like after setup-pi: the fixture with `applied/` laid over it.
fn expected_after_apply(case: &str) -> BTreeMap<String, Vec<u8>> {
    let mut want = tree(&fixture(case).join("root"));
    let applied = fixture(case).join("applied");
    if applied.is_dir() {
        want.extend(tree(&applied));
    }
    want
}

#[test]
fn apply_produces_exactly_the_expected_files() {
    for case in CASES_THAT_CHANGE.iter().chain(&["already-set-up"]) {
        let dir = root(case, "apply");
        let out = ok(&setup_pi(&dir, &[]));
        assert_eq!(boot_tree(&dir), expected_after_apply(case), "{case}: {out}");
        if *case == "already-set-up" {
            assert!(out.contains("already set up"), "{out}");
            // A Pi 5: its serial0 is the debug connector, so the user is told the header's name.
            assert!(out.contains("set device = \"/dev/ttyAMA0\""), "{out}");
            assert!(
                !dir.join(STATE).exists(),
                "nothing changed, nothing recorded"
            );
        } else {
            assert!(!out.contains("ttyAMA0\" in"), "{case} is no Pi 5: {out}");
            assert!(
                dir.join(STATE).is_file(),
                "{case}: the changes are recorded"
            );
            assert!(out.contains("next boots"), "{case}: reboot notice: {out}");
        }
        fs::remove_dir_all(&dir).expect("cleanup");
    }
}

#[test]
fn bookworm_report_names_files_and_the_unit() {
    let dir = root("bookworm", "report");
    let out = ok(&setup_pi(&dir, &[]));
    let config = dir.join("boot/firmware/config.txt").display().to_string();
    assert!(
        out.contains(&format!("{config}: added line 53: enable_uart=1")),
        "{out}"
    );
    assert!(out.contains("removed console=serial0,115200"), "{out}");
    // Under --root systemd is not asked; the enabled hciuart is reported with the command.
    assert!(
        out.contains("sudo systemctl disable hciuart.service"),
        "{out}"
    );
    // Bullseye and the kept-Bluetooth case have no hciuart to mention.
    let dir2 = root("miniuart-bt", "report");
    let out2 = ok(&setup_pi(&dir2, &[]));
    assert!(!out2.contains("hciuart.service:"), "{out2}");
    assert!(out2.contains("miniuart-bt"), "{out2}");
    fs::remove_dir_all(&dir).expect("cleanup");
    fs::remove_dir_all(&dir2).expect("cleanup");
}

#[test]
fn applying_twice_changes_nothing_and_keeps_the_first_backup() {
    for case in CASES_THAT_CHANGE {
        let dir = root(case, "twice");
        ok(&setup_pi(&dir, &[]));
        let after_first = tree(&dir);
        let out = ok(&setup_pi(&dir, &[]));
        assert!(out.contains("already set up"), "{case}: {out}");
        assert_eq!(
            tree(&dir),
            after_first,
            "{case}: second run changed something"
        );
        // The backups are the untouched originals.
        let original = tree(&fixture(case).join("root"));
        for (name, bytes) in tree(&dir.join("var/lib/esp-bridge/setup-pi")) {
            let from_boot = original
                .get(&format!("boot/firmware/{name}"))
                .or_else(|| original.get(&format!("boot/{name}")))
                .expect("backup of a boot file");
            assert_eq!(&bytes, from_boot, "{case}: backup {name}");
        }
        fs::remove_dir_all(&dir).expect("cleanup");
    }
}

#[test]
fn revert_restores_every_byte() {
    for case in CASES_THAT_CHANGE {
        let dir = root(case, "revert");
        let original = tree(&dir);
        ok(&setup_pi(&dir, &[]));
        let out = ok(&setup_pi(&dir, &["--revert"]));
        assert!(out.contains("restored from its backup"), "{case}: {out}");
        let mut now = tree(&dir);
        assert!(
            now.keys().all(|k| !k.starts_with("var/")),
            "{case}: leftovers {now:?}"
        );
        now.retain(|k, _| !k.starts_with("var/"));
        assert_eq!(now, original, "{case}");
        // A second revert has nothing left to do.
        let again = ok(&setup_pi(&dir, &["--revert"]));
        assert!(again.contains("nothing to revert"), "{again}");
        fs::remove_dir_all(&dir).expect("cleanup");
    }
}

#[test]
fn revert_after_a_user_edit_keeps_the_users_edit() {
    for case in [
        "bookworm",
        "crlf",
        "no-trailing-newline",
        "hand-edited",
        "bullseye",
    ] {
        let dir = root(case, "user-edit");
        let boot = if case == "bullseye" {
            "boot"
        } else {
            "boot/firmware"
        };
        let (config, cmdline) = (
            dir.join(boot).join("config.txt"),
            dir.join(boot).join("cmdline.txt"),
        );
        let (orig_config, orig_cmdline) = (
            fs::read_to_string(&config).expect("config"),
            fs::read_to_string(&cmdline).expect("cmdline"),
        );
        ok(&setup_pi(&dir, &[]));
        // The user turns I2C on (a commented line in every Raspberry Pi OS file), adds a line
        // at the end, and adds a kernel parameter.
        let user = |s: &str| {
            s.replacen("#dtparam=i2c_arm=on", "dtparam=i2c_arm=on", 1)
                .replacen("rootwait", "rootwait cfg80211.ieee80211_regdom=GB", 1)
        };
        let nl = if case == "crlf" { "\r\n" } else { "\n" };
        let edited_config = format!(
            "{}{nl}gpu_mem=64{nl}",
            user(&fs::read_to_string(&config).expect("config")).trim_end()
        );
        fs::write(&config, &edited_config).expect("edit");
        fs::write(
            &cmdline,
            user(&fs::read_to_string(&cmdline).expect("cmdline")),
        )
        .expect("edit");

        let out = ok(&setup_pi(&dir, &["--revert"]));
        assert!(out.contains("undid only our edits"), "{case}: {out}");
        let want_config = format!("{}{nl}gpu_mem=64{nl}", user(&orig_config).trim_end());
        assert_eq!(
            fs::read_to_string(&config).expect("config"),
            want_config,
            "{case}"
        );
        assert_eq!(
            fs::read_to_string(&cmdline).expect("cmdline"),
            user(&orig_cmdline),
            "{case}"
        );
        assert!(!dir.join(STATE).exists());
        fs::remove_dir_all(&dir).expect("cleanup");
    }
}

#[test]
fn dry_run_changes_nothing() {
    for case in CASES_THAT_CHANGE {
        let dir = root(case, "dry");
        let before = tree(&dir);
        let out = ok(&setup_pi(&dir, &["--dry-run"]));
        assert!(out.contains("would"), "{case}: {out}");
        assert!(out.contains("Dry run: nothing was changed"), "{out}");
        assert_eq!(tree(&dir), before, "{case}: dry run changed files");
        // And a dry-run revert after a real apply.
        ok(&setup_pi(&dir, &[]));
        let applied = tree(&dir);
        let out = ok(&setup_pi(&dir, &["--revert", "--dry-run"]));
        assert!(out.contains("would"), "{case}: {out}");
        assert_eq!(tree(&dir), applied, "{case}: dry-run revert changed files");
        fs::remove_dir_all(&dir).expect("cleanup");
    }
}

#[test]
fn broken_systems_are_refused_with_the_file_and_the_fix() {
    for (case, file, fix) in [
        (
            "missing-cmdline",
            "boot/firmware/cmdline.txt",
            "boot partition is mounted",
        ),
        (
            "unmounted",
            "boot/firmware/config.txt",
            "sudo mount /boot/firmware",
        ),
        (
            "not-a-pi",
            "proc/device-tree/model",
            "enable the UART by hand",
        ),
    ] {
        let dir = root(case, "broken");
        let before = tree(&dir);
        let o = setup_pi(&dir, &[]);
        let t = text(&o);
        assert_eq!(o.status.code(), Some(1), "{case}: {t}");
        assert!(
            t.contains(&dir.join(file).display().to_string()),
            "{case} names {file}: {t}"
        );
        assert!(t.contains(fix), "{case} says how to fix it: {t}");
        assert!(t.contains("nothing was changed"), "{case}: {t}");
        assert_eq!(tree(&dir), before, "{case}: changed files");
        fs::remove_dir_all(&dir).expect("cleanup");
    }
    let o = setup_pi(Path::new("/nonexistent/esp-bridge-root"), &[]);
    assert_eq!(o.status.code(), Some(64), "{}", text(&o));
    assert!(text(&o).contains("--root /nonexistent/esp-bridge-root"));
}
