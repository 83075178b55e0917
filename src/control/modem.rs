//! The modem-line driver: EN and IO0 through the UART's own DTR and RTS, for a USB dev board
//! (with its two-transistor auto-program circuit) plugged into the Pi.
//!
//! The circuit pulls EN low only for RTS without DTR and IO0 low only for DTR without RTS, so
//! "both pins low" cannot be expressed: it maps to EN low (reset dominates), and the bootloader
//! entry that follows ("EN up, IO0 low") is one TIOCMSET, as the circuit and the EN capacitor
//! expect. The lines live on their own file descriptor, opened once, so they keep their state
//! while client sessions open and close the port.

use super::{LineDriver, Straps};
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// Something with DTR and RTS outputs, set together.
pub trait ModemPort: Send {
    fn set_dtr_rts(&mut self, dtr: bool, rts: bool) -> io::Result<()>;
    /// The lines are released and nothing is pending: let go of the device until needed.
    fn rest(&mut self) {}
    fn describe(&self) -> String;
}

/// The DTR/RTS pins a dev board's auto-program circuit needs for the wanted straps.
pub fn dtr_rts_for(s: Straps) -> (bool, bool) {
    match (s.reset, s.boot) {
        (true, _) => (false, true),
        (false, true) => (true, false),
        (false, false) => (false, false),
    }
}

/// A line driver over any [`ModemPort`].
pub struct ModemLines<P: ModemPort> {
    port: P,
}

impl<P: ModemPort> ModemLines<P> {
    pub fn new(port: P) -> Self {
        ModemLines { port }
    }
}

impl<P: ModemPort> LineDriver for ModemLines<P> {
    fn drive(&mut self, s: Straps) -> io::Result<()> {
        let (dtr, rts) = dtr_rts_for(s);
        self.port.set_dtr_rts(dtr, rts)
    }
    fn rest(&mut self) {
        self.port.rest();
    }
    fn describe(&self) -> String {
        format!("DTR/RTS of {} (auto-program circuit)", self.port.describe())
    }
}

/// The real tty's modem lines, opened when first driven and closed again when the lines rest
/// between clients: like the data path, so an adapter unplugged and plugged in again (or
/// absent when the service starts) is simply opened again, and no stale descriptor keeps its
/// old name from the new one.
pub struct TtyModem {
    path: PathBuf,
    file: Option<File>,
}

impl TtyModem {
    /// The modem lines of `path`; nothing is opened yet.
    pub fn new(path: &Path) -> Self {
        TtyModem {
            path: path.to_path_buf(),
            file: None,
        }
    }

    /// Whether `path`, a serial port that exists, has DTR/RTS lines to drive: `Err` says why
    /// not (a pseudo-terminal, a UART without modem lines).
    pub fn probe(path: &Path) -> Result<(), String> {
        let file = open_lines(path)
            .map_err(|e| format!("cannot open {} for its DTR/RTS lines: {e}", path.display()))?;
        modem_bits(&file).map(|_| ()).map_err(|e| {
            format!(
                "{} has no DTR/RTS lines to drive ({e}): use [control] backend = \"gpio\" or \"none\"",
                path.display()
            )
        })
    }

    fn file(&mut self) -> io::Result<&File> {
        if self.file.is_none() {
            self.file = Some(open_lines(&self.path)?);
        }
        self.file
            .as_ref()
            .ok_or_else(|| io::Error::other("the modem lines are not open"))
    }
}

/// Opens a tty for its modem lines only: no exclusive lock (the sessions take that).
fn open_lines(path: &Path) -> io::Result<File> {
    File::options()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY | libc::O_NONBLOCK)
        .open(path)
}

fn modem_bits(file: &File) -> io::Result<libc::c_int> {
    let mut bits: libc::c_int = 0;
    // SAFETY: TIOCMGET writes exactly one c_int through the pointer, which points at a live
    // local; the fd is owned by `file` for the whole call.
    let got = unsafe { libc::ioctl(file.as_raw_fd(), libc::TIOCMGET, &mut bits) };
    if got < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(bits)
}

impl ModemPort for TtyModem {
    fn set_dtr_rts(&mut self, dtr: bool, rts: bool) -> io::Result<()> {
        let result = self.file().and_then(|file| {
            let mut bits = modem_bits(file)?;
            bits &= !(libc::TIOCM_DTR | libc::TIOCM_RTS);
            if dtr {
                bits |= libc::TIOCM_DTR;
            }
            if rts {
                bits |= libc::TIOCM_RTS;
            }
            // SAFETY: TIOCMSET reads exactly one c_int through the pointer, which points at a
            // live local; one call changes both lines at the same instant, which the
            // bootloader entry through the auto-program circuit relies on.
            let set = unsafe { libc::ioctl(file.as_raw_fd(), libc::TIOCMSET, &bits) };
            if set < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
        if result.is_err() {
            // Unplugged, hung up: opened afresh next time.
            self.file = None;
        }
        result.map_err(|e| {
            io::Error::new(e.kind(), format!("DTR/RTS of {}: {e}", self.path.display()))
        })
    }
    fn rest(&mut self) {
        self.file = None;
    }
    fn describe(&self) -> String {
        self.path.display().to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn straps_map_through_the_auto_program_circuit() {
        let s = |reset, boot| Straps { reset, boot };
        assert_eq!(dtr_rts_for(s(false, false)), (false, false));
        assert_eq!(dtr_rts_for(s(true, false)), (false, true));
        assert_eq!(dtr_rts_for(s(false, true)), (true, false));
        // Both low is impossible through the circuit: reset wins.
        assert_eq!(dtr_rts_for(s(true, true)), (false, true));
    }

    #[test]
    fn a_pty_has_no_modem_lines_and_says_so() {
        let (master, _) = rustix::pty::openpt(rustix::pty::OpenptFlags::RDWR)
            .map(|m| (m, ()))
            .expect("pty");
        rustix::pty::grantpt(&master).expect("grantpt");
        rustix::pty::unlockpt(&master).expect("unlockpt");
        let name = rustix::pty::ptsname(&master, Vec::new()).expect("ptsname");
        let path = PathBuf::from(name.to_string_lossy().into_owned());
        let err = TtyModem::probe(&path).expect_err("a pty has no DTR/RTS");
        assert!(err.contains("no DTR/RTS lines"), "{err}");
        let mut lines = TtyModem::new(&path);
        assert!(lines.set_dtr_rts(true, false).is_err());
        assert!(lines.file.is_none(), "a failed device is let go");
    }
}
