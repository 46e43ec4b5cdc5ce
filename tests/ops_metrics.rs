//! The metrics registry and its HTTP endpoint, scraped over real TCP and unix sockets.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::Duration;

use vhost_clone::metrics::{
    parse_response, CloneGauges, MetricsError, MetricsRegistry, MetricsServer,
    MetricsServerOptions, MetricsSource, RequestKind,
};

/// One sample: metric name, labels, value.
type Sample = (String, BTreeMap<String, String>, f64);

/// Parse Prometheus text format strictly enough for a test: every non-comment, non-empty line is
/// `name{k="v",...} value` or `name value` with a float value.
fn parse_exposition(text: &str) -> Vec<Sample> {
    let mut out = Vec::new();
    for line in text.lines() {
        if line.is_empty() || line.starts_with('#') {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let kind = rest.split(' ').nth(1).unwrap();
                assert!(
                    ["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind),
                    "bad TYPE line {line:?}"
                );
            }
            continue;
        }
        let (series, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("no value: {line:?}"));
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v
                .parse()
                .unwrap_or_else(|_| panic!("bad value in {line:?}")),
        };
        let (name, labels) = match series.split_once('{') {
            None => (series.to_string(), BTreeMap::new()),
            Some((name, rest)) => {
                let inner = rest
                    .strip_suffix('}')
                    .unwrap_or_else(|| panic!("unclosed labels: {line:?}"));
                let mut labels = BTreeMap::new();
                for kv in inner.split(',') {
                    let (k, v) = kv
                        .split_once('=')
                        .unwrap_or_else(|| panic!("bad label {kv:?}"));
                    let v = v
                        .strip_prefix('"')
                        .and_then(|v| v.strip_suffix('"'))
                        .unwrap_or_else(|| panic!("unquoted label {kv:?}"));
                    labels.insert(k.to_string(), v.to_string());
                }
                (name.to_string(), labels)
            }
        };
        assert!(
            name.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "bad metric name {name:?}"
        );
        out.push((name, labels, value));
    }
    out
}

fn get(samples: &[Sample], name: &str, want: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .find(|(n, l, _)| {
            n == name
                && want
                    .iter()
                    .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|s| s.2)
        .unwrap_or_else(|| panic!("no sample {name} {want:?}"))
}

/// Histogram invariants for every queue: buckets non-decreasing in `le`, `+Inf` == `_count`.
fn check_histograms(samples: &[Sample], name: &str, queues: usize) {
    for q in 0..queues {
        let q = q.to_string();
        let mut buckets: Vec<(f64, f64)> = samples
            .iter()
            .filter(|(n, l, _)| *n == format!("{name}_bucket") && l.get("queue") == Some(&q))
            .map(|(_, l, v)| {
                let le = l.get("le").unwrap();
                let le = if le == "+Inf" {
                    f64::INFINITY
                } else {
                    le.parse().unwrap()
                };
                (le, *v)
            })
            .collect();
        assert!(buckets.len() > 2);
        buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        for w in buckets.windows(2) {
            assert!(w[0].1 <= w[1].1, "queue {q}: buckets not monotonic: {w:?}");
        }
        let inf = buckets.last().unwrap();
        assert_eq!(inf.0, f64::INFINITY);
        let count = get(samples, &format!("{name}_count"), &[("queue", &q)]);
        assert_eq!(inf.1, count, "queue {q}: +Inf bucket != _count");
        get(samples, &format!("{name}_sum"), &[("queue", &q)]);
    }
}

struct FakeClone;
impl MetricsSource for FakeClone {
    fn render(&self, out: &mut String) {
        CloneGauges {
            hydrated_regions: 3,
            total_regions: 16,
            hydrating_regions: 1,
            region_bytes: 4096,
            copied_bytes: 12288,
            copy_failures: 2,
            commits: 5,
            metadata_mode: "rw",
            hydration_enabled: true,
        }
        .render(out)
    }
}

fn registry() -> Arc<MetricsRegistry> {
    let reg = Arc::new(MetricsRegistry::new(2));
    let q0 = reg.queue(0).unwrap();
    q0.record(RequestKind::Read, 4096, Duration::from_micros(3), true);
    q0.record(RequestKind::Read, 8192, Duration::from_micros(100), true);
    q0.record(RequestKind::Write, 512, Duration::from_millis(2), true);
    q0.record(RequestKind::Write, 512, Duration::from_millis(2), false);
    q0.record(RequestKind::Flush, 0, Duration::from_secs(100), true);
    let q1 = reg.queue(1).unwrap();
    q1.record(RequestKind::Discard, 0, Duration::ZERO, true);
    q1.record(RequestKind::WriteZeroes, 0, Duration::from_micros(1), true);
    assert!(reg.queue(2).is_none());
    reg.set_source(Some(Arc::new(FakeClone)));
    reg
}

fn check_scrape(body: &str) {
    let s = parse_exposition(body);
    assert_eq!(
        get(
            &s,
            "vhost_clone_requests_total",
            &[("queue", "0"), ("op", "read")]
        ),
        2.0
    );
    assert_eq!(
        get(
            &s,
            "vhost_clone_requests_total",
            &[("queue", "0"), ("op", "write")]
        ),
        2.0
    );
    assert_eq!(
        get(
            &s,
            "vhost_clone_requests_total",
            &[("queue", "0"), ("op", "flush")]
        ),
        1.0
    );
    assert_eq!(
        get(
            &s,
            "vhost_clone_requests_total",
            &[("queue", "1"), ("op", "discard")]
        ),
        1.0
    );
    assert_eq!(
        get(
            &s,
            "vhost_clone_requests_total",
            &[("queue", "1"), ("op", "write_zeroes")]
        ),
        1.0
    );
    assert_eq!(
        get(&s, "vhost_clone_read_bytes_total", &[("queue", "0")]),
        12288.0
    );
    assert_eq!(
        get(&s, "vhost_clone_written_bytes_total", &[("queue", "0")]),
        512.0
    );
    assert_eq!(
        get(&s, "vhost_clone_request_errors_total", &[("queue", "0")]),
        1.0
    );
    assert_eq!(
        get(&s, "vhost_clone_request_errors_total", &[("queue", "1")]),
        0.0
    );
    let h = "vhost_clone_request_duration_seconds";
    check_histograms(&s, h, 2);
    assert_eq!(get(&s, &format!("{h}_count"), &[("queue", "0")]), 5.0);
    // 3us lands in le=4us; 100us in le=128us; the 100 s flush only in +Inf.
    assert_eq!(
        get(
            &s,
            &format!("{h}_bucket"),
            &[("queue", "0"), ("le", "0.000002")]
        ),
        0.0
    );
    assert_eq!(
        get(
            &s,
            &format!("{h}_bucket"),
            &[("queue", "0"), ("le", "0.000004")]
        ),
        1.0
    );
    assert_eq!(
        get(
            &s,
            &format!("{h}_bucket"),
            &[("queue", "0"), ("le", "0.000128")]
        ),
        2.0
    );
    assert_eq!(
        get(
            &s,
            &format!("{h}_bucket"),
            &[("queue", "0"), ("le", "8.388608")]
        ),
        4.0
    );
    assert_eq!(
        get(
            &s,
            &format!("{h}_bucket"),
            &[("queue", "0"), ("le", "+Inf")]
        ),
        5.0
    );
    let sum = get(&s, &format!("{h}_sum"), &[("queue", "0")]);
    assert!((sum - 100.004103).abs() < 1e-6, "sum {sum}");
    assert_eq!(
        get(
            &s,
            &format!("{h}_bucket"),
            &[("queue", "1"), ("le", "0.000001")]
        ),
        2.0
    );
    // The target's source.
    assert_eq!(get(&s, "vhost_clone_hydrated_regions", &[]), 3.0);
    assert_eq!(get(&s, "vhost_clone_regions", &[]), 16.0);
    assert_eq!(get(&s, "vhost_clone_copied_bytes_total", &[]), 12288.0);
    assert_eq!(get(&s, "vhost_clone_copy_failures_total", &[]), 2.0);
    assert_eq!(get(&s, "vhost_clone_metadata_commits_total", &[]), 5.0);
    assert_eq!(get(&s, "vhost_clone_metadata_mode", &[("mode", "rw")]), 1.0);
    assert_eq!(get(&s, "vhost_clone_metadata_mode", &[("mode", "ro")]), 0.0);
    // Every family is announced exactly once.
    let types: Vec<&str> = body.lines().filter(|l| l.starts_with("# TYPE ")).collect();
    let mut names: Vec<&str> = types.iter().map(|l| l.split(' ').nth(2).unwrap()).collect();
    let n = names.len();
    names.sort();
    names.dedup();
    assert_eq!(n, names.len(), "duplicate # TYPE lines");
}

fn raw_request<S: Read + Write>(mut s: S, req: &[u8]) -> (u16, String) {
    s.write_all(req).unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    parse_response(&raw).unwrap()
}

#[test]
fn tcp_scrape() {
    let reg = registry();
    let server = MetricsServer::start("127.0.0.1:0", reg.clone()).unwrap();
    let addr = server.local_addr().unwrap();
    assert_ne!(addr.port(), 0);
    eprintln!("metrics server bound to {addr} ({})", server.endpoint());

    let tcp = || {
        let s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s
    };
    let (code, body) = raw_request(tcp(), b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(code, 200);
    check_scrape(&body);

    // Bad input never kills the server.
    assert_eq!(raw_request(tcp(), b"GET /nope HTTP/1.1\r\n\r\n").0, 404);
    assert_eq!(raw_request(tcp(), b"POST /metrics HTTP/1.1\r\n\r\n").0, 405);
    assert_eq!(raw_request(tcp(), b"\xff\xfe garbage\r\n\r\n").0, 400);
    {
        // An oversized head is answered 400 and closed; the peer may see a reset instead, as the
        // server does not read the rest. Either way the server must keep serving.
        let mut s = tcp();
        let _ = s.write_all(&[b'A'; 20000]);
        let mut raw = Vec::new();
        let _ = s.read_to_end(&mut raw);
        if let Ok((code, _)) = parse_response(&raw) {
            assert_eq!(code, 400);
        }
    }
    drop(tcp()); // connect and hang up
    let (code, head_body) = raw_request(tcp(), b"HEAD /metrics HTTP/1.1\r\n\r\n");
    assert_eq!((code, head_body.as_str()), (200, ""));

    // Live values: a new observation shows up in the next scrape.
    reg.queue(1)
        .unwrap()
        .record(RequestKind::Read, 1, Duration::from_micros(5), true);
    let (code, body) = vhost_clone::metrics::scrape(&addr.to_string()).unwrap();
    assert_eq!(code, 200);
    let s = parse_exposition(&body);
    assert_eq!(
        get(
            &s,
            "vhost_clone_requests_total",
            &[("queue", "1"), ("op", "read")]
        ),
        1.0
    );

    // Removing the source removes its families.
    reg.set_source(None);
    let (_, body) = vhost_clone::metrics::scrape(&addr.to_string()).unwrap();
    assert!(!body.contains("vhost_clone_hydrated_regions"));
    drop(server);
    assert!(
        TcpStream::connect(addr).is_err(),
        "server still listening after drop"
    );
}

#[test]
fn unix_scrape() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("metrics.sock");
    let addr = format!("unix:{}", path.display());
    let server = MetricsServer::start(&addr, registry()).unwrap();
    assert!(server.local_addr().is_none());
    let s = UnixStream::connect(&path).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let (code, body) = raw_request(s, b"GET /metrics HTTP/1.0\r\n\r\n");
    assert_eq!(code, 200);
    check_scrape(&body);
    assert_eq!(vhost_clone::metrics::scrape(&addr).unwrap().0, 200);
    drop(server);
    assert!(!path.exists(), "socket file left behind");
}

#[test]
fn ipv6_loopback_and_localhost() {
    let reg = registry();
    if let Ok(server) = MetricsServer::start("[::1]:0", reg.clone()) {
        let addr = server.local_addr().unwrap();
        assert!(addr.ip().is_loopback());
        assert_eq!(
            vhost_clone::metrics::scrape(&addr.to_string()).unwrap().0,
            200
        );
    } // else: no IPv6 on this host
    let server = MetricsServer::start("localhost:0", reg).unwrap();
    assert!(server.local_addr().unwrap().ip().is_loopback());
}

#[test]
fn non_loopback_refused() {
    let reg = registry();
    for addr in ["0.0.0.0:0", "[::]:0", "192.0.2.1:9100", "10.1.2.3:0"] {
        match MetricsServer::start(addr, reg.clone()) {
            Err(MetricsError::NonLoopback { .. }) => {}
            other => panic!("{addr}: expected NonLoopback, got {other:?}"),
        }
    }
    for addr in ["", "nonsense", "example.com:80", "unix:", "127.0.0.1"] {
        assert!(
            matches!(
                MetricsServer::start(addr, reg.clone()),
                Err(MetricsError::BadAddress { .. })
            ),
            "{addr:?} accepted"
        );
    }
    // With the explicit flag, a wildcard bind is allowed.
    let server = MetricsServer::start_with(
        "0.0.0.0:0",
        reg,
        MetricsServerOptions {
            allow_non_loopback: true,
        },
    )
    .unwrap();
    let port = server.local_addr().unwrap().port();
    assert_eq!(
        vhost_clone::metrics::scrape(&format!("127.0.0.1:{port}"))
            .unwrap()
            .0,
        200
    );
}

/// `CloneSource` on a real clone target: starts unhydrated with hydration off, then completes.
#[test]
fn clone_source_of_a_live_target() {
    use vhost_clone::metrics::CloneSource;
    use vhost_clone::table::{Table, TargetSpec};
    use vhost_clone::target::clone::CloneTarget;

    let dir = tempfile::tempdir().unwrap();
    let (src, dest, meta) = (
        dir.path().join("src"),
        dir.path().join("dest"),
        dir.path().join("meta"),
    );
    std::fs::write(&src, vec![0x5au8; 1 << 20]).unwrap();
    std::fs::File::create(&dest)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    std::fs::File::create(&meta)
        .unwrap()
        .set_len(4 << 20)
        .unwrap();
    let line = format!(
        "clone {} {} {} 8 1 no_hydration",
        meta.display(),
        dest.display(),
        src.display()
    );
    let TargetSpec::Clone(spec) = Table::parse(&line).unwrap().target else {
        panic!("not a clone table")
    };
    let target = CloneTarget::open(&spec, None, 512, false).unwrap();
    target.activate();
    let reg = MetricsRegistry::new(1);
    let source = Arc::new(CloneSource::new(target.shared().clone()));
    reg.set_source(Some(source.clone()));

    let s = parse_exposition(&reg.render_prometheus());
    assert_eq!(get(&s, "vhost_clone_regions", &[]), 256.0);
    assert_eq!(get(&s, "vhost_clone_hydrated_regions", &[]), 0.0);
    assert_eq!(get(&s, "vhost_clone_region_bytes", &[]), 4096.0);
    assert_eq!(get(&s, "vhost_clone_hydration_enabled", &[]), 0.0);
    assert_eq!(get(&s, "vhost_clone_metadata_mode", &[("mode", "rw")]), 1.0);

    target.message(&["enable_hydration"]).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while source.gauges().hydrated_regions < 256 {
        assert!(
            std::time::Instant::now() < deadline,
            "hydration did not finish: {:?}",
            source.gauges()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let s = parse_exposition(&reg.render_prometheus());
    assert_eq!(get(&s, "vhost_clone_hydrated_regions", &[]), 256.0);
    assert_eq!(get(&s, "vhost_clone_hydration_enabled", &[]), 1.0);
    assert_eq!(
        get(&s, "vhost_clone_copied_bytes_total", &[]),
        f64::from(1u32 << 20)
    );
    assert_eq!(get(&s, "vhost_clone_copy_failures_total", &[]), 0.0);
    target.shutdown();
    assert!(source.gauges().commits >= 1);
}
