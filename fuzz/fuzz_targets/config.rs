//! The TOML configuration (`config.toml`) through `Config::from_toml`: parse,
//! defaults, and every range check of `validate`.
#![no_main]

use std::path::Path;

use isr::config::Config;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(config) = Config::from_toml(text, Path::new("fuzz.toml")) {
        config.validate().expect("a loaded config is valid");
    }
});
