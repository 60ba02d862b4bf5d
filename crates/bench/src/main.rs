//! jobspool's benchmark harness (issue 5).
//!
//! Every workload is reported as a ratio against a reference measured in the same run, right
//! before it, on the same file system: the machine is shared and noisy, so absolute numbers from
//! different runs do not compare, ratios from one run do. Nothing here fails because a machine is
//! slow: a missed target is a row that says so.
//!
//! ```text
//! cargo build --release --workspace && target/release/bench            # default sizes
//! target/release/bench --quick                                          # smoke run, seconds
//! target/release/bench --full                                           # 1M backlog, peers, Redis
//! ```
//!
//! See `BENCHMARKS.md` at the root of the repository for the options and the latest results.

mod peers;
mod phys;
mod procfs;
mod redis;
mod report;
mod work;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use report::{PeerRow, Row, Verdict, rate};
use work::R;

const USAGE: &str = "\
usage: bench [--quick | --full] [options]

  --quick             tiny sizes, a smoke run of a few seconds (CI)
  --full              1M-job backlog, Redis store and peers included
  --dir DIR           work directory (default: target/bench-work next to this binary); queues
                      and the physical-limit references both live here, on the same file system
  --out FILE          results table (markdown; default: target/bench-results.md)
  --jobspool PATH     the jobspool binary (default: next to this binary; built if missing)
  --no-build          never run cargo to build the jobspool binary
  --only LIST         comma-separated items to run: 1..9, peers (default: all of the mode);
                      with --redis, items 1..8 also run on Redis (rows k/9), 9 runs all of them there
  --backlog LIST      backlog sizes for item 5 (default 1000,100000; --full adds 1000000)
  --redis / --no-redis  also run the workloads on a Redis server the harness starts
                      (redis-server on PATH; appendfsync always)
  --peers / --no-peers
  --slow-peers        also pueue and RQ with a forking worker (minutes)
  --peers-dir DIR     the peer scripts (default ../shared/bench/peers, then /work/shared/bench/peers)
  --peer-n N          jobs per peer run (default 1000)
  --peer-timeout S    limit per peer script (default 300)
  --storm-n N         jobs in item 8's push storm (default 50000)
  --drain-k N         claims + acks timed per backlog in item 5 (default 500; at most half the backlog)
  --no-strace         do not count ready/ listings under strace in item 8
";

struct Cfg {
    quick: bool,
    dir: PathBuf,
    out: PathBuf,
    bin: Option<PathBuf>,
    only: Option<Vec<String>>,
    backlogs: Vec<usize>,
    redis: bool,
    peers: bool,
    slow_peers: bool,
    peers_dir: Option<PathBuf>,
    peer_n: usize,
    peer_timeout: u64,
    strace: bool,
    // sizes
    push_n: usize,
    push_threads_n: usize,
    cli_push_n: usize,
    batch_n: usize,
    claim_n: usize,
    run_n: usize,
    drain_k: usize,
    latency_n: usize,
    idle_settle: Duration,
    idle_window: Duration,
    storm_n: usize,
    durable_ref_n: usize,
    spawn_ref_n: usize,
}

impl Cfg {
    fn wants(&self, item: &str) -> bool {
        self.only.as_ref().is_none_or(|l| l.iter().any(|x| x == item))
    }
}

fn parse_args() -> R<Cfg> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let has = |f: &str| args.iter().any(|a| a == f);
    let val = |f: &str| args.iter().position(|a| a == f).and_then(|i| args.get(i + 1)).cloned();
    if has("-h") || has("--help") {
        print!("{USAGE}");
        std::process::exit(0);
    }
    let known = [
        "--quick",
        "--full",
        "--dir",
        "--out",
        "--jobspool",
        "--no-build",
        "--only",
        "--backlog",
        "--redis",
        "--no-redis",
        "--peers",
        "--no-peers",
        "--slow-peers",
        "--peers-dir",
        "--peer-n",
        "--peer-timeout",
        "--no-strace",
        "--storm-n",
        "--drain-k",
    ];
    let takes_value = [
        "--dir",
        "--out",
        "--jobspool",
        "--only",
        "--backlog",
        "--peers-dir",
        "--peer-n",
        "--peer-timeout",
        "--storm-n",
        "--drain-k",
    ];
    let mut i = 0;
    while i < args.len() {
        if !known.contains(&args[i].as_str()) {
            return Err(format!("unknown argument {:?}\n{USAGE}", args[i]));
        }
        i += if takes_value.contains(&args[i].as_str()) { 2 } else { 1 };
    }
    let quick = has("--quick");
    let full = has("--full");
    let exe_dir = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(Path::to_path_buf))
        .unwrap_or_else(|| PathBuf::from("."));
    // target/release/bench -> target/
    let target_dir = exe_dir
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| exe_dir.clone());
    let dir = val("--dir")
        .map(PathBuf::from)
        .unwrap_or_else(|| target_dir.join("bench-work"));
    let out = val("--out")
        .map(PathBuf::from)
        .unwrap_or_else(|| target_dir.join("bench-results.md"));
    let mut bin = val("--jobspool").map(PathBuf::from);
    if bin.is_none() {
        let candidate = exe_dir.join("jobspool");
        if candidate.is_file() {
            bin = Some(candidate);
        } else if !has("--no-build") && !quick {
            eprintln!("bench: building the jobspool binary (cargo build --release -p jobspool-cli)");
            let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
            let ok = std::process::Command::new(cargo)
                .args(["build", "--release", "-p", "jobspool-cli"])
                .status()
                .is_ok_and(|s| s.success());
            if ok && candidate.is_file() {
                bin = Some(candidate);
            }
        }
    }
    let num = |f: &str, d: usize| -> R<usize> {
        val(f).map_or(Ok(d), |v| v.parse().map_err(|_| format!("{f}: not a number: {v}")))
    };
    let backlogs = match val("--backlog") {
        Some(l) => l
            .split(',')
            .map(|x| x.trim().parse::<usize>().map_err(|_| format!("--backlog: {x}")))
            .collect::<R<Vec<_>>>()?,
        None if quick => vec![100, 1000],
        None if full => vec![1000, 100_000, 1_000_000],
        None => vec![1000, 100_000],
    };
    let pick = |q: usize, d: usize| if quick { q } else { d };
    Ok(Cfg {
        quick,
        dir,
        out,
        bin,
        only: val("--only").map(|l| l.split(',').map(|s| s.trim().to_string()).collect()),
        backlogs,
        redis: (full || has("--redis")) && !has("--no-redis"),
        peers: (full || has("--peers")) && !has("--no-peers"),
        slow_peers: has("--slow-peers"),
        peers_dir: val("--peers-dir").map(PathBuf::from).or_else(|| {
            ["../shared/bench/peers", "/work/shared/bench/peers"]
                .iter()
                .map(PathBuf::from)
                .find(|p| p.join("run_all.sh").is_file())
        }),
        peer_n: num("--peer-n", 1000)?,
        peer_timeout: num("--peer-timeout", 300)? as u64,
        strace: !has("--no-strace") && !quick,
        push_n: pick(30, 1000),
        push_threads_n: pick(40, 2000),
        cli_push_n: pick(10, 300),
        batch_n: pick(200, 10_000),
        claim_n: pick(200, 10_000),
        run_n: pick(30, 2000),
        drain_k: num("--drain-k", pick(50, 500))?,
        latency_n: pick(30, 1000),
        idle_settle: Duration::from_millis(pick(300, 11_000) as u64),
        idle_window: Duration::from_millis(pick(1000, 30_000) as u64),
        storm_n: num("--storm-n", pick(200, 50_000))?,
        durable_ref_n: pick(30, 1000),
        spawn_ref_n: pick(30, 2000),
    })
}

fn skip_on_err(rows: &mut Vec<Row>, item: &str, what: &str, r: R<Vec<Row>>) {
    match r {
        Ok(mut v) => rows.append(&mut v),
        Err(e) => {
            eprintln!("bench: {what}: {e}");
            rows.push(Row::skipped(item, what, format!("failed: {e}")));
        }
    }
}

static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();

fn progress(what: &str) {
    let t = START.get_or_init(Instant::now).elapsed().as_secs_f64();
    eprintln!("bench: [{t:6.1} s] {what}");
}

fn ref_str(what: &str, v: f64) -> String {
    format!("{what} {}/s", rate(v))
}

/// A reference measured just before and just after its workload: the mean, and how it reads.
/// The two differ by the machine's drift (other work, write-back) during the workload.
fn bracket(what: &str, before: f64, after: f64) -> (f64, String) {
    let mean = (before + after) / 2.0;
    (
        mean,
        format!(
            "{what} {}/s (before {}, after {})",
            rate(mean),
            rate(before),
            rate(after)
        ),
    )
}

fn io<T>(r: std::io::Result<T>) -> R<T> {
    r.map_err(|e| e.to_string())
}

/// Items 1 and 2 for one store (`kind` = "dir" or "redis").
fn pushes(cfg: &Cfg, kind: &str, target: &dyn Fn(&str) -> String, item_suffix: &str) -> Vec<Row> {
    let phys = cfg.dir.join("phys");
    let mut rows = Vec::new();
    let i1 = format!("1{item_suffix}");
    let i2 = format!("2{item_suffix}");
    if cfg.wants("1") || cfg.wants(&i1) {
        progress(&format!("{kind}: durable push, one job per call"));
        skip_on_err(
            &mut rows,
            &i1,
            &format!("{kind}: durable push, library, 1 job/call"),
            (|| {
                let r0 = io(phys::durable_create(&phys, cfg.durable_ref_n))?;
                let v = work::push_one(&target("push1"), cfg.push_n)?;
                let r1 = io(phys::durable_create(&phys, cfg.durable_ref_n))?;
                let (r, rs) = bracket("write+fsync+rename+dir fsync", r0, r1);
                Ok(vec![
                    Row::new(
                        &i1,
                        format!("{kind}: durable push, library, 1 job/call (N={})", cfg.push_n),
                    )
                    .value(format!("{}/s", rate(v)))
                    .reference(rs.clone())
                    .ratio(v / r, Some(1.0))
                    .note("target: at the limit (group commit could exceed it)"),
                ])
            })(),
        );
        if kind == "dir" {
            const THREADS: usize = 8;
            let n = THREADS * (cfg.push_threads_n / THREADS);
            progress(&format!("{kind}: durable push, {THREADS} threads, one job per call"));
            skip_on_err(
                &mut rows,
                &i1,
                &format!("{kind}: durable push, library, {THREADS} threads"),
                (|| {
                    let r0 = io(phys::durable_create_threads(&phys, n, THREADS))?;
                    let v = work::push_threads(&target("push8"), n, THREADS)?;
                    let r1 = io(phys::durable_create_threads(&phys, n, THREADS))?;
                    let (r, rs) = bracket(&format!("{THREADS} threads: write+fsync+rename+dir fsync"), r0, r1);
                    Ok(vec![
                        Row::new(
                            &i1,
                            format!("{kind}: durable push, library, {THREADS} threads, 1 job/call, one store handle (N={n})"),
                        )
                        .value(format!("{}/s", rate(v)))
                        .reference(rs)
                        .ratio(v / r, Some(1.0))
                        .note("target: at the limit of as many independent durable producers; with group commit the pushes waiting on one fsync of ready/ share the next"),
                    ])
                })(),
            );
        }
        if kind == "dir" {
            match &cfg.bin {
                None => rows.push(Row::skipped(&i1, "durable push, CLI", "jobspool binary not found")),
                Some(bin) => skip_on_err(
                    &mut rows,
                    &i1,
                    "durable push, CLI",
                    (|| {
                        let r0 = io(phys::durable_create(&phys, cfg.durable_ref_n))?;
                        let s = io(phys::spawn_true(cfg.spawn_ref_n / 4, 1))?;
                        let v = work::cli_push(bin, &target("pushcli"), cfg.cli_push_n)?;
                        let r1 = io(phys::durable_create(&phys, cfg.durable_ref_n))?;
                        let (r, rs) = bracket("write+fsync+rename+dir fsync", r0, r1);
                        let bound = 1.0 / (1.0 / r + 1.0 / s);
                        Ok(vec![
                        Row::new(&i1, format!("durable push, CLI, 1 process/job (N={})", cfg.cli_push_n))
                            .value(format!("{}/s", rate(v)))
                            .reference(rs.clone())
                            .ratio(v / r, None)
                            .note(format!(
                                "includes a process start per job: spawn of `true` {}/s, so spawn+durable create bounds it at {}/s ({:.2} of that)",
                                rate(s),
                                rate(bound),
                                v / bound
                            )),
                    ])
                    })(),
                ),
            }
        }
    }
    if cfg.wants("2") || cfg.wants(&i2) {
        progress(&format!("{kind}: batch push"));
        skip_on_err(
            &mut rows,
            &i2,
            &format!("{kind}: batch push, library"),
            (|| {
                let r0 = io(phys::create_rename(&phys, cfg.batch_n))?;
                let v = work::push_batch(&target("batch"), cfg.batch_n)?;
                let r1 = io(phys::create_rename(&phys, cfg.batch_n))?;
                let (r, rs) = bracket("create+rename, no fsync", r0, r1);
                Ok(vec![
                    Row::new(
                        &i2,
                        format!("{kind}: batch push, library, one push_batch (N={})", cfg.batch_n),
                    )
                    .value(format!("{}/s", rate(v)))
                    .reference(rs.clone())
                    .ratio(v / r, None)
                    .note("durable (one syncfs + one dir fsync per batch); the reference is not durable"),
                ])
            })(),
        );
        if kind == "dir" {
            match &cfg.bin {
                None => rows.push(Row::skipped(&i2, "batch push, CLI", "jobspool binary not found")),
                Some(bin) => skip_on_err(
                    &mut rows,
                    &i2,
                    "batch push, CLI",
                    (|| {
                        let r0 = io(phys::create_rename(&phys, cfg.batch_n))?;
                        let v = work::cli_push_batch(bin, &target("batchcli"), cfg.batch_n)?;
                        let r1 = io(phys::create_rename(&phys, cfg.batch_n))?;
                        let (r, rs) = bracket("create+rename, no fsync", r0, r1);
                        Ok(vec![
                            Row::new(&i2, format!("batch push, CLI `push --batch` (N={})", cfg.batch_n))
                                .value(format!("{}/s", rate(v)))
                                .reference(rs.clone())
                                .ratio(v / r, None)
                                .note("one process for the whole batch, included"),
                        ])
                    })(),
                ),
            }
        }
    }
    rows
}

/// Item 3 for one store.
fn claims(cfg: &Cfg, kind: &str, target: &dyn Fn(&str) -> String, item: &str) -> Vec<Row> {
    let phys = cfg.dir.join("phys");
    let mut rows = Vec::new();
    for threads in [1, 2] {
        progress(&format!("{kind}: claim + ack, {threads} thread(s)"));
        skip_on_err(
            &mut rows,
            item,
            &format!("{kind}: claim + ack, {threads} thread(s)"),
            (|| {
                let t = target(&format!("claim{threads}"));
                work::fill(&*work::open(&t)?, cfg.claim_n)?;
                let r0 = io(phys::rename(&phys, cfg.claim_n))?;
                let (n, v) = work::claim_ack(&t, threads)?;
                let r1 = io(phys::rename(&phys, cfg.claim_n))?;
                let (r, rs) = bracket("plain rename", r0, r1);
                let floor = io(phys::rename_read_unlink(&phys, cfg.claim_n))?;
                if n != cfg.claim_n as u64 {
                    return Err(format!("claimed {n} of {}", cfg.claim_n));
                }
                Ok(vec![
                    Row::new(
                        item,
                        format!("{kind}: claim + ack, library, no-op, {threads} thread(s) (N={n})"),
                    )
                    .value(format!("{}/s", rate(v)))
                    .reference(rs)
                    .ratio(v / r, None)
                    .note(format!(
                        "a claim is a rename + shared flock + read of the body, an ack an unlink; those calls alone (rename+open+read+unlink loop, 1 thread): {}/s, so {:.2} of that",
                        rate(floor),
                        v / floor
                    )),
                ])
            })(),
        );
    }
    rows
}

/// The store a runner workload (items 4, 5, 7, 8) runs on: a queue directory under the work
/// directory, or a queue on the harness's Redis server (its port).
#[derive(Clone, Copy)]
enum On {
    Dir,
    Redis(u16),
}

impl On {
    /// A fresh queue called `name`, as `jobspool` takes it. `db` is the Redis database (a backlog
    /// gets its own, flushed afterwards).
    fn target(self, cfg: &Cfg, name: &str, db: u32) -> String {
        match self {
            On::Dir => work::scratch(&cfg.dir, name).to_string_lossy().into_owned(),
            On::Redis(port) => format!("redis://127.0.0.1:{port}/{db}?queue={name}"),
        }
    }

    /// The queue directory of `target`, for the directory store.
    fn dir(self, target: &str) -> Option<PathBuf> {
        matches!(self, On::Dir).then(|| PathBuf::from(target))
    }

    /// A file of the harness's own (runner logs, traces) for the queue `name`.
    fn file(self, cfg: &Cfg, name: &str) -> PathBuf {
        match self {
            On::Dir => cfg.dir.join(name),
            On::Redis(_) => cfg.dir.join(format!("redis-{name}")),
        }
    }

    /// The row's item: `4`, or `4/9` for Redis (item 9 asks for the same workloads on Redis).
    fn item(self, k: &str) -> String {
        match self {
            On::Dir => k.to_string(),
            On::Redis(_) => format!("{k}/9"),
        }
    }

    /// Prefix of the row's workload.
    fn label(self) -> &'static str {
        match self {
            On::Dir => "",
            On::Redis(_) => "redis: ",
        }
    }
}

fn runs(cfg: &Cfg, bin: &Path, on: On) -> Vec<Row> {
    let mut rows = Vec::new();
    let (item, label) = (on.item("4"), on.label());
    for slots in [1, 2] {
        progress(&format!("{label}jobspool run --drain -j {slots} -- true"));
        skip_on_err(
            &mut rows,
            &item,
            &format!("{label}jobspool run -j {slots}"),
            (|| {
                let name = format!("run{slots}");
                let q = on.target(cfg, &name, 0);
                let r0 = io(phys::spawn_true(cfg.spawn_ref_n, slots))?;
                let v = work::cli_run_drain(bin, &q, cfg.run_n, slots, &on.file(cfg, &format!("{name}.log")))?;
                let r1 = io(phys::spawn_true(cfg.spawn_ref_n, slots))?;
                let (r, rs) = bracket(&format!("fork+exec+wait `true`, {slots} thread(s)"), r0, r1);
                Ok(vec![
                    Row::new(
                        &item,
                        format!("{label}`jobspool run --drain -j {slots} -- true` (N={})", cfg.run_n),
                    )
                    .value(format!("{}/s", rate(v)))
                    .reference(rs)
                    .ratio(v / r, Some(0.8))
                    .note("wall clock from runner start to exit, startup included"),
                ])
            })(),
        );
    }
    rows
}

fn backlogs(cfg: &Cfg, on: On) -> Vec<Row> {
    let mut rows = Vec::new();
    let (item, label) = (on.item("5"), on.label());
    let mut results: Vec<work::Backlog> = Vec::new();
    for &b in &cfg.backlogs {
        progress(&format!("{label}backlog of {b}"));
        let name = format!("backlog{b}");
        let q = on.target(cfg, &name, 1);
        let server = match on {
            On::Dir => None,
            On::Redis(port) => Some(redis::Probe(port)),
        };
        match work::backlog(
            cfg.bin.as_deref(),
            &q,
            on.dir(&q).as_deref(),
            &on.file(cfg, &format!("{name}.runner.log")),
            b,
            cfg.drain_k,
            server.as_ref().map(|s| s as &dyn work::Server),
        ) {
            Ok(r) => results.push(r),
            Err(e) => rows.push(Row::skipped(
                &item,
                format!("{label}backlog {b}"),
                format!("failed: {e}"),
            )),
        }
        progress(&format!("{label}removing backlog of {b}"));
        match on {
            On::Dir => {
                let _ = std::fs::remove_dir_all(&q);
            }
            On::Redis(port) => {
                if let Err(e) = redis::command(port, 1, &["FLUSHDB"]) {
                    eprintln!("bench: flushing the backlog's database: {e}");
                }
            }
        }
    }
    let base = results.first().map(|r| (r.ready, r.rate));
    for r in &results {
        let mut row = Row::new(
            &item,
            format!(
                "{label}drain rate, {} ready (claim+ack of {}, 1 thread)",
                r.ready, r.claimed
            ),
        )
        .value(format!("{}/s", rate(r.rate)));
        if let Some((n0, v0)) = base {
            row = row.reference(format!("same at {n0} ready: {}/s", rate(v0)));
            let is_largest = r.ready == *cfg.backlogs.iter().max().unwrap_or(&0) && r.ready != n0;
            row = row.ratio(r.rate / v0, if is_largest { Some(0.8) } else { None });
        }
        let first = match on {
            On::Dir => "first claim (lists ready/ once)",
            On::Redis(_) => "first claim",
        };
        let mut note = format!(
            "{first} {:.1} ms; filling took {:.1} s; library index +{} MB RSS",
            r.first_claim_secs * 1e3,
            r.fill_secs,
            r.lib_rss_kb.max(0) / 1024
        );
        if let Some(bytes) = r.server_bytes {
            note = note.replace("library index", "library");
            note.push_str(&format!(
                "; server memory +{:.1} MB for the backlog ({} bytes/job)",
                bytes as f64 / 1048576.0,
                bytes / r.ready.max(1) as i64
            ));
        }
        if let Some(us) = r.server_us_per_call {
            note.push_str(&format!(
                "; server time per claim or ack script {us:.1} µs (INFO commandstats, evalsha usec_per_call: no round trip, no fsync)"
            ));
        }
        row = row.note(note);
        rows.push(row);
        let mem = Row::new(&item, format!("{label}runner peak RSS, {} ready", r.ready));
        rows.push(match r.runner_hwm_kb {
            Some(kb) => {
                let mb = kb as f64 / 1024.0;
                let mut m = mem.value(format!("{mb:.1} MB")).note(r.runner_note.clone());
                if r.ready >= 1_000_000 {
                    m = m.target("< 100 MB", mb < 100.0);
                }
                m
            }
            None => Row::skipped(
                &item,
                format!("{label}runner peak RSS, {} ready", r.ready),
                r.runner_note.clone(),
            ),
        });
    }
    rows
}

fn latency_rows(kind: &str, target: &str, n: usize, item: &str) -> R<Vec<Row>> {
    let l = work::latency(target, n)?;
    Ok(vec![
        Row::new(
            item,
            format!("{kind}: wake-up latency p50, push returned → handler start (n={})", l.n),
        )
        .value(format!("{:.2} ms", l.p50))
        .target("< 2 ms", l.p50 < 2.0)
        .note(format!("from the push call: p50 {:.2} ms", l.p50_from_call)),
        Row::new(item, format!("{kind}: wake-up latency p99 (n={})", l.n))
            .value(format!("{:.2} ms", l.p99))
            .target("< 20 ms", l.p99 < 20.0)
            .note(format!(
                "max {:.2} ms; from the push call: p99 {:.2} ms",
                l.max, l.p99_from_call
            )),
    ])
}

/// "evalsha claim 12, evalsha ack 10": requests by name, most first.
fn by_name(counts: &[(String, u64)]) -> String {
    counts
        .iter()
        .map(|(k, n)| format!("{k} {n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn idle_rows(cfg: &Cfg, bin: &Path, on: On) -> R<Vec<Row>> {
    let (item, label) = (on.item("7"), on.label());
    let q = on.target(cfg, "idle", 0);
    let log = on.file(cfg, "idle.runner.log");
    // On Redis the runner talks to the server through a counting proxy: what it sends while
    // idle is the Redis side of "no polling".
    let proxy = match on {
        On::Dir => None,
        On::Redis(port) => Some(redis::CountingProxy::start(port)?),
    };
    let runner_q = match (&proxy, on) {
        (Some(p), On::Redis(_)) => format!("redis://127.0.0.1:{}/0?queue=idle", p.port),
        _ => q.clone(),
    };
    let counter = proxy.as_ref().map(|p| move || p.counts());
    let i = work::idle(
        bin,
        &q,
        &runner_q,
        &log,
        cfg.idle_settle,
        cfg.idle_window,
        counter.as_ref().map(|f| f as &dyn Fn() -> _),
    )?;
    let mut rows = vec![
        Row::new(
            &item,
            format!("{label}idle runner, {:.0} s: wake-up bursts", i.window.as_secs_f64()),
        )
        .value(format!("{} bursts, {} context switches", i.episodes, i.switches))
        .reference(format!("{} heartbeat ticks due", i.ticks))
        .target("≤ heartbeat ticks (+1 for phase)", i.episodes <= i.ticks + 1)
        .note(format!(
            "sampled every 50 ms over {} process(es), {} threads (runner + guardian); bursts (s into the window: switches): {}",
            i.processes,
            i.threads,
            i.bursts
                .iter()
                .map(|(at, n)| format!("{at:.1}: {n}"))
                .collect::<Vec<_>>()
                .join(", ")
        )),
        Row::new(&item, format!("{label}idle runner, {:.0} s: CPU", i.window.as_secs_f64()))
            .value(format!("{:.0} ms", i.cpu_ms))
            .note("utime+stime from /proc, 10 ms resolution"),
    ];
    if let Some(req) = &i.requests {
        let total: u64 = req.iter().map(|(_, n)| n).sum();
        rows.push(
            Row::new(
                &item,
                format!(
                    "{label}idle runner, {:.0} s: requests to the server",
                    i.window.as_secs_f64()
                ),
            )
            .value(format!("{total} requests"))
            .reference(format!("{} heartbeat ticks due", i.ticks))
            .note(format!(
                "counted by a proxy between the runner and Redis (RESP requests, scripts by digest): {}",
                if req.is_empty() {
                    "none".to_string()
                } else {
                    by_name(req)
                }
            )),
        );
    }
    Ok(rows)
}

fn storm_rows(cfg: &Cfg, bin: &Path, on: On) -> R<Vec<Row>> {
    let (item, label) = (on.item("8"), on.label());
    let q = on.target(cfg, "storm", 0);
    let spawn_n = cfg.spawn_ref_n / 2;
    let (self0, kids0) = (procfs::self_cpu_secs(), procfs::children_cpu_secs());
    let spawn_rate = io(phys::spawn_true(spawn_n, 2))?;
    let spawn_self_us = (procfs::self_cpu_secs() - self0) * 1e6 / spawn_n as f64;
    let spawn_all_us = spawn_self_us + (procfs::children_cpu_secs() - kids0) * 1e6 / spawn_n as f64;
    let s = work::storm(bin, &q, &q, &on.file(cfg, "storm.runner.log"), None, cfg.storm_n, 4)?;
    let mut rows = vec![
        Row::new(
            &item,
            format!(
                "{label}push storm ({} producers, {} jobs) while `run -j 2 -- true` drains: runner CPU/job",
                s.producers, s.n
            ),
        )
        .value(format!("{:.0} µs", s.runner_cpu_us_per_job))
        .reference(format!(
            "bare spawn of `true`: {spawn_all_us:.0} µs CPU/job, parent + child ({spawn_self_us:.0} µs parent)"
        ))
        .ratio(s.runner_cpu_us_per_job / spawn_all_us.max(1.0), None)
        .note(
            "runner's own threads only (handlers not counted); ratio: runner overhead per job over a whole bare spawn",
        ),
        Row::new(&item, format!("{label}push storm: producer and drain rates"))
            .value(format!("push {}/s, drain {}/s", rate(s.push_rate), rate(s.drain_rate)))
            .reference(ref_str("fork+exec+wait `true`, 2 threads", spawn_rate))
            .ratio(s.drain_rate / spawn_rate, None)
            .note(match on {
                On::Dir => "drain = first push until the queue is empty (spawn-bound)",
                // Measured by the counted storm below: per job a claim, two log appends, two
                // history records and an ack, each a write the server fsyncs before answering.
                On::Redis(_) => {
                    "drain = first push until the queue is empty (bound by the spawn and by the runner's writes per job, each waiting for the server's fsync: see the counted row)"
                }
            }),
    ];
    let n = (cfg.storm_n / 5).max(400);
    match on {
        On::Redis(port) => {
            // What the runner sends per job, counted by a proxy in front of it alone (the
            // producers talk to the server directly). A runner that claimed once per push on
            // top of once per job, or listed the queue, would show here.
            let counted = (|| -> R<Vec<Row>> {
                let proxy = redis::CountingProxy::start(port)?;
                let q = on.target(cfg, "storm-counted", 0);
                let via = format!("redis://127.0.0.1:{}/0?queue=storm-counted", proxy.port);
                let t = work::storm(bin, &q, &via, &on.file(cfg, "storm-counted.runner.log"), None, n, 4)?;
                let counts = redis::count_delta(&Default::default(), &proxy.counts());
                let total: u64 = counts.iter().map(|(_, k)| k).sum();
                let get = |name: &str| counts.iter().find(|(k, _)| k == name).map_or(0, |(_, k)| *k);
                let claims = get("evalsha claim");
                let listings: u64 = counts
                    .iter()
                    .filter(|(k, _)| {
                        ["zrange", "zrangebyscore", "scan", "zscan", "keys", "hgetall", "lrange"].contains(&k.as_str())
                    })
                    .map(|(_, k)| k)
                    .sum();
                let extra = claims.saturating_sub(t.n as u64);
                Ok(vec![
                    Row::new(
                        &item,
                        format!("{label}push storm through a counting proxy ({} jobs): requests the runner sent", t.n),
                    )
                    .value(format!(
                        "{total} requests ({:.2}/job); {claims} claims, {listings} listings",
                        total as f64 / t.n as f64
                    ))
                    .reference(format!("{} pushes", t.n))
                    .ratio(extra as f64 / t.n as f64, None)
                    .target(
                        "no claim or listing per push beyond one claim per job (claims − jobs ≪ pushes)",
                        (extra as f64) < (t.n as f64 / 100.0).max(10.0) && listings == 0,
                    )
                    .note(format!(
                        "ratio: claims beyond one per job, per push; RESP requests from the runner (every connection: pool and subscription), scripts named by digest: {}",
                        by_name(&counts)
                    )),
                ])
            })();
            match counted {
                Ok(v) => rows.extend(v),
                Err(e) => rows.push(Row::skipped(
                    &item,
                    format!("{label}push storm: requests per job"),
                    format!("failed: {e}"),
                )),
            }
        }
        On::Dir if cfg.strace => {
            let have = std::process::Command::new("strace")
                .arg("-V")
                .output()
                .is_ok_and(|o| o.status.success());
            if !have {
                rows.push(Row::skipped(
                    &item,
                    "push storm: ready/ listings",
                    "strace not installed",
                ));
            } else {
                let q = on.target(cfg, "storm-traced", 0);
                let dir = PathBuf::from(&q);
                let trace = dir.with_extension("strace");
                match work::storm(bin, &q, &q, &dir.with_extension("runner.log"), Some(&trace), n, 4) {
                    Ok(t) => {
                        let l = t.listings.unwrap_or(0);
                        rows.push(
                            Row::new(
                                &item,
                                format!("push storm under strace ({} jobs): listings of ready/", t.n),
                            )
                            .value(format!("{l} listings"))
                            .reference(format!("{} pushes", t.n))
                            .ratio(l as f64 / t.n as f64, None)
                            .target(
                                "no rescan per push (listings ≪ pushes)",
                                (l as f64) < (t.n as f64 / 100.0).max(3.0),
                            )
                            .note(
                                "getdents64 on ready/ returning 0 (end of a listing), counted by strace --seccomp-bpf",
                            ),
                        );
                    }
                    Err(e) => rows.push(Row::skipped(
                        &item,
                        "push storm: ready/ listings",
                        format!("failed: {e}"),
                    )),
                }
            }
        }
        On::Dir => {}
    }
    Ok(rows)
}

/// Runs `f` on a thread; gives up (leaving it) after `limit`.
fn with_limit<T: Send + 'static>(limit: Duration, f: impl FnOnce() -> R<T> + Send + 'static) -> R<T> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let r =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|_| Err("panicked".to_string()));
        let _ = tx.send(r);
    });
    rx.recv_timeout(limit)
        .unwrap_or_else(|_| Err(format!("no answer within {} s", limit.as_secs())))
}

/// The items run on Redis too (item 9 asks for "the same workloads on the Redis store").
const REDIS_ITEMS: [&str; 8] = ["1", "2", "3", "4", "5", "6", "7", "8"];

/// Whether item `k` runs on Redis (with `--redis`): `--only 9` runs every one, `--only 3` or
/// `--only 3/9` item 3.
fn redis_wants(cfg: &Cfg, k: &str) -> bool {
    cfg.wants("9") || cfg.wants(k) || cfg.wants(&format!("{k}/9"))
}

fn redis_rows(cfg: &Cfg, note: &mut Vec<String>) -> Vec<Row> {
    let server = match redis::Server::start(&cfg.dir.join("redis")) {
        Ok(s) => s,
        Err(e) => {
            return vec![Row::skipped(
                "9",
                "Redis store",
                format!("cannot start redis-server: {e}"),
            )];
        }
    };
    note.push(format!(
        "Redis {} on 127.0.0.1:{}, `--appendonly yes --appendfsync always` (fsync per write), started and stopped by the harness",
        server.version, server.port
    ));
    let port = server.port;
    let target = move |name: &str| format!("redis://127.0.0.1:{port}/0?queue={name}");
    let mut rows = Vec::new();
    let limit = Duration::from_secs(if cfg.quick { 20 } else { 120 });
    // The items asked for, as the items of the copies of `cfg` given to each group.
    let only = Some(
        REDIS_ITEMS
            .iter()
            .filter(|k| redis_wants(cfg, k))
            .map(|k| k.to_string())
            .collect::<Vec<_>>(),
    );
    let sized = || Cfg {
        only: only.clone(),
        ..clone_sizes(cfg)
    };
    // Each group runs on its own thread with a time limit: the store is new and may hang.
    if redis_wants(cfg, "1") || redis_wants(cfg, "2") {
        let c = sized();
        let r = with_limit(limit, move || Ok(pushes(&c, "redis", &target, "/9")));
        match r {
            Ok(v) => rows.extend(v),
            Err(e) => rows.push(Row::skipped("9", "redis: pushes", e)),
        }
    }
    if redis_wants(cfg, "3") {
        let c = sized();
        let r = with_limit(limit, move || Ok(claims(&c, "redis", &target, "3/9")));
        match r {
            Ok(v) => rows.extend(v),
            Err(e) => rows.push(Row::skipped("9", "redis: claim + ack", e)),
        }
    }
    let on = On::Redis(port);
    let no_bin =
        |item: &str, what: &str| Row::skipped(item, what, "jobspool binary not found (build it, or --jobspool PATH)");
    // The runner workloads take longer than the library ones (item 8 pushes and drains
    // --storm-n jobs at spawn speed): their limits are those of the same items on a directory.
    if redis_wants(cfg, "4") {
        match &cfg.bin {
            Some(b) => {
                let (c, b) = (sized(), b.clone());
                match with_limit(limit.max(Duration::from_secs(600)), move || Ok(runs(&c, &b, on))) {
                    Ok(v) => rows.extend(v),
                    Err(e) => rows.push(Row::skipped("4/9", "redis: jobspool run -- true", e)),
                }
            }
            None => rows.push(no_bin("4/9", "redis: jobspool run -- true")),
        }
    }
    if redis_wants(cfg, "5") {
        let c = sized();
        match with_limit(limit.max(Duration::from_secs(1800)), move || Ok(backlogs(&c, on))) {
            Ok(v) => rows.extend(v),
            Err(e) => rows.push(Row::skipped("5/9", "redis: backlog", e)),
        }
    }
    if redis_wants(cfg, "6") {
        let url = server.url("latency");
        let n = cfg.latency_n;
        let latency_limit = Duration::from_secs(30).min(limit);
        match with_limit(latency_limit, move || latency_rows("redis", &url, n, "6/9")) {
            Ok(v) => rows.extend(v),
            Err(e) => rows.push(Row::skipped("6/9", "redis: wake-up latency", format!("failed: {e}"))),
        }
    }
    if redis_wants(cfg, "7") {
        progress("redis: idle runner");
        match &cfg.bin {
            Some(b) => skip_on_err(&mut rows, "7/9", "redis: idle runner", idle_rows(cfg, b, on)),
            None => rows.push(no_bin("7/9", "redis: idle runner")),
        }
    }
    if redis_wants(cfg, "8") {
        progress("redis: push storm");
        match &cfg.bin {
            Some(b) => {
                let (c, b) = (sized(), b.clone());
                match with_limit(Duration::from_secs(1800), move || storm_rows(&c, &b, on)) {
                    Ok(v) => rows.extend(v),
                    Err(e) => rows.push(Row::skipped("8/9", "redis: push storm", format!("failed: {e}"))),
                }
            }
            None => rows.push(no_bin("8/9", "redis: push storm")),
        }
    }
    for r in &mut rows {
        if r.verdict == Verdict::Skipped && !r.workload.contains("redis") {
            r.workload = format!("redis: {}", r.workload);
        }
    }
    drop(server);
    rows
}

/// The sizes of `cfg` (for threads that need their own copy).
fn clone_sizes(c: &Cfg) -> Cfg {
    Cfg {
        quick: c.quick,
        dir: c.dir.clone(),
        out: c.out.clone(),
        bin: c.bin.clone(),
        only: c.only.clone(),
        backlogs: c.backlogs.clone(),
        redis: c.redis,
        peers: c.peers,
        slow_peers: c.slow_peers,
        peers_dir: c.peers_dir.clone(),
        peer_n: c.peer_n,
        peer_timeout: c.peer_timeout,
        strace: c.strace,
        push_n: c.push_n,
        push_threads_n: c.push_threads_n,
        cli_push_n: c.cli_push_n,
        batch_n: c.batch_n,
        claim_n: c.claim_n,
        run_n: c.run_n,
        drain_k: c.drain_k,
        latency_n: c.latency_n,
        idle_settle: c.idle_settle,
        idle_window: c.idle_window,
        storm_n: c.storm_n,
        durable_ref_n: c.durable_ref_n,
        spawn_ref_n: c.spawn_ref_n,
    }
}

/// Peers, and jobspool's figures of the same class at the same N, in the same run.
fn peer_rows(cfg: &Cfg) -> Vec<PeerRow> {
    let Some(dir) = &cfg.peers_dir else {
        return vec![PeerRow {
            peer: "all".into(),
            variant: String::new(),
            n: 0,
            enqueue: None,
            drain: None,
            durability: String::new(),
            ours: None,
            note: "skipped: peer scripts not found (--peers-dir)".into(),
        }];
    };
    let n = cfg.peer_n;
    let logs = cfg.dir.join("peer-logs");
    let _ = std::fs::create_dir_all(&logs);
    // jobspool, same class, same N, same run.
    progress("jobspool figures for the peer comparison");
    let lib = (|| -> R<(f64, f64)> {
        let q = work::scratch(&cfg.dir, "peer-lib");
        let t = q.to_string_lossy().into_owned();
        let e = work::push_one(&t, n)?;
        let (_, d) = work::claim_ack(&t, 2)?;
        Ok((e, d))
    })();
    let cli = cfg.bin.as_ref().map(|bin| -> R<(f64, f64)> {
        let q = work::scratch(&cfg.dir, "peer-cli");
        let t = q.to_string_lossy().into_owned();
        let e = work::cli_push(bin, &t, n)?;
        let q2 = work::scratch(&cfg.dir, "peer-cli-run");
        let d = work::cli_run_drain(bin, &q2.to_string_lossy(), n, 2, &q2.with_extension("log"))?;
        Ok((e, d))
    });
    let mut rows = Vec::new();
    for p in peers::PEERS {
        if p.slow && !cfg.slow_peers {
            rows.push(PeerRow {
                peer: p.name.into(),
                variant: p.argv[4..].join(" "),
                n: 0,
                enqueue: None,
                drain: None,
                durability: String::new(),
                ours: None,
                note: "skipped: slow (minutes per run); --slow-peers runs it".into(),
            });
            continue;
        }
        progress(&format!("peer {}", p.name));
        let mut got = peers::run(
            dir,
            p,
            n,
            1,
            Duration::from_secs(cfg.peer_timeout),
            &logs.join(format!("{}.log", p.name)),
        );
        for r in &mut got {
            if r.enqueue.is_none() && r.drain.is_none() {
                continue;
            }
            r.ours = match p.class {
                peers::Class::InProcess => lib
                    .as_ref()
                    .ok()
                    .map(|(e, d)| ("library push 1/call, claim+ack 2 threads".to_string(), *e, *d)),
                peers::Class::Process => match &cli {
                    Some(Ok((e, d))) => Some(("CLI push 1/process, `run -j 2 -- true`".to_string(), *e, *d)),
                    _ => None,
                },
            };
            if r.n != n as u64 {
                r.note = format!("{} (jobspool figures at N={n})", r.note).trim().to_string();
            }
        }
        rows.extend(got);
    }
    if let Err(e) = &lib {
        eprintln!("bench: jobspool library figures for peers failed: {e}");
    }
    rows
}

/// Writes the results file (also called between items, so that an interrupted run keeps what it
/// measured).
fn write_out(
    cfg: &Cfg,
    machine: &str,
    command: &[String],
    started: Instant,
    notes: &[String],
    rows: &[Row],
    peer_table: Option<&[PeerRow]>,
) -> String {
    let mut md = String::new();
    md.push_str("## Machine\n\n");
    md.push_str(machine);
    md.push_str(&format!(
        "- command: `{}`; took {:.0} s\n",
        command.join(" "),
        started.elapsed().as_secs_f64()
    ));
    for n in notes {
        md.push_str(&format!("- {n}\n"));
    }
    md.push_str("\n## Results\n\nEvery ratio is against a reference measured in this run on the same file system: for items 1–4 just before and just after the workload (the mean of the two), for item 8 just before it; item 5 compares with its own smallest backlog.\n\n");
    md.push_str(&report::table(rows));
    if let Some(p) = &peer_table {
        md.push_str("\n## Peers (same run)\n\n");
        md.push_str(&report::peer_table(p));
    }
    if let Some(parent) = cfg.out.parent() {
        let _ = std::fs::create_dir_all(parent);
    }
    if let Err(e) = std::fs::write(&cfg.out, &md) {
        eprintln!("bench: writing {}: {e}", cfg.out.display());
    }
    md
}

fn main() {
    let cfg = match parse_args() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("bench: {e}");
            std::process::exit(2);
        }
    };
    if let Err(e) = std::fs::create_dir_all(cfg.dir.join("phys")) {
        eprintln!("bench: {}: {e}", cfg.dir.display());
        std::process::exit(2);
    }
    let started = *START.get_or_init(Instant::now);
    let machine = report::machine(&cfg.dir, cfg.bin.as_deref());
    let command: Vec<String> = std::env::args().collect();
    let dir = cfg.dir.clone();
    let target = move |name: &str| work::scratch(&dir, name).to_string_lossy().into_owned();
    let mut rows: Vec<Row> = Vec::new();
    let mut notes: Vec<String> = Vec::new();
    // The peers first: on an ext4 without a journal every file created pays for the files
    // deleted in the minutes before (BENCHMARKS.md, profile point 2), and the items below delete
    // over a million; the jobspool figures beside the peers' are measured in the same pass.
    let peer_table = if cfg.peers && cfg.wants("peers") {
        Some(peer_rows(&cfg))
    } else {
        None
    };
    let peer_table = peer_table.as_deref();

    rows.extend(pushes(&cfg, "dir", &target, ""));
    if cfg.wants("3") {
        rows.extend(claims(&cfg, "dir", &target, "3"));
    }
    let bin = cfg.bin.clone();
    let no_bin =
        |item: &str, what: &str| Row::skipped(item, what, "jobspool binary not found (build it, or --jobspool PATH)");
    write_out(&cfg, &machine, &command, started, &notes, &rows, peer_table);
    if cfg.wants("4") {
        match &bin {
            Some(b) => rows.extend(runs(&cfg, b, On::Dir)),
            None => rows.push(no_bin("4", "jobspool run -- true")),
        }
    }
    write_out(&cfg, &machine, &command, started, &notes, &rows, peer_table);
    if cfg.wants("5") {
        rows.extend(backlogs(&cfg, On::Dir));
    }
    write_out(&cfg, &machine, &command, started, &notes, &rows, peer_table);
    if cfg.wants("6") {
        progress("wake-up latency");
        let q = target("latency");
        skip_on_err(
            &mut rows,
            "6",
            "wake-up latency",
            latency_rows("dir", &q, cfg.latency_n, "6"),
        );
    }
    write_out(&cfg, &machine, &command, started, &notes, &rows, peer_table);
    if cfg.wants("7") {
        progress("idle runner");
        match &bin {
            Some(b) => skip_on_err(&mut rows, "7", "idle runner", idle_rows(&cfg, b, On::Dir)),
            None => rows.push(no_bin("7", "idle runner")),
        }
    }
    write_out(&cfg, &machine, &command, started, &notes, &rows, peer_table);
    if cfg.wants("8") {
        progress("push storm");
        match &bin {
            Some(b) => skip_on_err(&mut rows, "8", "push storm", storm_rows(&cfg, b, On::Dir)),
            None => rows.push(no_bin("8", "push storm")),
        }
    }
    write_out(&cfg, &machine, &command, started, &notes, &rows, peer_table);
    if cfg.redis && REDIS_ITEMS.iter().any(|k| redis_wants(&cfg, k)) {
        progress("Redis store");
        rows.extend(redis_rows(&cfg, &mut notes));
    } else if cfg.wants("9") && !cfg.redis {
        rows.push(Row::skipped("9", "Redis store", "not asked for (--redis or --full)"));
    }
    write_out(&cfg, &machine, &command, started, &notes, &rows, peer_table);
    let md = write_out(&cfg, &machine, &command, started, &notes, &rows, peer_table);
    println!("{md}");
    eprintln!("bench: results written to {}", cfg.out.display());
}
