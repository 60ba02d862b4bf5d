//! The Redis store: the same queue semantics in a Redis server, for queues shared across machines.
//!
//! A queue is addressed as `redis://[USER:PASSWORD@]HOST:PORT/DB?queue=NAME`. Every state
//! transition is one Lua script (see [`scripts`]) that checks the caller's lease token, takes the
//! time from the server, and touches only keys under the queue's hash tag `{jobspool:NAME}`, so a
//! stale holder can never disturb the new holder and the store works on Redis Cluster.
//!
//! Durability is the server's: with `appendonly yes` and `appendfsync always` a push is on disk
//! before Redis answers it. [`Store::doctor`] reports settings that cannot keep that promise.

mod scripts;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use ::redis::{Script, Value};

use super::*;
use crate::Error;
use crate::body;
use crate::config::QueueConfig;
use crate::job::{MAX_PRIORITY, now_ms};

/// Largest log kept per job; past it the oldest half is dropped.
pub const LOG_CAP: usize = 1 << 20;

/// A runner whose registration is older than this is taken for dead.
const ALIVE_WINDOW_MS: u64 = 30_000;

/// Registrations silent for longer than this are removed by garbage collection.
const FORGET_RUNNERS_MS: u64 = 3_600_000;

/// Jobs whose fields one pipelined round trip of a listing reads.
const LIST_CHUNK: usize = 500;

/// Jobs per push script: a batch larger than this is pushed in several atomic parts.
const PUSH_CHUNK: usize = 1000;

/// How long a request whose outcome is unknown is repeated before the error is reported.
const REPEAT_PATIENCE: Duration = Duration::from_secs(20);

/// Most connections one store handle keeps open at once. Each concurrent caller (a runner's
/// slots, threads sharing a handle) uses its own, so one caller's round trip never waits for
/// another's; past this many, callers wait for one to be given back.
const MAX_CONNECTIONS: usize = 16;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const IO_TIMEOUT: Duration = Duration::from_secs(30);

/// Where a Redis queue lives, parsed from its URL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Address {
    /// The server URL without the `queue` parameter (passed to the client).
    pub server: String,
    /// The queue's name.
    pub queue: String,
}

impl Address {
    /// Parses `redis://HOST:PORT/DB?queue=NAME`.
    pub fn parse(url: &str) -> Result<Address> {
        let bad = |what: &str| {
            Error::Invalid(format!(
                "{url}: {what}; a Redis queue is written redis://HOST:PORT/DB?queue=NAME (for example redis://127.0.0.1:6379/0?queue=mail)"
            ))
        };
        if !url.starts_with("redis://") {
            return Err(bad("only redis:// URLs are supported"));
        }
        let (server, query) = url.split_once('?').ok_or_else(|| bad("the queue name is missing"))?;
        let mut queue = None;
        for pair in query.split('&') {
            match pair.split_once('=') {
                Some(("queue", name)) => queue = Some(name.to_string()),
                _ => return Err(bad(&format!("unknown parameter {pair:?}"))),
            }
        }
        let queue = queue.ok_or_else(|| bad("the queue name is missing"))?;
        if let Err(why) = JobId::check(&queue) {
            return Err(bad(&format!("queue name {queue:?} is not valid: {why}")));
        }
        Ok(Address {
            server: server.to_string(),
            queue,
        })
    }
}

/// Each script's name and its SHA1 digest, the name `EVALSHA` calls it by: for tools that count
/// what a client sends to the server (the benchmark harness).
pub fn script_digests() -> Vec<(&'static str, String)> {
    Scripts::new()
        .named()
        .into_iter()
        .map(|(name, script)| (name, script.get_hash().to_string()))
        .collect()
}

/// True when `target` names a Redis queue rather than a directory.
pub fn is_url(target: &str) -> bool {
    target.starts_with("redis://") || target.starts_with("rediss://")
}

/// Declares the store's scripts once: a field of [`Scripts`] each, loaded from the constant of
/// the same name in `scripts.rs`, and listed by name for [`script_digests`].
macro_rules! scripts {
    ($($name:ident: $body:ident,)*) => {
        struct Scripts {
            $($name: Script,)*
        }

        impl Scripts {
            fn new() -> Scripts {
                Scripts {
                    $($name: Script::new(&scripts::source(scripts::$body)),)*
                }
            }

            /// Every script with its name.
            fn named(&self) -> Vec<(&'static str, &Script)> {
                vec![$((stringify!($name), &self.$name),)*]
            }
        }
    };
}

scripts! {
    push: PUSH,
    claim: CLAIM,
    reclaim: RECLAIM,
    heartbeat: HEARTBEAT,
    ack: ACK,
    retry: RETRY,
    bury: BURY,
    release: RELEASE,
    quarantine: QUARANTINE,
    revive: REVIVE,
    remove: REMOVE,
    stats: STATS,
    next_due: NEXT_DUE,
    log_append: LOG_APPEND,
    record: RECORD,
    begin_attempt: BEGIN_ATTEMPT,
    end_attempt: END_ATTEMPT,
    announce: ANNOUNCE,
    runners: RUNNERS,
    forget_runners: FORGET_RUNNERS,
}

struct Inner {
    target: String,
    /// The target with any password masked, for messages.
    shown: String,
    client: ::redis::Client,
    prefix: String,
    conns: Pool,
    scripts: Scripts,
    config: QueueConfig,
}

impl Inner {
    fn backend(&self, e: ::redis::RedisError) -> Error {
        let hint = if e.is_io_error() || e.is_connection_refusal() || e.is_timeout() {
            "; is the Redis server running and reachable?"
        } else {
            ""
        };
        Error::Backend {
            target: self.shown.clone(),
            msg: format!("{e}{hint}"),
        }
    }

    /// Runs `f` on the store's connection, connecting first if needed. A connection that failed
    /// is dropped so the next call reconnects. The call itself is not repeated here, since a
    /// script that reached the server may have been applied; see [`Inner::run_again`].
    fn with<T>(&self, f: impl FnOnce(&mut ::redis::Connection) -> ::redis::RedisResult<T>) -> Result<T> {
        self.with_raw(f).map_err(|(e, _)| self.backend(e))
    }

    /// [`Inner::with`], telling apart the failures after which the request may have reached
    /// the server (`true`: its outcome is unknown) from those where it surely did not.
    ///
    /// The call has a connection of its own for its duration (see [`Pool`]), so concurrent
    /// callers on one handle do not wait for each other's round trips.
    fn with_raw<T>(
        &self,
        f: impl FnOnce(&mut ::redis::Connection) -> ::redis::RedisResult<T>,
    ) -> std::result::Result<T, (::redis::RedisError, bool)> {
        let _quiet = SigchldBlocked::new();
        let mut lent = self.conns.take(&self.client).map_err(|e| (e, false))?;
        f(lent.conn()).map_err(|e| {
            let broke = e.is_io_error() || e.is_connection_dropped() || e.is_timeout() || e.is_unrecoverable_error();
            if broke {
                lent.broke();
            }
            (e, broke)
        })
    }

    fn key(&self, suffix: &str) -> String {
        format!("{}:{suffix}", self.prefix)
    }

    /// Invokes a script with the queue prefix as its first argument.
    fn run<T: ::redis::FromRedisValue>(&self, script: &Script, args: &[&dyn Arg]) -> Result<T> {
        self.with(|c| invoke(c, script, &self.key("ready"), &self.prefix, args))
    }

    /// [`Inner::run`] for a script that is safe to repeat: one whose repeat (same lease token or
    /// request id) answers what the first run did and applies nothing twice. When the connection
    /// breaks — or a stop signal interrupts the wait for the answer — after the request may have
    /// reached the server, its outcome is unknown; reporting a failure could hide a push or an
    /// ack that took effect. So the request is sent again, on a new connection, for up to
    /// [`REPEAT_PATIENCE`], and only then does the caller get the error.
    fn run_again<T: ::redis::FromRedisValue>(&self, script: &Script, args: &[&dyn Arg]) -> Result<T> {
        let started = std::time::Instant::now();
        let mut pause = Duration::from_millis(20);
        let mut unknown = false;
        loop {
            match self.with_raw(|c| invoke(c, script, &self.key("ready"), &self.prefix, args)) {
                Ok(v) => return Ok(v),
                Err((e, maybe_applied)) => {
                    unknown |= maybe_applied;
                    if !unknown || started.elapsed() + pause > REPEAT_PATIENCE {
                        return Err(self.backend(e));
                    }
                    tracing::warn!(
                        "{}: {e}; the request may have been applied: sending it again",
                        self.shown
                    );
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(Duration::from_secs(2));
                }
            }
        }
    }
}

/// SIGCHLD kept off the calling thread while it waits on Redis, let through again after.
///
/// A signal that arrives while a thread waits on a socket with a timeout (`SO_RCVTIMEO`, which
/// every pooled connection has) fails the wait with EINTR, whatever the signal's action and
/// `SA_RESTART` (signal(7)), and the client then takes the connection for broken. A runner gets
/// SIGCHLD for every handler that exits; ignored, it is normally discarded, but it is delivered
/// when it comes while the thread that started the handler has every signal blocked — which
/// the runner's spawning thread has, between clone and exec of the next handler. In a push
/// storm one call in a few hundred failed ("claiming failed", "cannot open the job's log",
/// repeats of unknown outcomes), and the pool reconnected: about 600 new connections for
/// 10 000 jobs. Blocked here, SIGCHLD goes to another thread, or waits until the call is over.
/// Other signals are left alone: they are rare for a runner (a stop signal, whose effect on a
/// call [`Inner::run_again`] covers), and blocking them would hold up a Ctrl-C of a command
/// waiting on a hung server.
struct SigchldBlocked {
    unblock: bool,
}

impl SigchldBlocked {
    fn set() -> nix::sys::signal::SigSet {
        let mut set = nix::sys::signal::SigSet::empty();
        set.add(nix::sys::signal::Signal::SIGCHLD);
        set
    }

    fn new() -> SigchldBlocked {
        let mut old = nix::sys::signal::SigSet::empty();
        let blocked = nix::sys::signal::pthread_sigmask(
            nix::sys::signal::SigmaskHow::SIG_BLOCK,
            Some(&Self::set()),
            Some(&mut old),
        )
        .is_ok();
        SigchldBlocked {
            unblock: blocked && !old.contains(nix::sys::signal::Signal::SIGCHLD),
        }
    }
}

impl Drop for SigchldBlocked {
    fn drop(&mut self) {
        if self.unblock {
            let _ =
                nix::sys::signal::pthread_sigmask(nix::sys::signal::SigmaskHow::SIG_UNBLOCK, Some(&Self::set()), None);
        }
    }
}

/// The connections of one store handle: opened when a caller needs one and none is idle, given
/// back after each call, at most [`MAX_CONNECTIONS`] open.
///
/// A connection that breaks is dropped, and so is every connection opened before it (they are
/// likely broken by the same outage, a server restart for instance): the next call connects
/// afresh, as it did when the handle had a single connection. That keeps [`Inner::run_again`]'s
/// promise that a repeat goes out on a new connection, and means an outage costs one failed
/// call, not one per idle connection.
struct Pool {
    state: Mutex<PoolState>,
    freed: Condvar,
}

struct PoolState {
    /// Connections not in use, with the generation they were opened in.
    idle: Vec<(u64, ::redis::Connection)>,
    /// Connections open: idle, lent, or being opened.
    open: usize,
    /// Bumped when a connection breaks; connections of earlier generations are not reused.
    generation: u64,
}

impl Pool {
    fn new() -> Pool {
        Pool {
            state: Mutex::new(PoolState {
                idle: Vec::new(),
                open: 0,
                generation: 0,
            }),
            freed: Condvar::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, PoolState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// An idle connection of the current generation, or a new one, waiting while
    /// [`MAX_CONNECTIONS`] are in use. The connection is made outside the lock.
    fn take(&self, client: &::redis::Client) -> ::redis::RedisResult<Lent<'_>> {
        let mut s = self.lock();
        loop {
            while let Some((generation, conn)) = s.idle.pop() {
                if generation == s.generation {
                    return Ok(Lent {
                        pool: self,
                        generation,
                        conn: Some(conn),
                        broke: false,
                    });
                }
                s.open -= 1;
            }
            if s.open < MAX_CONNECTIONS {
                s.open += 1;
                let generation = s.generation;
                drop(s);
                return match connect(client) {
                    Ok(conn) => Ok(Lent {
                        pool: self,
                        generation,
                        conn: Some(conn),
                        broke: false,
                    }),
                    Err(e) => {
                        self.lock().open -= 1;
                        self.freed.notify_one();
                        Err(e)
                    }
                };
            }
            s = self.freed.wait(s).unwrap_or_else(|e| e.into_inner());
        }
    }
}

/// A connection lent by a [`Pool`] for one call; given back when dropped.
struct Lent<'a> {
    pool: &'a Pool,
    generation: u64,
    conn: Option<::redis::Connection>,
    broke: bool,
}

impl Lent<'_> {
    fn conn(&mut self) -> &mut ::redis::Connection {
        self.conn.as_mut().expect("lent until dropped")
    }

    /// Marks the connection broken: it and every older one are closed instead of reused.
    fn broke(&mut self) {
        self.broke = true;
    }
}

impl Drop for Lent<'_> {
    fn drop(&mut self) {
        let conn = self.conn.take();
        let mut s = self.pool.lock();
        // A call that panicked may have left a half-read answer on the connection.
        let broke = self.broke || std::thread::panicking();
        if broke && self.generation == s.generation {
            s.generation += 1;
        }
        match conn {
            Some(c) if !broke && self.generation == s.generation => s.idle.push((self.generation, c)),
            _ => s.open -= 1,
        }
        drop(s);
        self.pool.freed.notify_one();
    }
}

/// Invokes `script` with `key` (any key of the queue, for cluster routing), the queue prefix,
/// then `args`.
fn invoke<T: ::redis::FromRedisValue>(
    c: &mut ::redis::Connection,
    script: &Script,
    key: &str,
    prefix: &str,
    args: &[&dyn Arg],
) -> ::redis::RedisResult<T> {
    let mut inv = script.key(key);
    inv.arg(prefix);
    for a in args {
        inv.arg(a.bytes());
    }
    inv.invoke(c)
}

/// A script argument, as the bytes sent to the server.
trait Arg {
    fn bytes(&self) -> Vec<u8>;
}

impl Arg for str {
    fn bytes(&self) -> Vec<u8> {
        self.as_bytes().to_vec()
    }
}

impl Arg for String {
    fn bytes(&self) -> Vec<u8> {
        self.as_bytes().to_vec()
    }
}

impl Arg for [u8] {
    fn bytes(&self) -> Vec<u8> {
        self.to_vec()
    }
}

impl Arg for Vec<u8> {
    fn bytes(&self) -> Vec<u8> {
        self.clone()
    }
}

impl<T: Arg + ?Sized> Arg for &T {
    fn bytes(&self) -> Vec<u8> {
        (**self).bytes()
    }
}

macro_rules! number_arg {
    ($($t:ty),*) => {$(
        impl Arg for $t {
            fn bytes(&self) -> Vec<u8> {
                self.to_string().into_bytes()
            }
        }
    )*};
}
number_arg!(u32, u64, usize, i64);

fn connect(client: &::redis::Client) -> ::redis::RedisResult<::redis::Connection> {
    let c = client.get_connection_with_timeout(CONNECT_TIMEOUT)?;
    c.set_read_timeout(Some(IO_TIMEOUT))?;
    c.set_write_timeout(Some(IO_TIMEOUT))?;
    Ok(c)
}

fn mask_password(url: &str) -> String {
    match (url.find("://"), url.find('@')) {
        (Some(s), Some(at)) if at > s => match url[s + 3..at].split_once(':') {
            Some((user, _)) => format!("{}{user}:***{}", &url[..s + 3], &url[at..]),
            None => url.to_string(),
        },
        _ => url.to_string(),
    }
}

/// A queue kept in a Redis server.
pub struct RedisStore {
    inner: Arc<Inner>,
    runner_id: Mutex<Option<String>>,
    /// The attempt limit the last [`Store::reclaim`] was given, used by the reclaim that every
    /// claim runs first.
    reclaim_max: AtomicU32,
    /// Claims taken back by a claim's own reclaim, reported by the next [`Store::reclaim`].
    reclaimed: Mutex<Vec<Reclaimed>>,
    /// The request ids of claims that failed: the next claim repeats one, so that a claim the
    /// server made but could not answer is handed over instead of held until its lease expires.
    /// Several, since concurrent callers on one handle can each lose an answer.
    unanswered_claims: Mutex<Vec<String>>,
}

impl RedisStore {
    /// Opens the queue at `url`. When it has no configuration yet, it is created with defaults if
    /// `create` is true, else refused with a hint to run `jobspool init`.
    pub fn open(url: &str, create: bool) -> Result<RedisStore> {
        Self::open_with(url, create.then(QueueConfig::default), false)
    }

    /// Creates the queue at `url` (idempotent), or rewrites its configuration when `replace`.
    pub fn init(url: &str, config: QueueConfig, replace: bool) -> Result<RedisStore> {
        Self::open_with(url, Some(config), replace)
    }

    fn open_with(url: &str, create: Option<QueueConfig>, replace: bool) -> Result<RedisStore> {
        let addr = Address::parse(url)?;
        let shown = mask_password(url);
        let client = ::redis::Client::open(addr.server.as_str()).map_err(|e| {
            Error::Invalid(format!(
                "{shown}: {e}; a Redis queue is written redis://HOST:PORT/DB?queue=NAME"
            ))
        })?;
        let mut inner = Inner {
            target: url.to_string(),
            shown,
            client,
            prefix: format!("{{jobspool:{}}}", addr.queue),
            conns: Pool::new(),
            scripts: Scripts::new(),
            config: QueueConfig::default(),
        };
        let key = inner.key("config");
        let text: Option<String> = inner.with(|c| ::redis::cmd("GET").arg(&key).query(c))?;
        inner.config = match (text, create) {
            (Some(_), Some(cfg)) if replace => {
                inner.with(|c| ::redis::cmd("SET").arg(&key).arg(cfg.to_toml()).query::<()>(c))?;
                cfg
            }
            (Some(t), _) => QueueConfig::parse(&t).map_err(|msg| Error::Backend {
                target: inner.shown.clone(),
                msg: format!(
                    "the queue's configuration (key {key}) is not valid: {msg}; rewrite it with `jobspool init`"
                ),
            })?,
            (None, Some(cfg)) => {
                inner.with(|c| {
                    ::redis::cmd("SET")
                        .arg(&key)
                        .arg(cfg.to_toml())
                        .arg("NX")
                        .query::<()>(c)
                })?;
                cfg
            }
            (None, None) => {
                return Err(Error::Backend {
                    target: inner.shown.clone(),
                    msg: "no such queue; create it with `jobspool init` or push a job to it".into(),
                });
            }
        };
        Ok(RedisStore {
            inner: Arc::new(inner),
            runner_id: Mutex::new(None),
            reclaim_max: AtomicU32::new(0),
            reclaimed: Mutex::new(Vec::new()),
            unanswered_claims: Mutex::new(Vec::new()),
        })
    }

    fn lost(id: &JobId) -> Error {
        Error::LeaseLost { id: id.to_string() }
    }

    fn my_id(&self) -> String {
        self.runner_id
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_or_insert_with(|| crate::store::dir::name::random_hex(16))
            .clone()
    }

    fn retention_ms(&self) -> u64 {
        self.inner.config.log_retention.as_millis().max(1) as u64
    }

    fn push_chunk(&self, jobs: &[(JobId, &NewJob)]) -> Result<()> {
        let now = now_ms();
        let mut args: Vec<Vec<u8>> = Vec::with_capacity(2 + jobs.len() * 5);
        args.push(crate::store::dir::name::random_hex(16).into_bytes());
        args.push(jobs.len().to_string().into_bytes());
        for (id, new) in jobs {
            let job = Job::from_new(new, id.clone(), now);
            args.push(id.as_str().as_bytes().to_vec());
            args.push(body::encode(&job));
            args.push((MAX_PRIORITY - new.priority).to_string().into_bytes());
            args.push(job.run_at.saturating_sub(now).to_string().into_bytes());
            args.push(new.max_attempts.unwrap_or(0).to_string().into_bytes());
        }
        let refs: Vec<&dyn Arg> = args.iter().map(|a| a as &dyn Arg).collect();
        let reply: Vec<String> = self.inner.run_again(&self.inner.scripts.push, &refs)?;
        match reply.as_slice() {
            [ok] if ok == "ok" => Ok(()),
            [what, id] if what == "exists" => Err(Error::JobExists {
                id: id.clone(),
                queue: self.inner.shown.clone(),
            }),
            [what, id] if what == "finished" => Err(Error::Finished {
                id: id.clone(),
                queue: self.inner.shown.clone(),
                retention: crate::config::format_duration(self.inner.config.log_retention),
            }),
            other => Err(self.unexpected("push", other)),
        }
    }

    fn unexpected(&self, what: &str, reply: impl std::fmt::Debug) -> Error {
        Error::Backend {
            target: self.inner.shown.clone(),
            msg: format!("unexpected reply to {what}: {reply:?}"),
        }
    }

    fn transition(&self, script: &Script, lease: &Lease, extra: &[&dyn Arg]) -> Result<()> {
        let id = lease.id.as_str();
        let mut args: Vec<&dyn Arg> = vec![&id, &lease.token];
        args.extend_from_slice(extra);
        let ok: i64 = self.inner.run_again(script, &args)?;
        if ok == 1 { Ok(()) } else { Err(Self::lost(&lease.id)) }
    }

    fn parse_reclaimed(&self, flat: &[Value]) -> Vec<Reclaimed> {
        flat.chunks(4)
            .filter_map(|c| {
                let id = JobId::new(text(&c[0])?).ok()?;
                Some(Reclaimed {
                    id,
                    old_token: text(&c[1])?,
                    cause: ReclaimCause::LeaseExpired,
                    attempts: int(&c[2])? as u32,
                    buried: int(&c[3])? == 1,
                })
            })
            .collect()
    }

    fn ids(&self, zset: &str) -> Result<Vec<String>> {
        let key = self.inner.key(zset);
        self.inner
            .with(|c| ::redis::cmd("ZRANGE").arg(&key).arg(0).arg(-1).query(c))
    }

    fn fields(&self, id: &str) -> Result<HashMap<String, Vec<u8>>> {
        let key = self.inner.key(&format!("job:{id}"));
        self.inner.with(|c| ::redis::cmd("HGETALL").arg(&key).query(c))
    }

    fn info(&self, id: &str, f: &HashMap<String, Vec<u8>>, expires: Option<Millis>, bodies: bool) -> Option<JobInfo> {
        let get = |k: &str| f.get(k).map(|v| String::from_utf8_lossy(v).into_owned());
        let num = |k: &str| get(k).and_then(|v| v.parse::<u64>().ok());
        let state = match get("state")?.as_str() {
            "ready" => State::Ready,
            "scheduled" => State::Scheduled,
            "running" => State::Running,
            "dead" => State::Dead,
            "quarantined" => State::Quarantined,
            _ => return None,
        };
        let job = if bodies || state != State::Quarantined {
            f.get("body").and_then(|b| body::decode(b).ok())
        } else {
            None
        };
        let runner = get("runner").filter(|r| !r.is_empty() && state == State::Running);
        Some(JobInfo {
            id: id.to_string(),
            state,
            attempts: num("attempts").unwrap_or(0) as u32,
            priority: num("pkey").map_or(0, |k| MAX_PRIORITY - k as i16),
            since: num("since").unwrap_or(0),
            runner,
            expires: if state == State::Running { expires } else { None },
            lease_ms: num("lease_ms").filter(|_| state == State::Running),
            reason: get("reason"),
            job: if bodies { job } else { None },
        })
    }
}

/// A retry's delay in milliseconds, no later than the latest run-at any store can hold.
fn delay_ms(delay: Duration) -> u64 {
    u64::try_from(delay.as_millis())
        .unwrap_or(u64::MAX)
        .min(crate::job::MAX_RUN_AT.saturating_sub(now_ms()))
}

fn text(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
        Value::SimpleString(s) => Some(s.clone()),
        Value::Int(i) => Some(i.to_string()),
        _ => None,
    }
}

fn int(v: &Value) -> Option<i64> {
    match v {
        Value::Int(i) => Some(*i),
        other => text(other)?.parse().ok(),
    }
}

impl Store for RedisStore {
    fn target(&self) -> &str {
        &self.inner.target
    }

    fn config(&self) -> &QueueConfig {
        &self.inner.config
    }

    fn push(&self, job: &NewJob) -> Result<JobId> {
        Ok(self.push_batch(std::slice::from_ref(job))?.remove(0))
    }

    fn push_batch(&self, jobs: &[NewJob]) -> Result<Vec<JobId>> {
        let mut ids = Vec::with_capacity(jobs.len());
        for j in jobs {
            j.validate()?;
            ids.push(j.id.clone().unwrap_or_else(JobId::generate));
        }
        let pairs: Vec<(JobId, &NewJob)> = ids.iter().cloned().zip(jobs.iter()).collect();
        for chunk in pairs.chunks(PUSH_CHUNK) {
            self.push_chunk(chunk)?;
        }
        Ok(ids)
    }

    fn claim(&self, lease: Duration) -> Result<Option<Claim>> {
        let lease_ms = crate::job::lease_ms(lease)?;
        let max = match self.reclaim_max.load(Ordering::Relaxed) {
            0 => self.inner.config.max_attempts,
            n => n,
        };
        let runner = self.my_id();
        loop {
            let request = self
                .unanswered_claims
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .pop()
                .unwrap_or_else(|| crate::store::dir::name::random_hex(16));
            let reply: Vec<Value> = match self
                .inner
                .run(&self.inner.scripts.claim, &[&lease_ms, &runner, &max, &request])
            {
                Ok(r) => r,
                Err(e) => {
                    self.unanswered_claims
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push(request);
                    return Err(e);
                }
            };
            let (Some(found), Some(Value::Array(reclaimed))) = (reply.first().and_then(int), reply.get(1)) else {
                return Err(self.unexpected("claim", &reply));
            };
            let reclaimed = self.parse_reclaimed(reclaimed);
            if !reclaimed.is_empty() {
                self.reclaimed
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .extend(reclaimed);
            }
            if found == 0 {
                return Ok(None);
            }
            let (Some(id), Some(token), Some(attempt), Some(Value::BulkString(bytes))) = (
                reply.get(2).and_then(text),
                reply.get(3).and_then(text),
                reply.get(4).and_then(int),
                reply.get(5),
            ) else {
                return Err(self.unexpected("claim", &reply));
            };
            let checked = match body::decode(bytes) {
                Ok(job) if job.id.as_str() == id => Ok(job),
                Ok(job) => Err(format!("the body is for job {} not {id}", job.id)),
                Err(c) => Err(c.to_string()),
            };
            match checked {
                Ok(job) => {
                    let lease = Lease {
                        id: job.id.clone(),
                        attempt: attempt as u32,
                        token,
                    };
                    return Ok(Some(Claim { job, lease }));
                }
                Err(reason) => {
                    tracing::error!(job = %id, "quarantined: {reason}");
                    let _: i64 = self
                        .inner
                        .run(&self.inner.scripts.quarantine, &[&id, &token, &reason])?;
                }
            }
        }
    }

    fn heartbeat(&self, lease: &Lease) -> Result<()> {
        self.transition(&self.inner.scripts.heartbeat, lease, &[])
    }

    fn ack(&self, lease: &Lease) -> Result<()> {
        let keep = self.retention_ms();
        self.transition(&self.inner.scripts.ack, lease, &[&keep])
    }

    fn retry(&self, lease: &Lease, delay: Duration) -> Result<()> {
        self.transition(&self.inner.scripts.retry, lease, &[&delay_ms(delay)])
    }

    fn bury(&self, lease: &Lease, reason: &str) -> Result<()> {
        self.transition(&self.inner.scripts.bury, lease, &[&reason])
    }

    fn release(&self, lease: &Lease) -> Result<()> {
        self.transition(&self.inner.scripts.release, lease, &[])
    }

    /// One script, so one round trip (and one fsync) instead of a read and two writes.
    fn begin_attempt(&self, lease: &Lease, header: &[u8], started: &Event) -> Result<(Box<dyn JobLog>, u64)> {
        let json = serde_json::to_string(started).expect("events serialize");
        let keep = self.retention_ms();
        let start: i64 = self.inner.run(
            &self.inner.scripts.begin_attempt,
            &[&lease.id.as_str(), &header, &LOG_CAP, &keep, &json],
        )?;
        Ok((self.open_log(&lease.id)?, start as u64))
    }

    /// One script, so one round trip (and one fsync) instead of three; `log` is not needed. The
    /// script checks the lease before it writes anything, and is answered, not reapplied, when
    /// repeated after its answer was lost, so it is sent again as a transition is.
    fn end_attempt(
        &self,
        lease: &Lease,
        _log: Option<Box<dyn JobLog>>,
        trailer: &[u8],
        outcome: &Outcome,
        event: Option<&Event>,
    ) -> Result<()> {
        let keep = self.retention_ms();
        let (op, arg) = match outcome {
            Outcome::Ack => ("ack", keep.to_string()),
            Outcome::Retry { delay } => ("retry", delay_ms(*delay).to_string()),
            Outcome::Bury { reason } => ("bury", reason.clone()),
            Outcome::Release => ("release", String::new()),
        };
        let json = event.map_or_else(String::new, |e| serde_json::to_string(e).expect("events serialize"));
        self.transition(
            &self.inner.scripts.end_attempt,
            lease,
            &[&op, &arg, &trailer, &LOG_CAP, &keep, &json],
        )
    }

    fn reclaim(&self, max_attempts: u32) -> Result<Vec<Reclaimed>> {
        self.reclaim_max.store(max_attempts.max(1), Ordering::Relaxed);
        let flat: Vec<Value> = self.inner.run(&self.inner.scripts.reclaim, &[&max_attempts.max(1)])?;
        let mut out = std::mem::take(&mut *self.reclaimed.lock().unwrap_or_else(|e| e.into_inner()));
        out.extend(self.parse_reclaimed(&flat));
        for r in &out {
            tracing::warn!(job = %r.id, attempt = r.attempts, buried = r.buried, "reclaimed: its lease expired");
        }
        Ok(out)
    }

    fn list(&self, states: &[State], bodies: bool) -> Result<Vec<JobInfo>> {
        let mut out = Vec::new();
        for state in states {
            let zset = match state {
                State::Ready => "ready",
                State::Scheduled => "sched",
                State::Running => "running",
                State::Dead => "dead",
                State::Quarantined => "quarantine",
            };
            // One listing with scores (a running job's score is its lease expiry), then the
            // jobs' fields in pipelined chunks: a round trip per chunk, not per job.
            let key = self.inner.key(zset);
            let scored: Vec<(String, f64)> = self.inner.with(|c| {
                ::redis::cmd("ZRANGE")
                    .arg(&key)
                    .arg(0)
                    .arg(-1)
                    .arg("WITHSCORES")
                    .query(c)
            })?;
            for chunk in scored.chunks(LIST_CHUNK) {
                let fields: Vec<HashMap<String, Vec<u8>>> = self.inner.with(|c| {
                    let mut p = ::redis::pipe();
                    for (id, _) in chunk {
                        p.cmd("HGETALL").arg(self.inner.key(&format!("job:{id}")));
                    }
                    p.query(c)
                })?;
                for ((id, score), f) in chunk.iter().zip(&fields) {
                    let expires = (*state == State::Running).then_some(*score as u64);
                    if let Some(info) = self.info(id, f, expires, bodies) {
                        out.push(info);
                    }
                }
            }
        }
        Ok(out)
    }

    fn stats(&self) -> Result<Stats> {
        let v: Vec<i64> = self.inner.run(&self.inner.scripts.stats, &[])?;
        let [ready, scheduled, running, dead, quarantined, oldest] = v[..] else {
            return Err(self.unexpected("stats", &v));
        };
        Ok(Stats {
            ready: ready as u64,
            scheduled: scheduled as u64,
            running: running as u64,
            dead: dead as u64,
            quarantined: quarantined as u64,
            oldest_ready: (oldest >= 0).then_some(oldest as u64),
        })
    }

    fn idle(&self) -> Result<Idle> {
        let s = self.stats()?;
        Ok(Idle {
            ready: s.ready,
            scheduled: s.scheduled,
            running: s.running,
        })
    }

    fn get(&self, id: &str) -> Result<Detail> {
        let f = self.fields(id)?;
        let expires = {
            let key = self.inner.key("running");
            let s: Option<f64> = self.inner.with(|c| ::redis::cmd("ZSCORE").arg(&key).arg(id).query(c))?;
            s.map(|s| s as u64)
        };
        let Some(info) = self.info(id, &f, expires, false) else {
            return Err(Error::NotFound {
                id: id.to_string(),
                queue: self.inner.shown.clone(),
            });
        };
        let job = f.get("body").and_then(|b| body::decode(b).ok());
        let key = self.inner.key(&format!("events:{id}"));
        let lines: Vec<String> = self
            .inner
            .with(|c| ::redis::cmd("LRANGE").arg(&key).arg(0).arg(-1).query(c))?;
        Ok(Detail {
            info,
            job,
            history: history(&lines),
        })
    }

    fn revive(&self, id: &JobId) -> Result<()> {
        let before: String = self.inner.run(&self.inner.scripts.revive, &[&id.as_str()])?;
        match before.as_str() {
            "dead" => Ok(()),
            "" => Err(Error::NotFound {
                id: id.to_string(),
                queue: self.inner.shown.clone(),
            }),
            other => Err(Error::WrongState {
                id: id.to_string(),
                state: state_name(other),
                what: "only dead jobs can be retried",
            }),
        }
    }

    fn revive_all(&self) -> Result<Vec<JobId>> {
        let mut out = Vec::new();
        for id in self.ids("dead")? {
            let Ok(id) = JobId::new(id) else { continue };
            match self.revive(&id) {
                Ok(()) => out.push(id),
                Err(Error::NotFound { .. } | Error::WrongState { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }

    fn remove(&self, id: &str) -> Result<Option<State>> {
        let before: String = self.inner.run(&self.inner.scripts.remove, &[&id])?;
        match before.as_str() {
            "ready" => Ok(Some(State::Ready)),
            "scheduled" => Ok(Some(State::Scheduled)),
            "running" => Ok(Some(State::Running)),
            "dead" => Ok(Some(State::Dead)),
            "quarantined" => Ok(Some(State::Quarantined)),
            "finished" => Ok(None),
            _ => Err(Error::NotFound {
                id: id.to_string(),
                queue: self.inner.shown.clone(),
            }),
        }
    }

    fn finished(&self, id: &JobId) -> Result<Option<Vec<Event>>> {
        let (job, log, events) = (
            self.inner.key(&format!("job:{id}")),
            self.inner.key(&format!("log:{id}")),
            self.inner.key(&format!("events:{id}")),
        );
        let (queued, log_kept, lines): (bool, bool, Vec<String>) = self.inner.with(|c| {
            ::redis::pipe()
                .atomic()
                .cmd("EXISTS")
                .arg(&job)
                .cmd("EXISTS")
                .arg(&log)
                .cmd("LRANGE")
                .arg(&events)
                .arg(0)
                .arg(-1)
                .query(c)
        })?;
        if queued || (lines.is_empty() && !log_kept) {
            return Ok(None);
        }
        Ok(Some(history(&lines)))
    }

    fn record(&self, id: &JobId, event: &Event) -> Result<()> {
        let json = serde_json::to_string(event).expect("events serialize");
        let keep = self.retention_ms();
        let _: i64 = self
            .inner
            .run(&self.inner.scripts.record, &[&id.as_str(), &json, &keep])?;
        Ok(())
    }

    fn open_log(&self, id: &JobId) -> Result<Box<dyn JobLog>> {
        Ok(Box::new(RedisLog {
            inner: Arc::clone(&self.inner),
            id: id.clone(),
            retention_ms: self.retention_ms(),
        }))
    }

    fn read_log(&self, id: &JobId, from: u64) -> Result<Option<Vec<u8>>> {
        let (log, off) = (
            self.inner.key(&format!("log:{id}")),
            self.inner.key(&format!("logoff:{id}")),
        );
        let (exists, trimmed): (bool, Option<u64>) = self
            .inner
            .with(|c| ::redis::pipe().cmd("EXISTS").arg(&log).cmd("GET").arg(&off).query(c))?;
        if !exists {
            return Ok(None);
        }
        let start = from.saturating_sub(trimmed.unwrap_or(0));
        let bytes: Vec<u8> = self
            .inner
            .with(|c| ::redis::cmd("GETRANGE").arg(&log).arg(start).arg(-1).query(c))?;
        Ok(Some(bytes))
    }

    fn watch(&self, wake: Wake) -> Result<Box<dyn WatchGuard>> {
        let stop = Arc::new(AtomicBool::new(false));
        let channel = self.inner.key("wake");
        // The listener subscribes on its own thread (a subscription lives as long as the
        // `PubSub` that made it), and reports back before this returns: a push made after
        // `watch` returns is always announced to it.
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let (client, shown, s, ch) = (
            self.inner.client.clone(),
            self.inner.shown.clone(),
            Arc::clone(&stop),
            channel.clone(),
        );
        std::thread::Builder::new()
            .name("jobspool-redis-watch".into())
            .spawn(move || listen(&client, &ch, &shown, &s, &wake, tx))
            .map_err(|e| Error::io("<thread>", "starting the Redis watcher", e))?;
        match rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(self.inner.backend(e)),
            Err(_) => {
                return Err(Error::Backend {
                    target: self.inner.shown.clone(),
                    msg: "the Redis watcher stopped before subscribing".into(),
                });
            }
        }
        Ok(Box::new(RedisWatch {
            stop,
            client: self.inner.client.clone(),
            channel,
        }))
    }

    fn next_due(&self) -> Result<Option<Millis>> {
        let wait: i64 = self.inner.run(&self.inner.scripts.next_due, &[])?;
        Ok((wait >= 0).then(|| now_ms().saturating_add(wait as u64)))
    }

    fn announce(&self, status: &RunnerStatus) -> Result<String> {
        let id = self.my_id();
        let json = serde_json::to_string(status).expect("status serializes");
        let _: i64 = self.inner.run(&self.inner.scripts.announce, &[&id, &json])?;
        Ok(id)
    }

    fn retire(&self) -> Result<()> {
        let id = self.runner_id.lock().unwrap_or_else(|e| e.into_inner()).clone();
        if let Some(id) = id {
            let key = self.inner.key("runners");
            self.inner
                .with(|c| ::redis::cmd("HDEL").arg(&key).arg(&id).query::<()>(c))?;
        }
        Ok(())
    }

    fn runners(&self) -> Result<Vec<RunnerInfo>> {
        let flat: Vec<String> = self.inner.run(&self.inner.scripts.runners, &[])?;
        let now: u64 = flat.first().and_then(|n| n.parse().ok()).unwrap_or(0);
        let mut out = Vec::new();
        for pair in flat[1..].chunks(2) {
            let [id, entry] = pair else { continue };
            let Some((hb, json)) = entry.split_once(' ') else {
                continue;
            };
            let (Ok(heartbeat), Ok(status)) = (hb.parse::<u64>(), serde_json::from_str::<RunnerStatus>(json)) else {
                continue;
            };
            out.push(RunnerInfo {
                id: id.clone(),
                status,
                heartbeat,
                alive: now.saturating_sub(heartbeat) < ALIVE_WINDOW_MS,
            });
        }
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }

    fn collect_garbage(&self) -> Result<u64> {
        // Logs and histories of finished jobs expire by themselves (PEXPIRE at ack).
        let n: i64 = self
            .inner
            .run(&self.inner.scripts.forget_runners, &[&FORGET_RUNNERS_MS])?;
        Ok(n as u64)
    }

    fn doctor(&self) -> Result<Vec<String>> {
        let get = |name: &str| -> Result<std::result::Result<String, String>> {
            let reply: ::redis::RedisResult<Vec<String>> = self
                .inner
                .with_raw(|c| ::redis::cmd("CONFIG").arg("GET").arg(name).query(c))
                .map_err(|(e, _)| e);
            Ok(match reply {
                Ok(v) => v
                    .get(1)
                    .cloned()
                    .ok_or_else(|| format!("CONFIG GET {name} returned nothing")),
                Err(e) => Err(e.to_string()),
            })
        };
        let shown = &self.inner.shown;
        let mut problems = Vec::new();
        match (get("appendonly")?, get("appendfsync")?) {
            (Ok(aof), _) if aof != "yes" => problems.push(format!(
                "{shown}: the server has appendonly={aof}: every job is lost when Redis restarts; set `appendonly yes` and `appendfsync always` in redis.conf"
            )),
            (Ok(_), Ok(fsync)) if fsync != "always" => problems.push(format!(
                "{shown}: the server has appendfsync={fsync}: acknowledged pushes and transitions of about the last second can be lost if the server or machine crashes; set `appendfsync always` to keep every acknowledged push"
            )),
            (Err(e), _) | (_, Err(e)) => problems.push(format!(
                "{shown}: cannot read the server's persistence settings ({e}); make sure it runs with `appendonly yes` and `appendfsync always`"
            )),
            _ => {}
        }
        if let Ok(policy) = get("maxmemory-policy")?
            && policy != "noeviction"
        {
            problems.push(format!(
                "{shown}: the server has maxmemory-policy={policy}: under memory pressure Redis may evict jobs; set `maxmemory-policy noeviction`"
            ));
        }
        Ok(problems)
    }
}

/// A job's history from its events list (entries that do not parse are left out).
fn history(lines: &[String]) -> Vec<Event> {
    lines.iter().filter_map(|l| serde_json::from_str(l).ok()).collect()
}

fn state_name(s: &str) -> &'static str {
    match s {
        "ready" => "ready",
        "scheduled" => "scheduled",
        "running" => "running",
        "quarantined" => "quarantined",
        _ => "dead",
    }
}

/// Subscribes to the queue's wake-up channel (reporting the outcome of the first attempt on
/// `ready`), then delivers wake-ups until stopped. When the server goes away it resubscribes with
/// backoff and wakes the caller after every reconnect, since pushes made meanwhile were not
/// announced.
fn listen(
    client: &::redis::Client,
    channel: &str,
    shown: &str,
    stop: &AtomicBool,
    wake: &Wake,
    ready: std::sync::mpsc::SyncSender<::redis::RedisResult<()>>,
) {
    // This thread only ever waits on Redis: SIGCHLD stays off it for good (see SigchldBlocked).
    std::mem::forget(SigchldBlocked::new());
    let subscribe = || -> ::redis::RedisResult<::redis::Connection> {
        let c = connect(client)?;
        c.set_read_timeout(None)?;
        Ok(c)
    };
    let mut ready = Some(ready);
    let mut pause = Duration::from_millis(100);
    loop {
        let failed = match subscribe() {
            Err(e) => e,
            Ok(mut conn) => {
                let mut ps = conn.as_pubsub();
                match ps.subscribe(channel) {
                    Err(e) => e,
                    Ok(()) => {
                        match ready.take() {
                            Some(tx) => {
                                let _ = tx.send(Ok(()));
                            }
                            None => {
                                tracing::info!("reconnected to {shown}");
                                wake(Wakeup {
                                    work: true,
                                    runner_exited: true,
                                });
                            }
                        }
                        pause = Duration::from_millis(100);
                        loop {
                            match ps.get_message() {
                                Ok(_) if stop.load(Ordering::Relaxed) => return,
                                Ok(_) => wake(Wakeup {
                                    work: true,
                                    runner_exited: false,
                                }),
                                Err(e) => break e,
                            }
                        }
                    }
                }
            }
        };
        if let Some(tx) = ready.take() {
            let _ = tx.send(Err(failed));
            return;
        }
        if stop.load(Ordering::Relaxed) {
            return;
        }
        tracing::warn!("lost the Redis wake-up subscription at {shown} ({failed}); reconnecting in {pause:?}");
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_secs(5));
        if stop.load(Ordering::Relaxed) {
            return;
        }
    }
}

struct RedisWatch {
    stop: Arc<AtomicBool>,
    client: ::redis::Client,
    channel: String,
}

impl WatchGuard for RedisWatch {}

impl Drop for RedisWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wake the listener so it sees the flag; if the server is unreachable the thread stays
        // blocked until the process exits, which holds nothing.
        if let Ok(mut c) = connect(&self.client) {
            let _: ::redis::RedisResult<i64> = ::redis::cmd("PUBLISH").arg(&self.channel).arg("stop").query(&mut c);
        }
    }
}

/// A job's log in Redis, capped at [`LOG_CAP`] bytes (the oldest half dropped past it).
struct RedisLog {
    inner: Arc<Inner>,
    id: JobId,
    retention_ms: u64,
}

impl JobLog for RedisLog {
    fn append(&mut self, bytes: &[u8]) -> Result<()> {
        let _: i64 = self.inner.run(
            &self.inner.scripts.log_append,
            &[&self.id.as_str(), &bytes, &LOG_CAP, &self.retention_ms],
        )?;
        Ok(())
    }

    fn size(&self) -> Result<u64> {
        let (log, off) = (
            self.inner.key(&format!("log:{}", self.id)),
            self.inner.key(&format!("logoff:{}", self.id)),
        );
        let (len, trimmed): (u64, Option<u64>) = self
            .inner
            .with(|c| ::redis::pipe().cmd("STRLEN").arg(&log).cmd("GET").arg(&off).query(c))?;
        Ok(len + trimmed.unwrap_or(0))
    }

    fn child_output(&self) -> Result<Option<std::fs::File>> {
        Ok(None)
    }
}
