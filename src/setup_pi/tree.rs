//! The files of the system being set up, reached without following links: every path is walked
//! one component at a time from a descriptor of the root directory (`--root`, or `/`), each
//! directory opened with O_DIRECTORY | O_NOFOLLOW and the file itself with O_NOFOLLOW, and `.`
//! and `..` are never accepted. A symbolic link anywhere on the way (a boot file,
//! /boot/firmware, /var/lib/esp-bridge, the name of a temporary file) is refused with a message
//! naming it, instead of leading a read, a write or a removal outside the tree. New content is
//! written to a temporary file created with O_CREAT | O_EXCL | O_NOFOLLOW beside the target,
//! then renamed over it.
//!
//! A walk rather than openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS): one code path on every
//! kernel a Pi runs, and each refusal names the component that is a link.

use rustix::fs::{AtFlags, FileType, Mode, OFlags, openat, statat};
use rustix::io::Errno;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

/// No boot file or state file comes near this size; a bigger one is refused, not read whole.
const MAX_FILE: u64 = 1 << 20;
/// Directories on the way: never through a link.
const DIR_FLAGS: OFlags = OFlags::RDONLY
    .union(OFlags::DIRECTORY)
    .union(OFlags::NOFOLLOW)
    .union(OFlags::CLOEXEC);
/// The temporary file: created here and now, never an existing file nor through a link.
const NEW_FLAGS: OFlags = OFlags::WRONLY
    .union(OFlags::CREATE)
    .union(OFlags::EXCL)
    .union(OFlags::NOFOLLOW)
    .union(OFlags::CLOEXEC);
/// Directories that setup-pi has to make on the way (/var, /var/lib under an empty --root).
const SYSTEM_DIR_MODE: u32 = 0o755;
/// Files written with [`Perm::Private`], and the mode temporary files are created with.
const PRIVATE_MODE: u32 = 0o600;
/// A new file with [`Perm::Keep`] (there is none yet to keep the mode of).
const DEFAULT_MODE: u32 = 0o644;

/// The mode a written file gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Perm {
    /// The mode of the file it replaces (best effort: FAT has no modes).
    Keep,
    /// 0600: the backups and the state file, which copy boot files and are root's alone.
    Private,
}

/// Why an operation on the tree did not happen.
#[derive(Debug)]
pub(super) enum TreeError {
    /// The system call failed (not found, permission denied, ...): the caller words it, as it
    /// knows what it was doing.
    Io(io::Error),
    /// setup-pi will not go there: what is wrong, and what to do about it.
    Refused { problem: String, hint: String },
}

impl From<Errno> for TreeError {
    fn from(e: Errno) -> Self {
        TreeError::Io(e.into())
    }
}

impl From<io::Error> for TreeError {
    fn from(e: io::Error) -> Self {
        TreeError::Io(e)
    }
}

impl TreeError {
    /// The path, or a directory on the way to it, does not exist.
    pub(super) fn not_found(&self) -> bool {
        matches!(self, TreeError::Io(e) if e.kind() == io::ErrorKind::NotFound)
    }

    /// The message for the user; `doing` says what failed, for an I/O error ("cannot read X").
    pub(super) fn message(self, doing: &str) -> String {
        match self {
            TreeError::Io(e) => format!("{doing}: {e}{}", hint_for(&e)),
            TreeError::Refused { problem, hint } => format!("{problem}.\n  hint: {hint}"),
        }
    }

    /// The same, for a failure before anything was written.
    pub(super) fn message_unchanged(self, doing: &str) -> String {
        match self {
            TreeError::Io(e) => format!("{doing}: {e}; nothing was changed{}", hint_for(&e)),
            TreeError::Refused { problem, hint } => {
                format!("{problem}; nothing was changed.\n  hint: {hint}")
            }
        }
    }
}

/// The components of an absolute path inside the tree, or why it is not one: it must start
/// with `/`, and contain no NUL, no `.` and no `..`.
pub(super) fn components(path: &str) -> Result<Vec<&str>, String> {
    let Some(rest) = path.strip_prefix('/') else {
        return Err(format!("{path:?} is not an absolute path"));
    };
    if path.contains('\0') {
        return Err(format!("{path:?} contains a NUL byte"));
    }
    let parts: Vec<&str> = rest.split('/').filter(|c| !c.is_empty()).collect();
    if let Some(bad) = parts.iter().find(|c| **c == "." || **c == "..") {
        return Err(format!("{path:?} contains `{bad}`"));
    }
    if parts.is_empty() {
        return Err(format!("{path:?} names no file"));
    }
    Ok(parts)
}

/// Where a file's new content is written before it is renamed over the file.
pub(super) fn temporary_name(name: &str) -> String {
    format!(".{name}.esp-bridge-new")
}

/// What the entry refused at a path was to be, for the message.
#[derive(Clone, Copy)]
enum Role {
    Directory,
    File,
    /// A file or a directory: whatever is there is only looked at.
    Entry,
    Temporary,
}

/// The system's root directory, held open; every path below is reached from it.
pub(super) struct Tree {
    root: OwnedFd,
    /// `--root`, for messages; None for `/`.
    prefix: Option<PathBuf>,
}

impl Tree {
    /// Opens `root` (following links: it is the caller's own choice), or `/`.
    pub(super) fn open(root: Option<&Path>) -> io::Result<Tree> {
        let dir = root.unwrap_or(Path::new("/"));
        let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC;
        let fd = rustix::fs::open(dir, flags, Mode::empty())?;
        Ok(Tree {
            root: fd,
            prefix: root.map(Path::to_path_buf),
        })
    }

    /// Whether this is a tree under `--root` rather than the running system.
    pub(super) fn under_root(&self) -> bool {
        self.prefix.is_some()
    }

    /// `path` (absolute, as seen on the Pi) as the user finds it.
    pub(super) fn show(&self, path: &str) -> String {
        match &self.prefix {
            Some(root) => root
                .join(path.trim_start_matches('/'))
                .display()
                .to_string(),
            None => path.to_string(),
        }
    }

    /// The whole content of the regular file at `path`.
    pub(super) fn read(&self, path: &str) -> Result<Vec<u8>, TreeError> {
        let (dirs, name) = split(path)?;
        let dir = self.walk(&dirs, None)?;
        let flags = OFlags::RDONLY
            | OFlags::NOFOLLOW
            | OFlags::CLOEXEC
            | OFlags::NOCTTY
            // Opening a FIFO must not hang; it is refused just below.
            | OFlags::NONBLOCK;
        let fd = openat(&dir, name, flags, Mode::empty())
            .map_err(|e| self.refusal(&dir, name, path, Role::File, e))?;
        if FileType::from_raw_mode(rustix::fs::fstat(&fd)?.st_mode) != FileType::RegularFile {
            return Err(self.not_regular(path));
        }
        let mut bytes = Vec::new();
        File::from(fd)
            .take(MAX_FILE.saturating_add(1))
            .read_to_end(&mut bytes)?;
        if u64::try_from(bytes.len()).unwrap_or(u64::MAX) > MAX_FILE {
            return Err(TreeError::Refused {
                problem: format!(
                    "{} is larger than {MAX_FILE} bytes, which no file setup-pi reads ever is",
                    self.show(path)
                ),
                hint: "check what that file is, and put the real one there".to_string(),
            });
        }
        Ok(bytes)
    }

    /// What is at `path`: None when it, or a directory on the way, does not exist. A link is
    /// refused, wherever it is.
    pub(super) fn kind(&self, path: &str) -> Result<Option<FileType>, TreeError> {
        let (dirs, name) = split(path)?;
        let dir = match self.walk(&dirs, None) {
            Ok(dir) => dir,
            Err(TreeError::Io(e))
                if matches!(
                    e.kind(),
                    io::ErrorKind::NotFound | io::ErrorKind::NotADirectory
                ) =>
            {
                return Ok(None);
            }
            Err(e) => return Err(e),
        };
        match statat(&dir, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => match FileType::from_raw_mode(st.st_mode) {
                FileType::Symlink => Err(self.link(path, Role::Entry)),
                kind => Ok(Some(kind)),
            },
            Err(Errno::NOENT) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Checks, before anything is written, that [`Tree::write`] of `path` will not meet a link:
    /// not on the way, not at the file, not at its temporary name. Directories that do not exist
    /// yet are fine (they are made later, without following links either).
    pub(super) fn check_write(&self, path: &str) -> Result<(), TreeError> {
        let (dirs, name) = split(path)?;
        let dir = match self.walk(&dirs, None) {
            Ok(dir) => dir,
            Err(e) if e.not_found() => return Ok(()),
            Err(e) => return Err(e),
        };
        self.existing(&dir, path, name, Role::File)?;
        let tmp = temporary_name(name);
        self.existing(&dir, &sibling(path, &tmp), &tmp, Role::Temporary)?;
        Ok(())
    }

    /// Replaces the file at `path` with `bytes` through a temporary file and a rename, so that a
    /// power cut (a Pi in a drawer) leaves either the old or the new file, never half of one.
    /// The directory must exist.
    pub(super) fn write(&self, path: &str, bytes: &[u8], perm: Perm) -> Result<(), TreeError> {
        let (dirs, name) = split(path)?;
        let dir = self.walk(&dirs, None)?;
        let old_mode = self.existing(&dir, path, name, Role::File)?;
        let mode = match perm {
            Perm::Private => Mode::from_raw_mode(PRIVATE_MODE),
            Perm::Keep => old_mode.unwrap_or(Mode::from_raw_mode(DEFAULT_MODE)),
        };
        let tmp = temporary_name(name);
        let file = File::from(self.create_temporary(&dir, path, &tmp)?);
        let written = (|| -> io::Result<()> {
            (&file).write_all(bytes)?;
            // Best effort: the boot partition is FAT, which has no modes to set. The file was
            // created 0600, so a failure leaves it no more open than that.
            let _ = rustix::fs::fchmod(&file, mode);
            file.sync_all()?;
            rustix::fs::renameat(&dir, tmp.as_str(), &dir, name)?;
            Ok(())
        })();
        if let Err(e) = written {
            let _ = rustix::fs::unlinkat(&dir, tmp.as_str(), AtFlags::empty());
            return Err(e.into());
        }
        // Best effort: some file systems refuse fsync on a directory.
        let _ = rustix::fs::fsync(&dir);
        Ok(())
    }

    /// Makes the directory `path` where it is missing (directories on the way 0755), and gives
    /// it `mode`, also when it was there already.
    pub(super) fn make_dir(&self, path: &str, mode: u32) -> Result<(), TreeError> {
        let dirs = checked_components(path)?;
        let dir = self.walk(&dirs, Some(Mode::from_raw_mode(mode)))?;
        rustix::fs::fchmod(&dir, Mode::from_raw_mode(mode))?;
        Ok(())
    }

    /// Removes the file at `path` (a link there is removed itself, never what it points to).
    pub(super) fn remove_file(&self, path: &str) -> Result<(), TreeError> {
        let (dirs, name) = split(path)?;
        let dir = self.walk(&dirs, None)?;
        rustix::fs::unlinkat(&dir, name, AtFlags::empty())?;
        Ok(())
    }

    /// Removes the directory at `path` if it is empty.
    pub(super) fn remove_dir(&self, path: &str) -> Result<(), TreeError> {
        let (dirs, name) = split(path)?;
        let dir = self.walk(&dirs, None)?;
        rustix::fs::unlinkat(&dir, name, AtFlags::REMOVEDIR)?;
        Ok(())
    }

    /// Whether any `*.wants` directory in `dir` has an entry (an enablement link) for `unit`.
    /// Nothing is followed: a link is only looked at.
    pub(super) fn has_wants_link(&self, dir: &str, unit: &str) -> bool {
        let Ok(dirs) = checked_components(dir) else {
            return false;
        };
        let Ok(fd) = self.walk(&dirs, None) else {
            return false;
        };
        let Ok(entries) = rustix::fs::Dir::read_from(&fd) else {
            return false;
        };
        entries.flatten().any(|entry| {
            entry.file_name().to_bytes().ends_with(b".wants")
                && openat(&fd, entry.file_name(), DIR_FLAGS, Mode::empty())
                    .and_then(|wants| statat(&wants, unit, AtFlags::SYMLINK_NOFOLLOW))
                    .is_ok()
        })
    }

    /// Opens the directory made of `dirs`, from the root, one component at a time and never
    /// through a link; with `create`, a missing last component is made with that mode (and
    /// missing ones before it 0755).
    fn walk(&self, dirs: &[&str], create: Option<Mode>) -> Result<OwnedFd, TreeError> {
        let mut fd = openat(&self.root, ".", DIR_FLAGS, Mode::empty())?;
        for (i, name) in dirs.iter().enumerate() {
            let here = || format!("/{}", dirs[..=i].join("/"));
            let next = match (openat(&fd, *name, DIR_FLAGS, Mode::empty()), create) {
                (Ok(next), _) => next,
                (Err(Errno::NOENT), Some(mode)) => {
                    let mode = if i + 1 == dirs.len() {
                        mode
                    } else {
                        Mode::from_raw_mode(SYSTEM_DIR_MODE)
                    };
                    match rustix::fs::mkdirat(&fd, *name, mode) {
                        Ok(()) | Err(Errno::EXIST) => {}
                        Err(e) => return Err(e.into()),
                    }
                    openat(&fd, *name, DIR_FLAGS, Mode::empty())
                        .map_err(|e| self.refusal(&fd, name, &here(), Role::Directory, e))?
                }
                (Err(e), _) => return Err(self.refusal(&fd, name, &here(), Role::Directory, e)),
            };
            fd = next;
        }
        Ok(fd)
    }

    /// The error for a failed open of `name` in `dir`: a refusal when it is a link.
    fn refusal(&self, dir: &OwnedFd, name: &str, path: &str, role: Role, e: Errno) -> TreeError {
        if e != Errno::NOENT
            && let Ok(st) = statat(dir, name, AtFlags::SYMLINK_NOFOLLOW)
            && FileType::from_raw_mode(st.st_mode) == FileType::Symlink
        {
            return self.link(path, role);
        }
        e.into()
    }

    /// What is at `name` in `dir` (shown as `path`), where a regular file is about to be
    /// written or created: nothing (None), a regular file (its mode), or a refusal.
    fn existing(
        &self,
        dir: &OwnedFd,
        path: &str,
        name: &str,
        role: Role,
    ) -> Result<Option<Mode>, TreeError> {
        match statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => match FileType::from_raw_mode(st.st_mode) {
                FileType::RegularFile => Ok(Some(Mode::from_raw_mode(st.st_mode & 0o777))),
                FileType::Symlink => Err(self.link(path, role)),
                _ => Err(self.not_regular(path)),
            },
            Err(Errno::NOENT) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Creates the temporary file `tmp` in `dir`, exclusively and never through a link. One
    /// left by an interrupted run (a regular file) is replaced; anything else is refused.
    fn create_temporary(&self, dir: &OwnedFd, path: &str, tmp: &str) -> Result<OwnedFd, TreeError> {
        let mode = Mode::from_raw_mode(PRIVATE_MODE);
        match openat(dir, tmp, NEW_FLAGS, mode) {
            Ok(fd) => Ok(fd),
            Err(Errno::EXIST) => {
                self.existing(dir, &sibling(path, tmp), tmp, Role::Temporary)?;
                rustix::fs::unlinkat(dir, tmp, AtFlags::empty())?;
                // Should another one appear meanwhile, this fails (EEXIST) rather than use it.
                Ok(openat(dir, tmp, NEW_FLAGS, mode)?)
            }
            Err(e) => Err(e.into()),
        }
    }

    fn link(&self, path: &str, role: Role) -> TreeError {
        let shown = self.show(path);
        let problem = match &self.prefix {
            Some(root) => format!(
                "{shown} is a symbolic link, and setup-pi follows no links under --root: one could lead it out of {}",
                root.display()
            ),
            None => format!(
                "{shown} is a symbolic link, and setup-pi follows no links: one could lead it to change a file it must not"
            ),
        };
        let or_on_the_pi = if self.under_root() {
            ", or run esp-bridge setup-pi on the Pi itself"
        } else {
            ""
        };
        let hint = match role {
            Role::Directory => {
                format!("replace the link with the real directory it stands for{or_on_the_pi}")
            }
            Role::File => {
                format!("replace the link with the real file it stands for{or_on_the_pi}")
            }
            Role::Entry => format!(
                "replace the link with the real file or directory it stands for{or_on_the_pi}"
            ),
            Role::Temporary => format!(
                "delete it ({shown}): setup-pi writes new content under that name and renames it into place, so it is no file of the Pi's"
            ),
        };
        TreeError::Refused { problem, hint }
    }

    fn not_regular(&self, path: &str) -> TreeError {
        TreeError::Refused {
            problem: format!(
                "{} is not a regular file, and setup-pi reads and writes only regular files",
                self.show(path)
            ),
            hint: "check what it is, and put the real file there".to_string(),
        }
    }
}

/// The components of `path`, for a path setup-pi is about to use.
fn checked_components(path: &str) -> Result<Vec<&str>, TreeError> {
    components(path).map_err(|why| bug(&why))
}

/// The directories on the way to `path`, and its name.
fn split(path: &str) -> Result<(Vec<&str>, &str), TreeError> {
    let mut dirs = checked_components(path)?;
    let Some(name) = dirs.pop() else {
        return Err(bug(&format!("{path:?}, which names no file")));
    };
    Ok((dirs, name))
}

/// A path that setup-pi itself got wrong (they are its constants, or checked before use).
fn bug(what: &str) -> TreeError {
    TreeError::Refused {
        problem: format!("setup-pi was about to use {what}"),
        hint: "this is a bug in setup-pi; please report it".to_string(),
    }
}

/// The path of `name` in the directory of `path`.
fn sibling(path: &str, name: &str) -> String {
    match path.rsplit_once('/') {
        Some((dir, _)) => format!("{dir}/{name}"),
        None => name.to_string(),
    }
}

/// What to do about an I/O error setup-pi met, for its message.
pub(super) fn hint_for(e: &io::Error) -> &'static str {
    match e.kind() {
        io::ErrorKind::PermissionDenied => "\n  hint: run it as root: sudo esp-bridge setup-pi",
        io::ErrorKind::ReadOnlyFilesystem => {
            "\n  hint: the file system is mounted read-only; remount it read-write (sudo mount -o remount,rw <mount point>)"
        }
        _ => "",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn components_of_plain_absolute_paths() {
        assert_eq!(
            components("/boot/firmware/config.txt"),
            Ok(vec!["boot", "firmware", "config.txt"])
        );
        assert_eq!(
            components("//var//lib/esp-bridge/"),
            Ok(vec!["var", "lib", "esp-bridge"])
        );
    }

    #[test]
    fn components_refuse_going_up_relative_paths_and_nul() {
        for bad in [
            "/../../etc/passwd",
            "/boot/firmware/../../../etc/shadow",
            "/boot/./config.txt",
            "/..",
            "boot/config.txt",
            "",
            "/",
            "/boot/config.txt\0/x",
        ] {
            assert!(components(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn temporary_file_is_beside_its_file() {
        assert_eq!(
            sibling("/boot/firmware/config.txt", &temporary_name("config.txt")),
            "/boot/firmware/.config.txt.esp-bridge-new"
        );
    }
}
