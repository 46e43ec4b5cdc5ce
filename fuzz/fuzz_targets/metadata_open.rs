//! Fuzz target: any byte image, opened and checked as an in-memory metadata device, must give
//! a result or an error, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = vhost_clone::metadata::check_image(data);
});
