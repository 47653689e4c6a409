//! Soak: many mixed sessions through the gateway (in process, libunftp
//! upstream, loopback) for a bounded time, then checks that nothing leaked:
//! plans, ports, sessions, file descriptors; and reports RSS.
//!
//! Opt-in because it runs for minutes: `FTPGATE_SOAK_SECS=300 cargo test
//! --release --test soak -- --nocapture`. Without the variable it prints
//! `skipped` and returns.

mod common;

use common::start_unftp;

use ftpgate::config::Config;
use ftpgate::pinhole::Usage;
use ftpgate::proxy::{serve, Launched};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use suppaftp::tokio::AsyncFtpStream;
use suppaftp::types::FileType;
use suppaftp::Mode;
use tokio::io::AsyncReadExt;
use tokio::sync::oneshot;

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count())
}

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// One client's loop of sessions until `until`; returns transfers done.
async fn client(gw: SocketAddr, n: u64, until: Instant, errors: Arc<AtomicU64>) -> u64 {
    let mut done = 0;
    let mut round = 0u64;
    while Instant::now() < until {
        round += 1;
        let mode = match (n + round) % 3 {
            0 => Mode::Passive,
            1 => Mode::ExtendedPassive,
            _ => Mode::Active,
        };
        let r: Result<u64, String> = async {
            let mut ftp = AsyncFtpStream::connect(gw)
                .await
                .map_err(|e| e.to_string())?;
            if mode == Mode::Active {
                ftp = ftp.active_mode(Duration::from_secs(10));
            } else {
                ftp.set_mode(mode);
            }
            ftp.login("anonymous", "soak@")
                .await
                .map_err(|e| e.to_string())?;
            ftp.transfer_type(FileType::Binary)
                .await
                .map_err(|e| e.to_string())?;
            // A directory per client: libunftp's filesystem backend fails a
            // LIST (and panics a task) when another session deletes an
            // entry while it is being listed.
            let _ = ftp.mkdir(&format!("c{n}")).await;
            ftp.cwd(&format!("c{n}")).await.map_err(|e| e.to_string())?;
            let name = format!("c{n}-{round}.bin");
            let data: Vec<u8> = (0..(4096 + (round % 7) * 10_000))
                .map(|i| (i as u8) ^ (n as u8))
                .collect();
            ftp.put_file(&name, &mut data.as_slice())
                .await
                .map_err(|e| e.to_string())?;
            let got = ftp
                .retr(&name, |mut s| {
                    Box::pin(async move {
                        let mut buf = Vec::new();
                        s.read_to_end(&mut buf)
                            .await
                            .map_err(suppaftp::FtpError::ConnectionError)?;
                        Ok((buf, s))
                    })
                })
                .await
                .map_err(|e| e.to_string())?;
            if got != data {
                return Err(format!("{name}: content differs"));
            }
            ftp.list(None).await.map_err(|e| e.to_string())?;
            ftp.rm(&name).await.map_err(|e| e.to_string())?;
            // Every fifth session leaves without QUIT.
            if round % 5 != 0 {
                ftp.quit().await.map_err(|e| e.to_string())?;
            }
            Ok(3)
        }
        .await;
        match r {
            Ok(t) => done += t,
            Err(e) => {
                eprintln!("client {n} round {round} ({mode:?}): {e}");
                errors.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
    done
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak_mixed_sessions() {
    let Some(secs) = std::env::var("FTPGATE_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
    else {
        println!("skipped (set FTPGATE_SOAK_SECS to run)");
        return;
    };
    let clients: u64 = std::env::var("FTPGATE_SOAK_CLIENTS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(16);
    let root = tempfile::tempdir().unwrap();
    let upstream = start_unftp(root.path()).await;
    let yaml = format!(
        "listeners:\n  - name: soak\n    listen: 127.0.0.1:0\n    mode: reverse\n    upstream: {upstream}\n\
         data:\n  client_ports: 20000-29999\n  server_ports: 30000-39999\n\
         rules:\n  - name: loopback\n    clients: [127.0.0.0/8]\n    server_mode: same\n"
    );
    let config = Config::parse(&yaml, Path::new("soak.yaml")).unwrap();
    let launched = Launched::new(Arc::new(config)).await.unwrap();
    let addr = launched.listeners[0].1.local_addr().unwrap();
    let gateway = launched.gateway.clone();
    let (_stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(serve(
        launched.gateway,
        launched.listeners,
        async {
            let _ = stopped.await;
        },
        Duration::from_secs(1),
    ));

    let (fd0, rss0) = (open_fds(), rss_kib());
    let until = Instant::now() + Duration::from_secs(secs);
    let errors = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for n in 0..clients {
        tasks.push(tokio::spawn(client(addr, n, until, errors.clone())));
    }
    let mut transfers = 0;
    for t in tasks {
        transfers += t.await.unwrap();
    }
    // Sessions that left without QUIT end when the gateway sees the close.
    let limit = Instant::now() + Duration::from_secs(30);
    while gateway.limits.open() != 0 || gateway.backend.usage() != Usage::default() {
        assert!(
            Instant::now() < limit,
            "left open: {:?}",
            gateway.backend.usage()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (fd1, rss1) = (open_fds(), rss_kib());
    let errors = errors.load(Ordering::Relaxed);
    println!(
        "soak: {secs}s, {clients} clients, {transfers} transfers, {errors} errors; \
         fds {fd0} -> {fd1}; RSS {rss0} KiB -> {rss1} KiB"
    );
    assert_eq!(errors, 0);
    assert!(transfers > 0);
    // libunftp's sessions share the process: allow its few lingering ones.
    assert!(fd1 <= fd0 + 8, "fds grew from {fd0} to {fd1}");
}
