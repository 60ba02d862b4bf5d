//! Smoke run of the harness: `--quick` on a temp dir must write a table with a row for every
//! item. No timing is asserted: a slow machine never fails this test.

use std::path::PathBuf;
use std::process::Command;

#[test]
fn quick_run_writes_every_row() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("results.md");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_bench"));
    cmd.args([
        "--quick",
        "--no-build",
        "--no-strace",
        "--no-peers",
        "--no-redis",
        "--dir",
    ])
    .arg(tmp.path().join("work"))
    .arg("--out")
    .arg(&out);
    // The jobspool binary, when this test run built it (cargo test --workspace does).
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_bench")).with_file_name("jobspool");
    if bin.is_file() {
        cmd.arg("--jobspool").arg(&bin);
    }
    let run = cmd.output().unwrap();
    assert!(
        run.status.success(),
        "bench --quick failed:\n{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let table = std::fs::read_to_string(&out).unwrap();
    assert!(table.contains("## Machine"), "{table}");
    for item in ["1", "2", "3", "4", "5", "6", "7", "8", "9"] {
        assert!(
            table.lines().any(|l| l.starts_with(&format!("| {item} |"))),
            "no row for item {item}:\n{table}"
        );
    }
    // Every row of the library workloads was measured, not skipped.
    for l in table
        .lines()
        .filter(|l| l.starts_with("| 1 |") || l.starts_with("| 3 |") || l.starts_with("| 6 |"))
    {
        assert!(!l.contains("skipped"), "{l}");
    }
}
