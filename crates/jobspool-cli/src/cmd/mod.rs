//! One function per command. Each returns the process exit code for outcomes that are not
//! errors; errors are mapped to exit codes in `main`.

mod admin;
mod inspect;
mod produce;
mod run;

use std::sync::Arc;

use jobspool::{Result, Store};

use crate::cli::Command;

/// Opens the queue a command names; only `push` creates a missing one.
pub fn open(queue: &str) -> Result<Arc<dyn Store>> {
    jobspool::store::open(queue, false)
}

pub fn dispatch(command: Command) -> Result<u8> {
    match command {
        Command::Init { queue, group, mode } => produce::init(&queue, group, mode),
        Command::Push(args) => produce::push(args),
        Command::Ls { queue, state, json } => inspect::ls(&queue, state, json),
        Command::Show {
            queue,
            id,
            json,
            payload,
        } => inspect::show(&queue, &id, json, payload),
        Command::Stats { queue, json } => inspect::stats(&queue, json),
        Command::Status { queue, json } => inspect::status(&queue, json),
        Command::Logs { queue, id, follow } => inspect::logs(&queue, &id, follow),
        Command::Retry { queue, ids, all } => admin::retry(&queue, &ids, all),
        Command::Rm { queue, ids } => admin::rm(&queue, &ids),
        Command::Doctor { queue } => admin::doctor(&queue),
        Command::Run(args) => run::run(args),
        Command::Wait { queue, timeout } => run::wait(&queue, timeout),
        Command::Check(args) => run::check(args),
    }
}
