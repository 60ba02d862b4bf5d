//! Random sequences of push / claim / heartbeat / ack / retry / bury / release / reclaim /
//! crash against the directory store, checked step by step against a simple in-memory model.

use std::collections::HashMap;
use std::time::Duration;

use jobspool::store::dir::DirStore;
use jobspool::{Error, Lease, NewJob, Store};
use proptest::prelude::*;

const CLAIMERS: usize = 3;
const MAX_ATTEMPTS: u32 = 3;
const LEASE: Duration = Duration::from_secs(60);

#[derive(Clone, Debug)]
enum Op {
    Push { priority: i16, scheduled: bool },
    Claim(usize),
    Heartbeat(usize),
    Ack(usize),
    Retry(usize),
    Bury(usize),
    Release(usize),
    Reclaim(usize),
    Crash(usize),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => ((-2i16..=2), prop::bool::weighted(0.15)).prop_map(|(priority, scheduled)| Op::Push { priority, scheduled }),
        4 => (0..CLAIMERS).prop_map(Op::Claim),
        1 => (0..16usize).prop_map(Op::Heartbeat),
        2 => (0..16usize).prop_map(Op::Ack),
        1 => (0..16usize).prop_map(Op::Retry),
        1 => (0..16usize).prop_map(Op::Bury),
        1 => (0..16usize).prop_map(Op::Release),
        1 => (0..CLAIMERS).prop_map(Op::Reclaim),
        1 => (0..CLAIMERS).prop_map(Op::Crash),
    ]
}

#[derive(Clone, Debug, PartialEq)]
enum M {
    Ready(u32),
    Scheduled,
    Running {
        token: String,
        attempts: u32,
        owner: (usize, u32),
    },
    Dead,
    Done,
}

struct Model {
    jobs: HashMap<String, (M, i16)>,
    /// Generation of each claimer; a crash starts a new one.
    generation: [u32; CLAIMERS],
}

impl Model {
    fn count(&self, f: impl Fn(&M) -> bool) -> u64 {
        self.jobs.values().filter(|(m, _)| f(m)).count() as u64
    }
    fn current(&self, lease: &Lease) -> bool {
        matches!(&self.jobs[lease.id.as_str()].0, M::Running { token, .. } if *token == lease.token)
    }
}

fn check(ops: Vec<Op>) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().unwrap();
    let q = dir.path().join("q");
    jobspool::store::dir::init(&q, &Default::default()).unwrap();
    let producer = DirStore::open(&q, false).unwrap();
    let mut claimers: Vec<Option<DirStore>> = (0..CLAIMERS)
        .map(|_| Some(DirStore::open(&q, false).unwrap()))
        .collect();
    let mut model = Model {
        jobs: HashMap::new(),
        generation: [0; CLAIMERS],
    };
    let mut handles: Vec<(Lease, usize)> = Vec::new();
    for op in ops {
        match op {
            Op::Push { priority, scheduled } => {
                let mut job = NewJob::new("p").priority(priority).max_attempts(MAX_ATTEMPTS);
                if scheduled {
                    job = job.delay(Duration::from_secs(3600));
                }
                let id = producer.push(&job).unwrap();
                model.jobs.insert(
                    id.to_string(),
                    (if scheduled { M::Scheduled } else { M::Ready(0) }, priority),
                );
            }
            Op::Claim(c) => {
                let store = claimers[c].get_or_insert_with(|| DirStore::open(&q, false).unwrap());
                let got = store.claim(LEASE).unwrap();
                let best = model
                    .jobs
                    .values()
                    .filter(|(m, _)| matches!(m, M::Ready(_)))
                    .map(|(_, p)| *p)
                    .max();
                match (got, best) {
                    (None, None) => {}
                    (Some(claim), Some(best)) => {
                        let (state, prio) = model.jobs.get_mut(claim.job.id.as_str()).unwrap();
                        let M::Ready(attempts) = *state else {
                            return Err(TestCaseError::fail(format!(
                                "claimed {} in state {state:?}",
                                claim.job.id
                            )));
                        };
                        prop_assert_eq!(*prio, best, "not the most urgent job");
                        prop_assert_eq!(claim.lease.attempt, attempts + 1);
                        *state = M::Running {
                            token: claim.lease.token.clone(),
                            attempts,
                            owner: (c, model.generation[c]),
                        };
                        handles.push((claim.lease, c));
                    }
                    (got, best) => {
                        return Err(TestCaseError::fail(format!(
                            "claim gave {:?}, model's best {best:?}",
                            got.map(|c| c.job.id)
                        )));
                    }
                }
            }
            Op::Heartbeat(k) | Op::Ack(k) | Op::Retry(k) | Op::Bury(k) | Op::Release(k) => {
                if handles.is_empty() {
                    continue;
                }
                let (lease, c) = handles[k % handles.len()].clone();
                // A crashed claimer's handle is used through a fresh instance: the token is
                // what matters, not who presents it.
                let store = claimers[c].get_or_insert_with(|| DirStore::open(&q, false).unwrap());
                let current = model.current(&lease);
                let result = match &op {
                    Op::Heartbeat(_) => store.heartbeat(&lease),
                    Op::Ack(_) => store.ack(&lease),
                    Op::Retry(_) => store.retry(&lease, Duration::ZERO),
                    Op::Bury(_) => store.bury(&lease, "model"),
                    _ => store.release(&lease),
                };
                match (current, result) {
                    (true, Ok(())) => {
                        let (state, _) = model.jobs.get_mut(lease.id.as_str()).unwrap();
                        let M::Running { attempts, .. } = *state else {
                            unreachable!()
                        };
                        *state = match op {
                            Op::Heartbeat(_) => state.clone(),
                            Op::Ack(_) => M::Done,
                            Op::Retry(_) => M::Ready(attempts + 1),
                            Op::Bury(_) => M::Dead,
                            _ => M::Ready(attempts),
                        };
                    }
                    (false, Err(Error::LeaseLost { .. })) => {}
                    (current, r) => {
                        return Err(TestCaseError::fail(format!(
                            "{op:?} on a {} lease gave {r:?}",
                            if current { "current" } else { "stale" }
                        )));
                    }
                }
            }
            Op::Crash(c) => {
                claimers[c] = None;
                model.generation[c] += 1;
            }
            Op::Reclaim(c) => {
                let store = claimers[c].get_or_insert_with(|| DirStore::open(&q, false).unwrap());
                let got = store.reclaim(MAX_ATTEMPTS).unwrap();
                let mut expected = 0;
                for (state, _) in model.jobs.values_mut() {
                    if let M::Running { attempts, owner, .. } = state.clone() {
                        if model.generation[owner.0] != owner.1 {
                            expected += 1;
                            *state = if attempts + 1 >= MAX_ATTEMPTS {
                                M::Dead
                            } else {
                                M::Ready(attempts + 1)
                            };
                        }
                    }
                }
                prop_assert_eq!(got.len(), expected, "reclaimed {:?}", got);
            }
        }
        let s = producer.stats().unwrap();
        let want = (
            model.count(|m| matches!(m, M::Ready(_))),
            model.count(|m| *m == M::Scheduled),
            model.count(|m| matches!(m, M::Running { .. })),
            model.count(|m| *m == M::Dead),
        );
        prop_assert_eq!((s.ready, s.scheduled, s.running, s.dead), want, "after {:?}", op);
        prop_assert_eq!(s.quarantined, 0);
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]
    #[test]
    fn the_store_behaves_like_the_model(ops in prop::collection::vec(op(), 1..40)) {
        check(ops)?;
    }
}
