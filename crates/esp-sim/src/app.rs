//! The "application" the virtual chip runs when it boots from flash: an
//! ESP-IDF-like boot log, then a log line about once a second, and an echo of
//! every line it receives. Enough for a serial monitor, an RFC 2217 client or
//! a test to see that the board is running and that both directions work.
//!
//! Pure: time comes in as milliseconds since the application's boot; text
//! comes out ready to send (ESP-IDF's console turns `\n` into `\r\n`).

use std::borrow::Cow;
use std::collections::VecDeque;

/// Longest input line kept; the rest of an over-long line is dropped, as a
/// firmware with a fixed line buffer would.
const MAX_LINE: usize = 256;

/// The second-stage bootloader and application start-up, with the time
/// (ms after boot) each line appears.
const BOOT_LOG: &[(u64, &str)] = &[
    (30, "I (30) boot: ESP-IDF v5.2.1 2nd stage bootloader"),
    (30, "I (31) boot: compile time Jan  1 2024 00:00:00"),
    (31, "I (31) boot: Multicore bootloader"),
    (35, "I (35) boot: chip revision: v3.1"),
    (39, "I (39) boot.esp32: SPI Speed      : 40MHz"),
    (44, "I (44) boot.esp32: SPI Mode       : DIO"),
    (48, "I (48) boot.esp32: SPI Flash Size : 4MB"),
    (53, "I (53) boot: Enabling RNG early entropy source..."),
    (58, "I (58) boot: Partition Table:"),
    (
        62,
        "I (62) boot: ## Label            Usage          Type ST Offset   Length",
    ),
    (
        69,
        "I (69) boot:  0 nvs              WiFi data        01 02 00009000 00006000",
    ),
    (
        77,
        "I (77) boot:  1 phy_init         RF data          01 01 0000f000 00001000",
    ),
    (
        84,
        "I (84) boot:  2 factory          factory app      00 00 00010000 00100000",
    ),
    (92, "I (92) boot: End of partition table"),
    (
        96,
        "I (96) esp_image: segment 0: paddr=00010020 vaddr=3f400020 size=0a0f8h ( 41208) map",
    ),
    (
        120,
        "I (120) boot: Loaded app from partition at offset 0x10000",
    ),
    (120, "I (120) boot: Disabling RNG early entropy source..."),
    (132, "I (132) cpu_start: Multicore app"),
    (141, "I (141) cpu_start: Pro cpu start user code"),
    (141, "I (141) cpu_start: cpu freq: 160000000 Hz"),
    (145, "I (145) app_init: Application information:"),
    (150, "I (150) app_init: Project name:     virtual-esp32"),
    (155, "I (155) app_init: App version:      1.0.0"),
    (
        160,
        "I (160) heap_init: Initializing. RAM available for dynamic allocation:",
    ),
    (230, "I (230) spi_flash: detected chip: gd"),
    (235, "I (235) spi_flash: flash io: dio"),
    (250, "I (250) main_task: Started on CPU0"),
    (260, "I (260) main_task: Calling app_main()"),
    (
        260,
        "I (260) app: virtual ESP32 application running; lines sent to it are echoed",
    ),
];

#[derive(Debug)]
pub struct App {
    boot_log: VecDeque<(u64, Cow<'static, str>)>,
    next_tick_ms: u64,
    uptime_s: u64,
    line: Vec<u8>,
    overlong: bool,
}

impl App {
    /// `skip_bootloader`: when the ROM loader jumps straight to the app
    /// ("run user code"), there is no second-stage bootloader log.
    pub fn new(skip_bootloader: bool) -> App {
        let boot_log = BOOT_LOG
            .iter()
            .filter(|(_, l)| !(skip_bootloader && l.contains(" boot")))
            .map(|&(at, l)| (at, Cow::Borrowed(l)))
            .collect();
        App {
            boot_log,
            next_tick_ms: 1_260,
            uptime_s: 0,
            line: Vec::new(),
            overlong: false,
        }
    }

    /// Names the application the flash holds in its start-up log (ESP-IDF prints its ELF
    /// file's SHA256 there): `digest` is what the chip computed of its app partition, so that
    /// a test can tell which image booted.
    pub fn with_image_digest(mut self, digest: &str) -> App {
        let line = format!("I (156) app_init: App image MD5:    {digest}");
        let at = self
            .boot_log
            .iter()
            .position(|(t, _)| *t > 156)
            .unwrap_or(self.boot_log.len());
        self.boot_log.insert(at, (156, Cow::Owned(line)));
        self
    }

    /// The output due at `now_ms` since boot.
    pub fn poll(&mut self, now_ms: u64) -> Vec<u8> {
        let mut out = Vec::new();
        while let Some((at, _)) = self.boot_log.front() {
            if *at > now_ms {
                break;
            }
            let Some((_, line)) = self.boot_log.pop_front() else {
                break;
            };
            out.extend_from_slice(line.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        while self.boot_log.is_empty() && now_ms >= self.next_tick_ms {
            self.uptime_s += 1;
            let line = format!(
                "I ({}) app: hello from the virtual ESP32, uptime {} s\r\n",
                self.next_tick_ms, self.uptime_s
            );
            out.extend_from_slice(line.as_bytes());
            self.next_tick_ms += 1_000;
        }
        out
    }

    /// When [`App::poll`] next has something to say.
    pub fn next_due_ms(&self) -> u64 {
        match self.boot_log.front() {
            Some((at, _)) => *at,
            None => self.next_tick_ms,
        }
    }

    /// Takes received bytes; returns the echo of every line they complete.
    pub fn input(&mut self, now_ms: u64, bytes: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        for &b in bytes {
            match b {
                b'\r' | b'\n' => {
                    if !self.line.is_empty() || self.overlong {
                        let text = printable(&self.line);
                        out.extend_from_slice(
                            format!("I ({now_ms}) app: got: {text}\r\n").as_bytes(),
                        );
                    }
                    self.line.clear();
                    self.overlong = false;
                }
                _ if self.line.len() < MAX_LINE => self.line.push(b),
                _ => self.overlong = true,
            }
        }
        out
    }
}

/// Shows control and non-ASCII bytes as `\xNN`, so garbage received at the
/// wrong rate is visible without upsetting a terminal.
fn printable(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len());
    for &b in bytes {
        if (0x20..0x7F).contains(&b) {
            s.push(char::from(b));
        } else {
            s.push_str(&format!("\\x{b:02x}"));
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_log_then_one_line_per_second() {
        let mut app = App::new(false);
        let boot = String::from_utf8(app.poll(300)).unwrap();
        assert!(boot.contains("2nd stage bootloader"));
        assert!(boot.ends_with("lines sent to it are echoed\r\n"));
        assert_eq!(app.poll(1_000), b"");
        let ticks = String::from_utf8(app.poll(3_300)).unwrap();
        assert_eq!(
            ticks,
            "I (1260) app: hello from the virtual ESP32, uptime 1 s\r\n\
             I (2260) app: hello from the virtual ESP32, uptime 2 s\r\n\
             I (3260) app: hello from the virtual ESP32, uptime 3 s\r\n"
        );
        assert_eq!(app.next_due_ms(), 4_260);
    }

    #[test]
    fn echoes_lines_and_bounds_them() {
        let mut app = App::new(true);
        assert_eq!(app.input(5, b"hel"), b"");
        assert_eq!(app.input(7, b"lo\r\n"), b"I (7) app: got: hello\r\n");
        let long = vec![b'a'; 1000];
        let out = app.input(9, &long);
        assert!(out.is_empty());
        let out = String::from_utf8(app.input(9, b"\x01\n")).unwrap();
        assert_eq!(out.len(), "I (9) app: got: \r\n".len() + MAX_LINE);
        assert_eq!(app.input(9, b"\x80z\n"), b"I (9) app: got: \\x80z\r\n");
    }
}
