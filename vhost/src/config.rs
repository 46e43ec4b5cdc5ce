//! virtio-blk configuration space (`struct virtio_blk_config`, VIRTIO 1.2 §5.2.4), little-endian.

use crate::block::DiskGeometry;

/// Bytes of `struct virtio_blk_config` we fill in: up to and including `unused1[3]`
/// (offset 60). Everything past it (secure erase, zoned) reads as zero.
pub const CONFIG_LEN: usize = 60;

/// Offset of the `writeback` byte (writable by the driver when CONFIG_WCE is negotiated).
pub const WRITEBACK_OFFSET: usize = 32;

/// Values the device puts in its config space, besides the geometry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigOptions {
    /// `size_max`: largest single data segment in bytes.
    pub size_max: u32,
    /// `seg_max`: most data segments in one request.
    pub seg_max: u32,
    /// `num_queues`.
    pub num_queues: u16,
    /// `writeback`: 1 = write-back cache (the guest must flush), 0 = write-through.
    pub writeback: u8,
    /// `max_write_zeroes_sectors` (capped by the capacity).
    pub max_write_zeroes_sectors: u32,
}

/// The config space as the guest sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlkConfig {
    bytes: [u8; CONFIG_LEN],
}

fn put(bytes: &mut [u8; CONFIG_LEN], offset: usize, value: &[u8]) {
    if let Some(dst) = bytes.get_mut(offset..offset.saturating_add(value.len())) {
        dst.copy_from_slice(value);
    }
}

impl BlkConfig {
    /// Build the config space from the backend geometry and device options.
    pub fn new(geo: &DiskGeometry, opts: &ConfigOptions) -> Self {
        let mut b = [0u8; CONFIG_LEN];
        let max_sectors = u32::try_from(geo.capacity_sectors).unwrap_or(u32::MAX);
        put(&mut b, 0, &geo.capacity_sectors.to_le_bytes()); // capacity
        put(&mut b, 8, &opts.size_max.to_le_bytes()); // size_max
        put(&mut b, 12, &opts.seg_max.to_le_bytes()); // seg_max
                                                      // 16..20: geometry (cylinders, heads, sectors) left zero: F_GEOMETRY not offered.
        put(&mut b, 20, &geo.logical_block_size.to_le_bytes()); // blk_size
        put(&mut b, 24, &[geo.physical_block_exp]); // topology.physical_block_exp
        put(&mut b, 25, &[0]); // topology.alignment_offset
        put(&mut b, 26, &geo.min_io_size.to_le_bytes()); // topology.min_io_size
        put(&mut b, 28, &geo.opt_io_size.to_le_bytes()); // topology.opt_io_size
        put(&mut b, WRITEBACK_OFFSET, &[opts.writeback]); // writeback
        put(&mut b, 34, &opts.num_queues.to_le_bytes()); // num_queues
        if geo.discard {
            put(&mut b, 36, &max_sectors.to_le_bytes()); // max_discard_sectors
            put(&mut b, 40, &1u32.to_le_bytes()); // max_discard_seg
            let align = geo.discard_granularity_sectors.max(1);
            put(&mut b, 44, &align.to_le_bytes()); // discard_sector_alignment
        }
        if geo.write_zeroes {
            let max_wz = max_sectors.min(opts.max_write_zeroes_sectors);
            put(&mut b, 48, &max_wz.to_le_bytes()); // max_write_zeroes_sectors
            put(&mut b, 52, &1u32.to_le_bytes()); // max_write_zeroes_seg
            put(&mut b, 56, &[1]); // write_zeroes_may_unmap
        }
        BlkConfig { bytes: b }
    }

    /// The whole filled-in structure.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// Exactly `size` bytes starting at `offset`, zero past the end of the structure.
    /// Never panics, whatever `offset` and `size` are.
    pub fn read(&self, offset: u32, size: u32) -> Vec<u8> {
        let size = usize::try_from(size).unwrap_or(usize::MAX);
        // The vhost-user CONFIG payload is at most 256 bytes; refuse absurd sizes softly.
        let size = size.min(4096);
        let mut out = vec![0u8; size];
        let start = usize::try_from(offset).unwrap_or(usize::MAX);
        if let Some(src) = self.bytes.get(start..) {
            let n = src.len().min(size);
            if let (Some(dst), Some(src)) = (out.get_mut(..n), src.get(..n)) {
                dst.copy_from_slice(src);
            }
        }
        out
    }

    /// Current `writeback` byte.
    pub fn writeback(&self) -> u8 {
        self.bytes.get(WRITEBACK_OFFSET).copied().unwrap_or(0)
    }

    /// Apply a driver write. Only `writeback` is writable (VIRTIO 1.2 §5.2.5: the driver
    /// MAY switch the cache mode when CONFIG_WCE is negotiated); returns false otherwise.
    pub fn write(&mut self, offset: u32, data: &[u8]) -> bool {
        let Ok(off) = usize::try_from(offset) else {
            return false;
        };
        match (off, data) {
            (WRITEBACK_OFFSET, [v]) if *v <= 1 => {
                put(&mut self.bytes, WRITEBACK_OFFSET, &[*v]);
                true
            }
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn geo() -> DiskGeometry {
        DiskGeometry {
            capacity_sectors: 0x1_0000_0002,
            logical_block_size: 4096,
            physical_block_exp: 1,
            min_io_size: 2,
            opt_io_size: 16,
            read_only: false,
            discard: true,
            write_zeroes: true,
            discard_granularity_sectors: 128,
        }
    }

    fn cfg() -> BlkConfig {
        BlkConfig::new(
            &geo(),
            &ConfigOptions {
                size_max: 1 << 20,
                seg_max: 126,
                num_queues: 4,
                writeback: 1,
                max_write_zeroes_sectors: 65536,
            },
        )
    }

    fn le32(b: &[u8], o: usize) -> u32 {
        u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
    }

    #[test]
    fn field_offsets() {
        let c = cfg();
        let b = c.as_bytes();
        assert_eq!(
            u64::from_le_bytes(b[0..8].try_into().unwrap()),
            0x1_0000_0002
        );
        assert_eq!(le32(b, 8), 1 << 20);
        assert_eq!(le32(b, 12), 126);
        assert_eq!(le32(b, 20), 4096);
        assert_eq!(b[24], 1);
        assert_eq!(u16::from_le_bytes([b[26], b[27]]), 2);
        assert_eq!(le32(b, 28), 16);
        assert_eq!(b[32], 1);
        assert_eq!(u16::from_le_bytes([b[34], b[35]]), 4);
        assert_eq!(le32(b, 36), u32::MAX);
        assert_eq!(le32(b, 40), 1);
        assert_eq!(le32(b, 44), 128);
        assert_eq!(le32(b, 48), 65536, "max_write_zeroes_sectors as offered");
        assert_eq!(le32(b, 52), 1);
        assert_eq!(b[56], 1);
    }

    #[test]
    fn no_discard_fields_when_not_offered() {
        let mut g = geo();
        g.discard = false;
        g.write_zeroes = false;
        let c = BlkConfig::new(
            &g,
            &ConfigOptions {
                size_max: 0,
                seg_max: 1,
                num_queues: 1,
                writeback: 0,
                max_write_zeroes_sectors: 65536,
            },
        );
        assert!(c.as_bytes()[36..60].iter().all(|&x| x == 0));
    }

    #[test]
    fn reads_are_exactly_sized() {
        let c = cfg();
        assert_eq!(c.read(0, 60), c.as_bytes());
        let r = c.read(0, 256);
        assert_eq!(r.len(), 256);
        assert_eq!(&r[..60], c.as_bytes());
        assert!(r[60..].iter().all(|&x| x == 0));
        assert_eq!(c.read(8, 4), (1u32 << 20).to_le_bytes());
        assert_eq!(c.read(59, 3), vec![0, 0, 0]);
        assert_eq!(c.read(61, 7), vec![0; 7]);
        assert_eq!(c.read(u32::MAX, 5), vec![0; 5]);
        assert_eq!(c.read(3, 0), Vec::<u8>::new());
        assert_eq!(c.read(u32::MAX, u32::MAX).len(), 4096);
        assert_eq!(c.read(1, 1), vec![0]);
    }

    #[test]
    fn writeback_toggle() {
        let mut c = cfg();
        assert!(c.write(32, &[0]));
        assert_eq!(c.writeback(), 0);
        assert!(!c.write(32, &[2]));
        assert!(!c.write(0, &[0; 8]));
        assert!(!c.write(u32::MAX, &[0]));
        assert!(!c.write(32, &[0, 0]));
        assert_eq!(c.writeback(), 0);
    }
}
