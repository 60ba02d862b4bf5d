//! The properties each fuzz target checks, shared by the libFuzzer targets (`fuzz_targets/`) and by
//! the corpus replay in `cargo test` (`crates/jobspool/tests/fuzz_corpus.rs`), so a corpus entry
//! that once broke a property keeps being checked on every test run without cargo-fuzz.

use jobspool::QueueConfig;
use jobspool::body;
use jobspool::config::{parse_duration, parse_mode};
use jobspool::job::JobId;
use jobspool::store::dir::name::{QueuedName, RunningName};

/// Body decoder: never panics on any bytes; whatever it accepts re-encodes to a body that decodes
/// to the same job, and a flipped byte anywhere in an accepted body is never accepted silently as
/// the same job.
pub fn body(data: &[u8]) {
    let Ok(job) = body::decode(data) else { return };
    let again = body::encode(&job);
    let back = body::decode(&again).expect("a re-encoded body decodes");
    assert_eq!(back, job, "decode(encode(job)) differs from job");
    if !data.is_empty() {
        let mut flipped = data.to_vec();
        let at = data.len() / 2;
        flipped[at] ^= 0x01;
        if let Ok(other) = body::decode(&flipped) {
            assert_ne!(other, job, "a flipped byte at {at} decoded to the same job");
        }
    }
}

/// File-name parsers: never panic; a parsed name formats back to exactly the input, and no name
/// the parsers accept can carry a path separator, NUL or `..` into a path.
pub fn name(data: &[u8]) {
    if let Some(q) = QueuedName::parse(data) {
        assert_eq!(q.format().as_bytes(), data);
        safe_component(data);
    }
    if let Some(r) = RunningName::parse(data) {
        assert_eq!(r.format().as_bytes(), data);
        safe_component(data);
    }
    if let Ok(text) = std::str::from_utf8(data)
        && let Ok(id) = JobId::new(text)
    {
        assert_eq!(id.as_str(), text);
        safe_component(data);
    }
}

fn safe_component(name: &[u8]) {
    assert!(
        !name.is_empty() && name.len() <= 255,
        "unusable file name length {}",
        name.len()
    );
    assert!(
        !name.contains(&b'/') && !name.contains(&0),
        "separator or NUL in {name:?}"
    );
    assert!(!name.windows(2).any(|w| w == b".."), "'..' in {name:?}");
    assert!(
        name[0] != b'.' && name[0] != b'-',
        "hidden or option-like name {name:?}"
    );
}

/// Configuration loader and the option parsers it uses: never panic; an accepted configuration
/// written back out reads as the same configuration.
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(cfg) = QueueConfig::parse(text) {
        let again = QueueConfig::parse(&cfg.to_toml()).expect("a written config parses");
        assert_eq!(again, cfg, "config changed across a write and a read");
    }
    let _ = parse_duration(text);
    let _ = parse_mode(text);
}
