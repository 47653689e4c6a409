//! Soak: many mixed sessions through the gateway for a bounded time, then
//! checks that nothing leaked: sessions and pinholes (from its metrics), file
//! descriptors; and reports the gateway's RSS.
//!
//! The gateway is the built binary (`ftpgate run`) in a process of its own,
//! so its fds and RSS are measured apart from the libunftp upstream and the
//! clients, which run in this test process.
//!
//! Opt-in because it runs for minutes: `FTPGATE_SOAK_SECS=600 cargo test
//! --release --test soak -- --nocapture`. Without the variable it prints
//! `skipped` and returns.

mod common;

use common::{retr_all, start_unftp_passive, Binary};

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use suppaftp::tokio::AsyncFtpStream;
use suppaftp::types::FileType;
use suppaftp::Mode;

fn open_fds(pid: u32) -> usize {
    fd_targets(pid).len()
}

/// What each open fd of `pid` refers to (socket:[inode], a path, ...).
fn fd_targets(pid: u32) -> Vec<String> {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return Vec::new();
    };
    let mut out: Vec<String> = dir
        .filter_map(|e| e.ok())
        .map(|e| {
            std::fs::read_link(e.path())
                .map(|t| t.display().to_string())
                .unwrap_or_else(|_| "?".into())
        })
        .collect();
    out.sort();
    out
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Sum of a metric's samples over all label sets, from `/metrics`.
fn metric(addr: SocketAddr, name: &str) -> u64 {
    let mut s = std::net::TcpStream::connect(addr).expect("metrics endpoint");
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(s, "GET /metrics HTTP/1.0\r\nHost: soak\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    text.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
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
            let got = retr_all(&mut ftp, &name).await.map_err(|e| e.to_string())?;
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
    // The server's passive ports below the gateway's pools and clear of the
    // ephemeral range (libunftp's default, 49152-65535, shares most of it).
    let upstream = start_unftp_passive(root.path(), 1024..=19999).await;
    let yaml = format!(
        "listeners:\n  - name: soak\n    listen: 127.0.0.1:0\n    mode: reverse\n    upstream: {upstream}\n\
         data:\n  client_ports: 20000-29999\n  server_ports: 30000-39999\n\
         metrics:\n  listen: 127.0.0.1:0\n\
         rules:\n  - name: loopback\n    clients: [127.0.0.0/8]\n    server_mode: same\n"
    );
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("soak.yaml");
    std::fs::write(&config, yaml).unwrap();
    // The gateway's fds and RSS are measured apart from this process's.
    let args = ["run".as_ref(), "--config".as_ref(), config.as_os_str()];
    let gw = Binary::spawn(&args, "warn,ftpgate::proxy=info", Duration::from_secs(20));
    let listen = gw.addr_of(" listening listener=").await;
    let metrics = gw.addr_of("metrics endpoint listening").await;
    gw.forget_log();
    let pid = gw.pid();

    let (fds_at_start, rss0) = (fd_targets(pid), rss_kib(pid));
    let fd0 = fds_at_start.len();
    let start = Instant::now();
    let until = start + Duration::from_secs(secs);
    let errors = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for n in 0..clients {
        tasks.push(tokio::spawn(client(listen, n, until, errors.clone())));
    }
    // RSS over time, to tell a warm-up step from steady growth.
    let sampler = tokio::spawn(async move {
        let mut samples = Vec::new();
        let step = Duration::from_secs((secs / 10).max(1));
        while Instant::now() + step <= until {
            tokio::time::sleep(step).await;
            samples.push((start.elapsed().as_secs(), rss_kib(pid), open_fds(pid)));
        }
        samples
    });
    let mut transfers = 0;
    for t in tasks {
        transfers += t.await.unwrap();
    }
    let samples = sampler.await.unwrap();
    // Sessions that left without QUIT end when the gateway sees the close.
    let limit = Instant::now() + Duration::from_secs(30);
    loop {
        let (sessions, pinholes) = tokio::task::spawn_blocking(move || {
            (
                metric(metrics, "ftpgate_open_sessions"),
                metric(metrics, "ftpgate_open_pinholes"),
            )
        })
        .await
        .unwrap();
        if sessions == 0 && pinholes == 0 {
            break;
        }
        assert!(
            Instant::now() < limit,
            "left open: {sessions} sessions, {pinholes} pinholes"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The last sockets (the final metrics scrape's among them) close
    // asynchronously: wait, bounded, for the count to come back.
    let limit = Instant::now() + Duration::from_secs(10);
    while open_fds(pid) > fd0 && Instant::now() < limit {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let fds_at_end = fd_targets(pid);
    let (fd1, rss1) = (fds_at_end.len(), rss_kib(pid));
    let errors = errors.load(Ordering::Relaxed);
    for (t, rss, fds) in &samples {
        println!("soak: t={t}s RSS {rss} KiB, fds {fds}");
    }
    println!(
        "soak: {secs}s, {clients} clients, {transfers} transfers, {errors} errors; \
         gateway pid {pid}: fds {fd0} -> {fd1}; RSS {rss0} KiB -> {rss1} KiB"
    );
    assert_eq!(errors, 0);
    assert!(transfers > 0);
    assert!(
        fd1 <= fd0,
        "gateway fds grew from {fd0} to {fd1}: {fds_at_start:?} -> {fds_at_end:?}"
    );
    // The start figure is an idle process; the first sessions grow it once
    // (tokio's worker threads get their malloc arenas, buffers are allocated
    // and kept by the allocator for reuse). Growth is measured from the first
    // sample, a tenth into the run, after that step.
    let (t_warm, warm, _) = *samples.first().expect("at least one sample");
    println!(
        "soak: warm-up baseline at t={t_warm}s: RSS {warm} KiB; end {rss1} KiB ({:+.1}%)",
        (rss1 as f64 / warm as f64 - 1.0) * 100.0
    );
    assert!(
        rss1 * 100 <= warm * 105,
        "RSS grew more than 5% after warm-up: {warm} KiB -> {rss1} KiB"
    );
}
