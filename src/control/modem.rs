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
    fn describe(&self) -> String {
        format!("DTR/RTS of {} (auto-program circuit)", self.port.describe())
    }
}

/// The real tty's modem lines.
pub struct TtyModem {
    file: File,
    path: PathBuf,
}

impl TtyModem {
    /// Opens `path` for its modem lines only (no exclusive lock: the sessions take that) and
    /// releases both lines.
    pub fn open(path: &Path) -> Result<Self, String> {
        let file = File::options()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOCTTY | libc::O_NONBLOCK)
            .open(path)
            .map_err(|e| {
                format!(
                    "cannot open {} for its DTR/RTS lines ([control] backend = \"modem\"): {e}",
                    path.display()
                )
            })?;
        let mut me = TtyModem {
            file,
            path: path.to_path_buf(),
        };
        me.set_dtr_rts(false, false).map_err(|e| {
            format!(
                "{} has no DTR/RTS lines to drive ({e}): use [control] backend = \"gpio\" or \"none\"",
                path.display()
            )
        })?;
        Ok(me)
    }
}

impl ModemPort for TtyModem {
    fn set_dtr_rts(&mut self, dtr: bool, rts: bool) -> io::Result<()> {
        let mut bits: libc::c_int = 0;
        let fd = self.file.as_raw_fd();
        // SAFETY: TIOCMGET/TIOCMSET read and write exactly one c_int through the pointer,
        // which points at a live local; `fd` is owned by `self.file` for the whole call.
        let got = unsafe { libc::ioctl(fd, libc::TIOCMGET, &mut bits) };
        if got < 0 {
            return Err(io::Error::last_os_error());
        }
        bits &= !(libc::TIOCM_DTR | libc::TIOCM_RTS);
        if dtr {
            bits |= libc::TIOCM_DTR;
        }
        if rts {
            bits |= libc::TIOCM_RTS;
        }
        // SAFETY: as above; one TIOCMSET changes both lines at the same instant, which the
        // bootloader entry through the auto-program circuit relies on.
        let set = unsafe { libc::ioctl(fd, libc::TIOCMSET, &bits) };
        if set < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
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
        let err = TtyModem::open(&path).err().expect("a pty has no DTR/RTS");
        assert!(err.contains("no DTR/RTS lines"), "{err}");
    }
}
