//! Checks a history after a final, fault-free drain, the way Jepsen's queue checkers do.
//!
//! - **lost**: a push that returned success whose job was never acknowledged and did not end dead;
//! - **unexpected**: a job delivered (claimed) that no push ever tried to add, or whose every push
//!   returned an error (a failed push must leave nothing visible);
//! - **stale_ack_accepted**: an ack, heartbeat, retry, bury or release that returned success
//!   although, before it was invoked, its lease had been taken back (reclaimed) or the job claimed
//!   again under another lease;
//! - **acked_twice**: a job acknowledged twice (acknowledgement is at most once);
//! - **duplicates**: a delivery after an earlier one of the same job that did not end in a retry
//!   or release, each attributed to its cause; one that no cause explains is **unexplained**.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;

use serde::Serialize;

use crate::history::{Entry, F, Ty};

/// Why a job was delivered again.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Cause {
    /// The previous holder was killed while holding the lease.
    RunnerKilled,
    /// The previous holder was frozen (SIGSTOP) and its lease ran out.
    LeaseExpiredFrozen,
    /// The previous holder's transition failed (an injected I/O error, a full disk) and it gave
    /// the lease up; the claim was taken back when it exited or its lease ran out.
    HolderFailed,
    /// A power cut undid an unsynced claim or acknowledgement.
    PowerCut,
    /// Nothing in the history explains it: a bug.
    Unexplained,
}

impl fmt::Display for Cause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            Cause::RunnerKilled => "runner-killed",
            Cause::LeaseExpiredFrozen => "lease-expired-frozen",
            Cause::HolderFailed => "holder-failed",
            Cause::PowerCut => "power-cut",
            Cause::Unexplained => "UNEXPLAINED",
        };
        f.write_str(s)
    }
}

/// What the final drain left, besides the history.
#[derive(Clone, Debug, Default)]
pub struct Final {
    /// Ids of the jobs in `dead/` at the end.
    pub dead: HashSet<String>,
    /// Jobs still ready, scheduled or running after the drain (should be none).
    pub stranded: Vec<String>,
    /// Entries in `quarantine/`.
    pub quarantined: usize,
    /// Ids of jobs set aside on purpose, with a reason the scenario expects (e.g. a job file
    /// made unreadable, or corrupted, by the scenario itself): not lost, and counted apart.
    pub reported: HashSet<String>,
}

/// The figures of one check.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Report {
    pub pushes_ok: u64,
    pub pushes_failed: u64,
    pub pushes_unknown: u64,
    pub deliveries: u64,
    pub acks_ok: u64,
    pub transitions_ok: u64,
    pub transitions_failed: u64,
    pub transitions_unknown: u64,
    pub kills: u64,
    pub stops: u64,
    pub power_cuts: u64,
    pub redeliveries_after_retry: u64,
    pub lost: u64,
    pub vanished: u64,
    pub unexpected: u64,
    pub stale_ack_accepted: u64,
    pub acked_twice: u64,
    pub stranded: u64,
    pub dead_at_end: u64,
    pub reported: u64,
    /// History lines cut short by the death of their writer (informative).
    pub torn_lines: u64,
    pub duplicates: BTreeMap<Cause, u64>,
    /// A description of each violation, for the failure message.
    #[serde(skip)]
    pub problems: Vec<String>,
}

impl Report {
    /// Duplicates no cause explains.
    pub fn unexplained(&self) -> u64 {
        self.duplicates.get(&Cause::Unexplained).copied().unwrap_or(0)
    }

    /// Every duplicate, explained or not.
    pub fn duplicates_total(&self) -> u64 {
        self.duplicates.values().sum()
    }

    /// True when the history keeps the contract.
    pub fn is_ok(&self) -> bool {
        self.lost == 0
            && self.vanished == 0
            && self.unexpected == 0
            && self.stale_ack_accepted == 0
            && self.acked_twice == 0
            && self.unexplained() == 0
            && self.stranded == 0
    }

    /// Adds another report's figures to this one.
    pub fn add(&mut self, o: &Report) {
        self.pushes_ok += o.pushes_ok;
        self.pushes_failed += o.pushes_failed;
        self.pushes_unknown += o.pushes_unknown;
        self.deliveries += o.deliveries;
        self.acks_ok += o.acks_ok;
        self.transitions_ok += o.transitions_ok;
        self.transitions_failed += o.transitions_failed;
        self.transitions_unknown += o.transitions_unknown;
        self.kills += o.kills;
        self.stops += o.stops;
        self.power_cuts += o.power_cuts;
        self.redeliveries_after_retry += o.redeliveries_after_retry;
        self.lost += o.lost;
        self.vanished += o.vanished;
        self.unexpected += o.unexpected;
        self.stale_ack_accepted += o.stale_ack_accepted;
        self.acked_twice += o.acked_twice;
        self.stranded += o.stranded;
        self.dead_at_end += o.dead_at_end;
        self.reported += o.reported;
        self.torn_lines += o.torn_lines;
        for (c, n) in &o.duplicates {
            *self.duplicates.entry(*c).or_default() += n;
        }
        self.problems.extend(o.problems.iter().cloned());
    }

    /// One line of figures.
    pub fn summary(&self) -> String {
        let dups: Vec<String> = self.duplicates.iter().map(|(c, n)| format!("{c}={n}")).collect();
        format!(
            "pushes ok={} failed={} unknown={}; deliveries={} acks={} transitions ok={} failed={} unknown={}; \
             kills={} stops={} power-cuts={}; lost={} vanished={} unexpected={} stale_ack_accepted={} acked_twice={} \
             stranded={} dead={} quarantined-as-expected={} torn-lines={}; duplicates={} [{}] unexplained={}",
            self.pushes_ok,
            self.pushes_failed,
            self.pushes_unknown,
            self.deliveries,
            self.acks_ok,
            self.transitions_ok,
            self.transitions_failed,
            self.transitions_unknown,
            self.kills,
            self.stops,
            self.power_cuts,
            self.lost,
            self.vanished,
            self.unexpected,
            self.stale_ack_accepted,
            self.acked_twice,
            self.stranded,
            self.dead_at_end,
            self.reported,
            self.torn_lines,
            self.duplicates_total(),
            dups.join(" "),
            self.unexplained()
        )
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Outcome {
    Ok,
    Fail,
    Unknown,
}

/// One operation: its invocation and how it ended.
#[derive(Clone, Debug)]
struct Op {
    p: String,
    f: F,
    job: String,
    lease: String,
    leases: Vec<String>,
    invoked: usize,
    ended: usize,
    outcome: Outcome,
}

/// Pairs invocations with completions (a process runs one operation at a time).
fn operations(h: &[Entry]) -> Vec<Op> {
    let mut pending: HashMap<&str, usize> = HashMap::new();
    let mut ops: Vec<Op> = Vec::new();
    for (i, e) in h.iter().enumerate() {
        match e.ty {
            Ty::Invoke => {
                if let Some(prev) = pending.insert(&e.p, ops.len()) {
                    ops[prev].ended = i;
                }
                ops.push(Op {
                    p: e.p.clone(),
                    f: e.f,
                    job: e.job.clone(),
                    lease: e.lease.clone(),
                    leases: Vec::new(),
                    invoked: i,
                    ended: usize::MAX,
                    outcome: Outcome::Unknown,
                });
            }
            Ty::Ok | Ty::Fail => {
                if let Some(k) = pending.remove(e.p.as_str()) {
                    let op = &mut ops[k];
                    op.ended = i;
                    op.outcome = if e.ty == Ty::Ok { Outcome::Ok } else { Outcome::Fail };
                    if !e.job.is_empty() {
                        op.job = e.job.clone();
                    }
                    if !e.lease.is_empty() {
                        op.lease = e.lease.clone();
                    }
                    op.leases = e.leases.clone();
                }
            }
            // A process that died ends its operation with an unknown outcome; a freeze or a
            // thaw does not end anything (the process may record its next line before the
            // scenario records that it continued it).
            Ty::Info if matches!(e.f, F::Kill | F::Exit) => {
                if let Some(k) = pending.remove(e.p.as_str()) {
                    ops[k].ended = i;
                }
            }
            Ty::Info if e.f == F::PowerCut => {
                for (_, k) in pending.drain() {
                    ops[k].ended = i;
                }
            }
            Ty::Info => {}
        }
    }
    ops
}

/// The lease duration written in a directory store's lease token
/// (`PPPP.T.A.RUNNER.CLAIMED.LEASEMS.NONCE.ID`); unknown tokens count as infinite.
fn lease_ms(token: &str) -> u64 {
    token.split('.').nth(5).and_then(|s| s.parse().ok()).unwrap_or(u64::MAX)
}

/// Checks `h` (in order) against what the final drain left.
pub fn check(h: &[Entry], fin: &Final) -> Report {
    let mut r = Report::default();
    let ops = operations(h);

    // Pushes.
    let mut push_ok: HashSet<&str> = HashSet::new();
    let mut push_tried: HashMap<&str, bool> = HashMap::new(); // job -> may have taken effect
    for op in ops.iter().filter(|o| o.f == F::Push) {
        let may = match op.outcome {
            Outcome::Ok => {
                r.pushes_ok += 1;
                push_ok.insert(&op.job);
                true
            }
            Outcome::Fail => {
                r.pushes_failed += 1;
                false
            }
            Outcome::Unknown => {
                r.pushes_unknown += 1;
                true
            }
        };
        *push_tried.entry(&op.job).or_default() |= may;
    }

    // Events of the scenario.
    let mut kills: HashMap<&str, Vec<usize>> = HashMap::new();
    // (stop index, continue index, stop time, continue time)
    let mut stops: HashMap<&str, Vec<(usize, usize, u64, u64)>> = HashMap::new();
    let mut exits: HashMap<&str, Vec<usize>> = HashMap::new();
    let mut cuts: Vec<usize> = Vec::new();
    for (i, e) in h.iter().enumerate() {
        if e.ty != Ty::Info {
            continue;
        }
        match e.f {
            F::Kill => {
                r.kills += 1;
                kills.entry(&e.p).or_default().push(i);
            }
            F::Stop => {
                r.stops += 1;
                stops.entry(&e.p).or_default().push((i, usize::MAX, e.t, u64::MAX));
            }
            F::Cont => {
                if let Some(last) = stops.get_mut(e.p.as_str()).and_then(|v| v.last_mut()) {
                    if last.1 == usize::MAX {
                        last.1 = i;
                        last.3 = e.t;
                    }
                }
            }
            F::Exit => exits.entry(&e.p).or_default().push(i),
            F::PowerCut => {
                r.power_cuts += 1;
                cuts.push(i);
            }
            _ => {}
        }
    }
    let cut_between = |a: usize, b: usize| cuts.iter().any(|&c| c > a && c < b);

    // Deliveries, transitions and reclaims, by job and by lease.
    let mut deliveries: BTreeMap<&str, Vec<&Op>> = BTreeMap::new();
    let mut by_lease: HashMap<&str, Vec<&Op>> = HashMap::new();
    let mut reclaimed_at: HashMap<&str, usize> = HashMap::new();
    for op in &ops {
        match op.f {
            F::Claim if op.outcome == Outcome::Ok && !op.job.is_empty() => {
                r.deliveries += 1;
                deliveries.entry(&op.job).or_default().push(op);
            }
            F::Reclaim if op.outcome == Outcome::Ok => {
                for l in &op.leases {
                    reclaimed_at.entry(l.as_str()).or_insert(op.ended);
                }
            }
            F::Heartbeat | F::Ack | F::Retry | F::Bury | F::Release => {
                match op.outcome {
                    Outcome::Ok => r.transitions_ok += 1,
                    Outcome::Fail => r.transitions_failed += 1,
                    Outcome::Unknown => r.transitions_unknown += 1,
                }
                if op.f == F::Ack && op.outcome == Outcome::Ok {
                    r.acks_ok += 1;
                }
                by_lease.entry(&op.lease).or_default().push(op);
            }
            _ => {}
        }
    }

    // Deliveries in the order they took effect: a claim invoked first may well finish last.
    for ds in deliveries.values_mut() {
        ds.sort_by_key(|d| d.ended);
    }

    // Unexpected deliveries.
    for (job, ds) in &deliveries {
        if !push_tried.get(job).copied().unwrap_or(false) {
            r.unexpected += ds.len() as u64;
            r.problems.push(format!(
                "unexpected: job {job} was delivered but no push of it may have succeeded"
            ));
        }
    }

    // Stale transitions accepted.
    let mut claims_of: HashMap<&str, Vec<&Op>> = HashMap::new();
    for (job, ds) in &deliveries {
        claims_of.insert(job, ds.clone());
    }
    for op in ops
        .iter()
        .filter(|o| matches!(o.f, F::Heartbeat | F::Ack | F::Retry | F::Bury | F::Release) && o.outcome == Outcome::Ok)
    {
        let mine = claims_of
            .get(op.job.as_str())
            .and_then(|v| v.iter().find(|c| c.lease == op.lease).copied());
        let later_claim = claims_of.get(op.job.as_str()).into_iter().flatten().any(|c| {
            c.lease != op.lease
                && c.ended < op.invoked
                && mine.is_none_or(|m| c.ended > m.ended)
                && !cut_between(c.ended, op.invoked)
        });
        let reclaimed = reclaimed_at.get(op.lease.as_str()).is_some_and(|&at| at < op.invoked);
        if later_claim || reclaimed {
            r.stale_ack_accepted += 1;
            r.problems.push(format!(
                "stale {:?} accepted: job {} lease {} by {} after its lease was taken",
                op.f, op.job, op.lease, op.p
            ));
        }
    }

    // Acknowledged twice.
    let mut acks: HashMap<&str, Vec<usize>> = HashMap::new();
    for op in ops.iter().filter(|o| o.f == F::Ack && o.outcome == Outcome::Ok) {
        acks.entry(&op.job).or_default().push(op.ended);
    }
    for (job, ends) in &acks {
        for w in ends.windows(2) {
            if !cut_between(w[0], w[1]) {
                r.acked_twice += 1;
                r.problems.push(format!("job {job} acknowledged twice"));
            }
        }
    }

    // Duplicates and their causes.
    for (job, ds) in &deliveries {
        for w in ds.windows(2) {
            let (prev, next) = (w[0], w[1]);
            let ends = by_lease.get(prev.lease.as_str()).cloned().unwrap_or_default();
            let concluded = |f: F| {
                ends.iter()
                    .any(|t| t.f == f && t.outcome == Outcome::Ok && t.ended < next.invoked)
            };
            // A retry or release that began before the next claim ended may have put the job
            // back before that claim took it (concurrent operations linearize either way).
            let gave_back = |f: F| {
                ends.iter()
                    .any(|t| t.f == f && t.outcome == Outcome::Ok && t.invoked < next.ended)
            };
            if gave_back(F::Retry) || gave_back(F::Release) {
                r.redeliveries_after_retry += 1;
                continue;
            }
            let acked = concluded(F::Ack) || concluded(F::Bury);
            let within = |v: Option<&Vec<usize>>| v.into_iter().flatten().any(|&k| k > prev.ended && k < next.invoked);
            let cause = if cut_between(prev.invoked, next.invoked) {
                Cause::PowerCut
            } else if acked {
                Cause::Unexplained
            } else if within(kills.get(prev.p.as_str())) {
                Cause::RunnerKilled
            } else if stops.get(prev.p.as_str()).into_iter().flatten().any(|&(s, c, st, ct)| {
                // Frozen across the next delivery, or for longer than its lease.
                s > prev.invoked
                    && s < next.invoked
                    && (c > next.invoked || ct.saturating_sub(st) >= lease_ms(&prev.lease))
            }) {
                Cause::LeaseExpiredFrozen
            } else if ends
                .iter()
                .any(|t| t.outcome == Outcome::Fail && t.ended < next.invoked)
                || (within(exits.get(prev.p.as_str()))
                    && ends.iter().any(|t| t.outcome != Outcome::Ok && t.ended < next.invoked))
            {
                // The holder's ack, retry or heartbeat failed (an injected error, a full disk):
                // it gave the lease up, and the claim was taken back when its runner exited or
                // its lease ran out.
                Cause::HolderFailed
            } else {
                Cause::Unexplained
            };
            if cause == Cause::Unexplained {
                r.problems.push(format!(
                    "unexplained duplicate: job {job} delivered to {} (lease {}) and again to {} (lease {}){}",
                    prev.p,
                    prev.lease,
                    next.p,
                    next.lease,
                    if acked { " after it was acknowledged" } else { "" }
                ));
            }
            *r.duplicates.entry(cause).or_default() += 1;
        }
    }

    // Lost jobs: pushed with success, never delivered, not dead. Vanished jobs: delivered, but
    // no acknowledgement or burial of them may have happened, and they are not in the queue.
    let mut finished: HashSet<&str> = HashSet::new();
    for op in ops
        .iter()
        .filter(|o| matches!(o.f, F::Ack | F::Bury) && o.outcome != Outcome::Fail)
    {
        finished.insert(&op.job);
    }
    let mut ok: Vec<&str> = push_ok.iter().copied().collect();
    ok.sort();
    for j in ok {
        if fin.dead.contains(j) || fin.reported.contains(j) {
            continue;
        }
        if !deliveries.contains_key(j) {
            r.lost += 1;
            r.problems.push(format!(
                "lost: the push of job {j} succeeded but it was never delivered"
            ));
        } else if !finished.contains(j) && !fin.stranded.iter().any(|s| s.ends_with(&format!(" {j}"))) {
            r.vanished += 1;
            r.problems.push(format!(
                "vanished: job {j} was delivered but never acknowledged, and is gone"
            ));
        }
    }
    r.stranded = fin.stranded.len() as u64;
    for s in &fin.stranded {
        r.problems.push(format!("stranded after the drain: {s}"));
    }
    r.dead_at_end = fin.dead.len() as u64;
    r.reported = fin.reported.len() as u64;
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(p: &str, ty: Ty, f: F, job: &str, lease: &str) -> Entry {
        Entry::new(p, ty, f).job(job).lease(lease)
    }

    fn push(h: &mut Vec<Entry>, p: &str, job: &str, ty: Ty) {
        h.push(e(p, Ty::Invoke, F::Push, job, ""));
        if ty != Ty::Invoke {
            h.push(e(p, ty, F::Push, job, ""));
        }
    }

    fn claim(h: &mut Vec<Entry>, p: &str, job: &str, lease: &str) {
        h.push(e(p, Ty::Invoke, F::Claim, "", ""));
        h.push(e(p, Ty::Ok, F::Claim, job, lease));
    }

    fn tr(h: &mut Vec<Entry>, p: &str, f: F, job: &str, lease: &str, ty: Ty) {
        h.push(e(p, Ty::Invoke, f, job, lease));
        if ty != Ty::Invoke {
            h.push(e(p, ty, f, job, lease));
        }
    }

    #[test]
    fn a_clean_history_passes() {
        let mut h = Vec::new();
        push(&mut h, "a", "j1", Ty::Ok);
        push(&mut h, "a", "j2", Ty::Fail);
        claim(&mut h, "r", "j1", "L1");
        tr(&mut h, "r", F::Retry, "j1", "L1", Ty::Ok);
        claim(&mut h, "r", "j1", "L2");
        tr(&mut h, "r", F::Ack, "j1", "L2", Ty::Ok);
        let r = check(&h, &Final::default());
        assert!(r.is_ok(), "{:?}", r.problems);
        assert_eq!(
            (r.pushes_ok, r.pushes_failed, r.deliveries, r.redeliveries_after_retry),
            (1, 1, 2, 1)
        );
        assert_eq!(r.duplicates_total(), 0);
    }

    #[test]
    fn flags_a_lost_job() {
        let mut h = Vec::new();
        push(&mut h, "a", "j1", Ty::Ok);
        push(&mut h, "a", "j2", Ty::Ok);
        claim(&mut h, "r", "j1", "L1");
        tr(&mut h, "r", F::Ack, "j1", "L1", Ty::Ok);
        let r = check(&h, &Final::default());
        assert_eq!(r.lost, 1);
        assert!(!r.is_ok());
        // Dead at the end is not lost.
        let fin = Final {
            dead: ["j2".to_string()].into(),
            ..Final::default()
        };
        assert!(check(&h, &fin).is_ok());
    }

    #[test]
    fn flags_a_job_delivered_then_gone_without_an_ack() {
        let mut h = Vec::new();
        push(&mut h, "a", "j1", Ty::Ok);
        push(&mut h, "a", "j2", Ty::Ok);
        claim(&mut h, "r", "j1", "L1");
        claim(&mut h, "r", "j2", "L2");
        // j2's ack may have happened (its runner died during it): not vanished.
        tr(&mut h, "r", F::Ack, "j2", "L2", Ty::Invoke);
        h.push(e("r", Ty::Info, F::Kill, "", ""));
        let r = check(&h, &Final::default());
        assert_eq!((r.lost, r.vanished), (0, 1), "{:?}", r.problems);
        assert!(!r.is_ok());
    }

    #[test]
    fn a_thaw_recorded_after_the_process_resumed_does_not_end_its_operation() {
        let mut h = Vec::new();
        push(&mut h, "a", "j1", Ty::Ok);
        h.push(e("r", Ty::Info, F::Stop, "", ""));
        h.push(e("r", Ty::Invoke, F::Claim, "", ""));
        h.push(e("r", Ty::Info, F::Cont, "", ""));
        h.push(e("r", Ty::Ok, F::Claim, "j1", "L1"));
        tr(&mut h, "r", F::Ack, "j1", "L1", Ty::Ok);
        let r = check(&h, &Final::default());
        assert!(r.is_ok(), "{:?}", r.problems);
        assert_eq!(r.deliveries, 1);
    }

    #[test]
    fn a_claim_concurrent_with_the_retry_that_freed_the_job_is_no_duplicate() {
        let mut h = Vec::new();
        push(&mut h, "a", "j1", Ty::Ok);
        claim(&mut h, "r1", "j1", "L1");
        h.push(e("r1", Ty::Invoke, F::Retry, "j1", "L1"));
        h.push(e("r2", Ty::Invoke, F::Claim, "", ""));
        h.push(e("r1", Ty::Ok, F::Retry, "j1", "L1"));
        h.push(e("r2", Ty::Ok, F::Claim, "j1", "L2"));
        tr(&mut h, "r2", F::Ack, "j1", "L2", Ty::Ok);
        let r = check(&h, &Final::default());
        assert!(r.is_ok(), "{:?}", r.problems);
        assert_eq!(r.redeliveries_after_retry, 1);
    }

    #[test]
    fn deliveries_are_ordered_by_when_the_claims_ended() {
        let mut h = Vec::new();
        push(&mut h, "a", "j1", Ty::Ok);
        h.push(e("slow", Ty::Invoke, F::Claim, "", ""));
        claim(&mut h, "fast", "j1", "L1");
        tr(&mut h, "fast", F::Retry, "j1", "L1", Ty::Ok);
        h.push(e("slow", Ty::Ok, F::Claim, "j1", "L2"));
        tr(&mut h, "slow", F::Heartbeat, "j1", "L2", Ty::Ok);
        tr(&mut h, "slow", F::Ack, "j1", "L2", Ty::Ok);
        let r = check(&h, &Final::default());
        assert!(r.is_ok(), "{:?}", r.problems);
    }

    #[test]
    fn a_failed_retry_explains_the_redelivery_after_the_lease_ran_out() {
        let mut h = Vec::new();
        push(&mut h, "a", "j1", Ty::Ok);
        claim(&mut h, "w", "j1", "L1");
        tr(&mut h, "w", F::Retry, "j1", "L1", Ty::Fail);
        claim(&mut h, "w", "j1", "L2");
        tr(&mut h, "w", F::Ack, "j1", "L2", Ty::Ok);
        let r = check(&h, &Final::default());
        assert!(r.is_ok(), "{:?}", r.problems);
        assert_eq!(r.duplicates.get(&Cause::HolderFailed), Some(&1));
    }

    #[test]
    fn an_unknown_push_may_or_may_not_be_delivered() {
        let mut h = Vec::new();
        push(&mut h, "a", "j1", Ty::Invoke);
        h.push(e("a", Ty::Info, F::Kill, "", ""));
        push(&mut h, "b", "j2", Ty::Invoke);
        h.push(e("b", Ty::Info, F::Kill, "", ""));
        claim(&mut h, "r", "j1", "L1");
        tr(&mut h, "r", F::Ack, "j1", "L1", Ty::Ok);
        let r = check(&h, &Final::default());
        assert!(r.is_ok(), "{:?}", r.problems);
        assert_eq!(r.pushes_unknown, 2);
    }

    #[test]
    fn flags_a_delivery_nobody_pushed_or_whose_push_failed() {
        let mut h = Vec::new();
        push(&mut h, "a", "j1", Ty::Fail);
        claim(&mut h, "r", "j1", "L1");
        claim(&mut h, "r", "zz", "L2");
        let r = check(&h, &Final::default());
        assert_eq!(r.unexpected, 2);
        assert!(!r.is_ok());
    }

    #[test]
    fn flags_a_stale_ack() {
        let mut h = Vec::new();
        push(&mut h, "a", "j1", Ty::Ok);
        claim(&mut h, "r1", "j1", "L1");
        h.push(e("x", Ty::Info, F::Stop, "", ""));
        claim(&mut h, "r2", "j1", "L2");
        tr(&mut h, "r1", F::Ack, "j1", "L1", Ty::Ok);
        let r = check(&h, &Final::default());
        assert_eq!(r.stale_ack_accepted, 1, "{:?}", r.problems);
        assert!(!r.is_ok());
        // The same ack refused is fine.
        let mut h2 = h.clone();
        h2.last_mut().unwrap().ty = Ty::Fail;
        tr(&mut h2, "r2", F::Ack, "j1", "L2", Ty::Ok);
        let r2 = check(&h2, &Final::default());
        assert_eq!(r2.stale_ack_accepted, 0);
        // A heartbeat after a reclaim that took the lease back is stale too.
        let mut h3 = Vec::new();
        push(&mut h3, "a", "j1", Ty::Ok);
        claim(&mut h3, "r1", "j1", "L1");
        h3.push(e("g", Ty::Invoke, F::Reclaim, "", ""));
        let mut ok = e("g", Ty::Ok, F::Reclaim, "", "");
        ok.leases = vec!["L1".into()];
        h3.push(ok);
        tr(&mut h3, "r1", F::Heartbeat, "j1", "L1", Ty::Ok);
        assert_eq!(check(&h3, &Final::default()).stale_ack_accepted, 1);
    }

    #[test]
    fn attributes_duplicates_and_flags_the_unexplained() {
        let mut h = Vec::new();
        for j in ["k", "f", "x", "a", "p", "e"] {
            push(&mut h, "prod", j, Ty::Ok);
        }
        // Killed while holding the lease.
        claim(&mut h, "r1", "k", "K1");
        h.push(e("r1", Ty::Info, F::Kill, "", ""));
        claim(&mut h, "r2", "k", "K2");
        tr(&mut h, "r2", F::Ack, "k", "K2", Ty::Ok);
        // Frozen past the lease.
        claim(&mut h, "r3", "f", "F1");
        h.push(e("r3", Ty::Info, F::Stop, "", ""));
        claim(&mut h, "r2", "f", "F2");
        h.push(e("r3", Ty::Info, F::Cont, "", ""));
        tr(&mut h, "r2", F::Ack, "f", "F2", Ty::Ok);
        tr(&mut h, "r3", F::Ack, "f", "F1", Ty::Fail);
        // A failed transition, then the holder exits.
        claim(&mut h, "r4", "e", "E1");
        tr(&mut h, "r4", F::Ack, "e", "E1", Ty::Fail);
        h.push(e("r4", Ty::Info, F::Exit, "", ""));
        claim(&mut h, "r2", "e", "E2");
        tr(&mut h, "r2", F::Ack, "e", "E2", Ty::Ok);
        // Power cut.
        claim(&mut h, "r5", "p", "P1");
        tr(&mut h, "r5", F::Ack, "p", "P1", Ty::Ok);
        h.push(e("host", Ty::Info, F::PowerCut, "", ""));
        claim(&mut h, "r6", "p", "P2");
        tr(&mut h, "r6", F::Ack, "p", "P2", Ty::Ok);
        // Delivered twice with no cause.
        claim(&mut h, "r7", "x", "X1");
        claim(&mut h, "r8", "x", "X2");
        tr(&mut h, "r8", F::Ack, "x", "X2", Ty::Ok);
        // Delivered again after an ack: unexplained, whatever else happened.
        claim(&mut h, "r9", "a", "A1");
        tr(&mut h, "r9", F::Ack, "a", "A1", Ty::Ok);
        h.push(e("r9", Ty::Info, F::Kill, "", ""));
        claim(&mut h, "r2", "a", "A2");
        let r = check(&h, &Final::default());
        assert_eq!(r.duplicates.get(&Cause::RunnerKilled), Some(&1), "{:?}", r.duplicates);
        assert_eq!(r.duplicates.get(&Cause::LeaseExpiredFrozen), Some(&1));
        assert_eq!(r.duplicates.get(&Cause::HolderFailed), Some(&1));
        assert_eq!(r.duplicates.get(&Cause::PowerCut), Some(&1));
        assert_eq!(r.unexplained(), 2, "{:?}", r.problems);
        assert_eq!(r.lost, 0);
        assert!(!r.is_ok());
    }

    #[test]
    fn flags_an_ack_accepted_twice_and_stranded_jobs() {
        let mut h = Vec::new();
        push(&mut h, "a", "j", Ty::Ok);
        claim(&mut h, "r", "j", "L1");
        tr(&mut h, "r", F::Ack, "j", "L1", Ty::Ok);
        tr(&mut h, "r", F::Ack, "j", "L1", Ty::Ok);
        let r = check(&h, &Final::default());
        assert_eq!(r.acked_twice, 1);
        let fin = Final {
            stranded: vec!["ready/x".into()],
            ..Final::default()
        };
        let mut h2 = Vec::new();
        push(&mut h2, "a", "j", Ty::Fail);
        assert!(!check(&h2, &fin).is_ok());
    }
}
