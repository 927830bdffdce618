//! WASM plugins (docs/plugins.md): the host that runs teams' components in a sandbox
//! ([`host`]), the generated bindings of the `rewind:plugin@0.1.0` worlds ([`bindings`]),
//! upload validation, and the limits every call runs under.

pub mod bindings;
pub mod host;
pub mod net;
pub mod pipeline;

use std::time::Duration;

/// The world a component implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PluginKind {
    Transform,
    Destination,
    Ingress,
}

impl PluginKind {
    pub fn as_str(self) -> &'static str {
        match self {
            PluginKind::Transform => "transform",
            PluginKind::Destination => "destination",
            PluginKind::Ingress => "ingress",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "transform" => Some(Self::Transform),
            "destination" => Some(Self::Destination),
            "ingress" => Some(Self::Ingress),
            _ => None,
        }
    }

    /// The limits a call gets unless the plugin's attachment sets others.
    pub fn default_limits(self) -> Limits {
        match self {
            PluginKind::Transform => Limits {
                memory_bytes: 32 << 20,
                cpu: Duration::from_millis(50),
                wall: Duration::from_millis(500),
            },
            PluginKind::Destination => Limits {
                memory_bytes: 64 << 20,
                cpu: Duration::from_millis(100),
                wall: Duration::from_secs(10),
            },
            PluginKind::Ingress => Limits {
                memory_bytes: 32 << 20,
                cpu: Duration::from_millis(50),
                wall: Duration::from_millis(500),
            },
        }
    }
}

/// What one call of a plugin may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Linear memory (and tables) of the instance.
    pub memory_bytes: usize,
    /// Time the guest itself runs (awaited host I/O does not count).
    pub cpu: Duration,
    /// Wall-clock deadline for the whole call, awaited I/O included.
    pub wall: Duration,
}

/// The most a limit may be raised to by a plugin's attachment.
pub const MAX_MEMORY_BYTES: usize = 512 << 20;
pub const MAX_CPU: Duration = Duration::from_secs(10);
pub const MAX_WALL: Duration = Duration::from_secs(60);
/// Largest upload.
pub const MAX_UPLOAD_BYTES: usize = 10 << 20;

/// Errors of the plugin host. Each says what went wrong and what to do.
#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    #[error(
        "the upload is {0} bytes; plugins may be at most {MAX_UPLOAD_BYTES} bytes (10 MiB): build with --release and strip debug info"
    )]
    TooLarge(usize),
    #[error(
        "the upload is not WebAssembly (it does not start with \\0asm): upload the .wasm file cargo builds for wasm32-wasip2"
    )]
    NotWasm,
    #[error(
        "the upload is a core WebAssembly module, not a component: build for the wasm32-wasip2 target (cargo build --target wasm32-wasip2), which produces a component"
    )]
    CoreModule,
    #[error("the component is not valid: {0}")]
    Invalid(String),
    #[error("compiling the component took longer than {0:?}; it is refused")]
    CompileTimeout(Duration),
    #[error(
        "the component imports `{0}`, which Rewind does not provide: plugins may import WASI 0.2 and the rewind:plugin@0.1.0 interfaces of their world only"
    )]
    ForbiddenImport(String),
    #[error(
        "the component does not implement a Rewind world (rewind:plugin@0.1.0 transform, destination or ingress): it exports {0}"
    )]
    UnknownWorld(String),
    #[error("plugin init failed: {0}")]
    Init(String),
    #[error("plugin call failed: {0}")]
    Call(String),
    #[error("plugin call timed out: {0}")]
    Timeout(String),
    #[error("plugin returned a malformed result: {0}")]
    BadResult(String),
    #[error("plugin host error: {0}")]
    Host(String),
}

#[doc(hidden)]
pub mod fixtures;
#[cfg(test)]
mod host_tests;
