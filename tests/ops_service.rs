//! Daemon conventions: capabilities JSON, sd_notify, pid file, inherited listening socket.

use std::fs::File;
use std::os::fd::{AsRawFd, IntoRawFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram, UnixListener, UnixStream};
use std::process::Command;
use std::time::Duration;

use vhost_clone::service::{
    backend_description_json, capabilities_json, capabilities_json_for, listener_from_fd,
    notify_to, BlockFeature, ListenFdError, NotifyError, PidFile, PidFileError,
};

#[test]
fn capabilities_parse_as_vhost_user_json() {
    let v: serde_json::Value = serde_json::from_str(&capabilities_json()).unwrap();
    assert_eq!(v["type"], "block");
    assert_eq!(v["features"], serde_json::json!(["read-only"]));
    assert_eq!(v.as_object().unwrap().len(), 2);
    let all = capabilities_json_for(&[BlockFeature::ReadOnly, BlockFeature::BlkFile]);
    let v: serde_json::Value = serde_json::from_str(&all).unwrap();
    assert_eq!(v["features"], serde_json::json!(["read-only", "blk-file"]));
    let d: serde_json::Value =
        serde_json::from_str(&backend_description_json("/usr/bin/vhost-clone".as_ref())).unwrap();
    assert_eq!(d["type"], "block");
    assert_eq!(d["binary"], "/usr/bin/vhost-clone");
}

fn recv(sock: &UnixDatagram) -> String {
    sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = [0u8; 4096];
    let n = sock.recv(&mut buf).unwrap();
    String::from_utf8(buf[..n].to_vec()).unwrap()
}

#[test]
fn notify_path_socket() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&path).unwrap();
    let p = path.to_str().unwrap();
    notify_to(p, "READY=1").unwrap();
    assert_eq!(recv(&sock), "READY=1");
    notify_to(p, "STATUS=hydrating 3/16").unwrap();
    assert_eq!(recv(&sock), "STATUS=hydrating 3/16");
    // Nobody listening: an error to log, not a panic. (Unlink rather than rely on close: a child
    // forked by a parallel test may hold the fd until it execs.)
    drop(sock);
    std::fs::remove_file(&path).unwrap();
    assert!(matches!(
        notify_to(p, "STOPPING=1"),
        Err(NotifyError::Send { .. })
    ));
    assert!(matches!(
        notify_to("relative/path", "READY=1"),
        Err(NotifyError::BadSocket(_))
    ));
}

#[test]
fn notify_abstract_socket() {
    let name = format!("vhost-clone-test-notify-{}", std::process::id());
    let addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
    let sock = UnixDatagram::bind_addr(&addr).unwrap();
    notify_to(&format!("@{name}"), "STOPPING=1").unwrap();
    assert_eq!(recv(&sock), "STOPPING=1");
}

/// The env-driven wrappers, in a child process so NOTIFY_SOCKET never leaks into other tests.
#[test]
fn notify_env_in_child() {
    if let Ok(sock) = std::env::var("OPS_NOTIFY_CHILD") {
        // Child: NOTIFY_SOCKET was set by the parent.
        assert_eq!(std::env::var("NOTIFY_SOCKET").unwrap(), sock);
        assert!(vhost_clone::service::notify_ready().unwrap());
        assert!(vhost_clone::service::notify_status("line1\nline2").unwrap());
        assert!(vhost_clone::service::notify_stopping().unwrap());
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&path).unwrap();
    let exe = std::env::current_exe().unwrap();
    let out = Command::new(&exe)
        .args([
            "--exact",
            "notify_env_in_child",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("NOTIFY_SOCKET", &path)
        .env("OPS_NOTIFY_CHILD", &path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "child failed: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let ready = recv(&sock);
    assert!(ready.starts_with("READY=1\nMAINPID="), "{ready:?}");
    assert_eq!(recv(&sock), "STATUS=line1 line2");
    assert_eq!(recv(&sock), "STOPPING=1");

    // Unset: a no-op that reports nothing was sent.
    let out = Command::new(&exe)
        .args(["--exact", "notify_env_unset_child", "--nocapture"])
        .env_remove("NOTIFY_SOCKET")
        .env("OPS_NOTIFY_UNSET_CHILD", "1")
        .output()
        .unwrap();
    assert!(out.status.success());
}

#[test]
fn notify_env_unset_child() {
    if std::env::var_os("OPS_NOTIFY_UNSET_CHILD").is_none() {
        return; // only meaningful in the child spawned above
    }
    assert!(!vhost_clone::service::notify_ready().unwrap());
    assert!(!vhost_clone::service::notify_stopping().unwrap());
}

#[test]
fn pid_file_create_refuse_remove() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vhost-clone.pid");
    let pid = PidFile::create(&path).unwrap();
    assert_eq!(pid.path(), path);
    let text = std::fs::read_to_string(&path).unwrap();
    assert_eq!(text, format!("{}\n", std::process::id()));
    // A second holder (flock is per open file description, so this conflicts even in-process).
    match PidFile::create(&path) {
        Err(PidFileError::Held { pid: p, .. }) => assert_eq!(p, std::process::id().to_string()),
        other => panic!("expected Held, got {other:?}"),
    }
    drop(pid);
    assert!(!path.exists(), "pid file not removed on drop");
    // A stale file (no lock held) is taken over and rewritten.
    std::fs::write(&path, "999999\n").unwrap();
    let pid = PidFile::create(&path).unwrap();
    assert_eq!(
        std::fs::read_to_string(&path).unwrap(),
        format!("{}\n", std::process::id())
    );
    drop(pid);
    assert!(!path.exists());
    // Unwritable location: a typed error.
    assert!(matches!(
        PidFile::create(&dir.path().join("no/such/dir/x.pid")),
        Err(PidFileError::Open { .. })
    ));
}

#[test]
fn listener_from_fd_accepts_listening_socket() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vu.sock");
    let l = UnixListener::bind(&path).unwrap();
    let fd = l.into_raw_fd();
    // Clear CLOEXEC, as an inherited fd would be.
    // SAFETY: F_SETFD with 0 on an fd we own.
    assert_eq!(unsafe { libc::fcntl(fd, libc::F_SETFD, 0) }, 0);
    let l = listener_from_fd(fd).unwrap();
    // SAFETY: F_GETFD on an fd `l` owns.
    let flags = unsafe { libc::fcntl(l.as_raw_fd(), libc::F_GETFD) };
    assert_ne!(flags & libc::FD_CLOEXEC, 0, "CLOEXEC not set");
    let client = std::thread::spawn(move || UnixStream::connect(&path).unwrap());
    let (_conn, _) = l.accept().unwrap();
    client.join().unwrap();
}

#[test]
fn listener_from_fd_rejects() {
    let dir = tempfile::tempdir().unwrap();
    // A regular file.
    let f = File::create(dir.path().join("regular")).unwrap();
    let fd = f.as_raw_fd();
    assert!(matches!(
        listener_from_fd(fd),
        Err(ListenFdError::NotSocket {
            kind: "regular file",
            ..
        })
    ));
    drop(f);
    // A connected, not listening, unix stream socket.
    let (a, _b) = UnixStream::pair().unwrap();
    assert!(matches!(
        listener_from_fd(a.as_raw_fd()),
        Err(ListenFdError::NotListening { .. })
    ));
    // A datagram socket.
    let d = UnixDatagram::unbound().unwrap();
    assert!(matches!(
        listener_from_fd(d.as_raw_fd()),
        Err(ListenFdError::NotStream { .. })
    ));
    // A TCP listener.
    let t = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    assert!(matches!(
        listener_from_fd(t.as_raw_fd()),
        Err(ListenFdError::NotUnix { .. })
    ));
    // Closed and negative fds.
    assert!(matches!(
        listener_from_fd(-1),
        Err(ListenFdError::Negative(-1))
    ));
    let r = File::open("/dev/null").unwrap();
    let closed = r.as_raw_fd();
    drop(r);
    match listener_from_fd(closed) {
        Err(ListenFdError::NotOpen { .. }) => {}
        // Another test thread may have reused the number; it still must not be accepted as ours
        // unless it is a listening unix socket, which none of this test's fds are.
        Err(_) => {}
        // Only if a parallel test's listener reused the number; not ours: do not close it.
        Ok(l) => {
            let _ = l.into_raw_fd();
        }
    }
    // The error messages tell the operator what to do.
    let msg = ListenFdError::NotListening { fd: 3 }.to_string();
    assert!(msg.contains("listen"), "{msg}");
}
