//! Signals as events. Every signal that arrives is delivered on a channel, in order: a later
//! signal never overwrites an earlier one, so `SIGTERM` followed at once by `SIGHUP` or `SIGALRM`
//! still shuts down.

use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;

/// The signals a runner reacts to or deliberately ignores.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sig {
    /// SIGTERM: stop claiming, let running jobs finish within the grace period.
    Term,
    /// SIGINT: as SIGTERM.
    Int,
    /// SIGQUIT: stop at once, without the grace period.
    Quit,
    /// SIGUSR1: log the runner's status.
    Usr1,
    /// SIGHUP, SIGALRM, SIGUSR2: logged and otherwise ignored (their default would kill the
    /// runner and orphan its jobs until their leases expire).
    Ignored(&'static str),
}

/// Installs handlers for every signal a runner cares about and returns the event channel.
/// Installing happens before this returns, so no signal can take its default action after.
pub fn listen() -> std::io::Result<mpsc::UnboundedReceiver<Sig>> {
    let (tx, rx) = mpsc::unbounded_channel();
    let kinds = [
        (SignalKind::terminate(), Sig::Term),
        (SignalKind::interrupt(), Sig::Int),
        (SignalKind::quit(), Sig::Quit),
        (SignalKind::user_defined1(), Sig::Usr1),
        (SignalKind::hangup(), Sig::Ignored("SIGHUP")),
        (SignalKind::alarm(), Sig::Ignored("SIGALRM")),
        (SignalKind::user_defined2(), Sig::Ignored("SIGUSR2")),
    ];
    for (kind, sig) in kinds {
        let mut stream = signal(kind)?;
        let tx = tx.clone();
        tokio::spawn(async move {
            while stream.recv().await.is_some() {
                if tx.send(sig).is_err() {
                    break;
                }
            }
        });
    }
    Ok(rx)
}
