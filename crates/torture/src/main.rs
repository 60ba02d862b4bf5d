//! `torture`: runs the torture scenarios and prints their figures.
//!
//! ```sh
//! cargo build --release --workspace && ./target/release/torture --long          # everything, long form
//! ./target/release/torture --scenario chaos --seed 7 --duration 5m               # one scenario
//! ```

use std::time::Duration;

use torture::Env;
use torture::scenario;

fn main() {
    let mut long = false;
    let mut only: Vec<String> = Vec::new();
    let mut seed: u64 = 1;
    let mut duration: Option<Duration> = None;
    let mut json = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--long" => long = true,
            "--scenario" => only.push(args.next().expect("--scenario NAME")),
            "--seed" => seed = args.next().and_then(|s| s.parse().ok()).expect("--seed N"),
            "--duration" => {
                duration = Some(
                    jobspool::config::parse_duration(&args.next().expect("--duration D")).expect("a duration like 5m"),
                )
            }
            "--json" => json = Some(args.next().expect("--json FILE")),
            "--check" => {
                // Re-checks a kept history (TORTURE_KEEP=DIR keeps them); the queue's final state
                // is not known here, so jobs dead at the end would count as lost.
                let path = args.next().expect("--check HISTORY");
                let (h, torn) = torture::history::read(std::path::Path::new(&path)).expect("read history");
                let r = torture::checker::check(&h, &Default::default());
                println!("{} (torn lines: {torn})", r.summary());
                for p in &r.problems {
                    println!("  {p}");
                }
                std::process::exit(if r.is_ok() { 0 } else { 1 });
            }
            "--list" => {
                for (name, _) in scenario::all() {
                    println!("{name}");
                }
                return;
            }
            _ => {
                eprintln!(
                    "usage: torture [--long] [--scenario NAME]... [--seed N] [--duration 5m] [--json FILE] [--list] [--check HISTORY]"
                );
                std::process::exit(2);
            }
        }
    }
    let exe = std::env::current_exe().expect("current exe");
    let mut env = Env::beside(exe.parent().expect("exe dir"), long, seed);
    if let Some(d) = duration {
        env.duration = d;
    }
    let mut failed = false;
    let mut all = Vec::new();
    for (name, f) in scenario::all() {
        if !only.is_empty() && !only.iter().any(|o| o == name) {
            continue;
        }
        let start = std::time::Instant::now();
        let figs = f(&env);
        println!("{}time: {:.1}s\n", figs.render(), start.elapsed().as_secs_f64());
        failed |= !figs.passed();
        all.push(figs);
    }
    if let Some(path) = json {
        std::fs::write(path, serde_json::to_string_pretty(&all).expect("json")).expect("write json");
    }
    std::process::exit(if failed { 1 } else { 0 });
}
