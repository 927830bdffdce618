//! Builds the workspace's plugin crates (the shipped plugins in `plugins/` and the test
//! fixtures in `tests/plugins/`) for `wasm32-wasip2`, for tests and benchmarks. Builds go to
//! `<target dir>/plugins` (a target dir of their own, so a test can run cargo while another
//! cargo holds the main one) and are incremental.

use std::path::PathBuf;
use std::process::Command;

/// The target dir the gateway was built in.
fn target_dir() -> PathBuf {
    if let Ok(d) = std::env::var("CARGO_TARGET_DIR") {
        return PathBuf::from(d);
    }
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target")
}

/// Builds the plugin crate `package` (profile `plugin`) and returns its `.wasm`.
/// Panics with cargo's output when the build fails (tests and benchmarks only).
pub fn build(package: &str) -> PathBuf {
    let dir = target_dir().join("plugins");
    let out = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(["build", "--quiet", "-p", package, "--profile", "plugin"])
        .args(["--target", "wasm32-wasip2"])
        .env("CARGO_TARGET_DIR", &dir)
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
        .output()
        .expect("run cargo to build a plugin");
    assert!(
        out.status.success(),
        "building plugin {package} for wasm32-wasip2 failed (is the target installed? `rustup target add wasm32-wasip2`):\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    dir.join("wasm32-wasip2/plugin")
        .join(format!("{}.wasm", package.replace('-', "_")))
}
