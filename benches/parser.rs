//! Throughput of the control-stream path: framer, then the command or reply
//! parsers, over a realistic mixed session (login, FEAT, passive and active
//! transfers), fed in TCP-sized segments.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use ftpgate::ftp::{
    parse_227, parse_229, parse_command, parse_reply_line, Command, Framer, ReplyLine, ReplyTracker,
};

/// One session's worth of client commands and server replies, repeated.
fn streams(rounds: usize) -> (Vec<u8>, Vec<u8>) {
    let mut client = b"USER anonymous\r\nPASS guest@example.org\r\nFEAT\r\nTYPE I\r\n".to_vec();
    let mut server = b"220 ProFTPD Server ready.\r\n331 Password required\r\n\
        230 User anonymous logged in\r\n211-Features:\r\n EPRT\r\n EPSV\r\n MDTM\r\n\
        \x20MLST type*;perm*;size*;modify*;\r\n REST STREAM\r\n SIZE\r\n UTF8\r\n211 End\r\n\
        200 Type set to I\r\n"
        .to_vec();
    for i in 0..rounds {
        client.extend_from_slice(b"PASV\r\n");
        server.extend_from_slice(b"227 Entering Passive Mode (192,0,2,10,156,64).\r\n");
        client.extend_from_slice(format!("RETR pub/file-{i}.tar.gz\r\n").as_bytes());
        server.extend_from_slice(b"150 Opening BINARY mode data connection\r\n");
        server.extend_from_slice(b"226 Transfer complete\r\n");
        client.extend_from_slice(b"EPSV\r\n");
        server.extend_from_slice(b"229 Entering Extended Passive Mode (|||40001|)\r\n");
        client.extend_from_slice(b"LIST -la\r\n");
        server.extend_from_slice(
            b"150 Here comes the directory listing\r\n226 Directory send OK\r\n",
        );
        client.extend_from_slice(b"PORT 10,0,0,5,195,80\r\n");
        server.extend_from_slice(b"200 PORT command successful\r\n");
        client.extend_from_slice(format!("STOR upload-{i}.bin\r\n").as_bytes());
        server.extend_from_slice(b"150 Ok to send data\r\n226 Transfer complete\r\n");
    }
    client.extend_from_slice(b"QUIT\r\n");
    server.extend_from_slice(b"221 Goodbye.\r\n");
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
        }
    }
    let mut framer = Framer::new();
    let mut tracker = ReplyTracker::default();
    for chunk in server.chunks(segment) {
        framer.push(chunk);
        while let Ok(Some(line)) = framer.next_line() {
            lines += 1;
            let text = line.text();
            let _ = tracker.push(&text);
            match parse_reply_line(&text) {
                ReplyLine::Last { code: 227, text } => {
                    sum += parse_227(text).map_or(0, |a| u64::from(a.port()));
                }
                ReplyLine::Last { code: 229, text } => {
                    sum += parse_229(text).map_or(0, u64::from);
                }
                ReplyLine::Last { code, .. } | ReplyLine::First { code, .. } => {
                    sum += u64::from(code);
                }
                ReplyLine::Text(_) => {}
            }
        }
    }
    (lines, sum)
}

fn bench(c: &mut Criterion) {
    let (client, server) = streams(1000);
    let bytes = (client.len() + server.len()) as u64;
    let (lines, _) = run(&client, &server, 1460);

    let mut group = c.benchmark_group("control_stream");
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

criterion_group!(benches, bench);
criterion_main!(benches);
