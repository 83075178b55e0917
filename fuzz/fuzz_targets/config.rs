//! Arbitrary text as /etc/esp-bridge.toml: parsing never panics, and every error names the
//! file (the operator has to know which one to fix).
#![no_main]

use esp_bridge::config::Config;
use libfuzzer_sys::fuzz_target;
use std::path::Path;

const PATH: &str = "/etc/esp-bridge-fuzz.toml";

fuzz_target!(|bytes: &[u8]| {
    // The service reads the file with read_to_string, which refuses invalid UTF-8 before the
    // parser sees it; lossy conversion keeps the fuzzer's mutations useful.
    let text = String::from_utf8_lossy(bytes);
    match Config::parse(&text, Path::new(PATH)) {
        Ok(config) => {
            // Whatever parsed is in range: validation happens while deserializing, for every
            // board, and the boards' names are unique.
            assert!(!config.boards.is_empty());
            for board in &config.boards {
                assert!((50..=20_000_000).contains(&board.serial.baud.0));
                assert!((5..=8).contains(&board.serial.data_bits.0));
                assert!(board
                    .serial
                    .flash_baud
                    .rate()
                    .is_none_or(|rate| (115_200..=20_000_000).contains(&rate)));
                let same_name = config.boards.iter().filter(|b| b.name == board.name);
                assert_eq!(same_name.count(), 1, "two boards named {}", board.name);
            }
            let keepalive = config.network.keepalive.as_secs();
            assert!((1..=3600).contains(&keepalive));
        }
        Err(e) => {
            let message = e.to_string();
            assert!(
                message.contains(PATH),
                "error does not name the file: {message}"
            );
        }
    }
});
