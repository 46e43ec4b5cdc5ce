//! `vhost-clone serve`: build the table's target, start the control socket, serve
//! vhost-user frontends until SIGTERM/SIGINT, then drain, flush and commit.

use std::os::fd::FromRawFd;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::mpsc::Receiver;
use std::sync::Arc;

use anyhow::Context;
use vhost_user_blk::{BlockBackend, DeviceOptions, StopHandle};

use crate::control::{ControlHandler, ControlServer};
use crate::table::{Table, TargetSpec};
use crate::target::clone::CloneTarget;
use crate::target::linear::{LinearOptions, LinearTarget};

/// Everything `serve` needs.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub socket: Option<PathBuf>,
    pub fd: Option<i32>,
    pub table: Table,
    pub num_queues: u16,
    pub threads: usize,
    pub queue_size: u16,
    pub read_only: bool,
    pub serial: String,
    pub logical_block_size: u32,
    pub control: Option<PathBuf>,
}

/// The live target, for the control socket.
enum Live {
    Linear(u64),
    Clone(Arc<CloneTarget>),
}

struct Control {
    live: Live,
    table: Table,
}

impl Control {
    fn len(&self) -> u64 {
        match &self.live {
            Live::Linear(len) => *len,
            Live::Clone(c) => c.len(),
        }
    }
}

impl ControlHandler for Control {
    fn command(&self, words: &[&str]) -> Result<String, String> {
        match (words, &self.live) {
            (["table"], _) => Ok(self.table.to_dm_line(self.len())),
            (["status"], Live::Linear(..)) => Ok(format!("0 {} linear", self.len())),
            (["status"], Live::Clone(c)) => Ok(c.status_line()),
            (["status", "--json"], Live::Clone(c)) => {
                serde_json::to_string(&c.shared().status_json()).map_err(|e| e.to_string())
            }
            (["status", "--json"], Live::Linear(..)) => Ok(format!(
                "{{\"target\":\"linear\",\"len\":{},\"progress_percent\":100.0}}",
                self.len()
            )),
            (["message", rest @ ..], Live::Clone(c)) => c.message(rest).map(|()| String::new()),
            (["message", ..], Live::Linear(..)) => {
                Err("the linear target takes no messages".to_string())
            }
            _ => Err(format!("unknown command '{}'", words.join(" "))),
        }
    }

    fn subscribe(&self) -> Option<Receiver<String>> {
        let Live::Clone(c) = &self.live else {
            return None;
        };
        let events = c.shared().events.subscribe();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("events".into())
            .spawn(move || {
                for e in events {
                    if tx.send(e.to_json()).is_err() {
                        break;
                    }
                }
            })
            .ok()?;
        Some(rx)
    }
}

fn listener(opts: &ServeOptions) -> anyhow::Result<UnixListener> {
    if let Some(fd) = opts.fd {
        // SAFETY: the operator passed this descriptor to us as a listening unix socket
        // (`--fd N`); we take ownership of it exactly once, here.
        return Ok(unsafe { UnixListener::from_raw_fd(fd) });
    }
    let path = opts.socket.as_ref().context("give --socket or --fd")?;
    if path.exists() {
        std::fs::remove_file(path)
            .with_context(|| format!("removing the old socket {}", path.display()))?;
    }
    UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))
}

fn signal_thread(stop: StopHandle) -> anyhow::Result<()> {
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGINT,
    ])
    .context("installing signal handlers")?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            if let Some(sig) = signals.forever().next() {
                log::info!("signal {sig}: draining and stopping");
                stop.stop();
            }
        })
        .context("starting the signal thread")?;
    Ok(())
}

fn run_device<B: BlockBackend>(
    backend: Arc<B>,
    opts: &ServeOptions,
    live: Live,
) -> anyhow::Result<()> {
    let _control = match &opts.control {
        Some(path) => Some(
            ControlServer::start(
                path,
                Arc::new(Control {
                    live,
                    table: opts.table.clone(),
                }),
            )
            .context("starting the control socket")?,
        ),
        None => None,
    };
    let listener = listener(opts)?;
    let stop = StopHandle::new().context("creating the stop event")?;
    signal_thread(stop.clone())?;
    let device = DeviceOptions {
        num_queues: opts.num_queues,
        queue_size: opts.queue_size,
        threads: opts.threads.clamp(1, usize::from(opts.num_queues)),
        serial: opts.serial.clone(),
        ..DeviceOptions::default()
    };
    log::info!(
        "serving {} sectors ({} queues on {} threads) on {}",
        backend.geometry().capacity_sectors,
        device.num_queues,
        device.threads,
        opts.socket
            .as_ref()
            .map_or_else(|| format!("fd {:?}", opts.fd), |p| p.display().to_string())
    );
    vhost_user_blk::serve(backend, &device, listener, &stop).context("serving vhost-user")?;
    if let Some(path) = &opts.socket {
        let _ = std::fs::remove_file(path);
    }
    Ok(())
}

/// Run the daemon until it is stopped.
pub fn run(opts: ServeOptions) -> anyhow::Result<()> {
    match &opts.table.target {
        TargetSpec::Linear(l) => {
            let target = Arc::new(
                LinearTarget::open(
                    &l.device,
                    &LinearOptions {
                        offset_sectors: l.offset,
                        length_sectors: opts.table.len,
                        read_only: opts.read_only,
                        logical_block_size: opts.logical_block_size,
                    },
                )
                .context("opening the linear target")?,
            );
            let len = target.length_sectors();
            run_device(target, &opts, Live::Linear(len))
        }
        TargetSpec::Clone(c) => {
            let target =
                CloneTarget::open(c, opts.table.len, opts.logical_block_size, opts.read_only)
                    .context("opening the clone target")?;
            let result = run_device(target.clone(), &opts, Live::Clone(target.clone()));
            target.shutdown();
            result
        }
    }
}
