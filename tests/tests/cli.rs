//! The `keel` command line against real broker processes: every client command, the exact JSON
//! shapes, produce/consume formats and stop conditions, and the exit-status contract (0 success,
//! 1 failure with one line on stderr, 2 usage error).
//!
//! Every child process runs under a deadline and is killed when the test gives up on it.

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use keel_tests::broker::{BrokerProc, free_port, keel_bin, wait_until};
use serde_json::{Value, json};

/// Generous: a debug build on a shared 2-core machine.
const DEADLINE: Duration = Duration::from_secs(60);

#[derive(Debug)]
struct Out {
    code: Option<i32>,
    stdout: String,
    stderr: String,
    elapsed: Duration,
}

impl Out {
    #[track_caller]
    fn ok(&self) -> &str {
        assert_eq!(self.code, Some(0), "expected success: {self:?}");
        &self.stdout
    }

    /// Exit 1 with exactly one line on stderr; returns that line.
    #[track_caller]
    fn fails(&self) -> &str {
        assert_eq!(self.code, Some(1), "expected exit 1: {self:?}");
        assert_eq!(
            self.stderr.lines().count(),
            1,
            "expected one line on stderr: {self:?}"
        );
        assert!(self.stderr.starts_with("keel: "), "{self:?}");
        self.stderr.trim_end()
    }

    #[track_caller]
    fn usage_error(&self) {
        assert_eq!(self.code, Some(2), "expected a usage error: {self:?}");
        assert!(self.stdout.is_empty(), "{self:?}");
        assert!(!self.stderr.is_empty(), "{self:?}");
    }

    fn json(&self) -> Value {
        serde_json::from_str(self.ok()).unwrap_or_else(|e| panic!("not JSON ({e}): {self:?}"))
    }
}

fn read_all(mut r: impl Read + Send + 'static) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = r.read_to_end(&mut buf);
        String::from_utf8_lossy(&buf).into_owned()
    })
}

/// Runs `keel ARGS` with `stdin` as input and `env` added (KEEL_BROKERS removed unless given),
/// killing it if it outlives `deadline`.
fn run_with(args: &[&str], stdin: &[u8], env: &[(&str, &str)], deadline: Duration) -> Out {
    let started = Instant::now();
    let mut child = Command::new(keel_bin())
        .args(args)
        .env_remove("KEEL_BROKERS")
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn keel");
    let mut input = child.stdin.take().expect("stdin");
    let data = stdin.to_vec();
    let writer = std::thread::spawn(move || {
        let _ = input.write_all(&data);
    });
    let stdout = read_all(child.stdout.take().expect("stdout"));
    let stderr = read_all(child.stderr.take().expect("stderr"));
    let status = loop {
        if let Some(s) = child.try_wait().expect("try_wait") {
            break s;
        }
        if started.elapsed() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "keel {args:?} still running after {deadline:?}; stdout so far: {:?}, stderr: {:?}",
                stdout.join().unwrap_or_default(),
                stderr.join().unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let _ = writer.join();
    Out {
        code: status.code(),
        stdout: stdout.join().expect("stdout reader"),
        stderr: stderr.join().expect("stderr reader"),
        elapsed: started.elapsed(),
    }
}

/// `keel ARGS --brokers ADDR` with no input.
fn keel(b: &BrokerProc, args: &[&str]) -> Out {
    keel_in(b, args, b"")
}

/// `keel ARGS --brokers ADDR` reading `stdin`.
fn keel_in(b: &BrokerProc, args: &[&str], stdin: &[u8]) -> Out {
    let mut all: Vec<&str> = args.to_vec();
    all.extend(["--brokers", b.grpc.as_str()]);
    run_with(&all, stdin, &[], DEADLINE)
}

/// `keel ARGS` without a broker (usage errors, help, group commands).
fn keel_alone(args: &[&str]) -> Out {
    run_with(args, b"", &[], DEADLINE)
}

/// A `keel` process to talk to while it runs: stdin stays open, stdout arrives line by line.
struct Live {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<String>,
}

impl Live {
    fn start(b: &BrokerProc, args: &[&str]) -> Self {
        let mut child = Command::new(keel_bin())
            .args(args)
            .args(["--brokers", &b.grpc])
            .env_remove("KEEL_BROKERS")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn keel");
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().expect("stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Self {
            child,
            stdin,
            lines,
        }
    }

    fn write(&mut self, s: &str) {
        let stdin = self.stdin.as_mut().expect("stdin open");
        stdin.write_all(s.as_bytes()).expect("write to keel");
        stdin.flush().expect("flush");
    }

    #[track_caller]
    fn next_line(&self, what: &str) -> String {
        self.lines
            .recv_timeout(DEADLINE)
            .unwrap_or_else(|e| panic!("no line from keel for {what}: {e}"))
    }

    fn try_line(&self) -> Option<String> {
        self.lines.try_recv().ok()
    }

    /// SIGTERM, then the exit code.
    fn terminate(self) -> Option<i32> {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        self.finish()
    }

    /// Closes stdin and waits for the exit code.
    fn finish(mut self) -> Option<i32> {
        drop(self.stdin.take());
        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Some(s) = self.child.try_wait().expect("try_wait") {
                return s.code();
            }
            assert!(Instant::now() < deadline, "keel did not exit");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Live {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn broker(tmp: &tempfile::TempDir) -> BrokerProc {
    BrokerProc::start(&tmp.path().join("b1"), 1)
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .expect("clock")
}

/// Milliseconds since the epoch as RFC 3339 with a +02:00 offset (to exercise the parser's
/// offsets and fractions).
fn rfc3339_plus2(ms: i64) -> String {
    let local = ms + 2 * 3_600_000;
    let (days, rem) = (local.div_euclid(86_400_000), local.rem_euclid(86_400_000));
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    let (h, mi, s, milli) = (
        rem / 3_600_000,
        rem / 60_000 % 60,
        rem / 1000 % 60,
        rem % 1000,
    );
    format!("{y:04}-{m:02}-{d:02}T{h:02}:{mi:02}:{s:02}.{milli:03}+02:00")
}

#[test]
fn topic_commands_and_their_json() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let b = broker(&tmp);

    let out = keel(
        &b,
        &[
            "topic",
            "create",
            "orders",
            "--partitions",
            "3",
            "--replication-factor",
            "1",
            "--config",
            "retention.ms=3600000",
            "--config",
            "segment.bytes=1048576",
        ],
    );
    assert!(out.ok().contains("orders"), "{out:?}");
    assert_eq!(
        keel(&b, &["topic", "create", "orders"]).fails(),
        r#"keel: topic "orders" already exists"#
    );
    keel(&b, &["topic", "create", "payments"]).ok();

    // list
    let out = keel(&b, &["topic", "list"]);
    let lines: Vec<&str> = out.ok().lines().collect();
    assert_eq!(
        lines,
        [
            "NAME      PARTITIONS  REPLICATION-FACTOR",
            "orders    3           1",
            "payments  1           1",
        ]
    );
    assert_eq!(
        keel(&b, &["topic", "list", "--output", "json"]).json(),
        json!({"topics": [
            {"name": "orders", "partitions": 3, "replication_factor": 1},
            {"name": "payments", "partitions": 1, "replication_factor": 1},
        ]})
    );

    // describe: the contract's fields, in the contract's order, then ours.
    keel_in(&b, &["produce", "orders", "--partition", "1"], b"x\ny\n").ok();
    let out = keel(&b, &["topic", "describe", "orders", "--output", "json"]);
    assert!(
        out.stdout.starts_with(
            r#"{"name":"orders","partitions":[{"partition":0,"leader":1,"replicas":[1],"in_sync":[1],"log_start_offset":0,"log_end_offset":0,"#
        ),
        "{out:?}"
    );
    let v = out.json();
    let mut top: Vec<&String> = v.as_object().expect("object").keys().collect();
    top.sort_unstable();
    assert_eq!(top, ["config", "name", "partitions"]);
    assert_eq!(v["name"], "orders");
    let parts = v["partitions"].as_array().expect("partitions");
    assert_eq!(parts.len(), 3);
    for (i, p) in parts.iter().enumerate() {
        assert_eq!(p["partition"], i);
        assert_eq!(p["leader"], 1);
        assert_eq!(p["replicas"], json!([1]));
        assert_eq!(p["in_sync"], json!([1]));
        assert_eq!(p["log_start_offset"], 0);
        let end = if i == 1 { 2 } else { 0 };
        assert_eq!(p["log_end_offset"], end, "{p}");
        assert_eq!(p["high_watermark"], end, "{p}");
    }
    let config = v["config"].as_object().expect("config");
    assert_eq!(config["retention.ms"], "3600000");
    assert_eq!(config["segment.bytes"], "1048576");
    assert_eq!(config["cleanup.policy"], "delete", "defaults are shown too");
    assert!(config.values().all(Value::is_string));

    let out = keel(&b, &["topic", "describe", "orders"]);
    let text = out.ok();
    assert!(
        text.starts_with(
            "Topic orders: 3 partitions, replication factor 1\n\n\
             PARTITION  LEADER  REPLICAS  IN-SYNC  LOG-START  LOG-END  HIGH-WATERMARK\n\
             0          1       1         1        0          0        0\n\
             1          1       1         1        0          2        2\n"
        ),
        "{text}"
    );
    // The key column is as wide as the longest key (producer.id.expiration.ms).
    assert!(
        text.contains("\nretention.ms               3600000\n"),
        "{text}"
    );

    // alter
    let out = keel(
        &b,
        &[
            "topic",
            "alter",
            "orders",
            "--config",
            "retention.ms=1000",
            "--delete-config",
            "segment.bytes",
        ],
    );
    assert!(out.ok().contains("retention.ms=1000"), "{out:?}");
    let v = keel(&b, &["topic", "describe", "orders", "--output", "json"]).json();
    assert_eq!(v["config"]["retention.ms"], "1000");
    assert_eq!(
        v["config"]["segment.bytes"], "1073741824",
        "back to default"
    );
    let err = keel(
        &b,
        &["topic", "alter", "orders", "--config", "retention.ms=soon"],
    );
    assert!(err.fails().contains("retention.ms"), "{err:?}");
    let err = keel(&b, &["topic", "alter", "orders", "--delete-config", "nope"]);
    assert!(err.fails().contains("nope"), "{err:?}");
    keel(&b, &["topic", "alter", "orders"]).usage_error();
    keel(
        &b,
        &[
            "topic",
            "alter",
            "orders",
            "--config",
            "retention.ms=1",
            "--delete-config",
            "retention.ms",
        ],
    )
    .usage_error();
    assert_eq!(
        keel(
            &b,
            &["topic", "alter", "ghost", "--config", "retention.ms=5"]
        )
        .fails(),
        r#"keel: topic "ghost" not found"#
    );

    // add-partitions
    let out = keel(
        &b,
        &["topic", "add-partitions", "orders", "--partitions", "5"],
    );
    assert!(out.ok().contains('5'), "{out:?}");
    let v = keel(&b, &["topic", "describe", "orders", "--output", "json"]).json();
    assert_eq!(v["partitions"].as_array().map(Vec::len), Some(5));
    let err = keel(
        &b,
        &["topic", "add-partitions", "orders", "--partitions", "2"],
    );
    assert!(err.fails().contains("partitions"), "{err:?}");
    keel(&b, &["topic", "add-partitions", "orders"]).usage_error();

    // bad creates
    let err = keel(
        &b,
        &["topic", "create", "bad", "--config", "retention.ms=abc"],
    );
    assert!(
        err.fails().contains("invalid config retention.ms"),
        "{err:?}"
    );
    let err = keel(&b, &["topic", "create", "bad", "--config", "colour=blue"]);
    assert!(err.fails().contains("colour"), "{err:?}");
    let err = keel(&b, &["topic", "create", "bad/name"]);
    assert!(err.fails().contains("name"), "{err:?}");
    let err = keel(&b, &["topic", "create", "bad", "--replication-factor", "3"]);
    assert!(err.fails().contains("replication"), "{err:?}");
    keel(&b, &["topic", "create", "bad", "--config", "retention.ms"]).usage_error();
    keel(&b, &["topic", "create", "bad", "--partitions", "0"]).usage_error();
    keel(&b, &["topic", "create", "bad", "--partitions", "many"]).usage_error();
    keel(
        &b,
        &[
            "topic",
            "create",
            "bad",
            "--config",
            "retention.ms=1",
            "--config",
            "retention.ms=2",
        ],
    )
    .usage_error();
    keel(&b, &["topic", "list", "--output", "yaml"]).usage_error();

    // unknown topics
    assert_eq!(
        keel(&b, &["topic", "describe", "ghost"]).fails(),
        r#"keel: topic "ghost" not found"#
    );
    assert_eq!(
        keel(&b, &["topic", "describe", "ghost", "--output", "json"]).fails(),
        r#"keel: topic "ghost" not found"#
    );

    // delete
    assert!(
        keel(&b, &["topic", "delete", "orders"])
            .ok()
            .contains("orders")
    );
    assert_eq!(
        keel(&b, &["topic", "list", "--output", "json"]).json(),
        json!({"topics": [{"name": "payments", "partitions": 1, "replication_factor": 1}]})
    );
    assert_eq!(
        keel(&b, &["topic", "delete", "orders"]).fails(),
        r#"keel: topic "orders" not found"#
    );
    assert_eq!(
        keel(&b, &["topic", "describe", "orders"]).fails(),
        r#"keel: topic "orders" not found"#
    );
}

#[test]
fn cluster_status_and_finding_the_cluster() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let b = broker(&tmp);
    let addr = b.grpc.as_str();

    let out = keel(&b, &["cluster", "status", "--output", "json"]);
    assert_eq!(
        out.ok().trim_end(),
        format!(
            r#"{{"metadata_leader":1,"brokers":[{{"id":1,"address":"{addr}","alive":true}}],"under_replicated":[]}}"#
        )
    );
    let out = keel(&b, &["cluster", "status"]);
    let lines: Vec<String> = out.ok().lines().map(str::to_owned).collect();
    assert_eq!(lines.len(), 3, "{out:?}");
    assert!(lines[0].starts_with("ID  ADDRESS"), "{out:?}");
    assert!(lines[1].starts_with(&format!("1   {addr}  yes")), "{out:?}");
    assert!(lines[1].ends_with("metadata leader"), "{out:?}");
    assert_eq!(lines[2], "All partitions are fully replicated.", "{out:?}");

    // KEEL_BROKERS, and --brokers over it, before or after the command.
    let env = [("KEEL_BROKERS", addr)];
    let v = run_with(
        &["cluster", "status", "--output", "json"],
        b"",
        &env,
        DEADLINE,
    )
    .json();
    assert_eq!(v["brokers"][0]["address"], addr);
    let dead = format!("127.0.0.1:{}", free_port());
    let dead_env = [("KEEL_BROKERS", dead.as_str())];
    let list = format!("{dead},{addr}");
    for args in [
        vec!["cluster", "status", "--brokers", addr],
        vec!["--brokers", addr, "cluster", "status"],
        // A dead bootstrap broker is skipped when another answers.
        vec!["cluster", "status", "--brokers", list.as_str()],
    ] {
        run_with(&args, b"", &dead_env, DEADLINE).ok();
    }

    // A dead port fails fast, naming the address.
    for (args, env) in [
        (vec!["topic", "list", "--brokers", dead.as_str()], vec![]),
        (vec!["cluster", "status"], dead_env.to_vec()),
        (vec!["produce", "t", "--brokers", dead.as_str()], Vec::new()),
        (vec!["consume", "t", "--brokers", dead.as_str()], Vec::new()),
    ] {
        let out = run_with(&args, b"x\n", &env, Duration::from_secs(30));
        let line = out.fails();
        assert!(line.contains("cannot reach the cluster"), "{out:?}");
        assert!(line.contains(&dead), "{out:?}");
        assert!(out.elapsed < Duration::from_secs(12), "{out:?}");
    }

    // Malformed addresses are usage errors, wherever they come from.
    keel_alone(&["topic", "list", "--brokers", "localhost"]).usage_error();
    keel_alone(&["topic", "list", "--brokers", "h:99999"]).usage_error();
    run_with(
        &["topic", "list"],
        b"",
        &[("KEEL_BROKERS", "nonsense")],
        DEADLINE,
    )
    .usage_error();
    keel_alone(&["--brokers", addr, "broker", "--id", "1", "--data-dir", "x"]).usage_error();

    // bench finds the cluster the same way.
    let bench = [
        "bench",
        "produce",
        "--topic",
        "bench",
        "--records",
        "200",
        "--batch-size",
        "50",
        "--json",
    ];
    let v = keel(&b, &bench).json();
    assert_eq!(v["records"], 200);
    run_with(&bench, b"", &env, DEADLINE).ok();
    let mut dead_bench = bench.to_vec();
    dead_bench.extend(["--brokers", dead.as_str()]);
    assert!(
        run_with(&dead_bench, b"", &[], DEADLINE)
            .fails()
            .contains(&dead)
    );
}

#[test]
fn produce_and_consume_records() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let b = broker(&tmp);
    keel(&b, &["topic", "create", "t", "--partitions", "1"]).ok();

    // Plain lines, keys by separator, a fixed key, headers; --verbose prints PARTITION OFFSET.
    let out = keel_in(&b, &["produce", "t", "--verbose"], b"a\nb\nc\n");
    assert_eq!(out.ok(), "0 0\n0 1\n0 2\n");
    assert!(out.stderr.is_empty(), "{out:?}");
    let out = keel_in(
        &b,
        &[
            "produce",
            "t",
            "--key-separator",
            "::",
            "--header",
            "h1=v1",
            "--header",
            "h2=",
            "-v",
        ],
        b"k1::v1\nk2::v::2\n::no key\n",
    );
    assert_eq!(out.ok(), "0 3\n0 4\n0 5\n");
    let out = keel_in(&b, &["produce", "t", "--key", "fixed", "-v"], b"x\r\n\ny");
    assert_eq!(
        out.ok(),
        "0 6\n0 7\n0 8\n",
        "CRLF, empty line, no final newline"
    );
    // Without --verbose nothing is printed; empty input is fine.
    assert_eq!(keel_in(&b, &["produce", "t"], b"q\n").ok(), "");
    assert_eq!(keel_in(&b, &["produce", "t", "-v"], b"").ok(), "");

    let fmt = "%t|%p|%o|%k|%v|%h";
    let out = keel(
        &b,
        &[
            "consume",
            "t",
            "--from-beginning",
            "-n",
            "10",
            "--format",
            fmt,
        ],
    );
    assert_eq!(
        out.ok(),
        "t|0|0||a|\n\
         t|0|1||b|\n\
         t|0|2||c|\n\
         t|0|3|k1|v1|h1=v1,h2=\n\
         t|0|4|k2|v::2|h1=v1,h2=\n\
         t|0|5||no key|h1=v1,h2=\n\
         t|0|6|fixed|x|\n\
         t|0|7|fixed||\n\
         t|0|8|fixed|y|\n\
         t|0|9||q|\n"
    );
    // The default format is the value; escapes; %T is the record's time.
    let out = keel(&b, &["consume", "t", "--from-beginning", "-n", "3"]);
    assert_eq!(out.ok(), "a\nb\nc\n");
    let out = keel(
        &b,
        &[
            "consume",
            "t",
            "--offset",
            "3",
            "-n",
            "2",
            "--format",
            "%k\\t%v\\n--",
        ],
    );
    assert_eq!(out.ok(), "k1\tv1\n--\nk2\tv::2\n--\n");
    let out = keel(
        &b,
        &[
            "consume",
            "t",
            "--from-beginning",
            "-n",
            "1",
            "--format",
            "%T",
        ],
    );
    let ts: i64 = out.ok().trim().parse().expect("timestamp");
    assert!((now_ms() - ts).abs() < 600_000, "{ts}");

    // --timeout-ms ends a consume that has nothing (more) to read.
    let out = keel(&b, &["consume", "t", "--timeout-ms", "300"]);
    assert_eq!(out.ok(), "", "starts at the end by default");
    let out = keel(&b, &["consume", "t", "--from-end", "--timeout-ms", "300"]);
    assert_eq!(out.ok(), "");
    let out = keel(&b, &["consume", "t", "--offset", "8", "-n", "2"]);
    assert_eq!(out.ok(), "y\nq\n");
    let out = keel(
        &b,
        &["consume", "t", "--offset", "10", "--timeout-ms", "300"],
    );
    assert_eq!(out.ok(), "", "the end itself is a valid start");
    let out = keel(
        &b,
        &[
            "consume",
            "t",
            "--from-beginning",
            "--timeout-ms",
            "2000",
            "-n",
            "100",
        ],
    );
    assert_eq!(out.ok().lines().count(), 10);
    let err = keel(
        &b,
        &["consume", "t", "--offset", "11", "--timeout-ms", "300"],
    );
    assert!(err.fails().contains("out of range"), "{err:?}");

    // --from-timestamp: a later batch starts exactly where its first record is.
    let before = keel(
        &b,
        &["consume", "t", "--offset", "9", "-n", "1", "--format", "%T"],
    );
    let last_ts: i64 = before.ok().trim().parse().expect("ts");
    wait_until("the clock to move on", Duration::from_secs(5), || {
        now_ms() > last_ts
    });
    assert_eq!(
        keel_in(&b, &["produce", "t", "-v"], b"late1\nlate2\n").ok(),
        "0 10\n0 11\n"
    );
    let first_late = keel(
        &b,
        &[
            "consume", "t", "--offset", "10", "-n", "1", "--format", "%T",
        ],
    );
    let late_ts = first_late.ok().trim().to_owned();
    let rfc = rfc3339_plus2(late_ts.parse().expect("ts"));
    for ts in [late_ts.as_str(), rfc.as_str()] {
        let out = keel(
            &b,
            &[
                "consume",
                "t",
                "--from-timestamp",
                ts,
                "-n",
                "2",
                "--format",
                "%o %v",
            ],
        );
        assert_eq!(out.ok(), "10 late1\n11 late2\n", "{ts}");
    }
    let out = keel(
        &b,
        &[
            "consume",
            "t",
            "--from-timestamp",
            "2000-01-01T00:00:00Z",
            "-n",
            "1",
        ],
    );
    assert_eq!(out.ok(), "a\n");
    let out = keel(
        &b,
        &[
            "consume",
            "t",
            "--from-timestamp",
            "2100-01-01T00:00:00Z",
            "--timeout-ms",
            "300",
        ],
    );
    assert_eq!(out.ok(), "", "a time after every record starts at the end");

    // A line without the separator: the lines before it are produced, it and those after not.
    let out = keel_in(
        &b,
        &["produce", "t", "--key-separator", "=", "-v"],
        b"k=1\nk=2\nbroken\nk=3\n",
    );
    assert_eq!(out.code, Some(1));
    assert_eq!(out.stdout, "0 12\n0 13\n");
    assert!(out.fails().contains("line 3"), "{out:?}");
    let out = keel(&b, &["consume", "t", "--offset", "12", "-n", "2"]);
    assert_eq!(out.ok(), "1\n2\n");

    // Acks levels.
    assert_eq!(
        keel_in(&b, &["produce", "t", "--acks", "leader", "-v"], b"l\n").ok(),
        "0 14\n"
    );
    assert_eq!(
        keel_in(&b, &["produce", "t", "--acks", "none", "-v"], b"n\n").ok(),
        "0 -1\n"
    );
    assert_eq!(
        keel_in(&b, &["produce", "t", "--acks", "all", "-v"], b"a\n").ok(),
        "0 16\n",
        "the acks=none record was written too"
    );

    // Partitions: explicit, by key, all of them when consuming.
    keel(&b, &["topic", "create", "p3", "--partitions", "3"]).ok();
    assert_eq!(
        keel_in(&b, &["produce", "p3", "--partition", "2", "-v"], b"x\ny\n").ok(),
        "2 0\n2 1\n"
    );
    let out = keel_in(
        &b,
        &["produce", "p3", "--key-separator", ":", "-v"],
        b"same:1\nsame:2\nsame:3\n",
    );
    let parts: Vec<&str> = out
        .ok()
        .lines()
        .map(|l| l.split(' ').next().expect("partition"))
        .collect();
    assert_eq!(parts.len(), 3);
    assert!(parts.iter().all(|p| *p == parts[0]), "{parts:?}");
    let out = keel(
        &b,
        &[
            "consume",
            "p3",
            "--partition",
            "2",
            "--from-beginning",
            "-n",
            "2",
            "--format",
            "%p:%v",
        ],
    );
    assert_eq!(out.ok(), "2:x\n2:y\n");
    let out = keel(
        &b,
        &[
            "consume",
            "p3",
            "--from-beginning",
            "-n",
            "5",
            "--format",
            "%v",
        ],
    );
    let mut values: Vec<&str> = out.ok().lines().collect();
    values.sort_unstable();
    assert_eq!(values, ["1", "2", "3", "x", "y"]);
    let err = keel_in(&b, &["produce", "p3", "--partition", "3"], b"x\n");
    assert!(err.fails().contains("partition 3"), "{err:?}");
    let err = keel(&b, &["consume", "p3", "--partition", "7", "-n", "1"]);
    assert!(err.fails().contains("partition 7"), "{err:?}");

    // Unknown topics.
    assert_eq!(
        keel_in(&b, &["produce", "ghost"], b"x\n").fails(),
        r#"keel: topic "ghost" not found"#
    );
    assert_eq!(
        keel(&b, &["consume", "ghost", "-n", "1"]).fails(),
        r#"keel: topic "ghost" not found"#
    );

    // A record the broker refuses fails the command, naming its line.
    keel(
        &b,
        &[
            "topic",
            "create",
            "small",
            "--config",
            "max.message.bytes=200",
        ],
    )
    .ok();
    let mut input = vec![b'x'; 1000];
    input.push(b'\n');
    let out = keel_in(&b, &["produce", "small", "-v"], &input);
    assert_eq!(out.stdout, "", "{out:?}");
    let line = out.fails();
    assert!(line.contains("line 1"), "{out:?}");
    assert!(line.contains("max.message.bytes"), "{out:?}");
}

#[test]
fn verbose_produce_reports_each_record_as_it_is_acknowledged() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let b = broker(&tmp);
    keel(&b, &["topic", "create", "live"]).ok();
    let mut p = Live::start(&b, &["produce", "live", "-v"]);
    // Each acknowledgement arrives while stdin is still open.
    for i in 0..3 {
        p.write(&format!("record {i}\n"));
        assert_eq!(p.next_line("an acknowledgement"), format!("0 {i}"));
    }
    p.write("a\nb\n");
    assert_eq!(p.next_line("a"), "0 3");
    assert_eq!(p.next_line("b"), "0 4");
    assert_eq!(p.finish(), Some(0));

    // Bulk input goes through the batching producer and comes back in input order.
    let n = 20_000;
    let input: String = (0..n).map(|i| format!("{i}\n")).collect();
    let out = keel_in(&b, &["produce", "live", "-v"], input.as_bytes());
    let offsets: Vec<u64> = out
        .ok()
        .lines()
        .map(|l| {
            let (p, o) = l.split_once(' ').expect("PARTITION OFFSET");
            assert_eq!(p, "0");
            o.parse().expect("offset")
        })
        .collect();
    assert_eq!(offsets, (5..5 + n).collect::<Vec<u64>>());
    let out = keel(
        &b,
        &["consume", "live", "--offset", "5", "-n", &n.to_string()],
    );
    assert_eq!(out.ok(), input);
}

#[test]
fn consume_follows_the_topic() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let b = broker(&tmp);
    keel(&b, &["topic", "create", "f", "--partitions", "2"]).ok();
    keel_in(&b, &["produce", "f", "--partition", "0"], b"old1\nold2\n").ok();

    // From the beginning, -n 4: two records now, two more later.
    let c = Live::start(&b, &["consume", "f", "--from-beginning", "-n", "4"]);
    let mut got = vec![c.next_line("old1"), c.next_line("old2")];
    keel_in(&b, &["produce", "f", "--partition", "1"], b"new1\nnew2\n").ok();
    got.push(c.next_line("new1"));
    got.push(c.next_line("new2"));
    assert_eq!(got, ["old1", "old2", "new1", "new2"]);
    assert_eq!(c.finish(), Some(0));

    // By default it starts at the end: only records produced after it started show up.
    let c = Live::start(&b, &["consume", "f", "-n", "1"]);
    let deadline = Instant::now() + DEADLINE;
    let line = loop {
        if let Some(line) = c.try_line() {
            break line;
        }
        assert!(Instant::now() < deadline, "the consumer printed nothing");
        keel_in(&b, &["produce", "f"], b"late\n").ok();
    };
    assert_eq!(line, "late");
    assert_eq!(c.finish(), Some(0));

    // --timeout-ms counts from the last record, not from the start: a record produced after
    // the first ones still shows up, then the consumer ends by itself.
    let c = Live::start(
        &b,
        &[
            "consume",
            "f",
            "--partition",
            "0",
            "--from-beginning",
            "--timeout-ms",
            "8000",
        ],
    );
    assert_eq!(c.next_line("the first record"), "old1");
    keel_in(&b, &["produce", "f", "--partition", "0"], b"more\n").ok();
    let mut seen = Vec::new();
    while !seen.iter().any(|l| l == "more") {
        seen.push(c.next_line("the record produced later"));
    }
    assert_eq!(c.finish(), Some(0));

    // Deleting the topic ends a consume that follows it, with exit 1.
    let c = Live::start(&b, &["consume", "f", "--from-beginning"]);
    c.next_line("a record");
    keel(&b, &["topic", "delete", "f"]).ok();
    assert_eq!(c.finish(), Some(1));
}

#[test]
fn usage_errors_help_and_groups() {
    // Usage errors exit 2 before contacting any broker.
    for args in [
        &["topic"][..],
        &["topic", "create"],
        &["topic", "bogus"],
        &["topic", "create", "t", "--bogus"],
        &["produce"],
        &["produce", "t", "--acks", "most"],
        &["produce", "t", "--key", "k", "--key-separator", ":"],
        &["produce", "t", "--key-separator", ""],
        &["produce", "t", "--header", "novalue"],
        &["produce", "t", "--partition", "-1"],
        &["consume", "t", "--from-beginning", "--offset", "3"],
        &["consume", "t", "--from-end", "--from-timestamp", "0"],
        &["consume", "t", "--format", "%q"],
        &["consume", "t", "--format", "trailing\\"],
        &["consume", "t", "--from-timestamp", "yesterday"],
        &["consume", "t", "-n", "many"],
        &["consume", "t", "--timeout-ms", "-5"],
        &["consume", "t", "--group", "g", "--partition", "0"],
        &["consume", "t", "--group", "g", "--offset", "3"],
        &["consume", "t", "--group", "g", "--from-timestamp", "0"],
        &["consume", "t", "--instance-id", "x"],
        &["consume", "t", "--group", "g", "--strategy", "foo"],
        &["cluster"],
        &["cluster", "status", "--output", "xml"],
        &["group"],
        &["group", "describe"],
        &["group", "reset-offsets", "g", "--topic", "t"],
        &["group", "reset-offsets", "g", "--to-earliest"],
        &[
            "group",
            "reset-offsets",
            "g",
            "--topic",
            "t",
            "--to-earliest",
            "--to-latest",
        ],
        &[
            "group",
            "reset-offsets",
            "g",
            "--topic",
            "t",
            "--to-timestamp",
            "noon",
        ],
    ] {
        keel_alone(args).usage_error();
    }

    // `keel probe` (the image's health check) fails with one line when nothing answers.
    let err = keel_alone(&["probe", "127.0.0.1:1"]).fails().to_owned();
    assert!(err.contains("127.0.0.1:1"), "{err}");

    // An invalid pattern fails before any broker is contacted.
    let err = keel_alone(&["consume", "a.#x", "--group", "g"])
        .fails()
        .to_owned();
    assert!(err.contains("invalid topic pattern"), "{err}");

    // --help documents every flag and its default.
    for (args, wants) in [
        (
            &["--help"][..],
            &[
                "topic",
                "cluster",
                "produce",
                "consume",
                "group",
                "KEEL_BROKERS",
            ][..],
        ),
        (
            &["topic", "create", "--help"],
            &[
                "--partitions",
                "--replication-factor",
                "--config",
                "retention.ms",
                "--brokers",
                "[default: 127.0.0.1:9292]",
                "KEEL_BROKERS",
            ],
        ),
        (
            &["topic", "list", "--help"],
            &["--output", "[default: table]", "json"],
        ),
        (&["topic", "describe", "--help"], &["--output", "--brokers"]),
        (&["topic", "delete", "--help"], &["--brokers"]),
        (
            &["topic", "alter", "--help"],
            &["--config", "--delete-config"],
        ),
        (&["topic", "add-partitions", "--help"], &["--partitions"]),
        (&["cluster", "status", "--help"], &["--output", "--brokers"]),
        (
            &["produce", "--help"],
            &[
                "--key",
                "--partition",
                "--acks",
                "[default: all]",
                "--key-separator",
                "--header",
                "--verbose",
                "PARTITION OFFSET",
            ],
        ),
        (
            &["consume", "--help"],
            &[
                "--group",
                "--partition",
                "--from-beginning",
                "--from-end",
                "--offset",
                "--from-timestamp",
                "-n",
                "--timeout-ms",
                "--format",
                "[default: %v]",
                "%h",
                "--no-commit",
                "RFC 3339",
            ],
        ),
        (&["group", "list", "--help"], &["--output"]),
        (&["group", "describe", "--help"], &["--output"]),
        (&["group", "delete", "--help"], &["--brokers"]),
        (
            &["group", "reset-offsets", "--help"],
            &[
                "--topic",
                "--to-earliest",
                "--to-latest",
                "--to-offset",
                "--to-timestamp",
            ],
        ),
        (&["bench", "produce", "--help"], &["--topic", "--brokers"]),
    ] {
        let out = keel_alone(args);
        let text = out.ok();
        for w in wants {
            assert!(text.contains(w), "{args:?} --help lacks {w:?}:\n{text}");
        }
    }
}

#[test]
fn group_commands_against_a_broker() {
    let dir = tempfile::tempdir().expect("tempdir");
    let b = BrokerProc::start(dir.path(), 1);
    run_with(&["probe", &b.http], b"", &[], DEADLINE).ok();
    run_with(
        &["probe", &b.http, "--path", "/healthz"],
        b"",
        &[],
        DEADLINE,
    )
    .ok();
    keel(&b, &["topic", "create", "t", "--partitions", "3"]).ok();
    for p in ["0", "1", "2"] {
        let input: String = (0..10).map(|i| format!("v{p}-{i}\n")).collect();
        keel_in(&b, &["produce", "t", "--partition", p], input.as_bytes()).ok();
    }
    let out = keel(
        &b,
        &[
            "consume",
            "t",
            "--group",
            "g",
            "--from-beginning",
            "-n",
            "30",
        ],
    );
    out.ok();
    assert_eq!(out.stdout.lines().count(), 30);

    let list: serde_json::Value =
        serde_json::from_str(keel(&b, &["group", "list", "--output", "json"]).ok()).expect("json");
    assert_eq!(list["groups"][0]["group"], "g", "{list}");
    assert_eq!(list["groups"][0]["state"], "empty");
    assert_eq!(list["groups"][0]["members"], 0);

    let d: serde_json::Value =
        serde_json::from_str(keel(&b, &["group", "describe", "g", "--output", "json"]).ok())
            .expect("json");
    assert_eq!(d["group"], "g");
    assert_eq!(d["state"], "empty");
    assert_eq!(d["members"], serde_json::json!([]));
    let offsets = d["offsets"].as_array().expect("offsets");
    assert_eq!(offsets.len(), 3, "{d}");
    for o in offsets {
        assert_eq!(o["topic"], "t");
        assert_eq!(o["committed"], o["log_end_offset"], "{o}");
        assert_eq!(o["lag"], 0);
        assert!(o["member"].is_null());
    }
    let table = keel(&b, &["group", "describe", "g"]).ok().to_owned();
    assert!(table.contains("LAG") || table.contains("lag"), "{table}");

    // A live member blocks resets and deletion with a clear error.
    let live = Live::start(&b, &["consume", "t", "--group", "g"]);
    let deadline = Instant::now() + DEADLINE;
    loop {
        let d: serde_json::Value =
            serde_json::from_str(keel(&b, &["group", "describe", "g", "--output", "json"]).ok())
                .expect("json");
        if d["members"].as_array().is_some_and(|m| m.len() == 1) {
            break;
        }
        assert!(Instant::now() < deadline, "the consumer never joined");
        std::thread::sleep(Duration::from_millis(100));
    }
    let err = keel(
        &b,
        &[
            "group",
            "reset-offsets",
            "g",
            "--topic",
            "t",
            "--to-earliest",
        ],
    )
    .fails()
    .to_owned();
    assert!(err.contains("active members"), "{err}");
    let err = keel(&b, &["group", "delete", "g"]).fails().to_owned();
    assert!(err.contains("active members"), "{err}");
    assert_eq!(
        live.terminate(),
        Some(0),
        "SIGTERM ends a group consumer cleanly"
    );

    // Resets, also backwards, once the group is empty.
    keel(
        &b,
        &[
            "group",
            "reset-offsets",
            "g",
            "--topic",
            "t",
            "--to-earliest",
        ],
    )
    .ok();
    let lag = |b: &BrokerProc| -> u64 {
        let d: serde_json::Value =
            serde_json::from_str(keel(b, &["group", "describe", "g", "--output", "json"]).ok())
                .expect("json");
        d["offsets"]
            .as_array()
            .expect("offsets")
            .iter()
            .map(|o| o["lag"].as_u64().expect("lag"))
            .sum()
    };
    assert_eq!(lag(&b), 30);
    keel(
        &b,
        &[
            "group",
            "reset-offsets",
            "g",
            "--topic",
            "t",
            "--to-offset",
            "5",
        ],
    )
    .ok();
    assert_eq!(lag(&b), 15, "5 behind on each of 3 partitions");
    keel(
        &b,
        &["group", "reset-offsets", "g", "--topic", "t", "--to-latest"],
    )
    .ok();
    assert_eq!(lag(&b), 0);
    keel(
        &b,
        &[
            "group",
            "reset-offsets",
            "g",
            "--topic",
            "t",
            "--to-timestamp",
            "0",
        ],
    )
    .ok();
    assert_eq!(lag(&b), 30, "every record is at or after time 0");
    keel(
        &b,
        &[
            "group",
            "reset-offsets",
            "g",
            "--topic",
            "t",
            "--to-timestamp",
            "2999-01-01T00:00:00Z",
        ],
    )
    .ok();
    assert_eq!(lag(&b), 0, "no record that late: the end");
    // Re-reading after a reset to earliest gets everything again.
    keel(
        &b,
        &[
            "group",
            "reset-offsets",
            "g",
            "--topic",
            "t",
            "--to-earliest",
        ],
    )
    .ok();
    let out = keel(&b, &["consume", "t", "--group", "g", "-n", "30"]);
    assert_eq!(out.ok().lines().count(), 30);

    keel(&b, &["group", "delete", "g"]).ok();
    let err = keel(&b, &["group", "describe", "g"]).fails().to_owned();
    assert!(err.contains("unknown group"), "{err}");
    let err = keel(&b, &["group", "delete", "nope"]).fails().to_owned();
    assert!(err.contains("unknown group"), "{err}");
}
