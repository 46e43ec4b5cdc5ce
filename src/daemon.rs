//! `vhost-clone serve`: build the table's target, start the control socket, serve
//! vhost-user frontends until SIGTERM/SIGINT, then drain, flush and commit.

use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::mpsc::Receiver;
use std::sync::Arc;

use anyhow::Context;
use std::time::Duration;

use vhost_user_blk::{DeviceOptions, StopHandle};

use crate::control::{ControlHandler, ControlServer};
use crate::device::{Device, Target};
use crate::metrics::{
    CloneSource, MetricsRegistry, MetricsServer, MetricsServerOptions, MetricsSource,
};
use crate::service;
use crate::table::{LinearSpec, Table, TargetSpec};

/// Everything `serve` needs.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub socket: Option<PathBuf>,
    pub fd: Option<i32>,
    pub table: Table,
    pub num_queues: u16,
    pub threads: usize,
    pub queue_size: u16,
    /// Longest a queue thread busy-polls after its last request, in microseconds (0 = off).
    pub poll_us: u32,
    /// Poll without checking that it pays (no probing; see vhost_user_blk::poll_tuner).
    pub poll_always: bool,
    pub read_only: bool,
    pub serial: String,
    pub logical_block_size: u32,
    pub control: Option<PathBuf>,
    /// Swap to `linear DEST 0` by itself when every region is hydrated.
    pub on_hydrated_linear: bool,
    /// Write the daemon's pid here (locked; removed at exit).
    pub pid_file: Option<PathBuf>,
    /// Serve Prometheus metrics here (`127.0.0.1:PORT`, `[::1]:PORT`, `unix:/path`).
    pub metrics: Option<String>,
    /// Allow a metrics address that is not loopback.
    pub metrics_allow_remote: bool,
}

/// Metrics of whichever clone target is live.
struct LiveSource(std::sync::Weak<Device>);

impl MetricsSource for LiveSource {
    fn render(&self, out: &mut String) {
        let Some(dev) = self.0.upgrade() else { return };
        if let Target::Clone(c) = &*dev.live_target() {
            CloneSource::new(c.shared().clone()).render(out);
        }
    }
}

/// The control socket's view of the daemon.
struct Control {
    dev: Arc<Device>,
}

/// The dmsetup table that reproduces the live state on the host's device mapper.
fn dmsetup_table(dev: &Device) -> String {
    let len = dev.len();
    dev.with_live(|live| match (&*live.target, &live.table.target) {
        (Target::Clone(c), TargetSpec::Clone(spec)) => {
            let s = c.shared();
            if s.map.all_hydrated() {
                return format!("0 {len} linear {} 0", spec.destination.display());
            }
            let mut spec = spec.clone();
            spec.no_hydration = !s.sched.is_enabled();
            spec.hydration_threshold = u32::try_from(s.sched.threshold()).unwrap_or(u32::MAX);
            spec.hydration_batch_size = u32::try_from(s.sched.batch_size()).unwrap_or(u32::MAX);
            format!("0 {len} {spec}")
        }
        _ => live.table.to_dm_line(len),
    })
}

impl ControlHandler for Control {
    fn command(&self, words: &[&str]) -> Result<String, String> {
        let dev = &self.dev;
        let len = dev.len();
        let target = dev.live_target();
        match (words, &*target) {
            (["table"], _) => Ok(dev.with_live(|l| l.table.to_dm_line(len))),
            (["table", "--dmsetup"], _) => Ok(dmsetup_table(dev)),
            (["table", "--loaded"], _) => Ok(dev
                .loaded_table()
                .map(|t| t.to_dm_line(len))
                .unwrap_or_default()),
            (["load", rest @ ..], _) => {
                let table = Table::parse(&rest.join(" ")).map_err(|e| e.to_string())?;
                dev.load(table).map_err(|e| e.to_string())?;
                Ok(String::new())
            }
            (["suspend"], _) => dev
                .suspend(Duration::from_secs(60))
                .map(|()| String::new())
                .map_err(|e| e.to_string()),
            (["resume"], _) => dev
                .resume()
                .map(|_| String::new())
                .map_err(|e| e.to_string()),
            (["status"], Target::Linear(_)) => Ok(format!("0 {len} linear")),
            (["status"], Target::Clone(c)) => Ok(c.status_line()),
            (["status", "--json"], Target::Clone(c)) => {
                serde_json::to_string(&c.shared().status_json()).map_err(|e| e.to_string())
            }
            (["status", "--json"], Target::Linear(_)) => Ok(format!(
                "{{\"target\":\"linear\",\"len\":{len},\"progress_percent\":100.0}}"
            )),
            (["message", rest @ ..], Target::Clone(c)) => c.message(rest).map(|()| String::new()),
            (["message", ..], Target::Linear(_)) => {
                Err("the live table is linear: it takes no messages".to_string())
            }
            _ => Err(format!("unknown command '{}'", words.join(" "))),
        }
    }

    fn subscribe(&self) -> Option<Receiver<String>> {
        Some(self.dev.subscribe())
    }
}

/// `--on-hydrated linear`: when the clone is complete, swap to `linear DEST 0`.
fn swap_when_hydrated(dev: &Arc<Device>) -> anyhow::Result<()> {
    let rx = dev.subscribe();
    let dev = Arc::downgrade(dev);
    std::thread::Builder::new()
        .name("on-hydrated".into())
        .spawn(move || {
            for line in rx {
                if !line.contains("\"hydration_complete\"") {
                    continue;
                }
                let Some(dev) = dev.upgrade() else { break };
                let table = dev.with_live(|l| match &l.table.target {
                    TargetSpec::Clone(c) => Some(Table {
                        len: Some(dev.len()),
                        target: TargetSpec::Linear(LinearSpec {
                            device: c.destination.clone(),
                            offset: 0,
                        }),
                    }),
                    TargetSpec::Linear(_) => None,
                });
                let Some(table) = table else { continue };
                match dev.swap(table) {
                    Ok(()) => log::info!("hydration complete: switched to the linear table"),
                    Err(e) => {
                        log::error!("hydration complete, but the switch to linear failed: {e}");
                        let _ = dev.resume();
                    }
                }
            }
        })?;
    Ok(())
}

fn listener(opts: &ServeOptions) -> anyhow::Result<UnixListener> {
    if let Some(fd) = opts.fd {
        return service::listener_from_fd(fd)
            .with_context(|| format!("--fd {fd} is not a usable listening unix socket"));
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
                if let Err(e) = service::notify_stopping() {
                    log::warn!("systemd notification: {e}");
                }
                stop.stop();
            }
        })
        .context("starting the signal thread")?;
    Ok(())
}

fn run_device(dev: Arc<Device>, opts: &ServeOptions) -> anyhow::Result<()> {
    let _control = match &opts.control {
        Some(path) => Some(
            ControlServer::start(path, Arc::new(Control { dev: dev.clone() }))
                .context("starting the control socket")?,
        ),
        None => None,
    };
    if opts.on_hydrated_linear {
        swap_when_hydrated(&dev)?;
    }
    let registry = Arc::new(MetricsRegistry::new(usize::from(opts.num_queues)));
    let _metrics = match &opts.metrics {
        Some(addr) => {
            registry.set_source(Some(Arc::new(LiveSource(Arc::downgrade(&dev)))));
            let server = MetricsServer::start_with(
                addr,
                registry.clone(),
                MetricsServerOptions {
                    allow_non_loopback: opts.metrics_allow_remote,
                },
            )
            .context("starting the metrics endpoint")?;
            log::info!("metrics on {}", server.endpoint());
            Some(server)
        }
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
        // Segments go to the kernel as iovecs: no reason to make the guest split them.
        // (libblkio computes size_max * seg_max in an i32: keep the product below 2 GiB.)
        size_max: 16 << 20,
        poll_us: opts.poll_us,
        poll_always: opts.poll_always,
        ..DeviceOptions::default()
    };
    log::info!(
        "serving {} sectors ({} queues on {} threads) on {}",
        dev.len(),
        device.num_queues,
        device.threads,
        opts.socket
            .as_ref()
            .map_or_else(|| format!("fd {:?}", opts.fd), |p| p.display().to_string())
    );
    if let Err(e) = service::notify_ready() {
        log::warn!("systemd notification: {e}");
    }
    let observer: Option<Arc<dyn vhost_user_blk::RequestObserver>> = match opts.metrics {
        Some(_) => Some(registry),
        None => None,
    };
    vhost_user_blk::serve_observed(dev, &device, listener, &stop, observer)
        .context("serving vhost-user")?;
    if let Some(path) = &opts.socket {
        let _ = std::fs::remove_file(path);
    }
    Ok(())
}

/// Run the daemon until it is stopped.
pub fn run(opts: ServeOptions) -> anyhow::Result<()> {
    let _pid_file = match &opts.pid_file {
        Some(p) => Some(service::PidFile::create(p).context("creating the pid file")?),
        None => None,
    };
    let dev = Device::new(opts.table.clone(), opts.read_only, opts.logical_block_size)?;
    let result = run_device(dev.clone(), &opts);
    dev.shutdown();
    result
}
