//! Fuzz target: structured damage to a valid metadata image, checksums kept valid, so the
//! structural validators of `open` and `check` are what is exercised. Errors are fine;
//! panics are not.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = vhost_clone::metadata::damage::check_damaged(data);
});
