//! The ESP serial loader protocol, as the ROM download mode and the flasher stubs speak it
//! and esptool drives it: SLIP framing, command codes, the checksum of data packets and the
//! stub's greeting. No I/O: the virtual ESP32 (the chip's side) and the bridge's raw port (a
//! watcher in the middle) both build on it.
//!
//! Packets are SLIP frames ([`slip`]). Inside, a request is direction 0x00, the op code, a
//! little-endian u16 data length, a u32 checksum (data packets only) and the data; a response
//! is direction 0x01, the op, a u16 length, a u32 value and data ending in status bytes.

pub mod esp32;
pub mod slip;

/// First byte of a packet from the host.
pub const DIR_REQUEST: u8 = 0x00;
/// First byte of a packet from the chip.
pub const DIR_RESPONSE: u8 = 0x01;
/// Bytes before a request's data: direction, op, u16 length, u32 checksum.
pub const HEADER_LEN: usize = 8;

/// Command codes. The ROM knows those up to 0x14; 0xD0 and up exist only in the stubs.
pub mod op {
    pub const FLASH_BEGIN: u8 = 0x02;
    pub const FLASH_DATA: u8 = 0x03;
    pub const FLASH_END: u8 = 0x04;
    pub const MEM_BEGIN: u8 = 0x05;
    pub const MEM_END: u8 = 0x06;
    pub const MEM_DATA: u8 = 0x07;
    pub const SYNC: u8 = 0x08;
    pub const WRITE_REG: u8 = 0x09;
    pub const READ_REG: u8 = 0x0A;
    pub const SPI_SET_PARAMS: u8 = 0x0B;
    pub const SPI_ATTACH: u8 = 0x0D;
    pub const READ_FLASH_SLOW: u8 = 0x0E;
    pub const CHANGE_BAUDRATE: u8 = 0x0F;
    pub const FLASH_DEFL_BEGIN: u8 = 0x10;
    pub const FLASH_DEFL_DATA: u8 = 0x11;
    pub const FLASH_DEFL_END: u8 = 0x12;
    pub const SPI_FLASH_MD5: u8 = 0x13;
    pub const GET_SECURITY_INFO: u8 = 0x14;
    pub const ERASE_FLASH: u8 = 0xD0;
    pub const ERASE_REGION: u8 = 0xD1;
    pub const READ_FLASH: u8 = 0xD2;
    pub const RUN_USER_CODE: u8 = 0xD3;
}

/// The data of a SYNC request: `07 07 12 20` and 32 times `0x55`, so the ROM can measure the
/// host's baud rate.
pub const SYNC_DATA_LEN: u16 = 36;

/// Seed of the XOR checksum over a data packet's payload.
pub const CHECKSUM_SEED: u8 = 0xEF;

/// The stub announces itself with this frame once it runs: the only packet a chip ever sends
/// unasked.
pub const STUB_HELLO: &[u8] = b"OHAI";

/// The checksum field of MEM_DATA, FLASH_DATA and FLASH_DEFL_DATA: the seed XORed with every
/// byte of the payload after its 16-byte header.
pub fn checksum(data: &[u8]) -> u8 {
    data.iter().fold(CHECKSUM_SEED, |acc, b| acc ^ b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksum_starts_at_the_seed() {
        assert_eq!(checksum(&[]), CHECKSUM_SEED);
        assert_eq!(checksum(&[0xEF]), 0);
        assert_eq!(checksum(&[1, 2, 4]), CHECKSUM_SEED ^ 7);
    }
}
