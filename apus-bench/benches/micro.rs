//! Micro-benchmarks of the engine's hot path: an entry's encode and decode,
//! one engine step, and a whole commit round over zero-latency memory.
//!
//! `cargo bench -p apus-bench` (criterion; `-- --test` runs each once).

use std::hint::black_box;

use apus_bench::memnet::MemCluster;
use apus_core::entry::{self, EntryHeader};
use apus_core::{EntryKind, Time};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

fn header(payload: usize) -> EntryHeader {
    EntryHeader {
        kind: EntryKind::Data,
        payload_len: payload as u32,
        term: 3,
        leader_term: 3,
        index: 1000,
        pos: 1 << 20,
        prev_term: 3,
        commit: 999,
        conn: 7,
    }
}

fn entries(c: &mut Criterion) {
    let mut g = c.benchmark_group("entry");
    for size in [64usize, 1024, 4096] {
        let payload = vec![0x5a; size];
        let mut buf = vec![0u8; entry::encoded_len(size)];
        g.throughput(Throughput::Bytes(size as u64));
        g.bench_function(format!("encode/{size}"), |b| {
            b.iter(|| entry::encode(black_box(&header(size)), black_box(&payload), &mut buf))
        });
        entry::encode(&header(size), &payload, &mut buf);
        g.bench_function(format!("decode/{size}"), |b| {
            b.iter(|| entry::decode(black_box(&buf), 4096).expect("valid entry"))
        });
    }
    g.finish();
}

fn engine(c: &mut Criterion) {
    let mut g = c.benchmark_group("engine");
    // One poll of an idle leader: its timers, its slots, its outbox.
    let mut cluster = MemCluster::new(3);
    let mut now = cluster.now().0;
    g.bench_function("leader_poll_idle", |b| {
        b.iter(|| {
            now += 1;
            let r = cluster.leader_mut();
            r.poll(Time(now)).expect("poll");
            while r.next_action().is_some() {}
        })
    });
    // A commit round: propose at the leader, replicate to both followers,
    // commit; every replica's engine runs, memory is instant.
    for n in [3usize, 5, 7] {
        let mut c = MemCluster::new(n);
        g.bench_function(format!("commit_round/{n}_replicas/64B"), |b| {
            b.iter(|| black_box(c.commit_one(&[0x5a; 64])))
        });
    }
    g.finish();
}

criterion_group!(benches, entries, engine);
criterion_main!(benches);
