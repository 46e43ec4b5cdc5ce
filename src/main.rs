//! `vhost-clone`: serve a dm-style table (`linear`, `clone`) as a vhost-user-blk disk.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use vhost_clone::control;
use vhost_clone::daemon::{self, ServeOptions};
use vhost_clone::metadata::tool as mdtool;
use vhost_clone::table::Table;

/// A vhost-user-blk backend that boots a VM instantly from a read-only, possibly
/// remote image, hydrating it into a local destination in the background, with
/// metadata in the Linux kernel's dm-clone format.
#[derive(Parser, Debug)]
#[command(name = "vhost-clone", version, about, long_about = None)]
struct Cli {
    /// Print the vhost-user backend capabilities (JSON, for libvirt) and exit.
    #[arg(long)]
    print_capabilities: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Serve a table as a vhost-user-blk device on a unix socket.
    Serve(ServeArgs),
    /// Print dm-clone's status line (as `dmsetup status` does), or progress as JSON.
    Status {
        #[command(flatten)]
        ctl: ControlArg,
        /// Progress, rates, ETA and error counts as one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Send a dm-clone message: enable_hydration, disable_hydration,
    /// hydration_threshold N, hydration_batch_size N.
    Message {
        #[command(flatten)]
        ctl: ControlArg,
        /// The message words.
        #[arg(required = true, num_args = 1..)]
        words: Vec<String>,
    },
    /// Stream events (one JSON object per line) until interrupted.
    Events {
        #[command(flatten)]
        ctl: ControlArg,
    },
    /// Show the live table (dm table syntax).
    Table {
        #[command(flatten)]
        ctl: ControlArg,
        /// Print the dmsetup table line that reproduces the live state on the host's
        /// device mapper (`clone` while hydrating, `linear` on the destination when done).
        #[arg(long)]
        dmsetup: bool,
        /// Show the loaded (inactive) table instead.
        #[arg(long, conflicts_with = "dmsetup")]
        loaded: bool,
    },
    /// Load a table beside the live one; it becomes live at the next `resume`.
    Load {
        #[command(flatten)]
        ctl: ControlArg,
        /// The new table (same length as the live one), e.g. `linear DEST 0`.
        #[arg(long, value_name = "TABLE", value_parser = parse_table)]
        table: Table,
    },
    /// Hold new guest requests and wait for in-flight ones to drain (metadata committed).
    Suspend {
        #[command(flatten)]
        ctl: ControlArg,
    },
    /// Make the loaded table live (if any) and release held requests.
    Resume {
        #[command(flatten)]
        ctl: ControlArg,
    },
    /// Offline tools for dm-clone metadata devices.
    #[command(subcommand)]
    Metadata(MetadataCommand),
}

#[derive(Args, Debug)]
struct ControlArg {
    /// The daemon's control socket (its `serve --control` path).
    #[arg(long, value_name = "CTRL")]
    control: PathBuf,
}

#[derive(Subcommand, Debug)]
enum MetadataCommand {
    /// Format a metadata device exactly as the kernel's dm-clone would (block 0 must be zero).
    Format {
        /// Region size in 512-byte sectors (power of two, 8..=2097152).
        #[arg(long, value_name = "SECTORS")]
        region_size: u64,
        /// Target (table) length in 512-byte sectors.
        #[arg(long, value_name = "SECTORS")]
        target_size: u64,
        /// The metadata device or file.
        meta: PathBuf,
    },
    /// Check a metadata device: checksums, self-locations, reference counts, bitset.
    /// Exits 0 only when it is consistent.
    Check {
        /// The metadata device or file.
        meta: PathBuf,
    },
    /// Print the superblock, space-map figures and hydrated regions as ranges.
    Dump {
        /// The metadata device or file.
        meta: PathBuf,
        /// One JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args, Debug)]
struct ServeArgs {
    /// The vhost-user socket to listen on (created; an old socket file is replaced).
    #[arg(long, value_name = "SOCK", required_unless_present = "fd")]
    socket: Option<PathBuf>,
    /// Listen on an inherited, already bound and listening unix socket instead of --socket.
    #[arg(long, value_name = "N", conflicts_with = "socket")]
    fd: Option<i32>,
    /// The table: `linear DEV OFFSET` or `clone META DEST SRC REGION [features] [core args]`,
    /// optionally prefixed by dm's `0 LEN`.
    #[arg(long, value_name = "TABLE", required_unless_present = "table_file", value_parser = parse_table)]
    table: Option<Table>,
    /// Read the table from a file (one line; `#` comments allowed).
    #[arg(long, value_name = "FILE", conflicts_with = "table")]
    table_file: Option<PathBuf>,
    /// Number of virtqueues offered (QEMU asks for one per vCPU and refuses fewer).
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u16).range(1..=64))]
    num_queues: u16,
    /// Worker threads the queues are spread over (default: one per CPU core).
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=256))]
    threads: Option<u16>,
    /// Maximum virtqueue size (power of two).
    #[arg(long, default_value_t = 256, value_parser = parse_queue_size)]
    queue_size: u16,
    /// Longest a queue thread busy-polls its rings and completions after its last request,
    /// in microseconds, before it sleeps (adaptive: shrinks while the device is idle); 0 turns
    /// polling off.
    #[arg(long, value_name = "US", default_value_t = 64, value_parser = clap::value_parser!(u32).range(0..=1000))]
    poll_us: u32,
    /// Poll after every request as --poll-us allows, without checking that it pays. By default
    /// each queue thread measures, every few seconds, whether it completes more requests with
    /// polling than without, and polls only then.
    #[arg(long)]
    poll_always: bool,
    /// Refuse writes, discards and write-zeroes (the guest sees a read-only disk).
    #[arg(long)]
    read_only: bool,
    /// Serial number answered to GET_ID (at most 20 bytes).
    #[arg(long, default_value = "vhost-clone", value_parser = parse_serial)]
    serial: String,
    /// Logical block size shown to the guest.
    #[arg(long, default_value_t = 512, value_parser = parse_block_size)]
    logical_block_size: u32,
    /// Control socket (mode 0600) for status, messages, events and tables.
    #[arg(long, value_name = "CTRL")]
    control: Option<PathBuf>,
    /// When every region is hydrated, switch to `linear DEST 0` by itself (the metadata
    /// device is closed afterwards).
    #[arg(long, value_name = "TABLE_TYPE", value_parser = ["linear"])]
    on_hydrated: Option<String>,
    /// Write the daemon's pid to this file (refused if a live daemon holds it; removed at exit).
    #[arg(long, value_name = "FILE")]
    pid_file: Option<PathBuf>,
    /// Serve Prometheus metrics: `127.0.0.1:PORT`, `[::1]:PORT`, `localhost:PORT` or
    /// `unix:/path` (loopback only unless --metrics-allow-remote).
    #[arg(long, value_name = "ADDR")]
    metrics: Option<String>,
    /// Allow a metrics address that is not loopback.
    #[arg(long, requires = "metrics")]
    metrics_allow_remote: bool,
}

fn parse_table(s: &str) -> Result<Table, String> {
    Table::parse(s).map_err(|e| e.to_string())
}

fn parse_queue_size(s: &str) -> Result<u16, String> {
    match s.parse::<u16>() {
        Ok(n) if n.is_power_of_two() && n <= 32768 => Ok(n),
        _ => Err(format!("'{s}' is not a power of two from 1 to 32768")),
    }
}

fn parse_serial(s: &str) -> Result<String, String> {
    if s.len() <= 20 {
        Ok(s.to_string())
    } else {
        Err(format!("serial '{s}' is longer than 20 bytes"))
    }
}

fn parse_block_size(s: &str) -> Result<u32, String> {
    match s {
        "512" => Ok(512),
        "4096" => Ok(4096),
        _ => Err(format!("'{s}' is not 512 or 4096")),
    }
}

fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let table = match (args.table, args.table_file) {
        (Some(t), _) => t,
        (None, Some(file)) => {
            let text = std::fs::read_to_string(&file)
                .map_err(|e| anyhow::anyhow!("cannot read table file {}: {e}", file.display()))?;
            Table::parse(&text)
                .map_err(|e| anyhow::anyhow!("table file {}: {e}", file.display()))?
        }
        (None, None) => anyhow::bail!("give --table or --table-file"),
    };
    let threads = match args.threads {
        Some(t) => usize::from(t),
        None => std::thread::available_parallelism().map_or(1, |n| n.get()),
    };
    daemon::run(ServeOptions {
        socket: args.socket,
        fd: args.fd,
        table,
        num_queues: args.num_queues,
        threads,
        queue_size: args.queue_size,
        poll_us: args.poll_us,
        poll_always: args.poll_always,
        read_only: args.read_only,
        serial: args.serial,
        logical_block_size: args.logical_block_size,
        control: args.control,
        on_hydrated_linear: args.on_hydrated.is_some(),
        pid_file: args.pid_file,
        metrics: args.metrics,
        metrics_allow_remote: args.metrics_allow_remote,
    })
}

fn control_request(ctl: &ControlArg, words: Vec<String>) -> anyhow::Result<()> {
    let out = control::request(&ctl.control, &words)?;
    if !out.is_empty() {
        println!("{out}");
    }
    Ok(())
}

fn run(cli: Cli) -> anyhow::Result<bool> {
    if cli.print_capabilities {
        println!("{}", vhost_clone::service::capabilities_json());
        return Ok(true);
    }
    let Some(command) = cli.command else {
        anyhow::bail!("no command given (try --help)");
    };
    match command {
        Command::Serve(args) => serve(args)?,
        Command::Status { ctl, json } => {
            let mut words = vec!["status".to_string()];
            if json {
                words.push("--json".into());
            }
            control_request(&ctl, words)?
        }
        Command::Message { ctl, words } => {
            let mut all = vec!["message".to_string()];
            all.extend(words);
            control_request(&ctl, all)?
        }
        Command::Events { ctl } => control::stream(&ctl.control, &["events".into()], |line| {
            println!("{line}");
            true
        })?,
        Command::Table {
            ctl,
            dmsetup,
            loaded,
        } => {
            let mut words = vec!["table".to_string()];
            if dmsetup {
                words.push("--dmsetup".into());
            }
            if loaded {
                words.push("--loaded".into());
            }
            control_request(&ctl, words)?
        }
        Command::Load { ctl, table } => {
            control_request(&ctl, vec!["load".into(), table.to_line()])?
        }
        Command::Suspend { ctl } => control_request(&ctl, vec!["suspend".into()])?,
        Command::Resume { ctl } => control_request(&ctl, vec!["resume".into()])?,
        Command::Metadata(MetadataCommand::Format {
            region_size,
            target_size,
            meta,
        }) => println!("{}", mdtool::format_cmd(&meta, region_size, target_size)?),
        Command::Metadata(MetadataCommand::Check { meta }) => {
            let report = mdtool::check_cmd(&meta)?;
            println!("{}", report.to_string().trim_end());
            return Ok(report.problems.is_empty());
        }
        Command::Metadata(MetadataCommand::Dump { meta, json }) => {
            println!("{}", mdtool::dump_cmd(&meta, json)?)
        }
    }
    Ok(true)
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    match run(Cli::parse()) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("vhost-clone: {e:#}");
            ExitCode::FAILURE
        }
    }
}
