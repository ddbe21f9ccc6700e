//! The `keel` binary's contract for what exists today.

use std::process::Command;

fn keel() -> Command {
    Command::new(env!("CARGO_BIN_EXE_keel"))
}

#[test]
fn version_and_help() {
    let out = keel().arg("--version").output().expect("run keel");
    assert!(out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.starts_with("keel "), "{stdout}");
    assert!(stdout.contains(env!("CARGO_PKG_VERSION")));

    let out = keel().arg("--help").output().expect("run keel");
    assert!(out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("up"), "{stdout}");
}

#[test]
fn usage_errors_exit_2() {
    let out = keel().arg("no-such-command").output().expect("run keel");
    assert_eq!(out.status.code(), Some(2));
    let out = keel().output().expect("run keel");
    assert_eq!(out.status.code(), Some(2));
}
