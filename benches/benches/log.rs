//! Storage benchmarks: the partition log (`keel-log`) measured against the targets of the
//! storage issue. Method, machine and results: `docs/benchmarks.md`.
//!
//! ```text
//! cargo bench -p keel-benches --bench log                    # large log 2 GiB, a few minutes
//! KEEL_BENCH_BIG=1 cargo bench -p keel-benches --bench log   # large log 10 GiB
//! ```
//!
//! Groups (criterion ids):
//! - `append/os/…`  `FlushPolicy::Os`, one pre-encoded batch of 1000 records of 100 bytes per
//!   iteration, reported in bytes/s. `in_segment` never rolls inside the timing (a full 1 GiB log
//!   is swapped for a fresh one untimed) and first fills one segment untimed, printing its rate
//!   as "cold first segment", so that it measures the log on recycled page-cache memory;
//!   `sustained` rolls 256 MiB segments, and a roll seals (fsyncs) the old segment, so it
//!   includes writeback and every page of it is memory the log touches for the first time. It
//!   prints the share of time spent in the appends that rolled.
//! - `fsync/every_batch/…`  `FlushPolicy::EveryBatch`, ~100 KB batches from 1, 2 and 4 threads
//!   sharing one log, reported in batches/s.
//! - `read/…`  `Log::read(offset, 1 MiB)` from offset 0 to the end of a 1 GiB log, following
//!   `last.next_offset()`: `zero_copy` only takes the (mmap-backed) bytes, `touch_every_byte`
//!   also sums every byte, `first_pass_after_reopen` is the first pass over a freshly opened log,
//!   which CRC-checks every batch.
//! - `reopen/…`  time of `Log::open`: after `close()` of a 1 GiB and a 2 GiB (10 GiB) log of
//!   128 MiB segments, and after a crash (the `Log` dropped without `close()`) with 0, 16 or
//!   64 MiB appended since the last checkpoint. `dirty` leaves the tail in the page cache
//!   unwritten, as a killed process does; `synced` writes it back first (as `EveryBatch` has),
//!   so only the scan is left.
//!
//! On a VM whose balloon reports free memory to the host (the project's 2-core machines do), the
//! first touch of memory costs a host page fault, so page-cache-heavy figures (`append`,
//! `fsync`) depend on how recently that memory was used; see `docs/benchmarks.md`.
//!
//! Logs are created under `<workspace>/target/bench-tmp` (or `$KEEL_BENCH_DIR`), which must be on
//! a real disk: tmpfs is refused. Fixture logs are built lazily, so a criterion filter such as
//! `-- append` builds only what it needs. Under `cargo test --benches` (criterion's test mode,
//! each benchmark runs once) every size is scaled down to a few MiB.

use std::cell::OnceCell;
use std::fs::File;
use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use criterion::{Criterion, SamplingMode, Throughput, criterion_group, criterion_main};
use keel_batch::{BatchBuilder, Compression, RecordRef};
use keel_log::{FlushPolicy, Log, LogConfig};
use tempfile::TempDir;

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
/// Value of every record (records have no key and no headers).
const VALUE_LEN: usize = 100;
/// Records per batch in the append, read and reopen benchmarks.
const RECORDS_PER_BATCH: usize = 1000;
/// Size of one batch in the fsync benchmark.
const FSYNC_BATCH_BYTES: usize = 100_000;
/// `max_bytes` of every read.
const READ_MAX_BYTES: u64 = MIB;

/// Sizes of everything; tiny in criterion's test mode.
struct Scale {
    /// Segment size of `append/os/in_segment` (the default, 1 GiB).
    append_segment: u64,
    /// Segment size of `append/os/sustained`, which rolls.
    rolling_segment: u64,
    /// Segment size of the read and reopen logs.
    fixture_segment: u64,
    /// Sealed segments of the small log (also the read log) and of the large log.
    small_segments: usize,
    large_segments: usize,
    /// Unflushed tails of the crash benchmarks.
    tails: [u64; 3],
}

fn scale() -> &'static Scale {
    static SCALE: OnceLock<Scale> = OnceLock::new();
    SCALE.get_or_init(|| {
        let args: Vec<String> = std::env::args().collect();
        let quick = !args.iter().any(|a| a == "--bench") || args.iter().any(|a| a == "--test");
        let big = std::env::var("KEEL_BENCH_BIG").is_ok_and(|v| v == "1");
        if quick {
            Scale {
                append_segment: 4 * MIB,
                rolling_segment: MIB,
                fixture_segment: MIB,
                small_segments: 2,
                large_segments: 4,
                tails: [0, 256 * KIB, 512 * KIB],
            }
        } else {
            let fixture_segment = 128 * MIB;
            Scale {
                append_segment: LogConfig::default().segment_bytes,
                rolling_segment: 256 * MIB,
                fixture_segment,
                small_segments: (GIB / fixture_segment) as usize,
                large_segments: ((if big { 10 } else { 2 } * GIB) / fixture_segment) as usize,
                tails: [0, 16 * MIB, 64 * MIB],
            }
        }
    })
}

/// The directory under which every benchmark log is created, checked once to be on a real disk.
fn scratch_parent() -> &'static Path {
    static PARENT: OnceLock<PathBuf> = OnceLock::new();
    PARENT.get_or_init(|| {
        let dir = std::env::var_os("KEEL_BENCH_DIR").map_or_else(
            || Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench-tmp"),
            PathBuf::from,
        );
        std::fs::create_dir_all(&dir).expect("creating the benchmark scratch directory");
        let dir = dir
            .canonicalize()
            .expect("resolving the benchmark scratch directory");
        let df = Command::new("df")
            .arg("-PT")
            .arg(&dir)
            .output()
            .expect("running df on the benchmark scratch directory");
        let df = String::from_utf8_lossy(&df.stdout);
        let line = df.lines().nth(1).unwrap_or("");
        eprintln!("keel bench: logs under {} ({line})", dir.display());
        let fstype = line.split_whitespace().nth(1).unwrap_or("");
        assert!(
            fstype != "tmpfs" && fstype != "ramfs",
            "{} is on {fstype}: set KEEL_BENCH_DIR to a directory on a real disk",
            dir.display()
        );
        dir
    })
}

fn tempdir(prefix: &str) -> TempDir {
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in(scratch_parent())
        .expect("creating a benchmark log directory")
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Encodes one uncompressed batch of records with 100-byte values and no keys, adding records
/// while `more(records so far, builder)` holds.
fn encode_batch(mut more: impl FnMut(usize, &BatchBuilder) -> bool) -> Vec<u8> {
    let value = [0x5a_u8; VALUE_LEN];
    let ts = now_ms();
    let mut b = BatchBuilder::new(Compression::None);
    let mut n = 0;
    while more(n, &b) {
        b.push(&RecordRef {
            timestamp: ts + n as i64,
            key: None,
            value: Some(&value),
            headers: &[],
        })
        .expect("adding a record");
        n += 1;
    }
    b.build().expect("encoding a batch")
}

/// The batch of the append, read and reopen benchmarks: 1000 records.
fn append_batch() -> Vec<u8> {
    encode_batch(|n, _| n < RECORDS_PER_BATCH)
}

/// The batch of the fsync benchmark: as many records as fit in 100 KB (one record takes at most
/// `VALUE_LEN + 16` bytes).
fn fsync_batch() -> Vec<u8> {
    encode_batch(|_, b| b.size_bytes() + VALUE_LEN + 16 <= FSYNC_BATCH_BYTES)
}

/// `16MiB`, `512KiB`, `0MiB`.
fn size_label(bytes: u64) -> String {
    if bytes.is_multiple_of(MIB) {
        format!("{}MiB", bytes / MIB)
    } else {
        format!("{}KiB", bytes / KIB)
    }
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / MIB as f64
}

fn log_config(segment_bytes: u64, flush: FlushPolicy) -> LogConfig {
    LogConfig {
        segment_bytes,
        flush,
        ..LogConfig::default()
    }
}

// ------------------------------------------------------------------------------------ append

/// Fresh logs for appending without ever rolling inside the timing: when the active segment is
/// full, the log is dropped (no seal, no fsync) and deleted, and a new one created, untimed.
struct FreshLogs {
    segment_bytes: u64,
    current: Option<(Log, TempDir)>,
    /// Bytes in the current log's only segment.
    used: u64,
}

impl FreshLogs {
    /// Makes sure the current log can take at least one more `len`-byte batch without rolling,
    /// and returns it with the number of batches it can take.
    fn with_room(&mut self, len: u64) -> (&Log, u64) {
        if self.current.is_none() || self.used + len > self.segment_bytes {
            // Drop the old log first so that its files are gone before the new one reserves.
            self.current = None;
            let dir = tempdir("append-");
            let log = Log::open(dir.path(), log_config(self.segment_bytes, FlushPolicy::Os))
                .expect("creating an append log");
            self.used = log.size_bytes();
            self.current = Some((log, dir));
        }
        let room = (self.segment_bytes - self.used) / len;
        let (log, _) = self.current.as_ref().expect("a log was just created");
        (log, room)
    }

    /// Appends `n` batches (rolling over to fresh logs untimed); returns the time spent appending.
    fn append(&mut self, batch: &[u8], n: u64) -> Duration {
        let len = batch.len() as u64;
        let mut left = n;
        let mut timed = Duration::ZERO;
        while left > 0 {
            let (log, room) = self.with_room(len);
            let k = room.min(left);
            let start = Instant::now();
            for _ in 0..k {
                black_box(log.append(batch, 1).expect("append"));
            }
            timed += start.elapsed();
            self.used += k * len;
            left -= k;
        }
        timed
    }
}

fn append(c: &mut Criterion) {
    let s = scale();
    let batch = append_batch();
    let len = batch.len() as u64;
    eprintln!(
        "keel bench: append batch = {RECORDS_PER_BATCH} records x {VALUE_LEN} B values = {len} B"
    );
    let mut group = c.benchmark_group("append");
    group.throughput(Throughput::BytesDecimal(len));

    let mut fresh = FreshLogs {
        segment_bytes: s.append_segment,
        current: None,
        used: 0,
    };
    let mut primed = false;
    group.bench_function("os/in_segment", |b| {
        if !primed {
            // This VM returns freed memory to its host (virtio-balloon free page reporting), and
            // the first touch of such memory costs a host page fault. Fill one whole segment
            // first, so the measured appends reuse page-cache memory as a running broker (and
            // machine-limits.sh's fresh-file dd) does; report this cold segment separately.
            let n = (s.append_segment - 64) / len;
            let cold = fresh.append(&batch, n);
            eprintln!(
                "keel bench: append/os/in_segment cold first segment: {n} batches in {cold:.2?} = \
                 {:.2} GB/s",
                (n * len) as f64 / cold.as_secs_f64() / 1e9
            );
            primed = true;
        }
        b.iter_custom(|iters| fresh.append(&batch, iters));
    });
    drop(fresh);

    // Rolls included: each roll seals the full segment, which fsyncs it. Every append is timed
    // on its own so the share of the appends that rolled can be reported.
    let dir = tempdir("append-sustained-");
    let log = Log::open(dir.path(), log_config(s.rolling_segment, FlushPolicy::Os))
        .expect("creating an append log");
    let (mut rolled, mut rolls, mut total) = (Duration::ZERO, 0_u32, Duration::ZERO);
    group.sampling_mode(SamplingMode::Flat);
    group.measurement_time(Duration::from_secs(8));
    group.bench_function("os/sustained", |b| {
        b.iter_custom(|iters| {
            let mut timed = Duration::ZERO;
            for _ in 0..iters {
                let segments = log.segment_count();
                let start = Instant::now();
                black_box(log.append(&batch, 1).expect("append"));
                let took = start.elapsed();
                timed += took;
                if log.segment_count() != segments {
                    rolled += took;
                    rolls += 1;
                }
            }
            total += timed;
            timed
        });
    });
    if total > Duration::ZERO {
        eprintln!(
            "keel bench: append/os/sustained wrote {:.0} MiB in {} segments; {rolls} appends rolled \
         and took {rolled:.2?} of {total:.2?} ({:.0}%)",
            mib(log.size_bytes()),
            log.segment_count(),
            100.0 * rolled.as_secs_f64() / total.as_secs_f64()
        );
    }
    drop(log);
    group.finish();
}

// ------------------------------------------------------------------------------------- fsync

fn fsync(c: &mut Criterion) {
    let batch = fsync_batch();
    eprintln!(
        "keel bench: fsync batch = {} B (100-byte records)",
        batch.len()
    );
    let mut group = c.benchmark_group("fsync");
    group.throughput(Throughput::Elements(1));
    for threads in [1_u64, 2, 4] {
        let dir = tempdir("fsync-");
        let log = Log::open(
            dir.path(),
            log_config(LogConfig::default().segment_bytes, FlushPolicy::EveryBatch),
        )
        .expect("creating an fsync log");
        group.bench_function(format!("every_batch/{threads}_threads"), |b| {
            b.iter_custom(|iters| {
                let start = Instant::now();
                std::thread::scope(|scope| {
                    for t in 0..threads {
                        let n = iters / threads + u64::from(t < iters % threads);
                        let (log, batch) = (&log, &batch);
                        scope.spawn(move || {
                            for _ in 0..n {
                                black_box(log.append(batch, 1).expect("append"));
                            }
                        });
                    }
                });
                start.elapsed()
            });
        });
    }
    group.finish();
}

// ----------------------------------------------------------------------- read and reopen logs

/// A closed log of `segments` full sealed segments plus an active segment holding one batch,
/// so the crash benchmarks can append their tail without a roll (which would checkpoint).
struct Fixture {
    dir: TempDir,
    config: LogConfig,
    /// Bytes of all batches: what reading from offset 0 to the end returns.
    batch_bytes: u64,
    end_offset: u64,
    label: String,
}

impl Fixture {
    fn build(name: &str, sealed: usize, segment_bytes: u64, batch: &[u8]) -> Self {
        let dir = tempdir(&format!("{name}-"));
        let config = log_config(segment_bytes, FlushPolicy::Os);
        let started = Instant::now();
        let log = Log::open(dir.path(), config.clone()).expect("creating a fixture log");
        let mut batches = 0_u64;
        while log.segment_count() <= sealed {
            log.append(batch, 1).expect("append");
            batches += 1;
        }
        let size = log.size_bytes();
        let segments = log.segment_count();
        let end_offset = log.log_end_offset();
        log.close().expect("closing a fixture log");
        let label = if size >= GIB / 2 {
            format!("{:.1}GiB", size as f64 / GIB as f64)
        } else {
            format!("{:.0}MiB", mib(size))
        };
        eprintln!(
            "keel bench: fixture {name} ({label}): {segments} segments, {size} B, {batches} \
             batches, {end_offset} records, built in {:.1?}",
            started.elapsed()
        );
        Self {
            dir,
            config,
            batch_bytes: batches * batch.len() as u64,
            end_offset,
            label,
        }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn open(&self) -> Log {
        Log::open(self.path(), self.config.clone()).expect("opening a fixture log")
    }
}

/// Reads the whole log sequentially; returns the bytes read.
fn read_pass(log: &Log, touch: bool) -> u64 {
    let end = log.log_end_offset();
    let mut offset = log.log_start_offset();
    let mut bytes = 0_u64;
    let mut sum = 0_u64;
    while offset < end {
        let slice = log.read(offset, READ_MAX_BYTES).expect("read");
        let last = slice
            .last
            .expect("a read below the log end returns a batch");
        bytes += slice.bytes.len() as u64;
        if touch {
            sum = sum.wrapping_add(sum_bytes(&slice.bytes));
        }
        offset = last.next_offset();
    }
    black_box(sum);
    bytes
}

/// Touches every byte (a wrapping sum of little-endian words; vectorised).
fn sum_bytes(b: &[u8]) -> u64 {
    let (words, rest) = b.as_chunks::<8>();
    let sum = words
        .iter()
        .fold(0_u64, |acc, w| acc.wrapping_add(u64::from_le_bytes(*w)));
    rest.iter()
        .fold(sum, |acc, &x| acc.wrapping_add(u64::from(x)))
}

/// Forces the active segment's files (the unflushed tail) to disk, as a crashed process's
/// kernel eventually does.
fn sync_active_segment(dir: &Path) {
    let mut logs: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("listing a log directory")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "log"))
        .collect();
    logs.sort();
    let active = logs.pop().expect("a log has a segment");
    for ext in ["log", "index", "timeindex"] {
        let p = active.with_extension(ext);
        File::open(&p)
            .and_then(|f| f.sync_data())
            .expect("syncing the active segment");
    }
}

/// One crash and recovery: appends `tail` bytes without a checkpoint, drops the log without
/// `close()`, times `Log::open`, then truncates the tail away so the next run starts the same.
fn crash_and_reopen(fx: &Fixture, batch: &[u8], tail_batches: u64, sync_tail: bool) -> Duration {
    let log = fx.open();
    assert_eq!(log.log_end_offset(), fx.end_offset);
    for _ in 0..tail_batches {
        log.append(batch, 1).expect("append");
    }
    let end = log.log_end_offset();
    drop(log);
    if sync_tail {
        sync_active_segment(fx.path());
    }
    let start = Instant::now();
    let log = fx.open();
    let elapsed = start.elapsed();
    assert_eq!(
        log.log_end_offset(),
        end,
        "recovery lost acknowledged records"
    );
    log.truncate_to(fx.end_offset).expect("truncating the tail");
    log.close().expect("close");
    elapsed
}

/// The read and reopen logs, built on first use.
struct Fixtures {
    batch: Vec<u8>,
    small: OnceCell<Fixture>,
    large: OnceCell<Fixture>,
}

impl Fixtures {
    fn small(&self) -> &Fixture {
        let s = scale();
        self.small.get_or_init(|| {
            Fixture::build("small", s.small_segments, s.fixture_segment, &self.batch)
        })
    }

    fn large(&self) -> &Fixture {
        let s = scale();
        self.large.get_or_init(|| {
            Fixture::build("large", s.large_segments, s.fixture_segment, &self.batch)
        })
    }

    fn get(&self, name: &str) -> &Fixture {
        if name == "small" {
            self.small()
        } else {
            self.large()
        }
    }
}

fn read_and_reopen(c: &mut Criterion) {
    let s = scale();
    let fixtures = Fixtures {
        batch: append_batch(),
        small: OnceCell::new(),
        large: OnceCell::new(),
    };
    let batch_len = fixtures.batch.len() as u64;

    // Reads of the small log. Criterion needs the throughput before a filter selects a
    // benchmark, so the byte count comes from the log's shape (checked against the real log).
    let read_bytes =
        (s.small_segments as u64 * ((s.fixture_segment - 64) / batch_len) + 1) * batch_len;
    let mut group = c.benchmark_group("read");
    group.sampling_mode(SamplingMode::Flat);
    group.throughput(Throughput::BytesDecimal(read_bytes));
    let reader: OnceCell<Log> = OnceCell::new();
    let reader = || {
        reader.get_or_init(|| {
            let fx = fixtures.small();
            assert_eq!(fx.batch_bytes, read_bytes);
            fx.open()
        })
    };
    group.bench_function("zero_copy", |b| {
        let log = reader();
        b.iter(|| read_pass(log, false));
    });
    group.bench_function("touch_every_byte", |b| {
        let log = reader();
        b.iter(|| read_pass(log, true));
    });
    group.bench_function("first_pass_after_reopen", |b| {
        let fx = fixtures.small();
        b.iter_custom(|iters| {
            let mut timed = Duration::ZERO;
            for _ in 0..iters {
                let log = fx.open();
                let start = Instant::now();
                assert_eq!(black_box(read_pass(&log, false)), read_bytes);
                timed += start.elapsed();
            }
            timed
        });
    });
    group.finish();

    // Reopen after close().
    let mut group = c.benchmark_group("reopen");
    group.sampling_mode(SamplingMode::Flat);
    for name in ["small", "large"] {
        let mut said = false;
        group.bench_function(format!("clean/{name}"), |b| {
            let fx = fixtures.get(name);
            if !std::mem::replace(&mut said, true) {
                eprintln!("keel bench: reopen/clean/{name} is the {} log", fx.label);
            }
            b.iter_custom(|iters| {
                let mut timed = Duration::ZERO;
                for _ in 0..iters {
                    let start = Instant::now();
                    let log = fx.open();
                    timed += start.elapsed();
                    assert_eq!(log.log_end_offset(), fx.end_offset);
                }
                timed
            });
        });
    }

    // Reopen after a crash with a known tail beyond the last checkpoint.
    group.measurement_time(Duration::from_secs(3));
    for name in ["small", "large"] {
        for tail in s.tails {
            for sync_tail in [false, true] {
                let id = match (tail, sync_tail) {
                    (0, true) => continue,
                    (0, false) => format!("crash/{name}/tail_0MiB"),
                    (_, false) => format!("crash/{name}/tail_{}/dirty", size_label(tail)),
                    (_, true) => format!("crash/{name}/tail_{}/synced", size_label(tail)),
                };
                let mut said = false;
                group.bench_function(id.as_str(), |b| {
                    let fx = fixtures.get(name);
                    let tail_batches = tail.div_ceil(batch_len);
                    if !std::mem::replace(&mut said, true) {
                    eprintln!(
                        "keel bench: reopen/{id}: {} log, tail {tail_batches} batches = {:.1} MiB",
                        fx.label,
                        mib(tail_batches * batch_len)
                    );
                    }
                    b.iter_custom(|iters| {
                        (0..iters)
                            .map(|_| crash_and_reopen(fx, &fixtures.batch, tail_batches, sync_tail))
                            .sum()
                    });
                });
            }
        }
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(5));
    targets = append, fsync, read_and_reopen
}
criterion_main!(benches);
