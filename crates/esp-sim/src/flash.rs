//! The SPI NOR flash chip: erased bytes read `0xFF`, programming can only
//! clear bits (so writing without erasing first corrupts data, as on real
//! flash), erases work on 4 KiB sectors or 64 KiB blocks.
//!
//! Operations report how long they take on the modelled chip, so callers can
//! make the UART side wait as a real loader does. The figures are scaled down
//! from a real GD25Q32 (which erases a sector in ~50 ms) so that a 1 MiB
//! flash stays within a few seconds unpaced.

use std::io;
use std::path::Path;
use std::time::Duration;

pub const SECTOR: usize = 0x1000;
pub const BLOCK: usize = 0x1_0000;

const SECTOR_ERASE: Duration = Duration::from_micros(2_000);
const BLOCK_ERASE: Duration = Duration::from_micros(8_000);
/// Per byte programmed: 256-byte pages at ~0.13 ms each.
const PROGRAM_NS_PER_BYTE: u64 = 500;
/// A whole-chip erase of 4 MiB; scaled with the size.
const CHIP_ERASE_PER_MIB: Duration = Duration::from_millis(100);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutOfRange;

#[derive(Debug, Clone)]
pub struct Flash {
    data: Vec<u8>,
    /// Set by every change; cleared by whoever persists the content.
    dirty: bool,
}

impl Flash {
    /// A factory-fresh (erased) chip. Sizes are rounded up to whole sectors.
    pub fn new(size: usize) -> Flash {
        let size = size.max(SECTOR).div_ceil(SECTOR) * SECTOR;
        Flash {
            data: vec![0xFF; size],
            dirty: false,
        }
    }

    /// Loads content saved by [`Flash::save`]; a missing file gives an erased
    /// chip, a shorter file is padded with erased bytes, a longer one cut.
    pub fn load_or_new(size: usize, path: &Path) -> io::Result<Flash> {
        let mut flash = Flash::new(size);
        match std::fs::read(path) {
            Ok(bytes) => {
                let n = bytes.len().min(flash.data.len());
                flash.data[..n].copy_from_slice(&bytes[..n]);
                Ok(flash)
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(flash),
            Err(e) => Err(e),
        }
    }

    /// Writes the content atomically (temp file + rename), so a reader never
    /// sees half a flash.
    pub fn save(&mut self, path: &Path) -> io::Result<()> {
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(".tmp");
        std::fs::write(&tmp, &self.data)?;
        std::fs::rename(&tmp, path)?;
        self.dirty = false;
        Ok(())
    }

    pub fn size(&self) -> usize {
        self.data.len()
    }

    pub fn is_dirty(&self) -> bool {
        self.dirty
    }

    pub fn contents(&self) -> &[u8] {
        &self.data
    }

    fn range(&self, addr: u32, len: usize) -> Result<std::ops::Range<usize>, OutOfRange> {
        let start = addr as usize;
        let end = start.checked_add(len).ok_or(OutOfRange)?;
        if end > self.data.len() {
            return Err(OutOfRange);
        }
        Ok(start..end)
    }

    pub fn read(&self, addr: u32, len: usize) -> Result<&[u8], OutOfRange> {
        let r = self.range(addr, len)?;
        Ok(&self.data[r])
    }

    /// Programs bytes: NOR flash can only turn 1 bits into 0 bits.
    pub fn program(&mut self, addr: u32, bytes: &[u8]) -> Result<Duration, OutOfRange> {
        let r = self.range(addr, bytes.len())?;
        for (cell, &b) in self.data[r].iter_mut().zip(bytes) {
            *cell &= b;
        }
        self.dirty = true;
        Ok(Duration::from_nanos(
            PROGRAM_NS_PER_BYTE * bytes.len() as u64,
        ))
    }

    /// Erases every sector touched by `[addr, addr+len)`, using 64 KiB block
    /// erases where a whole aligned block is covered, as the loaders do.
    pub fn erase_region(&mut self, addr: u32, len: usize) -> Result<Duration, OutOfRange> {
        if len == 0 {
            return Ok(Duration::ZERO);
        }
        let start = (addr as usize / SECTOR) * SECTOR;
        let end = (addr as usize)
            .checked_add(len)
            .ok_or(OutOfRange)?
            .div_ceil(SECTOR)
            * SECTOR;
        if end > self.data.len() {
            return Err(OutOfRange);
        }
        let mut at = start;
        let mut took = Duration::ZERO;
        while at < end {
            let step = if at.is_multiple_of(BLOCK) && end - at >= BLOCK {
                took += BLOCK_ERASE;
                BLOCK
            } else {
                took += SECTOR_ERASE;
                SECTOR
            };
            self.data[at..at + step].fill(0xFF);
            at += step;
        }
        self.dirty = true;
        Ok(took)
    }

    pub fn erase_chip(&mut self) -> Duration {
        self.data.fill(0xFF);
        self.dirty = true;
        let mib = self.data.len().div_ceil(1 << 20) as u32;
        CHIP_ERASE_PER_MIB * mib.max(1)
    }

    /// The RDID answer (manufacturer, memory type, capacity as log2 of the
    /// size): GigaDevice GD25Q-series, as on many ESP32 modules.
    pub fn jedec_id(&self) -> u32 {
        let capacity = usize::BITS - 1 - self.data.len().leading_zeros();
        0xC8 | (0x40 << 8) | (capacity << 16)
    }

    /// Reading flash is fast next to the UART; hashing a region takes about
    /// as long as the stub's MD5 over SPI at 40 MHz.
    pub fn md5_duration(len: usize) -> Duration {
        Duration::from_nanos(len as u64 * 50)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn program_only_clears_bits() {
        let mut f = Flash::new(2 * SECTOR);
        f.program(0, &[0x0F, 0xAA]).unwrap();
        f.program(0, &[0xF0, 0xFF]).unwrap();
        assert_eq!(f.read(0, 3).unwrap(), &[0x00, 0xAA, 0xFF]);
        f.erase_region(0, 1).unwrap();
        assert_eq!(f.read(0, 2).unwrap(), &[0xFF, 0xFF]);
    }

    #[test]
    fn erase_covers_touched_sectors_and_uses_blocks() {
        let mut f = Flash::new(4 << 20);
        f.program(0x1_0000, &[0; 0x2_1000]).unwrap();
        let took = f.erase_region(0x1_0000, 0x2_0001).unwrap();
        // Two 64 KiB blocks, then one sector for the single byte past them.
        assert_eq!(took, BLOCK_ERASE * 2 + SECTOR_ERASE);
        assert!(
            f.read(0x1_0000, 0x2_1000)
                .unwrap()
                .iter()
                .all(|&b| b == 0xFF)
        );
    }

    #[test]
    fn out_of_range_is_an_error_not_a_panic() {
        let mut f = Flash::new(SECTOR);
        assert_eq!(f.read(u32::MAX, 16), Err(OutOfRange));
        assert_eq!(f.program(0xFFF, &[0, 0]), Err(OutOfRange));
        assert_eq!(f.erase_region(0x1000, 1), Err(OutOfRange));
    }

    #[test]
    fn jedec_id_matches_size() {
        assert_eq!(Flash::new(4 << 20).jedec_id(), 0x1640C8);
        assert_eq!(Flash::new(16 << 20).jedec_id(), 0x1840C8);
    }
}
