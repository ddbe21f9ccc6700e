//! `keel up`: starts its brokers, serves, stops them on SIGTERM, reuses the data.

use std::process::{Command, Stdio};
use std::time::Duration;

use keel_tests::broker::{free_port, http_get, keel_bin, wait_until};

fn base_port() -> u16 {
    // A base whose gRPC and metrics ports (base, base+100) are both free right now.
    loop {
        let p = free_port();
        if p < 60_000
            && std::net::TcpListener::bind(("127.0.0.1", p + 100)).is_ok()
            && std::net::TcpListener::bind(("127.0.0.1", p)).is_ok()
        {
            return p;
        }
    }
}

#[test]
fn up_serves_and_stops_cleanly_and_reuses_its_data() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("data");
    let base = base_port();
    for round in 0..2 {
        let mut up = Command::new(keel_bin())
            .args(["up", "--base-port", &base.to_string()])
            .arg("--data-dir")
            .arg(&data)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn keel up");
        let metrics = format!("127.0.0.1:{}", base + 100);
        wait_until("keel up to be ready", Duration::from_secs(30), || {
            http_get(&metrics, "/readyz").is_some_and(|(c, _)| c == 200)
        });
        let brokers = format!("127.0.0.1:{base}");
        if round == 0 {
            let out = Command::new(keel_bin())
                .args([
                    "bench",
                    "produce",
                    "--topic",
                    "up-test",
                    "--records",
                    "2000",
                    "--batch-size",
                    "100",
                ])
                .env("KEEL_BROKERS", &brokers)
                .output()
                .expect("bench");
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        // The data is there in both rounds.
        let out = Command::new(keel_bin())
            .args([
                "bench",
                "consume",
                "--topic",
                "up-test",
                "--records",
                "2000",
                "--json",
            ])
            .env("KEEL_BROKERS", &brokers)
            .output()
            .expect("bench consume");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(String::from_utf8_lossy(&out.stdout).contains("\"records\":2000"));
        let _ = Command::new("kill")
            .args(["-TERM", &up.id().to_string()])
            .status();
        let deadline = std::time::Instant::now() + Duration::from_secs(40);
        let status = loop {
            if let Some(s) = up.try_wait().expect("wait") {
                break s;
            }
            assert!(std::time::Instant::now() < deadline, "keel up did not stop");
            std::thread::sleep(Duration::from_millis(20));
        };
        assert!(status.success(), "keel up exit status {status}");
        assert!(data.join("broker-1").join("metadata").is_dir());
    }
}
