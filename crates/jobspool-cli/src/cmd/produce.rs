//! Commands that create queues and jobs.

use std::io::{IsTerminal, Read};

use jobspool::store::dir::{DirStore, InitOptions, init as init_dir};
use jobspool::store::redis::{self, RedisStore};
use jobspool::{Error, JobId, NewJob, QueueConfig, Result, Store};

use crate::cli::PushArgs;

pub fn init(queue: &str, group: Option<String>, mode: Option<u32>) -> Result<u8> {
    let store: Box<dyn Store> = if redis::is_url(queue) {
        if group.is_some() || mode.is_some() {
            return Err(Error::Invalid(format!(
                "{queue}: --group and --mode set file permissions of a queue directory; a Redis queue has no files (use Redis ACLs to share it)"
            )));
        }
        let store = RedisStore::init(queue, QueueConfig::default(), false)?;
        say!("{queue}: ready")?;
        Box::new(store)
    } else {
        let cfg = init_dir(std::path::Path::new(queue), &InitOptions { group, mode })?;
        say!(
            "{queue}: ready (file mode {:04o}{})",
            cfg.mode,
            cfg.group.as_deref().map(|g| format!(", group {g}")).unwrap_or_default()
        )?;
        Box::new(DirStore::open(queue, false)?)
    };
    let problems = store.doctor()?;
    for p in &problems {
        eprintln!("jobspool: warning: {p}");
    }
    Ok(0)
}

fn template(args: &PushArgs) -> Result<NewJob> {
    let mut job = NewJob::new(Vec::new()).priority(args.priority);
    if let Some(d) = args.delay {
        job = job.delay(d);
    }
    if let Some(n) = args.max_attempts {
        job = job.max_attempts(n);
    }
    if let Some(t) = args.timeout {
        job = job.timeout(t);
    }
    if !args.command.is_empty() {
        job = job.command(args.command.clone());
    }
    job.validate()?;
    Ok(job)
}

fn read_stdin() -> Result<Vec<u8>> {
    let mut buf = Vec::new();
    std::io::stdin()
        .lock()
        .read_to_end(&mut buf)
        .map_err(|e| Error::io("<stdin>", "reading the payload", e))?;
    Ok(buf)
}

pub fn push(args: PushArgs) -> Result<u8> {
    let template = template(&args)?;
    // Everything the push needs from the caller is read before the queue is opened (or created),
    // so that bad input leaves nothing behind.
    if args.batch {
        if std::io::stdin().is_terminal() {
            return Err(Error::Invalid(
                "push --batch reads one job per line from standard input; pipe the lines in".into(),
            ));
        }
        let input = read_stdin()?;
        let mut lines: Vec<&[u8]> = input.split(|&b| b == b'\n').collect();
        if lines.last().is_some_and(|l| l.is_empty()) {
            lines.pop();
        }
        let jobs: Vec<NewJob> = lines
            .into_iter()
            .map(|line| NewJob {
                payload: line.to_vec(),
                ..template.clone()
            })
            .collect();
        let store = jobspool::store::open(&args.queue, true)?;
        let ids = store.push_batch(&jobs)?;
        for id in ids {
            say!("{id}")?;
        }
        return Ok(0);
    }
    let payload = match (&args.payload, &args.payload_file) {
        (Some(p), _) => p.clone().into_bytes(),
        (None, Some(path)) => std::fs::read(path).map_err(|e| {
            Error::Invalid(format!(
                "{}: cannot read the payload file: {e}; give a readable file to --payload-file",
                path.display()
            ))
        })?,
        (None, None) if !std::io::stdin().is_terminal() => read_stdin()?,
        (None, None) => Vec::new(),
    };
    let mut job = NewJob { payload, ..template };
    if let Some(id) = &args.id {
        job.id = Some(JobId::new(id.clone())?);
    }
    job.validate()?;
    let store = jobspool::store::open(&args.queue, true)?;
    let id = store.push(&job)?;
    say!("{id}")?;
    Ok(0)
}
