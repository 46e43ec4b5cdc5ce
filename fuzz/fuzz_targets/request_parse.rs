#![no_main]
//! Fuzz the pure virtio-blk request parser: arbitrary descriptor lists, headers and limits.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    vhost_user_blk::request::fuzz_parse(data);
});
