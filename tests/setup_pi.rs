//! `esp-bridge setup-pi` as the package runs it: the real binary with `--root` on temporary
//! copies of real Raspberry Pi boot files (tests/fixtures/pi), for every shape they come in.

mod common;

use common::{bridge, text};
use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Output;

const CASES_THAT_CHANGE: [&str; 8] = [
    "bookworm",
    "pi4-boards",
    "pi5-boards",
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
            // pi5-boards names its header UART by-uart/uart0: no note needed.
            assert!(!out.contains("set device"), "{case}: {out}");
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

// ---------------------------------------------------------------------------------------------
// Links and crafted records planted in the tree: setup-pi runs as root on trees that dpkg --root
// and image builds hand it, so nothing in them may lead it to a file outside.

/// An empty directory outside the test's root, for what planted links point to.
fn outside(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "esp-bridge-setup-pi-{}-outside-{tag}",
        std::process::id()
    ));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).expect("outside dir");
    dir
}

/// Asserts that setup-pi stopped with exit status 1 and a message naming `path` as a link.
fn refused_link(o: &Output, path: &Path) -> String {
    let t = text(o);
    assert_eq!(o.status.code(), Some(1), "{t}");
    assert!(
        t.contains(&format!("{} is a symbolic link", path.display())),
        "names {}: {t}",
        path.display()
    );
    assert!(t.contains("hint: "), "says what to do: {t}");
    t
}

fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    fs::symlink_metadata(path)
        .expect("metadata")
        .permissions()
        .mode()
        & 0o7777
}

fn symlink(target: &Path, link: &Path) {
    std::os::unix::fs::symlink(target, link).expect("symlink");
}

#[test]
fn state_and_backups_are_readable_by_root_only() {
    for case in ["bookworm", "bullseye"] {
        let dir = root(case, "modes");
        if case == "bullseye" {
            // As the package's prerm leaves it (mkdir -p): made private on the next run.
            fs::create_dir_all(dir.join("var/lib/esp-bridge")).expect("state dir");
            use std::os::unix::fs::PermissionsExt;
            fs::set_permissions(
                dir.join("var/lib/esp-bridge"),
                fs::Permissions::from_mode(0o755),
            )
            .expect("chmod");
        }
        ok(&setup_pi(&dir, &[]));
        assert_eq!(mode(&dir.join(STATE)), 0o600, "{case}: state file");
        for d in ["var/lib/esp-bridge", "var/lib/esp-bridge/setup-pi"] {
            assert_eq!(mode(&dir.join(d)), 0o700, "{case}: {d}");
        }
        let backups: Vec<_> = fs::read_dir(dir.join("var/lib/esp-bridge/setup-pi"))
            .expect("backups")
            .map(|e| e.expect("entry").path())
            .collect();
        assert_eq!(backups.len(), 2, "{case}: {backups:?}");
        for b in backups {
            assert_eq!(mode(&b), 0o600, "{case}: {}", b.display());
        }
        fs::remove_dir_all(&dir).expect("cleanup");
    }
}

#[test]
fn a_temporary_file_left_by_an_interrupted_run_is_replaced() {
    let dir = root("bookworm", "stale-tmp");
    let tmp = dir.join("boot/firmware/.config.txt.esp-bridge-new");
    fs::write(&tmp, "half of a config.txt").expect("stale tmp");
    ok(&setup_pi(&dir, &[]));
    assert!(!tmp.exists(), "renamed into place");
    assert_eq!(boot_tree(&dir), expected_after_apply("bookworm"));
    fs::remove_dir_all(&dir).expect("cleanup");
}

#[test]
fn a_link_at_a_temporary_file_name_is_refused() {
    for tmp in [
        "boot/firmware/.config.txt.esp-bridge-new",
        "boot/firmware/.cmdline.txt.esp-bridge-new",
        "var/lib/esp-bridge/.setup-pi.toml.esp-bridge-new",
        "var/lib/esp-bridge/setup-pi/.config.txt.esp-bridge-new",
    ] {
        let dir = root("bookworm", "tmp-link");
        let out = outside("tmp-link");
        fs::write(out.join("victim"), "precious\n").expect("victim");
        let link = dir.join(tmp);
        fs::create_dir_all(link.parent().expect("parent")).expect("dir");
        symlink(&out.join("victim"), &link);
        let before = boot_tree(&dir);

        let o = setup_pi(&dir, &[]);
        assert_eq!(
            fs::read_to_string(out.join("victim")).expect("victim"),
            "precious\n",
            "{tmp}: the file outside was overwritten"
        );
        assert_eq!(boot_tree(&dir), before, "{tmp}: files changed");
        assert!(!dir.join(STATE).exists(), "{tmp}: a state was recorded");
        let t = refused_link(&o, &link);
        assert!(t.contains("nothing was changed"), "{tmp}: {t}");
        fs::remove_dir_all(&dir).expect("cleanup");
        fs::remove_dir_all(&out).expect("cleanup");
    }

    // And on --revert.
    let dir = root("bookworm", "tmp-link-revert");
    let out = outside("tmp-link-revert");
    ok(&setup_pi(&dir, &[]));
    fs::write(out.join("victim"), "precious\n").expect("victim");
    let link = dir.join("boot/firmware/.config.txt.esp-bridge-new");
    symlink(&out.join("victim"), &link);
    let before = tree(&dir);
    let o = setup_pi(&dir, &["--revert"]);
    assert_eq!(
        fs::read_to_string(out.join("victim")).expect("victim"),
        "precious\n",
        "revert overwrote the file outside"
    );
    assert_eq!(tree(&dir), before, "revert changed files");
    refused_link(&o, &link);
    fs::remove_dir_all(&dir).expect("cleanup");
    fs::remove_dir_all(&out).expect("cleanup");
}

#[test]
fn boot_files_and_directories_that_are_links_are_refused() {
    // (case, the path made a link to a copy of it outside)
    for (case, planted) in [
        ("bookworm", "boot/firmware/config.txt"),
        ("bookworm", "boot/firmware/cmdline.txt"),
        ("bookworm", "boot/firmware"),
        ("bookworm", "boot"),
        ("bullseye", "boot/config.txt"),
        ("bullseye", "boot/cmdline.txt"),
    ] {
        for revert in [false, true] {
            let dir = root(case, "boot-link");
            let out = outside("boot-link");
            if revert {
                ok(&setup_pi(&dir, &[]));
            }
            let link = dir.join(planted);
            let target = out.join("target");
            fs::rename(&link, &target).expect("move out");
            symlink(&target, &link);
            let outside_before = tree(&out);
            let before = tree(&dir);

            let args: &[&str] = if revert { &["--revert"] } else { &[] };
            let o = setup_pi(&dir, args);
            assert_eq!(
                tree(&out),
                outside_before,
                "{case} {planted} (revert: {revert}): the files outside changed"
            );
            assert_eq!(
                tree(&dir),
                before,
                "{case} {planted} (revert: {revert}): files changed (a backup copied?)"
            );
            let t = refused_link(&o, &link);
            assert!(t.contains("nothing was changed"), "{case} {planted}: {t}");
            fs::remove_dir_all(&dir).expect("cleanup");
            fs::remove_dir_all(&out).expect("cleanup");
        }
    }
}

#[test]
fn a_state_directory_that_is_a_link_is_refused() {
    for planted in [
        "var/lib/esp-bridge",
        "var/lib/esp-bridge/setup-pi",
        "var/lib",
        "var",
    ] {
        let dir = root("bookworm", "state-link");
        let out = outside("state-link");
        let link = dir.join(planted);
        fs::create_dir_all(link.parent().expect("parent")).expect("dir");
        symlink(&out, &link);
        let before = tree(&dir);

        let o = setup_pi(&dir, &[]);
        assert_eq!(tree(&out), BTreeMap::new(), "{planted}: written outside");
        assert_eq!(tree(&dir), before, "{planted}: files changed");
        refused_link(&o, &link);
        fs::remove_dir_all(&dir).expect("cleanup");
        fs::remove_dir_all(&out).expect("cleanup");
    }

    // --revert through a state directory moved outside and linked back.
    let dir = root("bookworm", "state-link-revert");
    let out = outside("state-link-revert");
    ok(&setup_pi(&dir, &[]));
    let link = dir.join("var/lib/esp-bridge");
    fs::rename(&link, out.join("esp-bridge")).expect("move out");
    symlink(&out.join("esp-bridge"), &link);
    let (before, outside_before) = (tree(&dir), tree(&out));
    let o = setup_pi(&dir, &["--revert"]);
    assert_eq!(tree(&out), outside_before, "the files outside changed");
    assert_eq!(tree(&dir), before, "files changed");
    refused_link(&o, &link);
    fs::remove_dir_all(&dir).expect("cleanup");
    fs::remove_dir_all(&out).expect("cleanup");
}

#[test]
fn a_crafted_state_file_reaches_nothing_outside() {
    let up = "/..".repeat(12);
    for (what, record) in [
        (
            "a boot file path going up",
            format!(
                "[[files]]\npath = \"{up}{{out}}/victim\"\nbackup = \"{up}{{out}}/other\"\n\
                 md5_after = \"0\"\nclean = false\n\
                 [[files.edits]]\nkind = \"added\"\nline = 0\ntext = \"enable_uart=1\"\n"
            ),
        ),
        (
            "a backup path going up",
            format!(
                "[[files]]\npath = \"/boot/firmware/config.txt\"\nbackup = \"{up}{{out}}/other\"\n\
                 md5_after = \"0\"\nclean = false\nedits = []\n"
            ),
        ),
        (
            "a backup path going up from the backup directory",
            "[[files]]\npath = \"/boot/firmware/cmdline.txt\"\n\
             backup = \"/var/lib/esp-bridge/setup-pi/../../../../../../../../../../../..{out}/other\"\n\
             md5_after = \"0\"\nclean = false\nedits = []\n"
                .to_string(),
        ),
        (
            "an absolute path elsewhere",
            "[[files]]\npath = \"{out}/victim\"\nbackup = \"/var/lib/esp-bridge/setup-pi/config.txt\"\n\
             md5_after = \"0\"\nclean = false\nedits = []\n"
                .to_string(),
        ),
        (
            "a unit that is not setup-pi's",
            "files = []\nunits = [\"ssh.service\"]\n".to_string(),
        ),
    ] {
        let dir = root("bookworm", "crafted");
        let out = outside("crafted");
        ok(&setup_pi(&dir, &[]));
        fs::write(out.join("victim"), "enable_uart=1\n").expect("victim");
        fs::write(out.join("other"), "keep me\n").expect("other");
        let record = record.replace("{out}", &out.display().to_string());
        fs::write(dir.join(STATE), &record).expect("crafted state");
        let (before, outside_before) = (tree(&dir), tree(&out));

        for args in [&["--revert"][..], &["--revert", "--dry-run"], &[]] {
            let o = setup_pi(&dir, args);
            let t = text(&o);
            assert_eq!(tree(&out), outside_before, "{what} {args:?}: outside changed");
            assert_eq!(tree(&dir), before, "{what} {args:?}: files changed");
            assert_eq!(o.status.code(), Some(1), "{what} {args:?}: {t}");
            assert!(
                t.contains(&format!(
                    "{} is not a record setup-pi wrote",
                    dir.join(STATE).display()
                )),
                "{what} {args:?}: names the state file: {t}"
            );
            assert!(t.contains("then delete"), "{what} {args:?}: the fix: {t}");
        }
        fs::remove_dir_all(&dir).expect("cleanup");
        fs::remove_dir_all(&out).expect("cleanup");
    }
}

#[test]
fn a_model_file_that_is_a_link_is_refused_unless_assume_pi() {
    let dir = root("bookworm", "model-link");
    let out = outside("model-link");
    let model = dir.join("proc/device-tree/model");
    fs::rename(&model, out.join("model")).expect("move out");
    symlink(&out.join("model"), &model);
    let before = tree(&dir);
    let t = refused_link(&setup_pi(&dir, &[]), &model);
    assert!(t.contains("--assume-pi"), "{t}");
    assert_eq!(tree(&dir), before);
    // The board's name is only a check: --assume-pi goes without it.
    ok(&setup_pi(&dir, &["--assume-pi"]));
    fs::remove_dir_all(&dir).expect("cleanup");
    fs::remove_dir_all(&out).expect("cleanup");
}

#[test]
fn a_uart_whose_pins_a_board_drives_is_refused_with_nothing_changed() {
    // uart3 of a Pi 4 takes GPIO4/5; lab3 is moved onto GPIO5 for its boot line.
    let dir = root("pi4-boards", "clash");
    let config = dir.join("etc/esp-bridge.toml");
    let original = fs::read_to_string(&config).expect("config");
    fs::write(
        &config,
        original.replace("boot = \"GPIO24\"", "boot = \"GPIO5\""),
    )
    .expect("write");
    let before = tree(&dir);
    let o = setup_pi(&dir, &[]);
    let out = text(&o);
    assert!(!o.status.success(), "{out}");
    assert!(
        out.contains(
            "board lab3 drives GPIO5 as its boot line, but uart3 of board lab2 takes GPIO5"
        ),
        "{out}"
    );
    assert!(out.contains("nothing was changed"), "{out}");
    assert_eq!(tree(&dir), before);
    // A UART this model does not have: the same.
    fs::write(&config, original.replace("uart5", "uart1")).expect("write");
    let o = setup_pi(&dir, &[]);
    assert!(!o.status.success());
    assert!(
        text(&o).contains("board lab3: /dev/serial/by-uart/uart1: uart1 is the mini UART"),
        "{}",
        text(&o)
    );
    fs::remove_dir_all(&dir).expect("cleanup");
}
