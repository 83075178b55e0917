//! The slice of the ESP32's register space a host reads through the ROM loader's READ_REG and
//! WRITE_REG to tell what the chip is (esptool's `chip-id` and `flash-id`): the chip-detect
//! word, the eFuse block, APB_CTL_DATE, and the SPI1 controller that runs raw flash commands.
//! The virtual ESP32 models these registers; the bridge's identification reads them.

/// The ROM's chip-detect word, the same address on every ESP chip.
pub const CHIP_DETECT_MAGIC_REG: u32 = 0x4000_1000;
/// What an ESP32 holds there.
pub const MAGIC: u32 = 0x00F0_1D83;

/// eFuse word N is at `EFUSE_BASE + 4 * N` (MAC in words 1 and 2, revision bits in 3 and 5).
pub const EFUSE_BASE: u32 = 0x3FF5_A000;
/// Bit 31: part of the chip revision.
pub const APB_CTL_DATE: u32 = 0x3FF6_607C;

/// The SPI1 controller (the flash's).
pub const SPI1_BASE: u32 = 0x3FF4_2000;
pub const SPI_CMD: u32 = SPI1_BASE;
pub const SPI_ADDR: u32 = SPI1_BASE + 0x04;
pub const SPI_USER: u32 = SPI1_BASE + 0x1C;
pub const SPI_USER1: u32 = SPI1_BASE + 0x20;
pub const SPI_USER2: u32 = SPI1_BASE + 0x24;
pub const SPI_MOSI_DLEN: u32 = SPI1_BASE + 0x28;
pub const SPI_MISO_DLEN: u32 = SPI1_BASE + 0x2C;
pub const SPI_W0: u32 = SPI1_BASE + 0x80;
/// SPI_CMD: start the user-defined command; cleared by the controller when it is done.
pub const SPI_CMD_USR: u32 = 1 << 18;
/// SPI_USER bits: a command phase, an address phase, data in, data out.
pub const SPI_USR_COMMAND: u32 = 1 << 31;
pub const SPI_USR_ADDR: u32 = 1 << 30;
pub const SPI_USR_MISO: u32 = 1 << 28;
pub const SPI_USR_MOSI: u32 = 1 << 27;
