//! The slice of the ESP32 register space that the loaders expose through
//! READ_REG/WRITE_REG and that esptool looks at: the chip-detect magic word,
//! the eFuse words (chip model, revision, MAC, crystal calibration), the
//! UART clock divider, the boot strap latch, and the SPI1 controller through
//! which esptool runs raw flash commands (JEDEC ID, status registers, SFDP).
//!
//! Pure state: the chip thread passes in what depends on the moment (baud
//! rate, APB clock, boot straps) and the flash chip the SPI controller talks to.

use std::collections::HashMap;

use super::flash::Flash;

use esp_loader::esp32::{
    APB_CTL_DATE, EFUSE_BASE, SPI_ADDR, SPI_CMD, SPI_CMD_USR, SPI_MISO_DLEN, SPI_MOSI_DLEN,
    SPI_USER, SPI_USER1, SPI_USER2, SPI_USR_ADDR, SPI_USR_MISO, SPI_USR_MOSI, SPI_W0,
};
pub use esp_loader::esp32::{CHIP_DETECT_MAGIC_REG, MAGIC as ESP32_MAGIC};

const EFUSE_WORDS: u32 = 64;
const UART0_CLKDIV: u32 = 0x3FF4_0014;
const UART0_DATE: u32 = 0x3FF4_0078;
/// The same UART0 register block seen through its other bus alias.
const UART0_DATE_ALIAS: u32 = 0x6000_0078;
const RTC_CALI_CFG1: u32 = 0x3FF5_F06C;
const GPIO_STRAP: u32 = 0x3FF4_4038;

/// The factory MAC the eFuses hold: an Espressif OUI.
pub const MAC: [u8; 6] = [0x24, 0x0A, 0xC4, 0x12, 0x34, 0x56];

/// `EFUSE_RD_CK8M_FREQ` and the RTC calibration value are chosen so that
/// esptool's model of the ROM's crystal estimate gives exactly 40 MHz
/// (`cali * 15625 * ck8m / 40`); then the ESP32 ROM baud-rate workaround in
/// esptool sends the rate it wants unchanged.
const CK8M_FREQ: u32 = 50;
const RTC_CALI_VALUE: u32 = 2048;

/// Keeps arbitrary host writes from growing the map without bound.
const MAX_STORED_REGS: usize = 4096;

/// What the registers show that is not stored in them.
#[derive(Debug, Clone, Copy)]
pub struct Ctx {
    /// The chip's current UART rate.
    pub baud: u32,
    /// The APB clock the UART divides: the crystal in ROM, the PLL under the stub.
    pub apb_hz: u32,
    /// IO0 as latched at the last reset (low = download boot).
    pub io0_high_at_boot: bool,
}

/// CRC-8 (reflected polynomial 0x8C, initial 0), the ROM's `esp_crc8`, which
/// guards the factory MAC in eFuse block 0.
fn mac_crc(mac: &[u8; 6]) -> u8 {
    let mut crc = 0u8;
    for &b in mac {
        crc ^= b;
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0x8C
            } else {
                crc >> 1
            };
        }
    }
    crc
}

/// eFuse block 0 words of an ESP32-D0WD-V3, revision v3.1, 240 MHz, dual core,
/// with Bluetooth, ADC Vref calibrated, no flash encryption or secure boot.
fn efuse_word(n: u32) -> u32 {
    match n {
        1 => u32::from_be_bytes([MAC[2], MAC[3], MAC[4], MAC[5]]),
        2 => (u32::from(mac_crc(&MAC)) << 16) | (u32::from(MAC[0]) << 8) | u32::from(MAC[1]),
        // Bit 15: revision bit 0; bits 9..11: package 1 (D0WD); bit 13: CPU
        // frequency rated, bit 12 clear: 240 MHz.
        3 => (1 << 15) | (1 << 13) | (1 << 9),
        // Bits 8..12: ADC Vref; bits 0..7: the 8 MHz oscillator calibration.
        4 => (0x11 << 8) | CK8M_FREQ,
        // Bits 24..25: minor revision 1; bit 20: revision bit 1.
        5 => (1 << 24) | (1 << 20),
        _ => 0,
    }
}

#[derive(Debug, Default, Clone)]
pub struct Registers {
    stored: HashMap<u32, u32>,
    /// The flash chip's status registers (SR1..SR3, one byte each).
    flash_status: u32,
}

impl Registers {
    pub fn new() -> Registers {
        Registers::default()
    }

    pub fn read(&self, addr: u32, ctx: &Ctx) -> u32 {
        match addr {
            CHIP_DETECT_MAGIC_REG => ESP32_MAGIC,
            a if (EFUSE_BASE..EFUSE_BASE + 4 * EFUSE_WORDS).contains(&a) => {
                efuse_word((a - EFUSE_BASE) / 4)
            }
            // Bit 31 is the third revision bit (set on v3 silicon).
            APB_CTL_DATE => 0x8000_0000 | 0x1604_2000,
            UART0_CLKDIV => clkdiv(ctx.apb_hz, ctx.baud),
            UART0_DATE | UART0_DATE_ALIAS => 0x1512_2500,
            RTC_CALI_CFG1 => RTC_CALI_VALUE << 7,
            // Download boot latches 0x03, SPI boot 0x13: bit 4 is IO0.
            GPIO_STRAP => 0x03 | (u32::from(ctx.io0_high_at_boot) << 4),
            // The controller finishes instantly: USR never reads back set.
            SPI_CMD => self.get(SPI_CMD) & !SPI_CMD_USR,
            a => self.get(a),
        }
    }

    /// A masked write, `reg = (reg & !mask) | (value & mask)`, as the loaders
    /// do it. Writing the SPI controller's USR bit runs the configured command.
    pub fn write(&mut self, addr: u32, value: u32, mask: u32, flash: &mut Flash) {
        let old = self.get(addr);
        let new = (old & !mask) | (value & mask);
        if addr == SPI_CMD && new & SPI_CMD_USR != 0 {
            self.run_spi_user_command(flash);
            self.put(addr, new & !SPI_CMD_USR);
            return;
        }
        self.put(addr, new);
    }

    fn get(&self, addr: u32) -> u32 {
        self.stored.get(&addr).copied().unwrap_or(0)
    }

    fn put(&mut self, addr: u32, value: u32) {
        if self.stored.len() < MAX_STORED_REGS || self.stored.contains_key(&addr) {
            self.stored.insert(addr, value);
        }
    }

    /// Runs the command the host set up in SPI_USER/USER2/ADDR/W0.. against
    /// the flash chip and leaves what it read in W0.
    fn run_spi_user_command(&mut self, flash: &mut Flash) {
        let user = self.get(SPI_USER);
        let command = self.get(SPI_USER2) & 0xFFFF;
        let addr_bits = ((self.get(SPI_USER1) >> 26) & 0x3F) + 1;
        let addr = if user & SPI_USR_ADDR != 0 {
            // The address goes out MSB first from the top of the register.
            self.get(SPI_ADDR) >> (32 - addr_bits.min(32))
        } else {
            0
        };
        let mosi = if user & SPI_USR_MOSI != 0 {
            let bits = self.get(SPI_MOSI_DLEN) + 1;
            let w0 = self.get(SPI_W0);
            if bits >= 32 {
                w0
            } else {
                w0 & ((1 << bits) - 1)
            }
        } else {
            0
        };
        let miso: Option<u32> = match command {
            0x9F => Some(flash.jedec_id()),
            0x05 => Some(self.flash_status & 0xFF),
            0x35 => Some((self.flash_status >> 8) & 0xFF),
            0x15 => Some((self.flash_status >> 16) & 0xFF),
            0x5A => Some(u32::from(sfdp_byte(addr))),
            // Write enable / disable toggle WEL (status bit 1).
            0x06 | 0x50 => {
                self.flash_status |= 0x02;
                None
            }
            0x04 => {
                self.flash_status &= !0x02;
                None
            }
            // WRSR takes one or two bytes, WRSR2/WRSR3 one; each clears WEL.
            0x01 => {
                let bits = self.get(SPI_MOSI_DLEN) + 1;
                let keep = if bits > 8 { 0xFF_0000 } else { 0xFF_FF00 };
                let mask = if bits > 8 { 0xFFFF } else { 0xFF };
                self.flash_status = (self.flash_status & keep) | (mosi & mask);
                self.flash_status &= !0x02;
                None
            }
            0x31 => {
                self.flash_status = (self.flash_status & !0xFF00) | ((mosi & 0xFF) << 8);
                self.flash_status &= !0x02;
                None
            }
            0x11 => {
                self.flash_status = (self.flash_status & !0xFF_0000) | ((mosi & 0xFF) << 16);
                self.flash_status &= !0x02;
                None
            }
            // Reset, power-down and the like: nothing observable here.
            _ => None,
        };
        if let (Some(value), true) = (miso, user & SPI_USR_MISO != 0) {
            let bits = self.get(SPI_MISO_DLEN) + 1;
            let value = if bits >= 32 {
                value
            } else {
                value & ((1 << bits) - 1)
            };
            self.put(SPI_W0, value);
        }
    }
}

/// `UART_CLKDIV`: integer divider in bits 0..19, sixteenths in bits 20..23.
fn clkdiv(apb_hz: u32, baud: u32) -> u32 {
    let div16 = (u64::from(apb_hz) * 16) / u64::from(baud.max(1));
    let int = ((div16 >> 4) as u32) & 0xF_FFFF;
    let frac = (div16 & 0xF) as u32;
    (frac << 20) | int
}

/// A minimal SFDP table: the "SFDP" signature header and a vendor parameter
/// header naming GigaDevice, enough for esptool's XMC check to leave it alone.
fn sfdp_byte(addr: u32) -> u8 {
    const TABLE: [u8; 24] = [
        b'S', b'F', b'D', b'P', 0x06, 0x01, 0x01, 0xFF, // header, 2 parameter headers
        0x00, 0x06, 0x01, 0x10, 0x30, 0x00, 0x00, 0xFF, // JEDEC basic table
        0xC8, 0x00, 0x01, 0x03, 0x90, 0x00, 0x00, 0xFF, // vendor (GigaDevice) table
    ];
    TABLE.get(addr as usize).copied().unwrap_or(0xFF)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROM_CTX: Ctx = Ctx {
        baud: 115_200,
        apb_hz: 40_000_000,
        io0_high_at_boot: false,
    };

    #[test]
    fn mac_reads_back_the_way_esptool_assembles_it() {
        let r = Registers::new();
        let w2 = r.read(EFUSE_BASE + 8, &ROM_CTX).to_be_bytes();
        let w1 = r.read(EFUSE_BASE + 4, &ROM_CTX).to_be_bytes();
        assert_eq!([w2[2], w2[3], w1[0], w1[1], w1[2], w1[3]], MAC);
    }

    #[test]
    fn clock_divider_gives_back_a_40mhz_crystal() {
        let r = Registers::new();
        for baud in [115_200u32, 230_400, 460_800, 921_600] {
            let ctx = Ctx { baud, ..ROM_CTX };
            let div = r.read(UART0_CLKDIV, &ctx) & 0xF_FFFF;
            let est = f64::from(baud) * f64::from(div) / 1e6;
            assert!((est - 40.0).abs() < 1.0, "{baud}: {est}");
        }
        let cali = (r.read(RTC_CALI_CFG1, &ROM_CTX) >> 7) & 0x1FF_FFFF;
        let ck8m = r.read(EFUSE_BASE + 16, &ROM_CTX) & 0xFF;
        assert_eq!(u64::from(cali) * 15625 * u64::from(ck8m) / 40, 40_000_000);
    }

    #[test]
    fn spi_rdid_runs_through_user_command_registers() {
        let mut r = Registers::new();
        let mut flash = Flash::new(4 << 20);
        r.write(SPI_MISO_DLEN, 23, !0, &mut flash);
        r.write(SPI_USER, (1 << 31) | SPI_USR_MISO, !0, &mut flash);
        r.write(SPI_USER2, (7 << 28) | 0x9F, !0, &mut flash);
        r.write(SPI_W0, 0, !0, &mut flash);
        r.write(SPI_CMD, SPI_CMD_USR, !0, &mut flash);
        assert_eq!(r.read(SPI_CMD, &ROM_CTX) & SPI_CMD_USR, 0);
        assert_eq!(r.read(SPI_W0, &ROM_CTX), 0x1640C8);
    }

    #[test]
    fn masked_write_keeps_unmasked_bits() {
        let mut r = Registers::new();
        let mut flash = Flash::new(0x1000);
        r.write(0x3FF0_0000, 0xFFFF_FFFF, !0, &mut flash);
        r.write(0x3FF0_0000, 0, 0x0000_FF00, &mut flash);
        assert_eq!(r.read(0x3FF0_0000, &ROM_CTX), 0xFFFF_00FF);
    }
}
