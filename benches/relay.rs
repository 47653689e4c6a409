//! Throughput of the relay's data path against a direct loopback connection.
//!
//! One sender thread writes `RELAY_BENCH_MIB` MiB (default 512) over
//! loopback and one receiver thread reads it to EOF, both with blocking
//! sockets, as an FTP server and client would. Each round measures, one after
//! the other, the direct connection and the relay with each data path
//! ([`DataPath::Splice`], [`DataPath::Buffered`]), on ftpgate's default
//! multi-thread runtime; the rounds (`RELAY_BENCH_ROUNDS`, default 5) are
//! interleaved so a load change on the machine hits every path alike. The
//! report gives each path's median rate and its ratio to the direct one.
//!
//! `cargo bench --bench relay`; without `--bench` (as `cargo test --benches`
//! runs it) one small round checks that the bytes arrive.
//!
//! `RELAY_BENCH_ROLE` runs one part alone, so that the three parts can run
//! in three network namespaces (a relay on a routed edge against the kernel
//! forwarding the same connection): `recv=ADDR` receives one connection to
//! EOF and prints its rate, `send=ADDR,MIB` sends, and
//! `relay=LISTEN,TARGET,splice|buffered` relays one connection.

use ftpgate::pinhole::relay::{relay, Counts, DataPath};
use std::io::{Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

const MIB: usize = 1024 * 1024;

/// How the bytes go from sender to receiver.
#[derive(Debug, Clone, Copy)]
enum Way {
    Direct,
    Relay(DataPath),
}

const WAYS: [Way; 3] = [
    Way::Direct,
    Way::Relay(DataPath::Splice),
    Way::Relay(DataPath::Buffered),
];

fn name(way: Way) -> &'static str {
    match way {
        Way::Direct => "direct",
        Way::Relay(DataPath::Splice) => "relay splice",
        Way::Relay(DataPath::Buffered) => "relay buffered",
    }
}

/// Reads `conn` to EOF; returns the bytes read.
fn drain(mut conn: TcpStream) -> u64 {
    let mut buf = vec![0u8; MIB];
    let mut total = 0u64;
    loop {
        match conn.read(&mut buf) {
            Ok(0) => return total,
            Ok(n) => total += n as u64,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => panic!("receiver: {e}"),
        }
    }
}

/// Writes `mib` MiB to `to`, then half-closes.
fn send(to: SocketAddr, mib: usize) {
    let mut conn = TcpStream::connect(to).expect("sender connect");
    let block: Vec<u8> = (0..MIB).map(|i| ((i * 31) >> 3) as u8).collect();
    for _ in 0..mib {
        conn.write_all(&block).expect("sender write");
    }
    conn.shutdown(Shutdown::Write).expect("sender shutdown");
    // Wait for the peer's EOF, so the sender's socket outlives the transfer.
    let _ = conn.read(&mut [0u8; 1]);
}

/// CPU time this process has used so far, in all its threads (user and
/// system, which includes the loopback's softirq work done on their behalf).
fn cpu_used() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name in parentheses; utime and stime are
    // the 14th and 15th fields overall, in USER_HZ (100) ticks.
    let after = stat.rsplit(')').next().unwrap_or("");
    let f: Vec<u64> = after
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|v| v.parse().ok())
        .collect();
    Duration::from_millis(f.iter().sum::<u64>() * 10)
}

/// One transfer of `mib` MiB by `way`; returns how long it took, from the
/// first write to the receiver's EOF, and the CPU time it cost.
fn transfer(rt: &tokio::runtime::Runtime, way: Way, mib: usize) -> (Duration, Duration) {
    let lo = Ipv4Addr::LOCALHOST;
    let sink = TcpListener::bind((lo, 0)).unwrap();
    let sink_addr = sink.local_addr().unwrap();
    let receiver = thread::spawn(move || {
        let (conn, _) = sink.accept().unwrap();
        let got = drain(conn);
        (got, Instant::now())
    });
    let (to, relayed) = match way {
        Way::Direct => (sink_addr, None),
        Way::Relay(path) => {
            let front = rt.block_on(tokio::net::TcpListener::bind((lo, 0))).unwrap();
            let front_addr = front.local_addr().unwrap();
            let task = rt.spawn(async move {
                let (client, _) = front.accept().await.unwrap();
                let server = tokio::net::TcpStream::connect(sink_addr).await.unwrap();
                relay(&client, &server, path).await
            });
            (front_addr, Some(task))
        }
    };
    let cpu = cpu_used();
    let start = Instant::now();
    let sender = thread::spawn(move || send(to, mib));
    let (got, end) = receiver.join().unwrap();
    sender.join().unwrap();
    let cpu = cpu_used() - cpu;
    assert_eq!(got, (mib * MIB) as u64, "{}: bytes lost", name(way));
    if let Some(task) = relayed {
        let (counts, result) = rt.block_on(task).unwrap();
        result.unwrap_or_else(|e| panic!("{}: {e}", name(way)));
        let want = Counts {
            to_client: 0,
            to_server: (mib * MIB) as u64,
        };
        assert_eq!(counts, want, "{}", name(way));
    }
    (end - start, cpu)
}

fn env_usize(key: &str, default: usize) -> usize {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        f64::NAN
    } else if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// One part of a transfer, alone (see the module doc).
fn role(spec: &str) {
    let (what, args) = spec.split_once('=').expect("ROLE=ARGS");
    let args: Vec<&str> = args.split(',').collect();
    let addr = |i: usize| -> SocketAddr { args[i].parse().expect("address") };
    match what {
        "recv" => {
            let l = TcpListener::bind(addr(0)).unwrap();
            let (conn, _) = l.accept().unwrap();
            let start = Instant::now();
            let got = drain(conn);
            let secs = start.elapsed().as_secs_f64();
            println!(
                "received {got} bytes in {secs:.3} s: {:.0} MB/s",
                got as f64 / secs / 1e6
            );
        }
        "send" => send(addr(0), args[1].parse().expect("MiB")),
        "relay" => {
            let path = match args[2] {
                "splice" => DataPath::Splice,
                _ => DataPath::Buffered,
            };
            let rt = tokio::runtime::Runtime::new().unwrap();
            let (counts, result) = rt.block_on(async {
                let l = tokio::net::TcpListener::bind(addr(0)).await.unwrap();
                let (client, _) = l.accept().await.unwrap();
                let server = tokio::net::TcpStream::connect(addr(1)).await.unwrap();
                relay(&client, &server, path).await
            });
            println!("relayed {counts:?}: {result:?}");
        }
        other => panic!("unknown role {other}"),
    }
}

fn main() {
    if let Ok(spec) = std::env::var("RELAY_BENCH_ROLE") {
        return role(&spec);
    }
    let benching = std::env::args().any(|a| a == "--bench");
    let (mib, rounds) = if benching {
        (
            env_usize("RELAY_BENCH_MIB", 512),
            env_usize("RELAY_BENCH_ROUNDS", 5),
        )
    } else {
        (16, 1)
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    // Rates in MB/s (10^6 bytes) and CPU seconds per GiB, per way, one per
    // round.
    let mut rates: Vec<Vec<f64>> = vec![Vec::new(); WAYS.len()];
    let mut cpus: Vec<Vec<f64>> = vec![Vec::new(); WAYS.len()];
    // RELAY_BENCH_ONLY=splice (a substring of a way's name) runs just that
    // way, for a profiler.
    let only = std::env::var("RELAY_BENCH_ONLY").unwrap_or_default();
    for _ in 0..rounds {
        for (i, way) in WAYS.iter().enumerate() {
            if !name(*way).contains(only.as_str()) {
                continue;
            }
            let (took, cpu) = transfer(&rt, *way, mib);
            rates[i].push((mib * MIB) as f64 / took.as_secs_f64() / 1e6);
            cpus[i].push(cpu.as_secs_f64() * 1024.0 / mib as f64);
        }
    }
    if !benching {
        println!("relay bench: 1 round of {mib} MiB per path checked (pass --bench to measure)");
        return;
    }
    println!("{mib} MiB per transfer, {rounds} rounds, loopback");
    let direct = median(rates[0].clone());
    let direct_cpu = median(cpus[0].clone());
    for (i, way) in WAYS.iter().enumerate() {
        if rates[i].is_empty() {
            continue;
        }
        let all: Vec<String> = rates[i].iter().map(|r| format!("{r:.0}")).collect();
        let m = median(rates[i].clone());
        let c = median(cpus[i].clone());
        println!(
            "{:<15} median {:>6.0} MB/s  ratio to direct {:.2}  CPU {:.2} s/GiB  \
             CPU ratio direct/this {:.2}  (MB/s per round: {})",
            name(*way),
            m,
            m / direct,
            c,
            direct_cpu / c,
            all.join(" ")
        );
    }
}
