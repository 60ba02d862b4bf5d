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
use clap::error::ErrorKind;

fn main() -> ExitCode {
    let args = match cli::Cli::try_parse() {
        Ok(args) => args,
        Err(e) => return usage_error(e),
    };
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

/// A command line that does not parse: clap's message and exit 2 — except for `check`, whose
/// caller is a monitoring system that reads one status line and treats any exit code but 0 to 3
/// as a broken plugin. There a usage error is UNKNOWN (exit 3), on one line.
fn usage_error(e: clap::Error) -> ExitCode {
    let asks_for_help = matches!(
        e.kind(),
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
    );
    if asks_for_help || !invokes_check() {
        e.exit();
    }
    let text = e.to_string();
    let what: Vec<&str> = text
        .lines()
        .map(str::trim)
        .take_while(|l| !l.starts_with("Usage:") && !l.starts_with("For more information"))
        .filter(|l| !l.is_empty() && !l.starts_with("tip:"))
        .collect();
    let what = what.join(" ");
    let what = what.strip_prefix("error: ").unwrap_or(&what);
    let _ = output::out(
        format!("JOBSPOOL UNKNOWN - {what} (see jobspool check --help)").as_bytes(),
        true,
    );
    ExitCode::from(3)
}

/// Whether the command line names the `check` subcommand (its first word that is not a global
/// flag; the global flags take no values).
fn invokes_check() -> bool {
    std::env::args_os()
        .skip(1)
        .find(|a| !a.as_encoded_bytes().starts_with(b"-"))
        .is_some_and(|a| a == "check")
}
