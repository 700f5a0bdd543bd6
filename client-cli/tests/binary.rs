//! The `orgpulse` binary answers `--help`. (Being an integration test of this package also makes
//! `cargo test --workspace` build the binary before the workspace's end-to-end tests run.)
use std::process::Command;

#[test]
fn help_names_the_commands() {
    let out = Command::new(env!("CARGO_BIN_EXE_orgpulse"))
        .arg("--help")
        .output()
        .unwrap();
    assert!(out.status.success());
    let help = String::from_utf8(out.stdout).unwrap();
    for cmd in ["watch", "jobs", "notify", "online", "poll", "token"] {
        assert!(help.contains(cmd), "--help lacks {cmd}");
    }
}
