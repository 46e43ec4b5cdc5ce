//! Issue 3, the gold test: metadata written by our library loads in the Linux kernel's dm-clone, and what
//! the kernel leaves behind loads in ours - with the same counts on both sides.
//! (a) `CloneMetadata::format` + `set_region` over a chosen set + two `commit`s; the kernel (QEMU guest,
//!     plain virtio disks) loads it: `dmsetup status` shows exactly our hydrated count and used/total;
//!     the kernel then hydrates/writes more and `dmsetup remove` commits; a reload shows the same count.
//! (b) we open what the kernel left: `vhost-clone metadata check` is clean, our hydrated count equals the
//!     kernel's last status, every region marked by either side is set, used blocks agree.
//! Two geometries: 64 MiB + 3 sectors at 8-sector regions (partial last region, 16385 regions), and a
//! sparse 32 GiB target at 8-sector regions (8,388,608 regions, 258 array blocks: a two-level btree)
//! on an 8 MiB metadata device.
//!
//! Needs `ci/install-deps.sh` and `ci/build-guest.sh`; skips with a notice without them, fails under `CI`.

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant};

use common::daemon::{random_file, scratch};
use common::guest::{self, GuestRun};
use common::util::{fields, metadata_check};
use vhost_clone::metadata::CloneMetadata;

const MIB: u64 = 1 << 20;
const REGION_SECTORS: u64 = 8;

fn sparse(path: &Path, len: u64) {
    let f = std::fs::File::create(path).expect("create");
    f.set_len(len).expect("set_len");
}

struct Case<'a> {
    name: &'a str,
    target_sectors: u64,
    meta_bytes: u64,
    random_src: bool,
    /// Regions we mark, one set per commit.
    commits: Vec<Vec<u64>>,
    /// (byte offset, length) O_DIRECT writes the kernel does on /dev/mapper/clone.
    kernel_writes: Vec<(u64, u64)>,
    /// Enable the kernel's hydration for this long (None: stay no_hydration).
    hydrate_secs: Option<&'static str>,
    /// Expected btree depth at least.
    min_depth: usize,
}

fn run_case(case: Case) {
    let t0 = Instant::now();
    let name = case.name;
    let dir = scratch(&format!("guest-gold-{name}"));
    let (meta, dest, src) = (
        dir.path().join("meta.img"),
        dir.path().join("dest.img"),
        dir.path().join("src.img"),
    );
    let bytes = case.target_sectors * 512;
    sparse(&meta, case.meta_bytes);
    sparse(&dest, bytes);
    if case.random_src {
        random_file(&src, usize::try_from(bytes).unwrap(), 0x901d_0003);
    } else {
        sparse(&src, bytes);
    }
    let nr_regions = case.target_sectors.div_ceil(REGION_SECTORS);

    // ---- (a) our format + commits
    let mut ours: BTreeSet<u64> = BTreeSet::new();
    let (our_h, our_used, our_total, depth) = {
        let mut md =
            CloneMetadata::format(&meta, REGION_SECTORS, case.target_sectors).expect("format");
        assert_eq!(md.nr_regions(), nr_regions);
        for set in &case.commits {
            for &r in set {
                md.set_region(r).expect("set_region");
                ours.insert(r);
            }
            md.commit().expect("commit");
        }
        (
            md.hydrated_count(),
            md.used_blocks(),
            md.total_blocks(),
            md.btree_depth(),
        )
    };
    assert_eq!(our_h, ours.len() as u64);
    assert!(
        depth >= case.min_depth,
        "{name}: btree depth {depth} < {}",
        case.min_depth
    );
    let check0 = metadata_check(&meta);
    eprintln!(
        "MEASURED gold {name}: target {} sectors, {nr_regions} regions, metadata {} blocks; ours: hydrated {our_h}, used/total {our_used}/{our_total}, btree depth {depth}; check: {check0}",
        case.target_sectors,
        case.meta_bytes / 4096
    );

    let mut writes = String::new();
    for &(off, len) in &case.kernel_writes {
        writes.push_str(&format!(
            "yes GOLD{off} | head -c {len} | dd of=$C bs={len} count=1 seek={off} \
             oflag=seek_bytes,direct iflag=fullblock conv=notrunc 2>/dev/null\n"
        ));
    }
    let hydrate = match case.hydrate_secs {
        Some(secs) => format!(
            "dmsetup message clone 0 hydration_threshold 16\n\
             dmsetup message clone 0 hydration_batch_size 8\n\
             dmsetup message clone 0 enable_hydration\n\
             sleep {secs}\n\
             dmsetup message clone 0 disable_hydration\n"
        ),
        None => String::new(),
    };
    let script = format!(
        r#"
set -e
T="0 {sectors} clone $DISK_meta $DISK_dest $DISK_src 8 1 no_hydration"
dmsetup create clone --table "$T"
echo "RESULT status_load=$(dmsetup status clone)"
C=/dev/mapper/clone
{writes}sync
{hydrate}
i=0
while :; do
    set -- $(dmsetup status clone)
    [ "$8" = 0 ] && break
    i=$((i + 1)); [ $i -lt 600 ] || {{ echo "hydrating never reached 0: $*"; exit 3; }}
    sleep 0.1
done
echo "RESULT status_last=$(dmsetup status clone)"
dmsetup remove clone
dmsetup create clone --table "$T"
echo "RESULT status_reload=$(dmsetup status clone)"
dmsetup remove clone
echo "RESULT removed=yes"
"#,
        sectors = case.target_sectors
    );
    let out = GuestRun::new(script)
        .clone_devices(&meta, &dest, &src)
        .timeout(Duration::from_secs(240))
        .run_ok();
    assert_eq!(out.result("removed").as_deref(), Some("yes"));
    let load = out.result("status_load").expect("status_load");
    let last = out.result("status_last").expect("status_last");
    let reload = out.result("status_reload").expect("status_reload");
    eprintln!(
        "MEASURED gold {name}: kernel status at load: {load}\nMEASURED gold {name}: kernel status last: {last}\nMEASURED gold {name}: kernel status after remove+reload: {reload}\nMEASURED gold {name}: guest wall {:?} s",
        out.wall_secs()
    );
    let (lu, lt, lh, ln, _) = fields(&load);
    assert_eq!(ln, nr_regions, "{name}: kernel nr_regions");
    assert_eq!(lh, our_h, "{name}: kernel's hydrated count at load != ours");
    assert_eq!(
        (lu, lt),
        (our_used, our_total),
        "{name}: kernel's used/total at load != ours"
    );
    let (_, _, kh, _, _) = fields(&last);
    let (ru, rt, rh, _, _) = fields(&reload);
    assert_eq!(rh, kh, "{name}: kernel's reload count != its last status");
    assert!(
        kh > our_h,
        "{name}: the kernel should have hydrated more than we marked ({kh} vs {our_h})"
    );

    // ---- (b) we load what the kernel left
    let check1 = metadata_check(&meta);
    let md = CloneMetadata::open(&meta, Some((REGION_SECTORS, case.target_sectors)))
        .expect("open the kernel's metadata");
    eprintln!(
        "MEASURED gold {name}: ours on the kernel's metadata: hydrated {}, used/total {}/{}, btree depth {}; check: {check1}",
        md.hydrated_count(),
        md.used_blocks(),
        md.total_blocks(),
        md.btree_depth()
    );
    assert_eq!(
        md.hydrated_count(),
        kh,
        "{name}: our hydrated count != kernel's last status"
    );
    assert_eq!(
        (md.used_blocks(), md.total_blocks()),
        (ru, rt),
        "{name}: our used/total != kernel's after reload"
    );
    for &r in &ours {
        assert!(
            md.is_hydrated(r),
            "{name}: our region {r} lost by the kernel"
        );
    }
    let sector_bytes = REGION_SECTORS * 512;
    for &(off, len) in &case.kernel_writes {
        for r in off / sector_bytes..(off + len).div_ceil(sector_bytes) {
            assert!(
                md.is_hydrated(r),
                "{name}: region {r} written by the kernel is not hydrated in its metadata"
            );
        }
    }
    if case.random_src && !case.target_sectors.is_multiple_of(REGION_SECTORS) {
        // the partial last region: the kernel hydrated only its tail sectors, then wrote the last one
        let tail = case.target_sectors % REGION_SECTORS;
        let start = (case.target_sectors - tail) * 512;
        let d = guest::read_at(&dest, start, (tail * 512) as usize).expect("read dest tail");
        let s = guest::read_at(&src, start, (tail * 512) as usize).expect("read src tail");
        let n = ((tail - 1) * 512) as usize;
        assert!(
            d[..n] == s[..n],
            "{name}: partial last region not hydrated from the source"
        );
        assert!(
            d[n..].starts_with(format!("GOLD{}\n", (case.target_sectors - 1) * 512).as_bytes()),
            "{name}: the kernel's write to the last sector is not in the destination"
        );
        assert_eq!(
            std::fs::metadata(&dest).expect("dest").len(),
            bytes,
            "{name}: destination grew"
        );
        eprintln!("MEASURED gold {name}: last partial region ({tail} sectors) in dest = source + the kernel's write");
    }
    eprintln!(
        "MEASURED gold {name}: total {:.1} s",
        t0.elapsed().as_secs_f64()
    );
}

#[test]
fn gold_partial_last_region() {
    if !guest::require_guest("gold_partial_last_region") {
        return;
    }
    let sectors = 64 * MIB / 512 + 3; // 131075: 16385 regions, the last one 3 sectors
    let last = sectors.div_ceil(REGION_SECTORS) - 1;
    assert_eq!(last, 16384);
    run_case(Case {
        name: "64m+3s",
        target_sectors: sectors,
        meta_bytes: 4 * MIB,
        random_src: true,
        commits: vec![
            vec![0, 1, 2, 63, 64, 65, 4095, 4096],
            (8000..8100).chain([16383]).collect(),
        ],
        kernel_writes: vec![
            ((sectors - 1) * 512, 512),  // the partial last region
            (5000 * 4096, 4096),         // whole region
            (6000 * 4096 + 1024, 512),   // partial region
            (12000 * 4096 + 3584, 1024), // straddles 12000/12001
        ],
        hydrate_secs: Some("0.3"),
        min_depth: 1,
    });
}

#[test]
fn gold_multilevel_32g() {
    if !guest::require_guest("gold_multilevel_32g") {
        return;
    }
    let sectors = 32 * 1024 * MIB / 512; // 67,108,864
    let nr = sectors / REGION_SECTORS; // 8,388,608
    let per_array_block = 509 * 64; // regions per array block
    let first_leaf_end = 252 * per_array_block; // first region past the first btree leaf
    run_case(Case {
        name: "32g-multilevel",
        target_sectors: sectors,
        meta_bytes: 8 * MIB,
        random_src: false,
        commits: vec![
            vec![
                0,
                per_array_block - 1,
                per_array_block,
                first_leaf_end - 1,
                first_leaf_end,
                nr - 1,
            ],
            (4_000_000..4_000_064).chain(8_300_000..8_300_100).collect(),
        ],
        kernel_writes: vec![
            (100 * 4096 + 512, 512),         // partial, first array block
            (8_350_000 * 4096, 2 * 4096),    // whole, array block 256 (second leaf)
            ((nr - 2) * 4096 + 1024, 512),   // partial, region next to the last
            (2_000_000 * 4096 + 3584, 1024), // straddles two regions
        ],
        hydrate_secs: None,
        min_depth: 2,
    });
}
