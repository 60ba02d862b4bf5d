//! Commands that repair: retry dead jobs, remove jobs, check the layout.

use jobspool::{Error, JobId, Result, State};

use super::open;

pub fn retry(queue: &str, ids: &[String], all: bool) -> Result<u8> {
    let store = open(queue)?;
    if all {
        let revived = store.revive_all()?;
        for id in &revived {
            say!("{id}")?;
        }
        eprintln!("jobspool: {} dead job(s) sent back to ready", revived.len());
        return Ok(0);
    }
    let mut code = 0;
    for id in ids {
        let id = JobId::new(id.clone())?;
        match store.revive(&id) {
            Ok(()) => say!("{id}")?,
            // Retrying a job that is no longer dead is harmless: say so and go on.
            Err(Error::WrongState { state, .. }) => eprintln!("jobspool: {id} is {state}, not dead; left as it is"),
            Err(e @ Error::NotFound { .. }) => {
                eprintln!("jobspool: {e}");
                code = 2;
            }
            Err(e) => return Err(e),
        }
    }
    Ok(code)
}

pub fn rm(queue: &str, ids: &[String]) -> Result<u8> {
    let store = open(queue)?;
    let mut code = 0;
    for id in ids {
        match store.remove(id) {
            Ok(Some(State::Running)) => {
                eprintln!("jobspool: {id} was running; its runner stops it at its next heartbeat");
                say!("{id}")?;
            }
            Ok(Some(_)) => say!("{id}")?,
            Ok(None) => {
                eprintln!("jobspool: {id}: finished job's log and history removed; the id can be pushed again");
                say!("{id}")?;
            }
            Err(e @ Error::NotFound { .. }) => {
                eprintln!("jobspool: {e}");
                code = 2;
            }
            Err(e) => return Err(e),
        }
    }
    Ok(code)
}

pub fn doctor(queue: &str) -> Result<u8> {
    let store = open(queue)?;
    let problems = store.doctor()?;
    if problems.is_empty() {
        say!("{queue}: no problems found")?;
        return Ok(0);
    }
    for p in &problems {
        say!("{p}")?;
    }
    Ok(1)
}
