//! Shared helpers of the Rust integration tests: where the real assets are.

#![allow(dead_code)]

use std::path::PathBuf;

/// `$TVC_ASSETS`, default `../shared/assets` next to the crate; None (the test then returns
/// early, saying so) when it is absent.
pub fn assets() -> Option<PathBuf> {
    let path = std::env::var_os("TVC_ASSETS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/assets"));
    if path.is_dir() {
        Some(path)
    } else {
        eprintln!("skipped: no assets at {} (set TVC_ASSETS)", path.display());
        None
    }
}
