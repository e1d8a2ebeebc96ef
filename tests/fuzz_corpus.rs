//! Replays the fuzz targets' regression corpus (`fuzz/corpus/<target>/`) through the same entry
//! points, so every input that once crashed (and every seed) is checked in each test run.

use std::path::PathBuf;

fn corpus(target: &str) -> Vec<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus").join(target);
    let mut files: Vec<PathBuf> =
        std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())).map(|e| e.unwrap().path()).collect();
    files.sort();
    files
}

#[test]
fn image_corpus_decodes_or_is_refused_without_panicking() {
    let files = corpus("decode_image");
    assert!(files.len() >= 6);
    for f in &files {
        let bytes = std::fs::read(f).unwrap();
        let ok = differnet::fuzzing::decode_and_preprocess(&bytes);
        let name = f.file_name().unwrap().to_string_lossy();
        if name.starts_with("seed_") {
            assert!(ok, "seed {name} must decode");
        }
        // every prefix of a seed (a truncated upload) is handled too
        if name.starts_with("seed_") {
            for cut in (0..bytes.len()).step_by(7) {
                differnet::fuzzing::decode_and_preprocess(&bytes[..cut]);
            }
        }
    }
}

#[test]
fn model_corpus_loads_or_is_refused_without_panicking() {
    let files = corpus("load_model");
    for f in &files {
        let bytes = std::fs::read(f).unwrap();
        let ok = differnet::fuzzing::load_model(&bytes);
        let name = f.file_name().unwrap().to_string_lossy();
        if name.starts_with("seed_") {
            assert!(ok, "seed {name} must load");
            // single-byte corruptions of the seed are refused (the checksum covers every parameter)
            // or, inside JSON whitespace, harmless; none may panic
            for i in (0..bytes.len()).step_by(13) {
                let mut b = bytes.clone();
                b[i] ^= 0x5A;
                differnet::fuzzing::load_model(&b);
            }
        }
    }
}

/// Replays a weight-file target's corpus through `read`: seeds must read, every file and every
/// truncation and single-byte corruption of a seed must return without panicking.
fn replay_weight_corpus(target: &str, read: fn(&[u8]) -> bool) {
    let files = corpus(target);
    assert!(files.iter().any(|f| f.file_name().unwrap().to_string_lossy().starts_with("seed_")), "{target} has seeds");
    for f in &files {
        let bytes = std::fs::read(f).unwrap();
        let ok = read(&bytes);
        let name = f.file_name().unwrap().to_string_lossy();
        if name.starts_with("seed_") {
            assert!(ok, "seed {name} must read");
            for cut in 0..bytes.len() {
                read(&bytes[..cut]);
            }
            for i in 0..bytes.len() {
                for flip in [0x01, 0x80, 0xFF] {
                    let mut b = bytes.clone();
                    b[i] ^= flip;
                    read(&b);
                }
            }
        }
    }
}

#[test]
fn torch_file_corpus_reads_or_is_refused_without_panicking() {
    replay_weight_corpus("torch_file", differnet::fuzzing::read_torch_file);
}

#[test]
fn numpy_pickle_corpus_reads_or_is_refused_without_panicking() {
    replay_weight_corpus("numpy_pickle", differnet::fuzzing::read_numpy_pickle);
}
