//! The serial loaders of the ESP32: the ROM's UART download mode, and the
//! esptool flasher stub that esptool uploads into RAM and starts from there.
//!
//! Pure protocol logic: one decoded SLIP frame in, a list of [`Effect`]s out
//! (replies to send, time the chip is busy, baud changes, resets). The chip
//! thread carries the effects out in order; nothing here does I/O or reads
//! a clock, so every rule can be unit-tested.
//!
//! The two loaders answer the same command set differently, and esptool
//! relies on the differences:
//! - the ROM ends every reply with four status bytes, the stub with two;
//! - the ROM answers SYNC with a non-zero value, the stub with zero;
//! - the ROM erases at FLASH_BEGIN and acknowledges a block only once it is
//!   written, the stub acknowledges on receipt and erases/writes while the
//!   next block arrives;
//! - SPI_FLASH_MD5 is 32 hex characters from the ROM, 16 raw bytes from the stub;
//! - READ_FLASH, ERASE_FLASH and ERASE_REGION exist only in the stub, the
//!   slow 64-byte READ_FLASH_SLOW only in the ROM, and neither knows
//!   GET_SECURITY_INFO on the original ESP32.
//!
//! Two stubs are told apart ([`StubKind`]), by the address their text was
//! uploaded to; they answer everything alike except CHANGE_BAUDRATE, where
//! the legacy stub scales its divider by the host's old/new rates and
//! esp-flasher-stub takes the new rate as is (see [`Loader::change_baud`]).

use std::time::Duration;

use flate2::{Decompress, FlushDecompress, Status};
use md5::{Digest, Md5};

use super::flash::{self, Flash};
use super::regs::{self, Registers};
use super::{NO_BAUD, SimEventKind, StubDecidedBy, StubKind};

pub use esp_loader::{STUB_HELLO, checksum, op};

/// ROM loader error codes (second status byte after a 1).
mod rom_err {
    /// Bad parameters or length, and also the answer to unknown commands.
    pub const INVALID_MESSAGE: u8 = 0x05;
    pub const FAILED_TO_ACT: u8 = 0x06;
    pub const BAD_CHECKSUM: u8 = 0x07;
    pub const FLASH_WRITE: u8 = 0x08;
    pub const FLASH_READ: u8 = 0x09;
    pub const READ_LENGTH: u8 = 0x0A;
    pub const DEFLATE: u8 = 0x0B;
}

/// Flasher stub error codes (first status byte, second one zero).
mod stub_err {
    pub const BAD_DATA_LEN: u8 = 0xC0;
    pub const BAD_DATA_CHECKSUM: u8 = 0xC1;
    pub const BAD_BLOCKSIZE: u8 = 0xC2;
    pub const FAILED_SPI_OP: u8 = 0xC4;
    pub const NOT_IN_FLASH_MODE: u8 = 0xC6;
    pub const INFLATE_ERROR: u8 = 0xC7;
    pub const TOO_MUCH_DATA: u8 = 0xC9;
    pub const CMD_NOT_IMPLEMENTED: u8 = 0xFF;
}

/// What the ROM puts in the value field of a SYNC reply (left over from the
/// sync pattern it has just received; any non-zero value tells esptool that
/// it talks to the ROM, not to an already running stub).
const ROM_SYNC_VALUE: u32 = u32::from_le_bytes([0x07, 0x12, 0x20, 0x55]);
/// The ROM answers one SYNC eight times; esptool reads the seven extras.
const SYNC_REPLIES: usize = 8;

const ROM_APB_HZ: u32 = 40_000_000;
const STUB_APB_HZ: u32 = 80_000_000;
/// The rates the ESP32 UART can be programmed to from a 40/80 MHz clock.
const BAUD_RANGE: std::ops::RangeInclusive<u32> = 300..=5_000_000;
/// Largest block the stub's buffers take (esptool sends 16 KiB).
const STUB_MAX_BLOCK: u32 = 0x1_0000;
/// The ROM reads at most this many bytes per READ_FLASH_SLOW.
const ROM_READ_CHUNK: usize = 64;
/// Time between the reply to MEM_END and the stub's first words.
const STUB_BOOT: Duration = Duration::from_micros(500);
/// Where esptool loads the legacy stub's text on the ESP32
/// (`stub_flasher/1/esp32.json`, esptool 4.x and 5.x alike; entry 0x400be658).
pub const LEGACY_STUB_TEXT: u32 = 0x400B_E000;
/// Where esptool 5 loads esp-flasher-stub's text on the ESP32
/// (`stub_flasher/2/esp32.json`).
pub const FLASHER_STUB_TEXT: u32 = 0x400A_8000;
/// Legacy stub: from its reply to the divider change, then until it reads on.
const LEGACY_BAUD_SETTLE: (Duration, Duration) =
    (Duration::from_millis(10), Duration::from_millis(1));
/// esp-flasher-stub: from its reply to waiting for TX idle, then until it reads on.
const FLASHER_BAUD_SETTLE: (Duration, Duration) =
    (Duration::from_millis(5), Duration::from_millis(5));

/// The name of a command for the event log; `UNKNOWN` for ops no loader has.
pub fn op_name(o: u8) -> &'static str {
    match o {
        op::FLASH_BEGIN => "FLASH_BEGIN",
        op::FLASH_DATA => "FLASH_DATA",
        op::FLASH_END => "FLASH_END",
        op::MEM_BEGIN => "MEM_BEGIN",
        op::MEM_END => "MEM_END",
        op::MEM_DATA => "MEM_DATA",
        op::SYNC => "SYNC",
        op::WRITE_REG => "WRITE_REG",
        op::READ_REG => "READ_REG",
        op::SPI_SET_PARAMS => "SPI_SET_PARAMS",
        op::SPI_ATTACH => "SPI_ATTACH",
        op::READ_FLASH_SLOW => "READ_FLASH_SLOW",
        op::CHANGE_BAUDRATE => "CHANGE_BAUDRATE",
        op::FLASH_DEFL_BEGIN => "FLASH_DEFL_BEGIN",
        op::FLASH_DEFL_DATA => "FLASH_DEFL_DATA",
        op::FLASH_DEFL_END => "FLASH_DEFL_END",
        op::SPI_FLASH_MD5 => "SPI_FLASH_MD5",
        op::GET_SECURITY_INFO => "GET_SECURITY_INFO",
        op::ERASE_FLASH => "ERASE_FLASH",
        op::ERASE_REGION => "ERASE_REGION",
        op::READ_FLASH => "READ_FLASH",
        op::RUN_USER_CODE => "RUN_USER_CODE",
        _ => "UNKNOWN",
    }
}

/// The rate the legacy stub ends up at: it multiplies its current divider
/// by old / new, so the rate becomes current x new / old (nominal rates; the
/// divider's rounding is not modelled, so a right "old" gives exactly "new").
/// An old or new rate of 0 gives a zero divider or a division by zero in
/// the real stub; either way no host can talk to it any more: [`NO_BAUD`].
pub fn legacy_stub_rate(current: u32, new: u32, old: u32) -> u32 {
    if current == NO_BAUD || new == 0 || old == 0 {
        return NO_BAUD;
    }
    let old = u64::from(old);
    let rate = (u64::from(current) * u64::from(new) + old / 2) / old;
    u32::try_from(rate)
        .ok()
        .filter(|&r| r != 0)
        .unwrap_or(NO_BAUD)
}

/// Which stub an upload is, from the start addresses of its MEM_DATA blocks.
/// Anything but the two known text addresses is taken for the legacy stub:
/// every esptool up to 5.2 uploads it, so an unknown RAM program is most
/// likely another build of it; and its CHANGE_BAUDRATE is the stricter of
/// the two (it trusts the host's old rate), so a bridge that passes against
/// it passes against both.
fn stub_from_upload(loaded: &[(u32, u32)]) -> (StubKind, StubDecidedBy) {
    for &(start, _) in loaded {
        match start {
            LEGACY_STUB_TEXT => return (StubKind::Legacy, StubDecidedBy::Address),
            FLASHER_STUB_TEXT => return (StubKind::Flasher, StubDecidedBy::Address),
            _ => {}
        }
    }
    (StubKind::Legacy, StubDecidedBy::Fallback)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Rom,
    Stub,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResetKind {
    /// A software reset: the chip restarts and boots as its straps were
    /// latched at the last power-on/EN reset (download mode stays download).
    Reboot,
    /// The loader jumps to the application in flash.
    RunApp,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// A SLIP payload to frame and send at the current rate.
    Send(Vec<u8>),
    /// The chip is busy: later effects, and any further commands, wait.
    Busy(Duration),
    /// The flash works in the background (the stub writes while receiving).
    FlashWork(Duration),
    /// Wait until background flash work is done.
    WaitFlash,
    /// The UART switches rate; what was sent before keeps the old one.
    SetBaud(u32),
    /// Wait until everything sent so far has left the UART.
    WaitTxIdle,
    /// The stub has taken over from the ROM.
    StubStarted(StubKind, StubDecidedBy),
    /// Something for the event log, as of now.
    Record(SimEventKind),
    Reset(ResetKind),
}

#[derive(Debug)]
struct WriteSession {
    offset: u32,
    /// Uncompressed bytes the host announced; the stub erases and writes
    /// exactly that much, the ROM erased it (rounded) at the begin command.
    size: u32,
    written: u32,
    block_size: u32,
    /// End of the region the stub has erased so far (it erases lazily).
    erased_to: u32,
    inflate: Option<Box<Decompress>>,
}

#[derive(Debug)]
struct ReadSession {
    next: u32,
    end: u32,
    total: u32,
    packet: u32,
    max_unacked: u32,
    sent: u32,
    acked: u32,
    md5: Md5,
}

#[derive(Debug, Default)]
struct MemSession {
    /// Address ranges loaded by MEM_DATA, to know whether an entry point
    /// lands in uploaded code.
    loaded: Vec<(u32, u32)>,
    offset: u32,
    block_size: u32,
}

#[derive(Debug)]
pub struct Loader {
    stage: Stage,
    /// The stub to take an upload for; `None`: decide by its address.
    stub_choice: Option<StubKind>,
    /// Which stub runs (meaningful in [`Stage::Stub`] only).
    stub: StubKind,
    regs: Registers,
    write: Option<WriteSession>,
    read: Option<ReadSession>,
    mem: Option<MemSession>,
}

/// What the registers need from outside the loader.
#[derive(Debug, Clone, Copy)]
pub struct Env {
    pub baud: u32,
    pub io0_high_at_boot: bool,
}

fn le32(b: &[u8], word: usize) -> Option<u32> {
    let s = b.get(word * 4..word * 4 + 4)?;
    Some(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
}

fn hex_lower(bytes: &[u8]) -> Vec<u8> {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    bytes
        .iter()
        .flat_map(|b| [DIGITS[usize::from(b >> 4)], DIGITS[usize::from(b & 0xF)]])
        .collect()
}

impl Default for Loader {
    fn default() -> Self {
        Self::rom(None)
    }
}

impl Loader {
    /// The ROM loader as it comes up after a download-mode boot; an upload
    /// it starts is taken for `stub`, or (`None`) for the stub its load
    /// address says.
    pub fn rom(stub: Option<StubKind>) -> Loader {
        Loader {
            stage: Stage::Rom,
            stub_choice: stub,
            stub: StubKind::Legacy,
            regs: Registers::new(),
            write: None,
            read: None,
            mem: None,
        }
    }

    #[cfg(test)]
    pub fn stage(&self) -> Stage {
        self.stage
    }

    /// The running stub, if a stub runs.
    pub fn stub_kind(&self) -> Option<StubKind> {
        (self.stage == Stage::Stub).then_some(self.stub)
    }

    /// The op and data length of `frame` if it is a command (and not, say,
    /// an acknowledgement during READ_FLASH): what [`Loader::handle_frame`]
    /// takes as a command.
    pub fn command_of(&self, frame: &[u8]) -> Option<(u8, usize)> {
        if self.read.is_some() && frame.len() == 4 {
            return None;
        }
        (frame.len() >= 8 && frame[0] == 0).then(|| (frame[1], frame.len() - 8))
    }

    pub fn apb_hz(&self) -> u32 {
        match self.stage {
            Stage::Rom => ROM_APB_HZ,
            Stage::Stub => STUB_APB_HZ,
        }
    }

    fn reply(&self, op: u8, value: u32, data: &[u8], err: Option<u8>) -> Effect {
        let status: &[u8] = match (self.stage, err) {
            (Stage::Rom, None) => &[0, 0, 0, 0],
            (Stage::Rom, Some(e)) => &[1, e, 0, 0],
            (Stage::Stub, None) => &[0, 0],
            (Stage::Stub, Some(e)) => &[e, 0],
        };
        let len = (data.len() + status.len()) as u16;
        let mut p = Vec::with_capacity(8 + usize::from(len));
        p.extend_from_slice(&[1, op]);
        p.extend_from_slice(&len.to_le_bytes());
        p.extend_from_slice(&value.to_le_bytes());
        p.extend_from_slice(data);
        p.extend_from_slice(status);
        Effect::Send(p)
    }

    fn ok(&self, op: u8) -> Effect {
        self.reply(op, 0, &[], None)
    }

    fn fail(&self, op: u8, rom: u8, stub: u8) -> Effect {
        let code = match self.stage {
            Stage::Rom => rom,
            Stage::Stub => stub,
        };
        self.reply(op, 0, &[], Some(code))
    }

    /// The answer to a command this loader does not know.
    fn unsupported(&self, op: u8) -> Effect {
        self.fail(op, rom_err::INVALID_MESSAGE, stub_err::CMD_NOT_IMPLEMENTED)
    }

    /// Handles one complete SLIP frame from the host.
    pub fn handle_frame(&mut self, frame: &[u8], flash: &mut Flash, env: Env) -> Vec<Effect> {
        if self.read.is_some() {
            if frame.len() == 4 {
                return self.read_flash_ack(frame, flash);
            }
            // Anything but an acknowledgement means the host gave up the
            // transfer; take it as a command rather than hang.
            self.read = None;
        }
        // Shorter than a header, or not a request: the loaders ignore it.
        if frame.len() < 8 || frame[0] != 0 {
            return Vec::new();
        }
        let op = frame[1];
        let declared = usize::from(u16::from_le_bytes([frame[2], frame[3]]));
        let chk = u32::from_le_bytes([frame[4], frame[5], frame[6], frame[7]]);
        let data = &frame[8..];
        let mut fx = Vec::new();
        if self.stage == Stage::Stub {
            // The stub handles a command only once the previous block is in
            // flash; that is also when it acknowledges the next block.
            fx.push(Effect::WaitFlash);
        }
        if declared != data.len() {
            fx.push(self.fail(op, rom_err::INVALID_MESSAGE, stub_err::BAD_DATA_LEN));
            return fx;
        }
        self.command(op, chk, data, flash, env, &mut fx);
        fx
    }

    fn command(
        &mut self,
        op: u8,
        chk: u32,
        data: &[u8],
        flash: &mut Flash,
        env: Env,
        fx: &mut Vec<Effect>,
    ) {
        let stub = self.stage == Stage::Stub;
        match op {
            op::SYNC => self.sync(data, fx),
            op::READ_REG => match le32(data, 0) {
                Some(addr) if data.len() == 4 => {
                    let v = self.regs.read(addr, &self.reg_ctx(env));
                    fx.push(self.reply(op, v, &[], None));
                }
                _ => fx.push(self.fail(op, rom_err::INVALID_MESSAGE, stub_err::BAD_DATA_LEN)),
            },
            op::WRITE_REG => self.write_reg(data, flash, fx),
            op::SPI_SET_PARAMS => {
                if data.len() == 24 {
                    fx.push(self.ok(op));
                } else {
                    fx.push(self.fail(op, rom_err::INVALID_MESSAGE, stub_err::BAD_DATA_LEN));
                }
            }
            op::SPI_ATTACH => {
                // The ROM takes a second word (the "legacy" flag); the stub one.
                let want = if stub { 4 } else { 8 };
                if data.len() == want {
                    fx.push(self.ok(op));
                } else {
                    fx.push(self.fail(op, rom_err::INVALID_MESSAGE, stub_err::BAD_DATA_LEN));
                }
            }
            op::CHANGE_BAUDRATE => self.change_baud(data, env, fx),
            op::MEM_BEGIN => self.mem_begin(data, fx),
            op::MEM_DATA => self.mem_data(chk, data, fx),
            op::MEM_END => self.mem_end(data, fx),
            op::FLASH_BEGIN => self.flash_begin(op, data, false, flash, fx),
            op::FLASH_DEFL_BEGIN => self.flash_begin(op, data, true, flash, fx),
            op::FLASH_DATA => self.flash_data(op, chk, data, false, flash, fx),
            op::FLASH_DEFL_DATA => self.flash_data(op, chk, data, true, flash, fx),
            op::FLASH_END | op::FLASH_DEFL_END => self.flash_end(op, data, fx),
            op::SPI_FLASH_MD5 => self.flash_md5(data, flash, fx),
            op::READ_FLASH_SLOW if !stub => self.read_flash_slow(data, flash, fx),
            op::READ_FLASH if stub => self.read_flash(data, flash, fx),
            op::ERASE_FLASH if stub => {
                let took = flash.erase_chip();
                fx.push(Effect::Busy(took));
                fx.push(self.ok(op));
            }
            op::ERASE_REGION if stub => self.erase_region(data, flash, fx),
            op::RUN_USER_CODE if stub => {
                // esptool does not wait for an answer: the stub just jumps.
                fx.push(Effect::Reset(ResetKind::RunApp));
            }
            _ => fx.push(self.unsupported(op)),
        }
    }

    fn reg_ctx(&self, env: Env) -> regs::Ctx {
        regs::Ctx {
            baud: env.baud,
            apb_hz: self.apb_hz(),
            io0_high_at_boot: env.io0_high_at_boot,
        }
    }

    fn sync(&self, data: &[u8], fx: &mut Vec<Effect>) {
        let mut pattern = [0x55u8; 36];
        pattern[..4].copy_from_slice(&[0x07, 0x07, 0x12, 0x20]);
        if data != pattern {
            // A damaged sync pattern is not taken for a sync at all.
            fx.push(self.fail(op::SYNC, rom_err::INVALID_MESSAGE, stub_err::BAD_DATA_LEN));
            return;
        }
        let value = match self.stage {
            Stage::Rom => ROM_SYNC_VALUE,
            Stage::Stub => 0,
        };
        let r = self.reply(op::SYNC, value, &[], None);
        fx.extend(std::iter::repeat_n(r, SYNC_REPLIES));
    }

    /// CHANGE_BAUDRATE (u32 new rate, u32 old rate). The reply always goes
    /// out at the current rate; the switch comes after it:
    /// - ROM: to the new rate at once (it gets 0 as the old rate and checks
    ///   the new one).
    /// - Legacy stub: 10 ms later, to current x new / old
    ///   ([`legacy_stub_rate`]), then 1 ms before the next command.
    /// - esp-flasher-stub: 5 ms later and once its TX is idle, to the new
    ///   rate whatever the old one, then 5 ms.
    ///
    /// Bytes that arrive meanwhile are received at whatever rate the UART
    /// has when they arrive (the old one until the switch), as the stubs'
    /// receive interrupt keeps running; they are handled once the stub
    /// reads commands again.
    fn change_baud(&mut self, data: &[u8], env: Env, fx: &mut Vec<Effect>) {
        let o = op::CHANGE_BAUDRATE;
        let (Some(new), Some(old), 8) = (le32(data, 0), le32(data, 1), data.len()) else {
            fx.push(self.fail(o, rom_err::INVALID_MESSAGE, stub_err::BAD_DATA_LEN));
            return;
        };
        let stub = self.stub_kind();
        let (rate, settle) = match stub {
            None if !BAUD_RANGE.contains(&new) => {
                fx.push(self.fail(o, rom_err::INVALID_MESSAGE, 0));
                return;
            }
            None => (new, None),
            Some(StubKind::Legacy) => (
                legacy_stub_rate(env.baud, new, old),
                Some(LEGACY_BAUD_SETTLE),
            ),
            Some(StubKind::Flasher) => {
                let rate = if new == 0 { NO_BAUD } else { new };
                (rate, Some(FLASHER_BAUD_SETTLE))
            }
        };
        fx.push(Effect::Record(SimEventKind::ChangeBaudrate {
            stub,
            new,
            old,
            rate,
        }));
        fx.push(self.ok(o));
        match settle {
            None => fx.push(Effect::SetBaud(rate)),
            Some((before, after)) => {
                fx.push(Effect::Busy(before));
                if stub == Some(StubKind::Flasher) {
                    fx.push(Effect::WaitTxIdle);
                }
                fx.push(Effect::SetBaud(rate));
                fx.push(Effect::Busy(after));
            }
        }
    }

    fn write_reg(&mut self, data: &[u8], flash: &mut Flash, fx: &mut Vec<Effect>) {
        if data.is_empty() || !data.len().is_multiple_of(16) {
            fx.push(self.fail(
                op::WRITE_REG,
                rom_err::INVALID_MESSAGE,
                stub_err::BAD_DATA_LEN,
            ));
            return;
        }
        for w in data.chunks_exact(16) {
            let (addr, value, mask, delay_us) =
                match (le32(w, 0), le32(w, 1), le32(w, 2), le32(w, 3)) {
                    (Some(a), Some(v), Some(m), Some(d)) => (a, v, m, d),
                    _ => continue,
                };
            self.regs.write(addr, value, mask, flash);
            if delay_us > 0 {
                // Bounded: a host cannot park the chip for an hour.
                fx.push(Effect::Busy(Duration::from_micros(u64::from(
                    delay_us.min(1_000_000),
                ))));
            }
        }
        fx.push(self.ok(op::WRITE_REG));
    }

    /// Splits a data packet into its payload after checking length and checksum.
    fn data_payload<'a>(&self, op: u8, chk: u32, data: &'a [u8]) -> Result<&'a [u8], Effect> {
        let len = le32(data, 0)
            .ok_or_else(|| self.fail(op, rom_err::INVALID_MESSAGE, stub_err::BAD_DATA_LEN))?;
        let payload = &data[16.min(data.len())..];
        if data.len() < 16 || len as usize != payload.len() {
            return Err(self.fail(op, rom_err::INVALID_MESSAGE, stub_err::BAD_DATA_LEN));
        }
        if u32::from(checksum(payload)) != chk {
            return Err(self.fail(op, rom_err::BAD_CHECKSUM, stub_err::BAD_DATA_CHECKSUM));
        }
        Ok(payload)
    }

    fn mem_begin(&mut self, data: &[u8], fx: &mut Vec<Effect>) {
        match (data.len(), le32(data, 2), le32(data, 3)) {
            (16, Some(block_size), Some(offset)) => {
                let mut session = self.mem.take().unwrap_or_default();
                session.offset = offset;
                session.block_size = block_size;
                self.mem = Some(session);
                fx.push(self.ok(op::MEM_BEGIN));
            }
            _ => fx.push(self.fail(
                op::MEM_BEGIN,
                rom_err::INVALID_MESSAGE,
                stub_err::BAD_DATA_LEN,
            )),
        }
    }

    fn mem_data(&mut self, chk: u32, data: &[u8], fx: &mut Vec<Effect>) {
        let payload = match self.data_payload(op::MEM_DATA, chk, data) {
            Ok(p) => p,
            Err(e) => return fx.push(e),
        };
        let seq = le32(data, 1).unwrap_or(0);
        let Some(session) = self.mem.as_mut() else {
            fx.push(self.fail(
                op::MEM_DATA,
                rom_err::FAILED_TO_ACT,
                stub_err::NOT_IN_FLASH_MODE,
            ));
            return;
        };
        let start = session
            .offset
            .wrapping_add(seq.wrapping_mul(session.block_size));
        if session.loaded.len() < 64 {
            session
                .loaded
                .push((start, start.wrapping_add(payload.len() as u32)));
        }
        fx.push(self.ok(op::MEM_DATA));
    }

    fn mem_end(&mut self, data: &[u8], fx: &mut Vec<Effect>) {
        let (Some(no_run), Some(entry), 8) = (le32(data, 0), le32(data, 1), data.len()) else {
            fx.push(self.fail(
                op::MEM_END,
                rom_err::INVALID_MESSAGE,
                stub_err::BAD_DATA_LEN,
            ));
            return;
        };
        fx.push(self.ok(op::MEM_END));
        let session = self.mem.take().unwrap_or_default();
        let runs_uploaded_code = session
            .loaded
            .iter()
            .any(|&(start, end)| (start..end).contains(&entry));
        if no_run == 0 && runs_uploaded_code {
            // Whatever was uploaded, the model runs it as a flasher stub,
            // the only RAM program esptool sends in practice.
            let (kind, by) = match self.stub_choice {
                Some(kind) => (kind, StubDecidedBy::Config),
                None => stub_from_upload(&session.loaded),
            };
            self.stage = Stage::Stub;
            self.stub = kind;
            self.write = None;
            fx.push(Effect::Busy(STUB_BOOT));
            fx.push(Effect::StubStarted(kind, by));
            fx.push(Effect::Send(STUB_HELLO.to_vec()));
        }
    }

    fn flash_begin(
        &mut self,
        op: u8,
        data: &[u8],
        compressed: bool,
        flash: &mut Flash,
        fx: &mut Vec<Effect>,
    ) {
        let stub = self.stage == Stage::Stub;
        // The stub takes a fifth word (encrypted write); the ESP32 ROM does not.
        let len_ok = if stub {
            data.len() == 16 || data.len() == 20
        } else {
            data.len() == 16
        };
        let (Some(size), Some(block_size), Some(offset), true) =
            (le32(data, 0), le32(data, 2), le32(data, 3), len_ok)
        else {
            fx.push(self.fail(op, rom_err::INVALID_MESSAGE, stub_err::BAD_DATA_LEN));
            return;
        };
        self.write = None;
        if u64::from(offset) + u64::from(size) > flash.size() as u64 {
            fx.push(self.fail(op, rom_err::FAILED_TO_ACT, stub_err::BAD_DATA_LEN));
            return;
        }
        if stub && (block_size == 0 || block_size > STUB_MAX_BLOCK) {
            fx.push(self.fail(op, rom_err::INVALID_MESSAGE, stub_err::BAD_BLOCKSIZE));
            return;
        }
        let sector_start = offset / flash::SECTOR as u32 * flash::SECTOR as u32;
        if !stub {
            // The ROM erases the whole region up front, before it answers.
            match flash.erase_region(offset, size as usize) {
                Ok(took) => fx.push(Effect::Busy(took)),
                Err(_) => {
                    fx.push(self.fail(op, rom_err::FAILED_TO_ACT, 0));
                    return;
                }
            }
        }
        self.write = Some(WriteSession {
            offset,
            size,
            written: 0,
            block_size,
            erased_to: sector_start,
            inflate: compressed.then(|| Box::new(Decompress::new(true))),
        });
        fx.push(self.ok(op));
    }

    fn flash_data(
        &mut self,
        op: u8,
        chk: u32,
        data: &[u8],
        compressed: bool,
        flash: &mut Flash,
        fx: &mut Vec<Effect>,
    ) {
        let payload = match self.data_payload(op, chk, data) {
            Ok(p) => p,
            Err(e) => return fx.push(e),
        };
        let seq = le32(data, 1).unwrap_or(0);
        let stub = self.stage == Stage::Stub;
        let session_ok = matches!(&self.write, Some(w) if w.inflate.is_some() == compressed);
        if !session_ok {
            fx.push(self.fail(op, rom_err::FAILED_TO_ACT, stub_err::NOT_IN_FLASH_MODE));
            return;
        }
        let Some(session) = self.write.as_mut() else {
            return;
        };
        if !compressed && !stub {
            // The ROM places a plain block by its sequence number, so a block
            // repeated after a lost reply lands where it belongs.
            session.written = seq.saturating_mul(session.block_size);
        }
        let result = if compressed {
            inflate_into(session, payload, flash, stub)
        } else {
            write_plain(session, payload, flash, stub)
        };
        match result {
            Ok(took) if stub => {
                fx.push(self.ok(op));
                fx.push(Effect::FlashWork(took));
            }
            Ok(took) => {
                fx.push(Effect::Busy(took));
                fx.push(self.ok(op));
            }
            Err(WriteError::Inflate) => {
                fx.push(self.fail(op, rom_err::DEFLATE, stub_err::INFLATE_ERROR))
            }
            Err(WriteError::TooMuch) => {
                fx.push(self.fail(op, rom_err::FLASH_WRITE, stub_err::TOO_MUCH_DATA))
            }
            Err(WriteError::Flash) => {
                fx.push(self.fail(op, rom_err::FLASH_WRITE, stub_err::FAILED_SPI_OP))
            }
        }
    }

    fn flash_end(&mut self, op: u8, data: &[u8], fx: &mut Vec<Effect>) {
        let Some(stay) = le32(data, 0).filter(|_| data.len() == 4) else {
            fx.push(self.fail(op, rom_err::INVALID_MESSAGE, stub_err::BAD_DATA_LEN));
            return;
        };
        self.write = None;
        fx.push(self.ok(op));
        match (self.stage, stay) {
            // The stub stays when told to "run user code" (1), and reboots
            // (back into the ROM loader, straps permitting) on 0.
            (Stage::Stub, 0) => fx.push(Effect::Reset(ResetKind::Reboot)),
            (Stage::Stub, _) => {}
            (Stage::Rom, 0) => fx.push(Effect::Reset(ResetKind::Reboot)),
            (Stage::Rom, _) => fx.push(Effect::Reset(ResetKind::RunApp)),
        }
    }

    fn flash_md5(&mut self, data: &[u8], flash: &Flash, fx: &mut Vec<Effect>) {
        let (Some(addr), Some(size), 16) = (le32(data, 0), le32(data, 1), data.len()) else {
            fx.push(self.fail(
                op::SPI_FLASH_MD5,
                rom_err::INVALID_MESSAGE,
                stub_err::BAD_DATA_LEN,
            ));
            return;
        };
        let Ok(bytes) = flash.read(addr, size as usize) else {
            fx.push(self.fail(
                op::SPI_FLASH_MD5,
                rom_err::FLASH_READ,
                stub_err::FAILED_SPI_OP,
            ));
            return;
        };
        let digest = Md5::digest(bytes);
        fx.push(Effect::Busy(Flash::md5_duration(bytes.len())));
        let body = match self.stage {
            Stage::Rom => hex_lower(&digest),
            Stage::Stub => digest.to_vec(),
        };
        fx.push(self.reply(op::SPI_FLASH_MD5, 0, &body, None));
    }

    fn read_flash_slow(&mut self, data: &[u8], flash: &Flash, fx: &mut Vec<Effect>) {
        let o = op::READ_FLASH_SLOW;
        let (Some(addr), Some(len), 8) = (le32(data, 0), le32(data, 1), data.len()) else {
            fx.push(self.fail(o, rom_err::INVALID_MESSAGE, 0));
            return;
        };
        if len as usize > ROM_READ_CHUNK {
            fx.push(self.fail(o, rom_err::READ_LENGTH, 0));
            return;
        }
        let Ok(bytes) = flash.read(addr, len as usize) else {
            fx.push(self.fail(o, rom_err::FLASH_READ, 0));
            return;
        };
        // Always a full 64-byte buffer, whatever was asked for.
        let mut body = [0u8; ROM_READ_CHUNK];
        body[..bytes.len()].copy_from_slice(bytes);
        fx.push(self.reply(o, 0, &body, None));
    }

    fn read_flash(&mut self, data: &[u8], flash: &Flash, fx: &mut Vec<Effect>) {
        let o = op::READ_FLASH;
        let words = (le32(data, 0), le32(data, 1), le32(data, 2), le32(data, 3));
        let (Some(offset), Some(len), Some(packet), Some(max_unacked), 16) =
            (words.0, words.1, words.2, words.3, data.len())
        else {
            fx.push(self.fail(o, 0, stub_err::BAD_DATA_LEN));
            return;
        };
        if packet == 0 || packet > STUB_MAX_BLOCK {
            fx.push(self.fail(o, 0, stub_err::BAD_BLOCKSIZE));
            return;
        }
        if flash.read(offset, len as usize).is_err() {
            fx.push(self.fail(o, 0, stub_err::BAD_DATA_LEN));
            return;
        }
        fx.push(self.ok(o));
        self.read = Some(ReadSession {
            next: offset,
            end: offset + len,
            total: len,
            packet,
            max_unacked: max_unacked.max(1),
            sent: 0,
            acked: 0,
            md5: Md5::new(),
        });
        self.pump_read(flash, fx);
    }

    fn read_flash_ack(&mut self, frame: &[u8], flash: &Flash) -> Vec<Effect> {
        let mut fx = Vec::new();
        if let (Some(session), Some(acked)) = (self.read.as_mut(), le32(frame, 0)) {
            // Acknowledgements can only move forward, and never past what was sent.
            session.acked = acked.clamp(session.acked, session.sent);
        }
        self.pump_read(flash, &mut fx);
        fx
    }

    /// Sends data packets while fewer than the allowed number are
    /// unacknowledged; once everything is acknowledged, the MD5 of it all.
    fn pump_read(&mut self, flash: &Flash, fx: &mut Vec<Effect>) {
        let Some(s) = self.read.as_mut() else {
            return;
        };
        while s.next < s.end && (s.sent - s.acked) < s.max_unacked.saturating_mul(s.packet) {
            let n = s.packet.min(s.end - s.next);
            let Ok(bytes) = flash.read(s.next, n as usize) else {
                self.read = None;
                return;
            };
            s.md5.update(bytes);
            fx.push(Effect::Send(bytes.to_vec()));
            s.next += n;
            s.sent += n;
        }
        if s.acked >= s.total {
            let digest = std::mem::take(&mut s.md5).finalize();
            fx.push(Effect::Send(digest.to_vec()));
            self.read = None;
        }
    }

    fn erase_region(&mut self, data: &[u8], flash: &mut Flash, fx: &mut Vec<Effect>) {
        let o = op::ERASE_REGION;
        let (Some(offset), Some(size), 8) = (le32(data, 0), le32(data, 1), data.len()) else {
            fx.push(self.fail(o, 0, stub_err::BAD_DATA_LEN));
            return;
        };
        let sector = flash::SECTOR as u32;
        if !offset.is_multiple_of(sector) || !size.is_multiple_of(sector) {
            fx.push(self.fail(o, 0, stub_err::BAD_DATA_LEN));
            return;
        }
        match flash.erase_region(offset, size as usize) {
            Ok(took) => {
                fx.push(Effect::Busy(took));
                fx.push(self.ok(o));
            }
            Err(_) => fx.push(self.fail(o, 0, stub_err::FAILED_SPI_OP)),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WriteError {
    Inflate,
    TooMuch,
    Flash,
}

/// Writes decompressed or plain bytes at the session's cursor. The stub
/// erases each sector the first time it writes into it (64 KiB at a time
/// where it can) and stops at the announced size, which swallows the 0xFF
/// padding esptool adds to the last plain block.
fn put_bytes(
    s: &mut WriteSession,
    mut bytes: &[u8],
    flash: &mut Flash,
    stub: bool,
) -> Result<Duration, WriteError> {
    let mut took = Duration::ZERO;
    if stub {
        let room = s.size.saturating_sub(s.written) as usize;
        if bytes.len() > room {
            if room == 0 {
                return Err(WriteError::TooMuch);
            }
            bytes = &bytes[..room];
        }
    }
    if bytes.is_empty() {
        return Ok(took);
    }
    let addr = s.offset.checked_add(s.written).ok_or(WriteError::Flash)?;
    let end = addr
        .checked_add(bytes.len() as u32)
        .ok_or(WriteError::Flash)?;
    if stub && end > s.erased_to {
        let region_end = (s.offset + s.size).div_ceil(flash::SECTOR as u32) * flash::SECTOR as u32;
        let erase_end = end
            .div_ceil(flash::BLOCK as u32)
            .saturating_mul(flash::BLOCK as u32)
            .min(region_end)
            .max(end.div_ceil(flash::SECTOR as u32) * flash::SECTOR as u32);
        took += flash
            .erase_region(s.erased_to, (erase_end - s.erased_to) as usize)
            .map_err(|_| WriteError::Flash)?;
        s.erased_to = erase_end;
    }
    took += flash.program(addr, bytes).map_err(|_| WriteError::Flash)?;
    s.written += bytes.len() as u32;
    Ok(took)
}

fn write_plain(
    s: &mut WriteSession,
    payload: &[u8],
    flash: &mut Flash,
    stub: bool,
) -> Result<Duration, WriteError> {
    put_bytes(s, payload, flash, stub)
}

/// Feeds one packet of the zlib stream through the decompressor; the stream
/// may be cut anywhere between packets.
fn inflate_into(
    s: &mut WriteSession,
    mut input: &[u8],
    flash: &mut Flash,
    stub: bool,
) -> Result<Duration, WriteError> {
    let mut took = Duration::ZERO;
    let mut out = vec![0u8; 0x4000];
    loop {
        let Some(inflate) = s.inflate.as_mut() else {
            return Err(WriteError::Inflate);
        };
        let before_in = inflate.total_in();
        let before_out = inflate.total_out();
        let status = inflate
            .decompress(input, &mut out, FlushDecompress::None)
            .map_err(|_| WriteError::Inflate)?;
        let consumed = (inflate.total_in() - before_in) as usize;
        let produced = (inflate.total_out() - before_out) as usize;
        input = &input[consumed.min(input.len())..];
        if produced > 0 {
            if !stub && s.written as usize + produced > s.size as usize {
                return Err(WriteError::TooMuch);
            }
            took += put_bytes(s, &out[..produced], flash, stub)?;
        }
        match status {
            Status::StreamEnd => return Ok(took),
            _ if produced == 0 && consumed == 0 => return Ok(took),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flate2::{Compression, write::ZlibEncoder};
    use std::io::Write;

    const ENV: Env = Env {
        baud: 115_200,
        io0_high_at_boot: false,
    };

    fn cmd(op: u8, data: &[u8], chk: u32) -> Vec<u8> {
        let mut f = vec![0, op];
        f.extend_from_slice(&(data.len() as u16).to_le_bytes());
        f.extend_from_slice(&chk.to_le_bytes());
        f.extend_from_slice(data);
        f
    }

    fn words(w: &[u32]) -> Vec<u8> {
        w.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    fn data_cmd(op: u8, seq: u32, payload: &[u8]) -> Vec<u8> {
        let mut d = words(&[payload.len() as u32, seq, 0, 0]);
        d.extend_from_slice(payload);
        cmd(op, &d, u32::from(checksum(payload)))
    }

    fn sends(fx: &[Effect]) -> Vec<Vec<u8>> {
        fx.iter()
            .filter_map(|e| match e {
                Effect::Send(p) => Some(p.clone()),
                _ => None,
            })
            .collect()
    }

    fn only_reply(fx: &[Effect]) -> Vec<u8> {
        let s = sends(fx);
        assert_eq!(s.len(), 1, "{fx:?}");
        s[0].clone()
    }

    fn sync_frame() -> Vec<u8> {
        let mut d = vec![0x07, 0x07, 0x12, 0x20];
        d.extend_from_slice(&[0x55; 32]);
        cmd(op::SYNC, &d, 0)
    }

    fn start_stub(l: &mut Loader, flash: &mut Flash) {
        let text = vec![0x11u8; 100];
        l.handle_frame(
            &cmd(op::MEM_BEGIN, &words(&[100, 1, 0x1800, 0x4008_0000]), 0),
            flash,
            ENV,
        );
        let r = l.handle_frame(&data_cmd(op::MEM_DATA, 0, &text), flash, ENV);
        assert_eq!(only_reply(&r)[8..], [0, 0, 0, 0]);
        let fx = l.handle_frame(&cmd(op::MEM_END, &words(&[0, 0x4008_0010]), 0), flash, ENV);
        let s = sends(&fx);
        assert_eq!(s.len(), 2);
        assert_eq!(s[1], b"OHAI");
        assert!(fx.contains(&Effect::StubStarted(
            StubKind::Legacy,
            StubDecidedBy::Fallback
        )));
        assert_eq!(l.stage(), Stage::Stub);
    }

    #[test]
    fn rom_sync_replies_eight_times_with_nonzero_value_and_four_status_bytes() {
        let mut l = Loader::rom(None);
        let mut f = Flash::new(0x10000);
        let s = sends(&l.handle_frame(&sync_frame(), &mut f, ENV));
        assert_eq!(s.len(), 8);
        assert_eq!(s[0], [1, 8, 4, 0, 0x07, 0x12, 0x20, 0x55, 0, 0, 0, 0]);
    }

    #[test]
    fn stub_sync_value_is_zero_with_two_status_bytes() {
        let mut l = Loader::rom(None);
        let mut f = Flash::new(0x10000);
        start_stub(&mut l, &mut f);
        let s = sends(&l.handle_frame(&sync_frame(), &mut f, ENV));
        assert_eq!(s.len(), 8);
        assert_eq!(s[0], [1, 8, 2, 0, 0, 0, 0, 0, 0, 0]);
    }

    #[test]
    fn read_reg_returns_chip_magic_in_value() {
        let mut l = Loader::rom(None);
        let mut f = Flash::new(0x10000);
        let r =
            only_reply(&l.handle_frame(&cmd(op::READ_REG, &words(&[0x4000_1000]), 0), &mut f, ENV));
        assert_eq!(r, [1, 0x0A, 4, 0, 0x83, 0x1D, 0xF0, 0x00, 0, 0, 0, 0]);
    }

    #[test]
    fn unknown_and_stub_only_commands_are_refused_by_rom() {
        let mut l = Loader::rom(None);
        let mut f = Flash::new(0x10000);
        for o in [op::GET_SECURITY_INFO, op::ERASE_FLASH, op::READ_FLASH, 0x77] {
            let r = only_reply(&l.handle_frame(&cmd(o, &[], 0), &mut f, ENV));
            assert_eq!(r, [1, o, 4, 0, 0, 0, 0, 0, 1, 0x05, 0, 0]);
        }
    }

    #[test]
    fn stub_refuses_rom_only_and_unknown_commands() {
        let mut l = Loader::rom(None);
        let mut f = Flash::new(0x10000);
        start_stub(&mut l, &mut f);
        for o in [op::READ_FLASH_SLOW, op::GET_SECURITY_INFO] {
            let r = only_reply(&l.handle_frame(&cmd(o, &words(&[0, 0]), 0), &mut f, ENV));
            assert_eq!(r, [1, o, 2, 0, 0, 0, 0, 0, 0xFF, 0]);
        }
    }

    #[test]
    fn bad_checksum_gets_the_loaders_error_code() {
        let mut l = Loader::rom(None);
        let mut f = Flash::new(0x10000);
        l.handle_frame(
            &cmd(op::FLASH_BEGIN, &words(&[0x400, 1, 0x400, 0]), 0),
            &mut f,
            ENV,
        );
        let mut frame = data_cmd(op::FLASH_DATA, 0, &[0xAB; 0x400]);
        frame[4] ^= 1;
        let r = only_reply(&l.handle_frame(&frame, &mut f, ENV));
        assert_eq!(&r[8..], [1, 0x07, 0, 0]);
        assert_eq!(f.read(0, 1).unwrap(), [0xFF]);
    }

    #[test]
    fn length_mismatch_is_an_invalid_message_not_a_panic() {
        let mut l = Loader::rom(None);
        let mut f = Flash::new(0x10000);
        let mut frame = cmd(op::READ_REG, &words(&[0x4000_1000]), 0);
        frame[2] = 9;
        let r = only_reply(&l.handle_frame(&frame, &mut f, ENV));
        assert_eq!(&r[8..], [1, 0x05, 0, 0]);
        // Too short to be a command, or a response: ignored.
        assert!(l.handle_frame(&[0, 8, 0], &mut f, ENV).is_empty());
        assert!(
            l.handle_frame(&[1, 8, 0, 0, 0, 0, 0, 0], &mut f, ENV)
                .is_empty()
        );
        // A data packet whose inner length lies.
        l.handle_frame(
            &cmd(op::FLASH_BEGIN, &words(&[0x400, 1, 0x400, 0]), 0),
            &mut f,
            ENV,
        );
        let mut d = words(&[0x9999, 0, 0, 0]);
        d.extend_from_slice(&[1, 2, 3]);
        let r = only_reply(&l.handle_frame(&cmd(op::FLASH_DATA, &d, 0), &mut f, ENV));
        assert_eq!(&r[8..], [1, 0x05, 0, 0]);
    }

    #[test]
    fn rom_flash_write_erases_then_writes_and_md5_is_hex() {
        let mut l = Loader::rom(None);
        let mut f = Flash::new(0x10000);
        f.program(0x1000, &[0; 16]).unwrap();
        let fx = l.handle_frame(
            &cmd(op::FLASH_BEGIN, &words(&[0x800, 2, 0x400, 0x1000]), 0),
            &mut f,
            ENV,
        );
        assert!(
            matches!(fx[0], Effect::Busy(_)),
            "ROM erases before replying"
        );
        let block: Vec<u8> = (0..0x400u32).map(|i| i as u8).collect();
        for seq in 0..2 {
            let fx = l.handle_frame(&data_cmd(op::FLASH_DATA, seq, &block), &mut f, ENV);
            assert!(matches!(fx[0], Effect::Busy(_)), "ROM writes before acking");
            assert_eq!(&only_reply(&fx)[8..], [0, 0, 0, 0]);
        }
        let mut expect = block.clone();
        expect.extend_from_slice(&block);
        assert_eq!(f.read(0x1000, 0x800).unwrap(), &expect[..]);
        let r = only_reply(&l.handle_frame(
            &cmd(op::SPI_FLASH_MD5, &words(&[0x1000, 0x800, 0, 0]), 0),
            &mut f,
            ENV,
        ));
        assert_eq!(u16::from_le_bytes([r[2], r[3]]), 36);
        let hex = String::from_utf8(r[8..40].to_vec()).unwrap();
        let want: String = Md5::digest(&expect)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(hex, want);
    }

    #[test]
    fn stub_deflate_stream_split_across_packets() {
        let mut l = Loader::rom(None);
        let mut f = Flash::new(0x40000);
        start_stub(&mut l, &mut f);
        // Stale data the stub must erase before writing.
        f.program(0x10000, &[0u8; 0x100]).unwrap();
        let image: Vec<u8> = (0..0x9000u32).map(|i| (i * 7 + i / 256) as u8).collect();
        let mut enc = ZlibEncoder::new(Vec::new(), Compression::best());
        enc.write_all(&image).unwrap();
        let z = enc.finish().unwrap();
        let fx = l.handle_frame(
            &cmd(
                op::FLASH_DEFL_BEGIN,
                &words(&[image.len() as u32, 4, 0x4000, 0x10000, 0]),
                0,
            ),
            &mut f,
            ENV,
        );
        assert_eq!(&only_reply(&fx)[8..], [0, 0]);
        // Deliberately odd packet sizes: the stream is cut mid-symbol.
        for (seq, chunk) in z.chunks(z.len() / 3 + 1).enumerate() {
            let fx = l.handle_frame(
                &data_cmd(op::FLASH_DEFL_DATA, seq as u32, chunk),
                &mut f,
                ENV,
            );
            assert_eq!(fx[0], Effect::WaitFlash);
            assert_eq!(&only_reply(&fx)[8..], [0, 0]);
            assert!(
                matches!(fx.last(), Some(Effect::FlashWork(_))),
                "stub acks first"
            );
        }
        assert_eq!(f.read(0x10000, image.len()).unwrap(), &image[..]);
        let r = only_reply(&l.handle_frame(
            &cmd(
                op::SPI_FLASH_MD5,
                &words(&[0x10000, image.len() as u32, 0, 0]),
                0,
            ),
            &mut f,
            ENV,
        ));
        assert_eq!(r[8..24], Md5::digest(&image)[..]);
        assert_eq!(&r[24..], [0, 0]);
        // Stay in the stub.
        let fx = l.handle_frame(&cmd(op::FLASH_DEFL_END, &words(&[1]), 0), &mut f, ENV);
        assert!(!fx.iter().any(|e| matches!(e, Effect::Reset(_))));
    }

    #[test]
    fn corrupt_deflate_stream_is_an_inflate_error() {
        let mut l = Loader::rom(None);
        let mut f = Flash::new(0x10000);
        l.handle_frame(
            &cmd(op::FLASH_DEFL_BEGIN, &words(&[0x1000, 1, 0x400, 0]), 0),
            &mut f,
            ENV,
        );
        let r = only_reply(&l.handle_frame(
            &data_cmd(op::FLASH_DEFL_DATA, 0, &[0xFF; 64]),
            &mut f,
            ENV,
        ));
        assert_eq!(&r[8..], [1, 0x0B, 0, 0]);
    }

    #[test]
    fn stub_read_flash_streams_with_acks_and_final_md5() {
        let mut l = Loader::rom(None);
        let mut f = Flash::new(0x10000);
        let content: Vec<u8> = (0..0x2800u32).map(|i| (i % 251) as u8).collect();
        f.program(0, &content).unwrap();
        start_stub(&mut l, &mut f);
        let fx = l.handle_frame(
            &cmd(op::READ_FLASH, &words(&[0, 0x2800, 0x1000, 2]), 0),
            &mut f,
            ENV,
        );
        let s = sends(&fx);
        // The reply, then two packets: the in-flight limit.
        assert_eq!(s.len(), 3);
        assert_eq!(&s[0][8..], [0, 0]);
        let mut got = s[1].clone();
        got.extend_from_slice(&s[2]);
        let s = sends(&l.handle_frame(&0x1000u32.to_le_bytes(), &mut f, ENV));
        assert_eq!(s.len(), 1);
        got.extend_from_slice(&s[0]);
        assert_eq!(s[0].len(), 0x800);
        assert!(sends(&l.handle_frame(&0x2000u32.to_le_bytes(), &mut f, ENV)).is_empty());
        let s = sends(&l.handle_frame(&0x2800u32.to_le_bytes(), &mut f, ENV));
        assert_eq!(s, vec![Md5::digest(&content).to_vec()]);
        assert_eq!(got, content);
        // Back to commands.
        let r =
            only_reply(&l.handle_frame(&cmd(op::READ_REG, &words(&[0x4000_1000]), 0), &mut f, ENV));
        assert_eq!(r[1], op::READ_REG);
    }

    #[test]
    fn change_baud_replies_before_switching() {
        let mut l = Loader::rom(None);
        let mut f = Flash::new(0x10000);
        let fx = l.handle_frame(
            &cmd(op::CHANGE_BAUDRATE, &words(&[921_600, 0]), 0),
            &mut f,
            ENV,
        );
        assert_eq!(
            fx[0],
            Effect::Record(SimEventKind::ChangeBaudrate {
                stub: None,
                new: 921_600,
                old: 0,
                rate: 921_600
            })
        );
        assert!(matches!(fx[1], Effect::Send(_)));
        assert_eq!(fx[2], Effect::SetBaud(921_600));
        assert_eq!(fx.len(), 3, "the ROM switches at once: {fx:?}");
        let fx = l.handle_frame(&cmd(op::CHANGE_BAUDRATE, &words(&[0, 0]), 0), &mut f, ENV);
        assert_eq!(&only_reply(&fx)[8..], [1, 0x05, 0, 0]);
    }

    /// Uploads a 100-byte program at `addr` and starts it; returns MEM_END's effects.
    fn upload(l: &mut Loader, flash: &mut Flash, addr: u32) -> Vec<Effect> {
        l.handle_frame(
            &cmd(op::MEM_BEGIN, &words(&[100, 1, 0x1800, addr]), 0),
            flash,
            ENV,
        );
        l.handle_frame(&data_cmd(op::MEM_DATA, 0, &[0x11; 100]), flash, ENV);
        l.handle_frame(&cmd(op::MEM_END, &words(&[0, addr + 0x10]), 0), flash, ENV)
    }

    #[test]
    fn the_stub_kind_is_decided_by_the_upload_address_or_forced() {
        let cases = [
            (
                None,
                LEGACY_STUB_TEXT,
                StubKind::Legacy,
                StubDecidedBy::Address,
            ),
            (
                None,
                FLASHER_STUB_TEXT,
                StubKind::Flasher,
                StubDecidedBy::Address,
            ),
            (None, 0x4008_0000, StubKind::Legacy, StubDecidedBy::Fallback),
            (
                Some(StubKind::Flasher),
                LEGACY_STUB_TEXT,
                StubKind::Flasher,
                StubDecidedBy::Config,
            ),
            (
                Some(StubKind::Legacy),
                FLASHER_STUB_TEXT,
                StubKind::Legacy,
                StubDecidedBy::Config,
            ),
        ];
        for (choice, addr, kind, by) in cases {
            let mut l = Loader::rom(choice);
            let mut f = Flash::new(0x10000);
            assert_eq!(l.stub_kind(), None);
            let fx = upload(&mut l, &mut f, addr);
            assert!(
                fx.contains(&Effect::StubStarted(kind, by)),
                "{addr:#x}: {fx:?}"
            );
            assert_eq!(l.stub_kind(), Some(kind));
        }
        // The second segment (data) may come first or later: any block at
        // the text address decides.
        let loaded = [(0x3FFE_0000, 0x3FFE_0100), (FLASHER_STUB_TEXT, 0x400A_9000)];
        assert_eq!(
            stub_from_upload(&loaded),
            (StubKind::Flasher, StubDecidedBy::Address)
        );
    }

    fn change_baud(l: &mut Loader, f: &mut Flash, current: u32, new: u32, old: u32) -> Vec<Effect> {
        let env = Env {
            baud: current,
            ..ENV
        };
        l.handle_frame(&cmd(op::CHANGE_BAUDRATE, &words(&[new, old]), 0), f, env)
    }

    #[test]
    fn legacy_stub_scales_its_divider_by_the_old_rate_it_is_told() {
        let mut l = Loader::rom(None);
        let mut f = Flash::new(0x10000);
        upload(&mut l, &mut f, LEGACY_STUB_TEXT);
        // The right old rate: the new rate, 10 ms after the reply, then 1 ms.
        let fx = change_baud(&mut l, &mut f, 115_200, 921_600, 115_200);
        assert_eq!(
            fx,
            [
                Effect::WaitFlash,
                Effect::Record(SimEventKind::ChangeBaudrate {
                    stub: Some(StubKind::Legacy),
                    new: 921_600,
                    old: 115_200,
                    rate: 921_600
                }),
                Effect::Send(vec![1, op::CHANGE_BAUDRATE, 2, 0, 0, 0, 0, 0, 0, 0]),
                Effect::Busy(Duration::from_millis(10)),
                Effect::SetBaud(921_600),
                Effect::Busy(Duration::from_millis(1)),
            ]
        );
        // Told 115200 while the line runs at 921600 (a bridge switched it):
        // 921600 x 921600 / 115200.
        let fx = change_baud(&mut l, &mut f, 921_600, 921_600, 115_200);
        assert!(fx.contains(&Effect::SetBaud(7_372_800)), "{fx:?}");
        // Down again with the right old rate.
        let fx = change_baud(&mut l, &mut f, 921_600, 115_200, 921_600);
        assert!(fx.contains(&Effect::SetBaud(115_200)), "{fx:?}");
        // An old (or new) rate of 0 gives no rate at all, and no panic.
        for (new, old) in [(921_600, 0), (0, 115_200), (0, 0)] {
            let fx = change_baud(&mut l, &mut f, 115_200, new, old);
            assert!(fx.contains(&Effect::SetBaud(NO_BAUD)), "{fx:?}");
            assert_eq!(&sends(&fx)[0][8..], [0, 0], "the stub still says ok");
        }
        // Extremes neither overflow nor panic.
        assert_eq!(legacy_stub_rate(5_000_000, u32::MAX, 1), NO_BAUD);
        assert_eq!(legacy_stub_rate(300, 1, u32::MAX), NO_BAUD);
        assert_eq!(legacy_stub_rate(NO_BAUD, 921_600, 115_200), NO_BAUD);
        assert_eq!(legacy_stub_rate(115_200, 230_400, 460_800), 57_600);
        // A wrong length is refused with the stub's code.
        let fx = l.handle_frame(
            &cmd(op::CHANGE_BAUDRATE, &words(&[921_600]), 0),
            &mut f,
            ENV,
        );
        assert_eq!(&only_reply(&fx)[8..], [0xC0, 0]);
        assert!(!fx.iter().any(|e| matches!(e, Effect::SetBaud(_))));
    }

    #[test]
    fn flasher_stub_sets_the_new_rate_whatever_the_old_one() {
        let mut l = Loader::rom(None);
        let mut f = Flash::new(0x10000);
        upload(&mut l, &mut f, FLASHER_STUB_TEXT);
        for old in [115_200, 921_600, 0, 12_345] {
            let fx = change_baud(&mut l, &mut f, 115_200, 921_600, old);
            assert_eq!(
                fx,
                [
                    Effect::WaitFlash,
                    Effect::Record(SimEventKind::ChangeBaudrate {
                        stub: Some(StubKind::Flasher),
                        new: 921_600,
                        old,
                        rate: 921_600
                    }),
                    Effect::Send(vec![1, op::CHANGE_BAUDRATE, 2, 0, 0, 0, 0, 0, 0, 0]),
                    Effect::Busy(Duration::from_millis(5)),
                    Effect::WaitTxIdle,
                    Effect::SetBaud(921_600),
                    Effect::Busy(Duration::from_millis(5)),
                ]
            );
        }
        let fx = change_baud(&mut l, &mut f, 115_200, 0, 115_200);
        assert!(fx.contains(&Effect::SetBaud(NO_BAUD)), "{fx:?}");
    }

    #[test]
    fn commands_are_told_from_read_flash_acks() {
        let mut l = Loader::rom(None);
        let mut f = Flash::new(0x10000);
        assert_eq!(l.command_of(&sync_frame()), Some((op::SYNC, 36)));
        assert_eq!(l.command_of(&[1, 8, 0, 0, 0, 0, 0, 0]), None, "a response");
        assert_eq!(l.command_of(&[0, 8, 0]), None, "too short");
        start_stub(&mut l, &mut f);
        l.handle_frame(
            &cmd(op::READ_FLASH, &words(&[0, 0x2000, 0x1000, 1]), 0),
            &mut f,
            ENV,
        );
        assert_eq!(l.command_of(&0x1000u32.to_le_bytes()), None, "an ack");
        assert_eq!(op_name(op::FLASH_DEFL_DATA), "FLASH_DEFL_DATA");
        assert_eq!(op_name(0x77), "UNKNOWN");
    }

    #[test]
    fn rom_read_flash_slow_returns_64_bytes() {
        let mut l = Loader::rom(None);
        let mut f = Flash::new(0x10000);
        f.program(0, &[1, 2, 3]).unwrap();
        let r =
            only_reply(&l.handle_frame(&cmd(op::READ_FLASH_SLOW, &words(&[0, 3]), 0), &mut f, ENV));
        assert_eq!(u16::from_le_bytes([r[2], r[3]]), 68);
        assert_eq!(&r[8..11], [1, 2, 3]);
        let r = only_reply(&l.handle_frame(
            &cmd(op::READ_FLASH_SLOW, &words(&[0, 65]), 0),
            &mut f,
            ENV,
        ));
        assert_eq!(&r[8..], [1, 0x0A, 0, 0]);
    }

    #[test]
    fn stub_flash_end_zero_reboots() {
        let mut l = Loader::rom(None);
        let mut f = Flash::new(0x10000);
        start_stub(&mut l, &mut f);
        let fx = l.handle_frame(
            &cmd(op::FLASH_BEGIN, &words(&[0, 0, 0x4000, 0, 0]), 0),
            &mut f,
            ENV,
        );
        assert_eq!(&only_reply(&fx)[8..], [0, 0]);
        let fx = l.handle_frame(&cmd(op::FLASH_END, &words(&[0]), 0), &mut f, ENV);
        assert_eq!(fx.last(), Some(&Effect::Reset(ResetKind::Reboot)));
    }

    #[test]
    fn stub_erase_region_requires_sector_alignment() {
        let mut l = Loader::rom(None);
        let mut f = Flash::new(0x10000);
        start_stub(&mut l, &mut f);
        f.program(0x1000, &[0]).unwrap();
        let r = only_reply(&l.handle_frame(
            &cmd(op::ERASE_REGION, &words(&[0x1000, 0x1000]), 0),
            &mut f,
            ENV,
        ));
        assert_eq!(&r[8..], [0, 0]);
        assert_eq!(f.read(0x1000, 1).unwrap(), [0xFF]);
        let r = only_reply(&l.handle_frame(
            &cmd(op::ERASE_REGION, &words(&[0x1001, 0x1000]), 0),
            &mut f,
            ENV,
        ));
        assert_eq!(&r[8..], [0xC0, 0]);
    }

    #[test]
    fn random_frames_never_panic() {
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let ops = [
            0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08, 0x09, 0x0A, 0x0B, 0x0D, 0x0E, 0x0F, 0x10,
            0x11, 0x12, 0x13, 0x14, 0xD0, 0xD1, 0xD2, 0xD3, 0x00, 0xFF,
        ];
        for round in 0..2 {
            let mut l = Loader::rom(None);
            let mut f = Flash::new(0x10000);
            if round == 1 {
                start_stub(&mut l, &mut f);
            }
            for _ in 0..20_000 {
                let r = next();
                let op = ops[(r % ops.len() as u64) as usize];
                let len = ((r >> 8) % 48) as usize;
                let mut data: Vec<u8> = (0..len).map(|_| next() as u8).collect();
                // Plausible headers now and then, so deeper paths run too.
                if len >= 16 && r & 0x100 != 0 {
                    let words_in = [(r >> 20) as u32 % 0x2_0000, (r >> 40) as u32 % 4];
                    data[..8].copy_from_slice(&words(&words_in));
                }
                let mut frame = cmd(op, &data, (r >> 32) as u32 & 0xFF);
                if r & 0x200 != 0 {
                    frame.truncate((r >> 12) as usize % (frame.len() + 1));
                }
                let _ = l.handle_frame(&frame, &mut f, ENV);
            }
        }
    }
}
