//! The `jobspool` command: a thin layer over the `jobspool` library.
//!
//! Exit codes, decided here and nowhere else:
//!
//! | code | meaning |
//! |---|---|
//! | 0 | success |
//! | 1 | the command ran and reports a failed outcome (dead jobs after `run --drain` or `wait`, problems found by `doctor`) |
//! | 2 | bad usage or input: a bad argument, an invalid or unknown job id, a path that is not a queue |
//! | 3 | the store failed: a file-system or Redis error |
//! | 124 | `wait --timeout` expired |
//!
//! `check` follows the monitoring-plugin convention instead (0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN).

#[macro_use]
mod output;
mod cli;
mod cmd;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let args = cli::Cli::parse();
    output::init_tracing(args.verbose, args.quiet);
    match cmd::dispatch(args.command) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("jobspool: {e}");
            ExitCode::from(exit_code(&e))
        }
    }
}

/// The one mapping from library errors to exit codes.
fn exit_code(e: &jobspool::Error) -> u8 {
    use jobspool::Error::*;
    match e {
        Invalid(_)
        | Config { .. }
        | NotFound { .. }
        | JobExists { .. }
        | Finished { .. }
        | WrongState { .. }
        | LeaseLost { .. } => 2,
        _ => 3,
    }
}
