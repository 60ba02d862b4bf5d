//! Redis-only behaviour that the conformance suite cannot reach: answers lost on the wire.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::redis_server::RedisServer;
use jobspool::{NewJob, store};

/// A loopback proxy to a Redis server that, when armed, lets the next request through but
/// swallows its answer and drops the connection: the server acted, the client never hears.
struct LossyProxy {
    port: u16,
    drop_next_reply: Arc<AtomicBool>,
}

impl LossyProxy {
    fn start(upstream: u16) -> LossyProxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let drop_next_reply = Arc::new(AtomicBool::new(false));
        let armed = Arc::clone(&drop_next_reply);
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { return };
                let server = TcpStream::connect(("127.0.0.1", upstream)).unwrap();
                let (mut c_in, mut s_out) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut c_in, &mut s_out);
                    let _ = s_out.shutdown(Shutdown::Write);
                });
                let armed = Arc::clone(&armed);
                std::thread::spawn(move || {
                    let (mut server, mut client) = (server, client);
                    let mut buf = [0u8; 65536];
                    loop {
                        let n = match server.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        if armed.swap(false, Ordering::SeqCst) {
                            let _ = client.shutdown(Shutdown::Both);
                            let _ = server.shutdown(Shutdown::Both);
                            break;
                        }
                        if client.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                });
            }
        });
        LossyProxy { port, drop_next_reply }
    }
}

#[test]
fn a_claim_whose_answer_was_lost_is_handed_over_on_the_next_claim_not_held_until_its_lease_expires() {
    let Some(server) = RedisServer::start() else { return };
    let direct = store::open(&server.url("lossy"), true).unwrap();
    let proxy = LossyProxy::start(server.port);
    let via_proxy = store::open(&format!("redis://127.0.0.1:{}/0?queue=lossy", proxy.port), false).unwrap();
    // A first claim loads the script into the server, so the next request is the claim itself.
    assert!(via_proxy.claim(Duration::from_secs(600)).unwrap().is_none());
    let pushed = direct.push(&NewJob::new(b"only one".to_vec())).unwrap();

    proxy.drop_next_reply.store(true, Ordering::SeqCst);
    let lost = via_proxy.claim(Duration::from_secs(600));
    assert!(lost.is_err(), "the answer was swallowed: {lost:?}");
    assert_eq!(direct.stats().unwrap().running, 1, "the server did make the claim");

    // The next claim (on a new connection) gets that same claim, not nothing.
    let claim = via_proxy
        .claim(Duration::from_secs(600))
        .unwrap()
        .expect("the unanswered claim is handed over");
    assert_eq!(claim.job.id, pushed);
    assert_eq!(claim.lease.attempt, 1, "no attempt was counted for the lost answer");
    via_proxy.ack(&claim.lease).unwrap();
    assert!(direct.idle().unwrap().is_idle());
    assert!(via_proxy.claim(Duration::from_secs(600)).unwrap().is_none());
}

#[test]
fn a_push_or_ack_whose_answer_was_lost_is_repeated_and_applied_once_not_reported_failed() {
    let Some(server) = RedisServer::start() else { return };
    let direct = store::open(&server.url("lossy2"), true).unwrap();
    let proxy = LossyProxy::start(server.port);
    let via_proxy = store::open(&format!("redis://127.0.0.1:{}/0?queue=lossy2", proxy.port), false).unwrap();
    // Load the scripts through the proxy first, so the armed drop hits the request itself.
    let warm = via_proxy.push(&NewJob::new(b"warm".to_vec())).unwrap();
    let c = via_proxy.claim(Duration::from_secs(600)).unwrap().unwrap();
    assert_eq!(c.job.id, warm);
    via_proxy.heartbeat(&c.lease).unwrap();

    // The ack reaches the server, its answer is lost: the store repeats it, the repeat is
    // answered as the first was, and the ack is reported — it took effect.
    proxy.drop_next_reply.store(true, Ordering::SeqCst);
    via_proxy
        .ack(&c.lease)
        .expect("an applied ack is not reported as failed");
    assert!(direct.idle().unwrap().is_idle());
    assert!(
        matches!(
            via_proxy.retry(&c.lease, Duration::ZERO),
            Err(jobspool::Error::LeaseLost { .. })
        ),
        "the claim is over: any other transition is refused"
    );
    assert!(direct.idle().unwrap().is_idle(), "and changed nothing");

    // The same for a push: one job, reported pushed.
    proxy.drop_next_reply.store(true, Ordering::SeqCst);
    let id = via_proxy
        .push(&NewJob::new(b"once".to_vec()))
        .expect("an applied push is not reported as failed");
    let st = direct.stats().unwrap();
    assert_eq!(st.ready, 1, "pushed exactly once");
    assert_eq!(direct.claim(Duration::from_secs(600)).unwrap().unwrap().job.id, id);
}
