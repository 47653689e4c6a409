//! Throughput of the control-stream path as the session core runs it per
//! line: the framer splits the stream into lines (lent from its buffer),
//! each line's text is taken (Telnet sequences stripped), client lines go
//! through the command parser, server lines through the reply tracker, and
//! the address of a final 227/229 through its parser. Input is fed in
//! TCP-sized segments. Not included: the copy of each line the session core
//! makes to forward it.
//!
//! The streams are whole sessions back to back, as a real client and server
//! exchange them: greeting, login, SYST, a multi-line FEAT, PWD/CWD/TYPE,
//! passive (EPSV, PASV) and active (PORT) transfers with their 150/226
//! pairs, SIZE/MDTM, NOOP and QUIT.
//!
//! Each case runs twice: `control_stream` in wall-clock time, and
//! `control_stream_cpu` in the thread's CPU time, which other processes
//! on a shared machine disturb far less.

use std::hint::black_box;

use std::time::Duration;

use criterion::measurement::{Measurement, ValueFormatter, WallTime};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use ftpgate::ftp::{
    parse_227, parse_229, parse_command, parse_reply_line, Command, Framer, ReplyLine, ReplyPos,
    ReplyTracker,
};

/// `sessions` sessions' worth of client commands and server replies.
fn streams(sessions: usize) -> (Vec<u8>, Vec<u8>) {
    let mut client = Vec::new();
    let mut server = Vec::new();
    for i in 0..sessions {
        let mut exchange = |command: &str, reply: &str| {
            if !command.is_empty() {
                client.extend_from_slice(command.as_bytes());
                client.extend_from_slice(b"\r\n");
            }
            for line in reply.lines() {
                server.extend_from_slice(line.as_bytes());
                server.extend_from_slice(b"\r\n");
            }
        };
        exchange("", "220 ProFTPD 1.3.8 Server (Debian) [192.0.2.10]");
        exchange(
            "USER anonymous",
            "331 Anonymous login ok, send your complete email address as your password",
        );
        exchange("PASS guest@example.org", "230-Welcome to the archive.\n230-Mirrors are listed in /pub/MIRRORS.\n230 Anonymous access granted, restrictions apply");
        exchange("SYST", "215 UNIX Type: L8");
        exchange(
            "FEAT",
            "211-Features:\n EPRT\n EPSV\n MDTM\n MFMT\n \
             MLST modify*;perm*;size*;type*;unique*;UNIX.group*;UNIX.mode*;UNIX.owner*;\n \
             LANG en-US*\n REST STREAM\n SIZE\n TVFS\n UTF8\n211 End",
        );
        exchange("PWD", "257 \"/\" is the current directory");
        exchange("TYPE I", "200 Type set to I");
        exchange("CWD pub/releases", "250 CWD command successful");
        exchange("EPSV", "229 Entering Extended Passive Mode (|||40001|)");
        exchange(
            "LIST -la",
            "150 Opening ASCII mode data connection for file list\n226 Transfer complete",
        );
        exchange(&format!("SIZE project-{i}.tar.gz"), "213 1048576");
        exchange(&format!("MDTM project-{i}.tar.gz"), "213 20240101120000");
        exchange("PASV", "227 Entering Passive Mode (192,0,2,10,156,64).");
        exchange(
            &format!("RETR project-{i}.tar.gz"),
            &format!("150 Opening BINARY mode data connection for project-{i}.tar.gz (1048576 bytes)\n226 Transfer complete"),
        );
        exchange("PORT 10,0,0,5,195,80", "200 PORT command successful");
        exchange(
            &format!("STOR upload-{i}.bin"),
            &format!(
                "150 Opening BINARY mode data connection for upload-{i}.bin\n226 Transfer complete"
            ),
        );
        exchange("NOOP", "200 NOOP command successful");
        exchange("QUIT", "221 Goodbye.");
    }
    (client, server)
}

/// Frames and parses both streams; returns the number of lines, and a
/// checksum of the parsed values so nothing is optimised away.
fn run(client: &[u8], server: &[u8], segment: usize) -> (usize, u64) {
    let mut lines = 0;
    let mut sum = 0u64;
    let mut framer = Framer::new();
    for chunk in client.chunks(segment) {
        framer.push(chunk);
        while let Ok(Some(line)) = framer.next_line() {
            lines += 1;
            match parse_command(&line.text()).map(|c| c.command) {
                Ok(Command::Port(a)) => sum += u64::from(a.port()),
                Ok(_) => sum += 1,
                Err(_) => {}
            }
            black_box(&line);
        }
    }
    let mut framer = Framer::new();
    let mut tracker = ReplyTracker::default();
    for chunk in server.chunks(segment) {
        framer.push(chunk);
        while let Ok(Some(line)) = framer.next_line() {
            lines += 1;
            let text = line.text();
            match tracker.push(&text) {
                ReplyPos::End(227) => {
                    if let ReplyLine::Last { text, .. } = parse_reply_line(&text) {
                        sum += parse_227(text).map_or(0, |a| u64::from(a.port()));
                    }
                }
                ReplyPos::End(229) => {
                    if let ReplyLine::Last { text, .. } = parse_reply_line(&text) {
                        sum += parse_229(text).map_or(0, u64::from);
                    }
                }
                ReplyPos::End(code) | ReplyPos::Inside(code) => sum += u64::from(code),
                ReplyPos::Garbage => {}
            }
            black_box(&line);
        }
    }
    (lines, sum)
}

/// The bench thread's CPU time (`CLOCK_THREAD_CPUTIME_ID`), shown like
/// wall time.
struct ThreadCpu;

static WALL: WallTime = WallTime;

fn thread_cpu() -> Duration {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
    Duration::new(t.tv_sec as u64, t.tv_nsec as u32)
}

impl Measurement for ThreadCpu {
    type Intermediate = Duration;
    type Value = Duration;
    fn start(&self) -> Duration {
        thread_cpu()
    }
    fn end(&self, start: Duration) -> Duration {
        thread_cpu().saturating_sub(start)
    }
    fn add(&self, a: &Duration, b: &Duration) -> Duration {
        *a + *b
    }
    fn zero(&self) -> Duration {
        Duration::ZERO
    }
    fn to_f64(&self, value: &Duration) -> f64 {
        value.as_nanos() as f64
    }
    fn formatter(&self) -> &dyn ValueFormatter {
        WALL.formatter()
    }
}

fn cases<M: Measurement>(c: &mut Criterion<M>, group: &str) {
    let (client, server) = streams(1000);
    let bytes = (client.len() + server.len()) as u64;
    let (lines, _) = run(&client, &server, 1460);
    eprintln!(
        "stream: {bytes} bytes, {lines} lines, {:.1} bytes/line",
        bytes as f64 / lines as f64
    );

    let mut group = c.benchmark_group(group);
    group.throughput(Throughput::Bytes(bytes));
    group.bench_function("bytes/1460-byte segments", |b| {
        b.iter(|| run(black_box(&client), black_box(&server), 1460))
    });
    group.throughput(Throughput::Elements(lines as u64));
    group.bench_function("lines/1460-byte segments", |b| {
        b.iter(|| run(black_box(&client), black_box(&server), 1460))
    });
    group.bench_function("lines/1-byte segments", |b| {
        b.iter(|| run(black_box(&client), black_box(&server), 1))
    });
    group.finish();
}

fn wall(c: &mut Criterion) {
    cases(c, "control_stream");
}

fn cpu(c: &mut Criterion<ThreadCpu>) {
    cases(c, "control_stream_cpu");
}

criterion_group!(wall_time, wall);
criterion_group! {
    name = cpu_time;
    config = Criterion::default().with_measurement(ThreadCpu);
    targets = cpu
}
criterion_main!(wall_time, cpu_time);
