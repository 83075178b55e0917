//! Which chip sits on a board: its model, revision, factory MAC and flash size, read through
//! its ROM loader the way esptool's `chip-id` and `flash-id` read them, with the board's own
//! reset engine, and the chip put back into its application afterwards. Only on request
//! (`esp-bridge identify BOARD`): the bridge lends the device for it as it would to a writer,
//! so it never fights a client, and it is bounded in time.

use crate::control::ModemOutputs;
use crate::control::{SharedControl, lock};
use crate::settings::{FlowControl, LineSettings, Parity, StopBits};
use crate::uart::Uart;
use esp_loader::esp32::{
    APB_CTL_DATE as ESP32_APB_CTL_DATE, CHIP_DETECT_MAGIC_REG, EFUSE_BASE as ESP32_EFUSE_BASE,
    MAGIC as ESP32_MAGIC, SPI_CMD, SPI_CMD_USR, SPI_MISO_DLEN, SPI_MOSI_DLEN, SPI_USER as SPI_USR,
    SPI_USER2 as SPI_USR2, SPI_USR_COMMAND, SPI_USR_MISO, SPI_W0,
};
use esp_loader::slip::{Decoded, Decoder, encode};
use esp_loader::{DIR_REQUEST, DIR_RESPONSE, SYNC_DATA_LEN, op};
use std::time::{Duration, SystemTime};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The most one identification may take, reset and all.
pub const IDENTIFY_TIMEOUT: Duration = Duration::from_secs(10);
/// Resets into the bootloader tried, each followed by SYNC attempts, each waiting this long
/// for the ROM's answer (esptool: 7 tries per reset, several resets).
const RESET_TRIES: usize = 3;
const SYNC_TRIES: usize = 10;
const SYNC_WAIT: Duration = Duration::from_millis(100);
/// How long one register read may take.
const COMMAND_WAIT: Duration = Duration::from_secs(1);
/// The ROMs' rate.
const ROM_BAUD: u32 = 115_200;
/// How long EN is held low for the reset into the application (esptool's hard reset: 100 ms).
const RESET_HOLD: Duration = Duration::from_millis(100);

/// The SPI flash command that answers the JEDEC id.
const SPIFLASH_RDID: u32 = 0x9F;

/// A request to identify a board's chip, with where its answer goes (the control socket's
/// `identify`, through the status book, to the board's bridge).
pub type Ask = tokio::sync::oneshot::Sender<Result<Identity, String>>;

/// The latest time a kept record may say: 9999-12-31 23:59:59 UTC.
const LATEST_RECORD: u64 = 253_402_300_799;

/// What is known of a board's chip.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// "ESP32", "ESP32-S2", ...
    pub chip: String,
    /// Major and minor revision (v3.1), where read.
    pub revision: Option<(u32, u32)>,
    pub mac: Option<[u8; 6]>,
    pub flash_bytes: Option<u64>,
    /// When it was read (seconds since the epoch).
    pub at: u64,
}

impl Identity {
    /// One line: `ESP32 v3.1, MAC 24:0a:c4:12:34:56, 4 MiB flash`.
    pub fn describe(&self) -> String {
        let mut out = self.chip.clone();
        if let Some((major, minor)) = self.revision {
            out.push_str(&format!(" v{major}.{minor}"));
        }
        match self.mac {
            Some(mac) => out.push_str(&format!(", MAC {}", mac_text(&mac))),
            None => out.push_str(", MAC not read for this chip"),
        }
        match self.flash_bytes {
            Some(b) if b >= 1 << 20 => out.push_str(&format!(", {} MiB flash", b >> 20)),
            Some(b) => out.push_str(&format!(", {} KiB flash", b >> 10)),
            None => out.push_str(", flash size not read"),
        }
        out
    }

    /// The record kept across restarts: `key=value` lines.
    pub fn to_record(&self) -> String {
        let mut out = format!("chip={}\nat={}\n", self.chip, self.at);
        if let Some((major, minor)) = self.revision {
            out.push_str(&format!("revision={major}.{minor}\n"));
        }
        if let Some(mac) = self.mac {
            out.push_str(&format!("mac={}\n", mac_text(&mac)));
        }
        if let Some(b) = self.flash_bytes {
            out.push_str(&format!("flash_bytes={b}\n"));
        }
        out
    }

    /// Reads a record back; `None` for anything that is not one (a damaged file is ignored).
    pub fn from_record(text: &str) -> Option<Identity> {
        let mut id = Identity {
            chip: String::new(),
            revision: None,
            mac: None,
            flash_bytes: None,
            at: 0,
        };
        for line in text.lines().take(16) {
            let (key, value) = line.split_once('=')?;
            match key {
                "chip" if value.len() <= 32 => id.chip = value.to_string(),
                // A time `status` can show (up to the year 9999): a damaged file's huge
                // number would overflow the clock's arithmetic.
                "at" => id.at = value.parse().ok().filter(|at| *at <= LATEST_RECORD)?,
                "revision" => {
                    let (a, b) = value.split_once('.')?;
                    id.revision = Some((a.parse().ok()?, b.parse().ok()?));
                }
                "mac" => {
                    let mut mac = [0u8; 6];
                    let mut parts = value.split(':');
                    for byte in &mut mac {
                        *byte = u8::from_str_radix(parts.next()?, 16).ok()?;
                    }
                    id.mac = Some(mac);
                }
                "flash_bytes" => id.flash_bytes = Some(value.parse().ok()?),
                _ => return None,
            }
        }
        (!id.chip.is_empty()).then_some(id)
    }
}

/// Where a board's identity is kept across restarts: systemd's `StateDirectory=` (the unit
/// sets it), passed in `$STATE_DIRECTORY`; without one it is kept only while the service runs.
fn record_path(board: &str) -> Option<std::path::PathBuf> {
    let dirs = std::env::var_os("STATE_DIRECTORY")?;
    let first = std::env::split_paths(&dirs).next()?;
    Some(first.join(format!("chip-{board}")))
}

/// The identity kept for `board`, if any.
pub fn load(board: &str) -> Option<Identity> {
    use std::io::Read;
    let file = std::fs::File::open(record_path(board)?).ok()?;
    let mut text = String::new();
    file.take(4096).read_to_string(&mut text).ok()?;
    Identity::from_record(&text)
}

/// Keeps `identity` for `board` (written aside, then renamed, so a crash leaves the old one);
/// `Ok(false)` when there is no state directory.
pub fn save(board: &str, identity: &Identity) -> std::io::Result<bool> {
    let Some(path) = record_path(board) else {
        return Ok(false);
    };
    let aside = path.with_extension("new");
    std::fs::write(&aside, identity.to_record())?;
    std::fs::rename(&aside, &path)?;
    Ok(true)
}

fn mac_text(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// The chip named by the ROM's chip-detect word (esptool's table), for chips whose details
/// esp-bridge does not read.
fn chip_of_magic(magic: u32) -> Option<&'static str> {
    Some(match magic {
        0xFFF0_C101 => "ESP8266",
        ESP32_MAGIC => "ESP32",
        0x0000_07C6 => "ESP32-S2",
        0x0000_0009 => "ESP32-S3",
        0x6921_506F | 0x1B31_506F | 0x4881_606F | 0x4361_606F => "ESP32-C3",
        0x6F51_306F | 0x7C41_A06F => "ESP32-C2",
        0x0DA1_806F => "ESP32-C6",
        0xD7B7_3E80 => "ESP32-H2",
        _ => return None,
    })
}

/// The ESP32's revision from its eFuses and APB_CTL_DATE, as esptool computes it.
fn esp32_revision(efuse3: u32, efuse5: u32, apb_ctl_date: u32) -> (u32, u32) {
    let bits = ((apb_ctl_date >> 31) & 1) << 2 | ((efuse5 >> 20) & 1) << 1 | ((efuse3 >> 15) & 1);
    let major = match bits {
        1 => 1,
        3 => 2,
        7 => 3,
        _ => 0,
    };
    (major, (efuse5 >> 24) & 3)
}

/// The factory MAC of an ESP32 from eFuse words 1 and 2.
fn esp32_mac(efuse1: u32, efuse2: u32) -> [u8; 6] {
    let hi = efuse2.to_be_bytes();
    let lo = efuse1.to_be_bytes();
    [hi[2], hi[3], lo[0], lo[1], lo[2], lo[3]]
}

/// The flash size a JEDEC id says (its third byte is log2 of the size in bytes).
fn flash_size(jedec: u32) -> Option<u64> {
    let log2 = (jedec >> 16) & 0xFF;
    (0x10..=0x1F).contains(&log2).then(|| 1u64 << log2)
}

/// The ROM loader over the board's UART.
struct Loader<'a, U: Uart> {
    uart: &'a mut U,
    decoder: Decoder,
}

impl<U: Uart> Loader<'_, U> {
    async fn send(&mut self, opcode: u8, data: &[u8]) -> Result<(), String> {
        let len = u16::try_from(data.len()).map_err(|_| "request too long".to_string())?;
        let mut packet = vec![DIR_REQUEST, opcode];
        packet.extend_from_slice(&len.to_le_bytes());
        packet.extend_from_slice(&[0; 4]);
        packet.extend_from_slice(data);
        self.uart
            .write_all(&encode(&packet))
            .await
            .map_err(|e| format!("writing to the serial device failed: {e}"))
    }

    /// The next response to `opcode` within `wait`: its value, or why there is none.
    async fn response(&mut self, opcode: u8, wait: Duration) -> Result<u32, String> {
        let deadline = tokio::time::Instant::now() + wait;
        let mut buf = [0u8; 256];
        loop {
            let n = match tokio::time::timeout_at(deadline, self.uart.read(&mut buf)).await {
                Err(_) => return Err("no answer".into()),
                Ok(Ok(0)) => return Err("the serial device closed".into()),
                Ok(Ok(n)) => n,
                Ok(Err(e)) => return Err(format!("reading the serial device failed: {e}")),
            };
            for &b in &buf[..n] {
                let Some(Decoded::Frame(f)) = self.decoder.push(b) else {
                    continue;
                };
                // direction, op, u16 length, u32 value, data ending in status bytes
                if f.len() < 10 || f[0] != DIR_RESPONSE || f[1] != opcode {
                    continue;
                }
                let value = u32::from_le_bytes([f[4], f[5], f[6], f[7]]);
                let data = &f[8..];
                // ESP32-and-later ROMs end with 4 status bytes, the ESP8266 ROM with 2.
                let status = if data.len() >= 4 {
                    &data[data.len() - 4..]
                } else {
                    &data[data.len() - 2..]
                };
                if status[0] != 0 {
                    return Err(format!(
                        "the ROM refused the command (error {:#04x})",
                        status[1]
                    ));
                }
                return Ok(value);
            }
        }
    }

    async fn sync(&mut self) -> Result<(), String> {
        let mut data = vec![0x07, 0x07, 0x12, 0x20];
        data.resize(usize::from(SYNC_DATA_LEN), 0x55);
        for _ in 0..SYNC_TRIES {
            self.send(op::SYNC, &data).await?;
            if self.response(op::SYNC, SYNC_WAIT).await.is_ok() {
                // The ROM answers a SYNC eight times: let the rest go by.
                while self.response(op::SYNC, SYNC_WAIT).await.is_ok() {}
                return Ok(());
            }
        }
        Err("the chip did not answer in its bootloader (no SYNC reply at 115200 baud): is the board powered and its TX/RX wired the right way round?".into())
    }

    async fn read_reg(&mut self, addr: u32) -> Result<u32, String> {
        self.send(op::READ_REG, &addr.to_le_bytes()).await?;
        self.response(op::READ_REG, COMMAND_WAIT)
            .await
            .map_err(|e| format!("reading register {addr:#010x}: {e}"))
    }

    async fn write_reg(&mut self, addr: u32, value: u32) -> Result<(), String> {
        let mut data = Vec::with_capacity(16);
        for word in [addr, value, 0xFFFF_FFFF, 0] {
            data.extend_from_slice(&word.to_le_bytes());
        }
        self.send(op::WRITE_REG, &data).await?;
        self.response(op::WRITE_REG, COMMAND_WAIT)
            .await
            .map(|_| ())
            .map_err(|e| format!("writing register {addr:#010x}: {e}"))
    }

    /// The flash chip's JEDEC id through the ESP32's SPI1 controller (the ROM attaches the
    /// flash first), as esptool's flash-id does.
    async fn esp32_flash_id(&mut self) -> Result<u32, String> {
        self.send(op::SPI_ATTACH, &[0; 8]).await?;
        self.response(op::SPI_ATTACH, COMMAND_WAIT).await?;
        let (usr, usr2) = (
            self.read_reg(SPI_USR).await?,
            self.read_reg(SPI_USR2).await?,
        );
        self.write_reg(SPI_MOSI_DLEN, 0).await?;
        self.write_reg(SPI_MISO_DLEN, 23).await?;
        self.write_reg(SPI_USR, SPI_USR_COMMAND | SPI_USR_MISO)
            .await?;
        self.write_reg(SPI_USR2, (7 << 28) | SPIFLASH_RDID).await?;
        self.write_reg(SPI_W0, 0).await?;
        self.write_reg(SPI_CMD, SPI_CMD_USR).await?;
        let mut done = false;
        for _ in 0..10 {
            if self.read_reg(SPI_CMD).await? & SPI_CMD_USR == 0 {
                done = true;
                break;
            }
        }
        let id = self.read_reg(SPI_W0).await?;
        self.write_reg(SPI_USR, usr).await?;
        self.write_reg(SPI_USR2, usr2).await?;
        if !done {
            return Err("the flash did not answer its id command".into());
        }
        Ok(id & 0x00FF_FFFF)
    }
}

/// Resets the chip into its ROM loader, reads what it is, and resets it into its application;
/// the UART is left at `settings` (the board's own) whatever happens.
pub async fn identify<U: Uart>(
    uart: &mut U,
    control: &SharedControl,
    settings: &LineSettings,
) -> Result<Identity, String> {
    let read = tokio::time::timeout(IDENTIFY_TIMEOUT, read_chip(uart, control)).await;
    let back = run_application(control).await;
    let restored = uart.set_line(settings);
    let identity = match read {
        Ok(r) => r?,
        Err(_) => {
            return Err(format!(
                "the chip did not finish answering within {} s",
                IDENTIFY_TIMEOUT.as_secs()
            ));
        }
    };
    back?;
    restored.map_err(|e| format!("setting the serial device back failed: {e}"))?;
    Ok(identity)
}

async fn read_chip<U: Uart>(uart: &mut U, control: &SharedControl) -> Result<Identity, String> {
    let rom = LineSettings {
        baud: ROM_BAUD,
        data_bits: 8,
        parity: Parity::None,
        stop_bits: StopBits::One,
        flow: FlowControl::None,
    };
    uart.set_line(&rom)
        .map_err(|e| format!("setting the serial device to 115200 8N1 failed: {e}"))?;
    let mut loader = Loader {
        uart,
        decoder: Decoder::new(),
    };
    // A reset that did not take (a chip still booting, a line change lost on its way) gets
    // another, as esptool's connect does.
    let mut synced = Err(String::new());
    for _ in 0..RESET_TRIES {
        lock(control)
            .enter_bootloader()
            .map_err(|e| format!("cannot reset the chip: {e}"))?;
        let settled = lock(control).settled();
        settled.await;
        let _ = loader.uart.purge(true, false);
        synced = loader.sync().await;
        if synced.is_ok() {
            break;
        }
    }
    synced?;
    let magic = loader.read_reg(CHIP_DETECT_MAGIC_REG).await?;
    let at = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    if magic != ESP32_MAGIC {
        let chip = chip_of_magic(magic).map_or_else(
            || format!("an Espressif chip esp-bridge does not know (magic {magic:#010x})"),
            str::to_string,
        );
        return Ok(Identity {
            chip,
            revision: None,
            mac: None,
            flash_bytes: None,
            at,
        });
    }
    let efuse = |n: u32| ESP32_EFUSE_BASE + 4 * n;
    let (e1, e2) = (
        loader.read_reg(efuse(1)).await?,
        loader.read_reg(efuse(2)).await?,
    );
    let (e3, e5) = (
        loader.read_reg(efuse(3)).await?,
        loader.read_reg(efuse(5)).await?,
    );
    let date = loader.read_reg(ESP32_APB_CTL_DATE).await?;
    let jedec = loader.esp32_flash_id().await?;
    Ok(Identity {
        chip: "ESP32".into(),
        revision: Some(esp32_revision(e3, e5, date)),
        mac: Some(esp32_mac(e1, e2)),
        flash_bytes: flash_size(jedec),
        at,
    })
}

/// EN pulsed low with IO0 released, as esptool's hard reset does through the same engine:
/// the chip boots its application.
async fn run_application(control: &SharedControl) -> Result<(), String> {
    let reset = |rts| lock(control).client_outputs(ModemOutputs { dtr: false, rts });
    reset(true).map_err(|e| format!("cannot reset the chip into its application: {e}"))?;
    tokio::time::sleep(RESET_HOLD).await;
    reset(false).map_err(|e| format!("cannot reset the chip into its application: {e}"))?;
    let settled = lock(control).settled();
    settled.await;
    lock(control)
        .release()
        .map_err(|e| format!("cannot release the control lines: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn esp32_fields_are_decoded_as_esptool_does() {
        // The virtual ESP32's eFuses: MAC 24:0a:c4:12:34:56, revision v3.1.
        assert_eq!(
            esp32_mac(0xC412_3456, 0x00AB_240A),
            [0x24, 0x0A, 0xC4, 0x12, 0x34, 0x56]
        );
        assert_eq!(
            esp32_revision(1 << 15, (1 << 20) | (1 << 24), 1 << 31),
            (3, 1)
        );
        assert_eq!(esp32_revision(0, 0, 0), (0, 0));
        assert_eq!(flash_size(0x0016_40EF), Some(4 << 20));
        assert_eq!(flash_size(0), None);
        assert_eq!(chip_of_magic(0x0000_07C6), Some("ESP32-S2"));
    }

    #[test]
    fn a_record_reads_back_and_a_damaged_one_is_ignored() {
        let id = Identity {
            chip: "ESP32".into(),
            revision: Some((3, 1)),
            mac: Some([0x24, 0x0A, 0xC4, 0x12, 0x34, 0x56]),
            flash_bytes: Some(4 << 20),
            at: 1_796_698_800,
        };
        assert_eq!(
            id.describe(),
            "ESP32 v3.1, MAC 24:0a:c4:12:34:56, 4 MiB flash"
        );
        assert_eq!(Identity::from_record(&id.to_record()), Some(id));
        for bad in [
            "",
            "chip=\n",
            "chip=ESP32\nmac=zz:00\n",
            "x=1\n",
            "chip=ESP32\nat=-1\n",
            "chip=ESP32\nat=18446744073709551615\n",
        ] {
            assert_eq!(Identity::from_record(bad), None, "{bad:?}");
        }
    }
}
