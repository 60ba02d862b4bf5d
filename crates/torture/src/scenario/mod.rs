//! The scenarios. Each returns its figures; a scenario fails when any violation is recorded.

pub mod chaos;
pub mod corruption;
pub mod disk;
pub mod foreign;
pub mod hostile;
pub mod multiuser;
pub mod powercut;
pub mod syscalls;

use serde::Serialize;

use crate::Env;
use crate::checker::Report;

/// What one scenario did and found.
#[derive(Debug, Default, Serialize)]
pub struct Figures {
    /// The scenario.
    pub name: String,
    /// Runs (one fault or one case each).
    pub cases: u64,
    /// Faults injected (kills, errors, corruptions, …).
    pub faults: u64,
    /// The history checks, summed over the runs.
    pub report: Report,
    /// Other figures, one line each.
    pub notes: Vec<String>,
    /// Every violation of the contract (empty when the scenario passes).
    pub violations: Vec<String>,
    /// Why the scenario (or part of it) was skipped.
    pub skipped: Option<String>,
}

impl Figures {
    pub fn new(name: &str) -> Figures {
        Figures {
            name: name.to_string(),
            ..Figures::default()
        }
    }

    /// Adds a checked run; its violations become the scenario's, tagged with `case`.
    pub fn add_run(&mut self, case: &str, r: &Report) {
        self.cases += 1;
        for p in &r.problems {
            self.violations.push(format!("{case}: {p}"));
        }
        if !r.is_ok() && r.problems.is_empty() {
            self.violations.push(format!("{case}: {}", r.summary()));
        }
        self.report.add(r);
    }

    /// Records a violation found outside the history check.
    pub fn violation(&mut self, case: &str, what: impl std::fmt::Display) {
        self.violations.push(format!("{case}: {what}"));
    }

    pub fn passed(&self) -> bool {
        self.violations.is_empty()
    }

    /// A human-readable block.
    pub fn render(&self) -> String {
        let mut s = format!("## {}\n", self.name);
        if let Some(why) = &self.skipped {
            s += &format!("skipped: {why}\n");
        }
        s += &format!(
            "cases={} faults={}\n{}\n",
            self.cases,
            self.faults,
            self.report.summary()
        );
        for n in &self.notes {
            s += &format!("{n}\n");
        }
        s += &format!("violations: {}\n", self.violations.len());
        for v in self.violations.iter().take(20) {
            s += &format!("  {v}\n");
        }
        s
    }
}

/// A scenario: runs its short or long form and returns its figures.
pub type Scenario = fn(&Env) -> Figures;

/// Every scenario, by name.
pub fn all() -> Vec<(&'static str, Scenario)> {
    vec![
        ("kill-at-every-syscall", syscalls::kill_at_every_syscall),
        ("io-errors", syscalls::io_errors),
        ("full-disk", disk::full_disk),
        ("chaos", chaos::chaos_scenario),
        ("redis-chaos", chaos::redis_chaos_scenario),
        ("power-cut", powercut::power_cut),
        ("corruption", corruption::corruption),
        ("foreign-entries", foreign::foreign),
        ("multi-user", multiuser::multi_user),
        ("hostile-ids-and-commands", hostile::hostile),
        ("poison-jobs", hostile::poison),
    ]
}
