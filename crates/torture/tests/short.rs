//! The short, seeded form of every torture scenario, as CI runs it. The long form:
//! `cargo run --release -p torture -- --long` (see RELIABILITY.md).

use std::path::Path;

use torture::Env;
use torture::scenario::Figures;

const SEED: u64 = 20261123;

fn env() -> Env {
    let op = Path::new(env!("CARGO_BIN_EXE_torture-op"));
    let env = Env::beside(op.parent().unwrap(), false, SEED);
    if !env.jobspool.exists() {
        // `cargo test -p torture` alone does not build the jobspool command.
        let st = std::process::Command::new(env!("CARGO"))
            .args(["build", "-q", "-p", "jobspool-cli"])
            .status()
            .unwrap();
        assert!(st.success(), "cannot build the jobspool command");
    }
    env
}

fn assert_passed(f: Figures) {
    println!("{}", f.render());
    if let Some(why) = &f.skipped {
        println!("SKIPPED {}: {why}", f.name);
        assert!(
            std::env::var_os("TORTURE_REQUIRE_ALL").is_none(),
            "{} was skipped but TORTURE_REQUIRE_ALL is set: {why}",
            f.name
        );
    }
    assert!(
        f.passed(),
        "{} found {} violations:\n{}",
        f.name,
        f.violations.len(),
        f.render()
    );
}

fn run(name: &str) {
    let env = env();
    let (_, f) = torture::scenario::all()
        .into_iter()
        .find(|(n, _)| *n == name)
        .expect("a scenario of that name");
    assert_passed(f(&env));
}

#[test]
fn kill_at_every_syscall() {
    run("kill-at-every-syscall");
}

#[test]
fn io_errors() {
    run("io-errors");
}

#[test]
fn corruption() {
    run("corruption");
}

#[test]
fn foreign_entries() {
    run("foreign-entries");
}

#[test]
fn hostile_ids_and_commands() {
    run("hostile-ids-and-commands");
}

#[test]
fn poison_jobs() {
    run("poison-jobs");
}

#[test]
fn chaos() {
    run("chaos");
}

#[test]
fn redis_chaos() {
    run("redis-chaos");
}

#[test]
fn full_disk() {
    run("full-disk");
}

#[test]
fn multi_user() {
    run("multi-user");
}

#[test]
fn power_cut() {
    run("power-cut");
}
