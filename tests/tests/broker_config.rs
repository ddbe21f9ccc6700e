//! `keel broker` configuration from a TOML file and `KEEL_*` variables, with flags winning, and
//! JSON logs.

use std::process::{Command, Stdio};
use std::time::Duration;

use keel_tests::broker::{free_port, http_get, keel_bin, wait_until};

#[test]
fn toml_file_env_and_flags_layer_in_that_order() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (grpc, http, http_flag) = (free_port(), free_port(), free_port());
    let cfg = tmp.path().join("keel.toml");
    std::fs::write(
        &cfg,
        format!(
            "id = 7\ndata_dir = {:?}\nlisten = \"127.0.0.1:{grpc}\"\nmetrics_listen = \"127.0.0.1:{http}\"\n",
            tmp.path().join("data")
        ),
    )
    .expect("write config");
    let log = tmp.path().join("broker.log");
    let mut child = Command::new(keel_bin())
        .args(["broker", "--config"])
        .arg(&cfg)
        // The flag beats the file.
        .args(["--metrics-listen", &format!("127.0.0.1:{http_flag}")])
        // The environment beats the file too.
        .env("KEEL_ADVERTISE", "keel-7.example:9292")
        .env("KEEL_LOG_JSON", "true")
        .stdin(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log"))
        .spawn()
        .expect("spawn");
    let addr = format!("127.0.0.1:{http_flag}");
    wait_until("the broker to be ready", Duration::from_secs(30), || {
        http_get(&addr, "/readyz").is_some_and(|(c, _)| c == 200)
    });
    assert!(
        http_get(&format!("127.0.0.1:{http}"), "/readyz").is_none(),
        "the file's metrics address was overridden"
    );
    let out = Command::new(keel_bin())
        .args([
            "cluster",
            "status",
            "--output",
            "json",
            "--brokers",
            &format!("127.0.0.1:{grpc}"),
        ])
        .output()
        .expect("cluster status");
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(status["metadata_leader"], 7);
    assert_eq!(status["brokers"][0]["address"], "keel-7.example:9292");
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let exit = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        assert!(std::time::Instant::now() < deadline, "broker did not stop");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(exit.success());
    let logs = std::fs::read_to_string(&log).expect("read log");
    let first = logs.lines().next().expect("a log line");
    let parsed: serde_json::Value = serde_json::from_str(first).expect("JSON log lines");
    assert!(parsed.get("level").is_some(), "{first}");
}

#[test]
fn bad_configuration_is_a_clear_error() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let out = Command::new(keel_bin())
        .args(["broker", "--data-dir"])
        .arg(tmp.path())
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--id is required"));
    let cfg = tmp.path().join("bad.toml");
    std::fs::write(&cfg, "id = 1\nno_such_key = 3\n").expect("write");
    let out = Command::new(keel_bin())
        .args(["broker", "--config"])
        .arg(&cfg)
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no_such_key"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
