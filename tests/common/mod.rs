//! Shared by the integration tests: the real-model fixtures (fetched by `sparsegrad fixtures`,
//! which `.ci/run` runs first). Outside CI a test without fixtures is skipped loudly; in CI a
//! missing fixture fails the run.
#![allow(dead_code)]

use sparsegrad_service::fixtures::{default_root, ensure, Fixtures};

pub fn fixtures() -> Option<Fixtures> {
    let root = std::env::var_os("SPARSEGRAD_FIXTURES")
        .map(Into::into)
        .unwrap_or_else(|| {
            default_root(
                std::env::var_os("XDG_CACHE_HOME").map(Into::into),
                std::env::var_os("HOME").map(Into::into),
            )
        });
    match ensure(&root) {
        Ok(f) => Some(f),
        Err(e) if std::env::var_os("CI").is_some() => panic!("fixtures unavailable in CI: {e:#}"),
        Err(e) => {
            eprintln!("\n*** SKIPPING: real-model fixtures unavailable ({e:#}); run `sparsegrad fixtures` ***\n");
            None
        }
    }
}

#[allow(unused_imports)]
pub use sparsegrad_engine::testing::max_abs_diff;
