//! Scenario 6: corrupted job files in every state — bit flips, truncation at every length,
//! zero-filled blocks, appended garbage. Each must be detected, quarantined with its reason and
//! its bytes kept, never delivered, and the other jobs must be unaffected.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use jobspool::store::Store;
use jobspool::store::dir::DirStore;
use jobspool::{JobId, NewJob};

use super::Figures;
use crate::Env;

/// Where the victim sits when it is corrupted.
#[derive(Clone, Copy, Debug)]
enum Where {
    Ready,
    /// Claimed by a claimer that then died.
    Running,
    /// Buried, then revived by an operator.
    Dead,
}

/// A corruption of a file's bytes.
#[derive(Clone, Debug)]
enum Mutation {
    Flip(usize),
    Truncate(usize),
    Zero(usize, usize),
    Append(Vec<u8>),
}

impl Mutation {
    fn apply(&self, b: &[u8]) -> Vec<u8> {
        let mut v = b.to_vec();
        match self {
            Mutation::Flip(bit) => v[bit / 8] ^= 1 << (bit % 8),
            Mutation::Truncate(n) => v.truncate(*n),
            Mutation::Zero(at, len) => {
                let end = (at + len).min(v.len());
                v[*at..end].iter_mut().for_each(|x| *x = 0);
            }
            Mutation::Append(g) => v.extend_from_slice(g),
        }
        v
    }
    fn kind(&self) -> &'static str {
        match self {
            Mutation::Flip(_) => "bit-flip",
            Mutation::Truncate(_) => "truncate",
            Mutation::Zero(..) => "zero-block",
            Mutation::Append(_) => "append",
        }
    }
}

fn mutations(len: usize, env: &Env) -> Vec<Mutation> {
    let mut all = Vec::new();
    for bit in 0..len * 8 {
        all.push(Mutation::Flip(bit));
    }
    for n in 0..len {
        all.push(Mutation::Truncate(n));
    }
    for block in [16, 64, 512] {
        for at in (0..len).step_by(block.min(16)) {
            all.push(Mutation::Zero(at, block));
        }
    }
    all.push(Mutation::Append(vec![0]));
    all.push(Mutation::Append(b"\n".to_vec()));
    all.push(Mutation::Append(b"garbage after the payload".to_vec()));
    all.push(Mutation::Append(vec![0xff; 4096]));
    if env.long {
        return all;
    }
    // Short form: every truncation length is cheap to reason about but we sample all kinds.
    let mut rng = fastrand::Rng::with_seed(env.seed);
    let mut pick: Vec<Mutation> = all
        .iter()
        .filter(|m| matches!(m, Mutation::Append(_)))
        .cloned()
        .collect();
    for _ in 0..20 {
        pick.push(all[rng.usize(0..all.len())].clone());
    }
    pick.push(Mutation::Truncate(0));
    pick.push(Mutation::Truncate(len - 1));
    pick
}

fn file_in(q: &Path, folder: &str) -> std::path::PathBuf {
    let name = crate::entries(q, folder).into_iter().next().expect("the victim's file");
    q.join(folder).join(name)
}

/// Runs one corruption: returns an error describing any violation.
fn one(wh: Where, m: &Mutation) -> Result<String, String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let q = dir.path().join("q");
    jobspool::store::dir::init(&q, &Default::default()).map_err(|e| e.to_string())?;
    let store = DirStore::open(&q, false).map_err(|e| e.to_string())?;
    let victim = JobId::new("victim").unwrap();
    store
        .push(&NewJob::new(b"the victim's payload".to_vec()).id(victim.clone()))
        .map_err(|e| e.to_string())?;
    let folder = match wh {
        Where::Ready => "ready",
        Where::Running => {
            let other = DirStore::open(&q, false).unwrap();
            other.claim(Duration::from_secs(600)).unwrap().unwrap();
            "running"
        }
        Where::Dead => {
            let other = DirStore::open(&q, false).unwrap();
            let c = other.claim(Duration::from_secs(600)).unwrap().unwrap();
            other.bury(&c.lease, "torture").unwrap();
            "dead"
        }
    };
    let path = file_in(&q, folder);
    let good = std::fs::read(&path).unwrap();
    let bad = m.apply(&good);
    if bad == good {
        return Ok("unchanged".into());
    }
    std::fs::write(&path, &bad).unwrap();
    // Bystanders pushed after the corruption, before and after in claim order.
    for i in 0..3 {
        store
            .push(&NewJob::new(format!("bystander {i}").into_bytes()).id(JobId::new(format!("by{i}")).unwrap()))
            .unwrap();
    }
    if matches!(wh, Where::Dead) {
        store.revive_all().map_err(|e| format!("revive: {e}"))?;
    }
    store.reclaim(100).map_err(|e| format!("reclaim: {e}"))?;
    let mut delivered = Vec::new();
    while let Some(c) = store
        .claim(Duration::from_secs(600))
        .map_err(|e| format!("claim: {e}"))?
    {
        delivered.push(c.lease.id.to_string());
        store.ack(&c.lease).unwrap();
    }
    if delivered.iter().any(|d| d == "victim") {
        return Err(format!("the corrupted job was delivered ({} bytes)", bad.len()));
    }
    if delivered.len() != 3 {
        return Err(format!("bystanders delivered: {delivered:?}"));
    }
    let q_entries = crate::entries(&q, "quarantine");
    if q_entries.len() != 1 {
        return Err(format!("quarantine holds {q_entries:?}"));
    }
    let kept = std::fs::read(q.join("quarantine").join(&q_entries[0])).unwrap();
    if kept != bad {
        return Err("the quarantined bytes differ from the corrupted file".into());
    }
    let reason = q_entries[0].split('.').nth(1).unwrap_or("").to_string();
    Ok(reason)
}

/// Scenario 6.
pub fn corruption(env: &Env) -> Figures {
    let mut figs = Figures::new("corruption");
    // The length of a victim's file.
    let len = {
        let dir = tempfile::tempdir().unwrap();
        let q = dir.path().join("q");
        let s = DirStore::open(&q, true).unwrap();
        s.push(&NewJob::new(b"the victim's payload".to_vec()).id(JobId::new("victim").unwrap()))
            .unwrap();
        std::fs::read(file_in(&q, "ready")).unwrap().len()
    };
    let muts = mutations(len, env);
    let mut reasons: BTreeMap<String, u64> = BTreeMap::new();
    let mut by_kind: BTreeMap<&str, u64> = BTreeMap::new();
    for wh in [Where::Ready, Where::Running, Where::Dead] {
        for m in &muts {
            match one(wh, m) {
                Ok(r) if r == "unchanged" => {}
                Ok(r) => {
                    figs.cases += 1;
                    figs.faults += 1;
                    *reasons.entry(r).or_default() += 1;
                    *by_kind.entry(m.kind()).or_default() += 1;
                }
                Err(e) => {
                    figs.cases += 1;
                    figs.faults += 1;
                    figs.violation(&format!("{wh:?} {m:?}"), e);
                }
            }
        }
    }
    figs.notes
        .push(format!("job file of {len} bytes; corruptions per kind: {by_kind:?}"));
    figs.notes.push(format!("quarantined, by reason: {reasons:?}"));
    figs.notes.push(format!(
        "detected {} of {} ({} never delivered)",
        figs.cases - figs.violations.len() as u64,
        figs.cases,
        figs.cases - figs.violations.len() as u64
    ));
    figs
}
