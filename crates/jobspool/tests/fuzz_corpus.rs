//! Replays every input of the cargo-fuzz corpus (`fuzz/corpus/<target>/`) through the same property
//! checks the fuzz targets run, so what the fuzzer found stays checked by a plain `cargo test`.

#[path = "../../../fuzz/checks.rs"]
mod checks;

use std::path::PathBuf;

fn replay(target: &str, check: fn(&[u8])) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fuzz/corpus")
        .join(target);
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        let data = std::fs::read(&path).unwrap();
        let outcome = std::panic::catch_unwind(|| check(&data));
        assert!(
            outcome.is_ok(),
            "fuzz property broken by corpus input {}",
            path.display()
        );
        seen += 1;
    }
    assert!(
        seen >= 4,
        "{}: only {seen} corpus inputs; the corpus is missing",
        dir.display()
    );
}

#[test]
fn body_corpus_holds_its_properties() {
    replay("body", checks::body);
}

#[test]
fn name_corpus_holds_its_properties() {
    replay("name", checks::name);
}

#[test]
fn config_corpus_holds_its_properties() {
    replay("config", checks::config);
}
