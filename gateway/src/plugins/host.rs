//! The plugin host: one wasmtime engine (component model, async, pooling allocator, epoch
//! interruption), uploads validated and compiled once (cache keyed by sha256, compiles
//! serialized and time-limited), and every call in a store of its own with memory and table limits,
//! a CPU budget (guest time, measured with epochs), a wall-clock deadline, WASI without
//! capabilities (no files, no environment, no sockets; stdout/stderr go to the plugin's log),
//! and only the imports of the plugin's world. A trap or a limit fails that call with a clear
//! reason, never the gateway; a failing batch is split to find the poison event.
//!
//! Transform instances are kept warm: after a call that succeeded (and printed nothing to
//! stdout/stderr), the instance goes back to a small pool keyed by plugin, pipeline step and
//! config, and the next batch of the same step reuses it (already initialised, its memory
//! already mapped) with fresh per-call budgets. A call that fails in any way drops its
//! instance; idle instances are dropped after [`WARM_IDLE`].

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sha2::Digest;
use wasmtime::component::{Component, HasSelf, Linker, ResourceTable};
use wasmtime::{Engine, Store, StoreLimits, StoreLimitsBuilder, Trap, UpdateDeadline};
use wasmtime_wasi::p2::pipe::MemoryOutputPipe;
use wasmtime_wasi::{WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

use super::bindings::{destination, ingress, transform};
use super::{Limits, MAX_UPLOAD_BYTES, PluginError, PluginKind};
use rewind_plugin_sdk::codec::{BatchReader, BatchWriter, Outcome, OutcomeReader};

/// One epoch tick: the granularity of the CPU budget. Every tick wakes the epoch thread (at
/// 1 ms it took ~3 % of a vCPU on the benchmark VM, in ~800 wake-ups a second that preempt
/// the threads acknowledging ingest, whether or not a plugin runs).
const TICK: Duration = Duration::from_millis(5);
/// The guest yields to the executor at least this often (in ticks, 10 ms) while under budget.
const SLICE_TICKS: u64 = 2;
/// Ticks between expiries of idle warm instances (about a second).
const EXPIRE_TICKS: u32 = 200;
/// Most a compile may take before the upload is refused.
const COMPILE_TIMEOUT: Duration = Duration::from_secs(60);
/// Bytes of stdout/stderr kept per call (the rest is dropped).
const LOG_CAPTURE_BYTES: usize = 64 << 10;
/// Log lines a plugin may write per call through the log import.
const MAX_LOG_LINES: u32 = 100;
const MAX_LOG_LINE: usize = 4096;
/// Compiled components kept in memory.
const CACHE_ENTRIES: usize = 256;
/// A transform may return at most this many times its input (plus 64 KiB).
pub const MAX_OUTPUT_FACTOR: usize = 16;
/// Bytes of a pooled linear memory kept resident when its slot is reused.
const KEEP_RESIDENT: usize = 0;
/// Warm instances kept per (plugin, step, config): about one per core.
const WARM_PER_KEY: usize = 2;
/// A warm instance unused this long is dropped (its memory returned).
pub const WARM_IDLE: Duration = Duration::from_secs(30);

/// Which calls may share a warm instance: the same plugin bytes, step name, config and
/// memory limit (CPU and wall-clock budgets are set afresh on every call).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct WarmKey {
    sha256: String,
    name: String,
    config: String,
    memory_bytes: usize,
}

/// An initialised transform instance between calls.
struct Warm {
    store: Store<HostState>,
    instance: transform::Transform,
    idle_since: Instant,
}

/// The warm instances, bounded in number per key and in all.
#[derive(Default)]
struct WarmPool {
    by_key: HashMap<WarmKey, Vec<Warm>>,
    total: usize,
}

impl WarmPool {
    fn take(&mut self, key: &WarmKey) -> Option<Warm> {
        let list = self.by_key.get_mut(key)?;
        let w = list.pop()?;
        if list.is_empty() {
            self.by_key.remove(key);
        }
        self.total -= 1;
        Some(w)
    }

    /// Keeps `w` unless the pool is full (then the oldest idle instance makes room, or `w`
    /// is dropped when its own key is full).
    fn put(&mut self, key: WarmKey, w: Warm, max_total: usize) {
        if max_total == 0 {
            return;
        }
        if self
            .by_key
            .get(&key)
            .is_some_and(|l| l.len() >= WARM_PER_KEY)
        {
            return;
        }
        if self.total >= max_total {
            let oldest = self
                .by_key
                .iter()
                .filter_map(|(k, l)| l.first().map(|w| (k.clone(), w.idle_since)))
                .min_by_key(|(_, t)| *t)
                .map(|(k, _)| k);
            if let Some(k) = oldest {
                let list = self.by_key.get_mut(&k).expect("present");
                list.remove(0);
                if list.is_empty() {
                    self.by_key.remove(&k);
                }
                self.total -= 1;
            }
        }
        self.by_key.entry(key).or_default().push(w);
        self.total += 1;
    }

    /// Drops instances idle since before `cutoff`.
    fn expire(&mut self, cutoff: Instant) {
        let mut dropped = 0;
        self.by_key.retain(|_, l| {
            let before = l.len();
            l.retain(|w| w.idle_since >= cutoff);
            dropped += before - l.len();
            !l.is_empty()
        });
        self.total -= dropped;
    }
}

/// What the warm pool holds now.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WarmStats {
    /// Idle instances.
    pub instances: usize,
    /// Their linear memory, in all.
    pub memory_bytes: usize,
}

/// A compiled, validated component, ready to instantiate.
pub struct Compiled {
    pub sha256: String,
    pub kind: PluginKind,
    pub bytes: usize,
    pre: Pre,
}

enum Pre {
    Transform(transform::TransformPre<HostState>),
    Destination(destination::DestinationPre<HostState>),
    Ingress(ingress::IngressPre<HostState>),
}

/// Per-call state of a store.
pub struct HostState {
    wasi: WasiCtx,
    table: ResourceTable,
    limits: Limiter,
    /// What the plugin wrote to stdout/stderr in this call.
    out: MemoryOutputPipe,
    plugin: String,
    log_lines: u32,
    /// When the call started and how long it spent awaiting host I/O (not guest time).
    started: Instant,
    io: Duration,
    cpu: Duration,
    wall_deadline: Instant,
    caps: Option<Arc<DestinationCaps>>,
    /// NATS messages were published in this call (flushed once when it returns).
    nats_unflushed: bool,
}

/// The store's limits, keeping count of the linear memory the instance holds.
struct Limiter {
    inner: StoreLimits,
    memory: usize,
}

impl wasmtime::ResourceLimiter for Limiter {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let allow = self.inner.memory_growing(current, desired, maximum)?;
        if allow {
            self.memory += desired.saturating_sub(current);
        }
        Ok(allow)
    }
    fn memory_grow_failed(&mut self, error: wasmtime::Error) -> wasmtime::Result<()> {
        self.inner.memory_grow_failed(error)
    }
    fn table_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        self.inner.table_growing(current, desired, maximum)
    }
    fn table_grow_failed(&mut self, error: wasmtime::Error) -> wasmtime::Result<()> {
        self.inner.table_grow_failed(error)
    }
    fn instances(&self) -> usize {
        self.inner.instances()
    }
    fn tables(&self) -> usize {
        self.inner.tables()
    }
    fn memories(&self) -> usize {
        self.inner.memories()
    }
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl HostState {
    fn write_log(&mut self, level: &str, message: &str) {
        self.log_lines += 1;
        if self.log_lines > MAX_LOG_LINES {
            return;
        }
        let message: String = if message.len() > MAX_LOG_LINE {
            let mut end = MAX_LOG_LINE;
            while !message.is_char_boundary(end) {
                end -= 1;
            }
            format!("{}…", &message[..end])
        } else {
            message.to_string()
        };
        match level {
            "error" => tracing::error!(plugin = %self.plugin, "{message}"),
            "warn" => tracing::warn!(plugin = %self.plugin, "{message}"),
            "info" => tracing::info!(plugin = %self.plugin, "{message}"),
            _ => tracing::debug!(plugin = %self.plugin, "{message}"),
        }
    }
}

macro_rules! impl_log {
    ($m:ident) => {
        impl $m::rewind::plugin::log::Host for HostState {
            async fn log(&mut self, level: $m::rewind::plugin::log::Level, message: String) {
                use $m::rewind::plugin::log::Level as L;
                let level = match level {
                    L::Error => "error",
                    L::Warn => "warn",
                    L::Info => "info",
                    L::Debug => "debug",
                    L::Trace => "trace",
                };
                self.write_log(level, &message);
            }
        }
        impl $m::rewind::plugin::types::Host for HostState {}
    };
}
impl_log!(transform);
impl_log!(destination);
impl_log!(ingress);

/// What a destination may reach: set per destination from its config and the operator's
/// settings. Without it (transforms, ingress) the HTTP and NATS imports are refused.
#[derive(Clone, Default)]
pub struct DestinationCaps {
    /// Hosts outbound HTTP may call (`example.com`, `*.example.com`).
    pub allow_hosts: Vec<String>,
    /// `--allow-private-destinations`.
    pub allow_private: bool,
    pub http: Option<reqwest::Client>,
    /// NATS connection and the subjects (NATS wildcards allowed) the destination may publish to.
    pub nats: Option<async_nats::Client>,
    pub nats_subjects: Vec<String>,
}

/// Does a NATS subject match a pattern (`*` one token, `>` the rest)?
pub fn subject_matches(pattern: &str, subject: &str) -> bool {
    let mut p = pattern.split('.');
    let mut s = subject.split('.');
    loop {
        match (p.next(), s.next()) {
            (Some(">"), Some(_)) => return true,
            (Some("*"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

impl destination::rewind::plugin::http::Host for HostState {
    async fn send(
        &mut self,
        request: destination::rewind::plugin::http::Request,
    ) -> Result<destination::rewind::plugin::http::Response, String> {
        let Some(caps) = self.caps.clone() else {
            return Err("outbound HTTP is not available here".into());
        };
        let Some(client) = caps.http.clone() else {
            return Err("outbound HTTP is not available to this destination".into());
        };
        let url = super::net::check_url(&request.url, &caps.allow_hosts, caps.allow_private)?;
        let method = reqwest::Method::from_bytes(request.method.to_ascii_uppercase().as_bytes())
            .map_err(|_| format!("invalid HTTP method {:?}", request.method))?;
        let left = self.wall_deadline.saturating_duration_since(Instant::now());
        let timeout = request
            .timeout_ms
            .map_or(super::net::MAX_REQUEST_TIMEOUT, |ms| {
                Duration::from_millis(ms.into())
            })
            .min(super::net::MAX_REQUEST_TIMEOUT)
            .min(left);
        if timeout.is_zero() {
            return Err("the call's wall-clock deadline has passed".into());
        }
        let mut req = client
            .request(method, url)
            .timeout(timeout)
            .body(request.body);
        for (k, v) in &request.headers {
            if k.eq_ignore_ascii_case("host") || k.eq_ignore_ascii_case("content-length") {
                continue;
            }
            req = req.header(k.as_str(), v.as_str());
        }
        let started = Instant::now();
        let result = async {
            let mut resp = req.send().await.map_err(describe_http)?;
            let status = resp.status().as_u16();
            let headers = resp
                .headers()
                .iter()
                .filter_map(|(k, v)| Some((k.as_str().to_string(), v.to_str().ok()?.to_string())))
                .collect();
            let mut body = Vec::new();
            while let Some(chunk) = resp.chunk().await.map_err(describe_http)? {
                let room = super::net::MAX_RESPONSE_BYTES - body.len();
                body.extend_from_slice(&chunk[..chunk.len().min(room)]);
                if body.len() >= super::net::MAX_RESPONSE_BYTES {
                    break;
                }
            }
            Ok(destination::rewind::plugin::http::Response {
                status,
                headers,
                body,
            })
        }
        .await;
        self.io += started.elapsed();
        result
    }
}

fn describe_http(e: reqwest::Error) -> String {
    use std::error::Error;
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text = format!("{text}: {s}");
        source = s.source();
    }
    if e.is_timeout() {
        format!("timed out: {text}")
    } else {
        text
    }
}

impl destination::rewind::plugin::nats::Host for HostState {
    async fn publish(
        &mut self,
        subject: String,
        headers: Vec<(String, String)>,
        payload: Vec<u8>,
    ) -> Result<(), String> {
        let Some(caps) = self.caps.clone() else {
            return Err("publishing to NATS is not available here".into());
        };
        let Some(client) = caps.nats.clone() else {
            return Err("publishing to NATS is not available to this destination: the gateway has no NATS connection (run it with --bus nats://…)".into());
        };
        if !caps
            .nats_subjects
            .iter()
            .any(|p| subject_matches(p, &subject))
        {
            return Err(format!(
                "subject {subject} is not among this destination's subjects ({})",
                caps.nats_subjects.join(", ")
            ));
        }
        let mut map = async_nats::HeaderMap::new();
        for (k, v) in &headers {
            map.insert(k.as_str(), v.as_str());
        }
        let started = Instant::now();
        // Buffered: the whole call's messages are flushed once when it returns, before any
        // of them counts as delivered (see `deliver_once`). A publish waits only for room in
        // the client's queue; the call's wall-clock deadline bounds that wait.
        let r = client
            .publish_with_headers(subject, map, payload.into())
            .await
            .map_err(|e| format!("publish to NATS: {e}"));
        self.nats_unflushed = true;
        self.io += started.elapsed();
        r
    }
}

/// One event handed to a plugin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PluginEvent {
    pub id: String,
    pub received_at: i64,
    pub headers: Vec<(String, String)>,
    pub payload: bytes::Bytes,
}

/// What a transform made of one input event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TransformResult {
    /// Zero or more events (ids are the input's unless the plugin set one).
    Events(Vec<PluginEvent>),
    /// The event failed: the plugin's reason, or the call's (trap, limit) when the event
    /// was isolated as the one that makes the batch fail.
    Failed(String),
}

/// What a destination did with one event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeliveryResult {
    Delivered,
    /// Try again later (after `retry_after` when the receiver said).
    Retryable {
        reason: String,
        retry_after: Option<Duration>,
    },
    /// Never deliverable: dead letters.
    Permanent(String),
}

/// Host settings.
#[derive(Debug, Clone)]
pub struct HostOptions {
    /// Instances that may exist at once (pooling allocator slots).
    pub max_instances: u32,
    /// Largest memory any plugin may be given.
    pub max_memory_bytes: usize,
}

impl Default for HostOptions {
    fn default() -> Self {
        Self {
            max_instances: 64,
            max_memory_bytes: super::MAX_MEMORY_BYTES,
        }
    }
}

/// The shared plugin host.
pub struct PluginHost {
    engine: Engine,
    transform_linker: Linker<HostState>,
    destination_linker: Linker<HostState>,
    ingress_linker: Linker<HostState>,
    cache: Mutex<HashMap<String, Arc<Compiled>>>,
    compiling: tokio::sync::Semaphore,
    stop: Arc<AtomicBool>,
    warm: Arc<Mutex<WarmPool>>,
    /// Most warm instances kept in all (a quarter of the instance slots).
    warm_max: usize,
}

impl Drop for PluginHost {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn engine_config(opts: &HostOptions, pooling: bool) -> wasmtime::Config {
    let mut c = wasmtime::Config::new();
    c.wasm_component_model(true);
    c.epoch_interruption(true);
    c.max_wasm_stack(1 << 20);
    c.async_stack_size(2 << 20);
    // For profiling plugins with `perf`: REWIND_WASM_PERFMAP=1 writes /tmp/perf-<pid>.map so
    // that JIT-compiled plugin functions have names in `perf report` (docs/plugins.md).
    if std::env::var_os("REWIND_WASM_PERFMAP").is_some_and(|v| v == "1") {
        c.profiler(wasmtime::ProfilingStrategy::PerfMap);
    }

    if pooling {
        let mut p = wasmtime::PoolingAllocationConfig::default();
        p.total_component_instances(opts.max_instances);
        p.total_core_instances(opts.max_instances * 4);
        p.total_memories(opts.max_instances * 2);
        p.total_tables(opts.max_instances * 4);
        p.total_stacks(opts.max_instances);
        p.max_memory_size(opts.max_memory_bytes);
        p.max_memories_per_component(4);
        p.max_tables_per_component(8);
        // A slot's memory is reset with memset instead of being decommitted and faulted in
        // again (fresh pages cost a kernel zeroing per 4 KiB) up to this size. Warm instances
        // made the reuse of slots rare, so only a little is kept: memset on every slot reuse
        // is what made fresh instances slow.
        p.linear_memory_keep_resident(KEEP_RESIDENT);
        p.table_keep_resident(64 << 10);
        c.allocation_strategy(wasmtime::InstanceAllocationStrategy::Pooling(p));
    }
    c
}

fn linker<F>(engine: &Engine, add_world: F) -> Result<Linker<HostState>, PluginError>
where
    F: FnOnce(&mut Linker<HostState>) -> wasmtime::Result<()>,
{
    let mut l = Linker::new(engine);
    wasmtime_wasi::p2::add_to_linker_async(&mut l)
        .map_err(|e| PluginError::Host(format!("WASI: {e:#}")))?;
    add_world(&mut l).map_err(|e| PluginError::Host(format!("{e:#}")))?;
    Ok(l)
}

impl PluginHost {
    pub fn new(opts: HostOptions) -> Result<Arc<Self>, PluginError> {
        // The pooling allocator reserves address space for every slot up front; where that
        // is refused (a small ulimit -v), fall back to allocating on demand.
        let engine = match Engine::new(&engine_config(&opts, true)) {
            Ok(e) => e,
            Err(e) => {
                tracing::warn!(error = %e, "pooling allocator unavailable; allocating instances on demand");
                Engine::new(&engine_config(&opts, false))
                    .map_err(|e| PluginError::Host(format!("cannot start wasmtime: {e:#}")))?
            }
        };
        let transform_linker = linker(&engine, |l| {
            transform::Transform::add_to_linker::<_, HasSelf<HostState>>(l, |s| s)
        })?;
        let destination_linker = linker(&engine, |l| {
            destination::Destination::add_to_linker::<_, HasSelf<HostState>>(l, |s| s)
        })?;
        let ingress_linker = linker(&engine, |l| {
            ingress::Ingress::add_to_linker::<_, HasSelf<HostState>>(l, |s| s)
        })?;
        let stop = Arc::new(AtomicBool::new(false));
        let warm = Arc::new(Mutex::new(WarmPool::default()));
        {
            let engine = engine.clone();
            let stop = stop.clone();
            let warm = Arc::downgrade(&warm);
            std::thread::Builder::new()
                .name("wasm-epoch".into())
                .spawn(move || {
                    let mut ticks = 0u32;
                    while !stop.load(Ordering::Relaxed) {
                        std::thread::sleep(TICK);
                        engine.increment_epoch();
                        ticks = ticks.wrapping_add(1);
                        // About once a second, idle warm instances expire.
                        if ticks.is_multiple_of(EXPIRE_TICKS)
                            && let Some(pool) = warm.upgrade()
                        {
                            let cutoff = Instant::now().checked_sub(WARM_IDLE);
                            if let Some(cutoff) = cutoff {
                                pool.lock().expect("lock").expire(cutoff);
                            }
                        }
                    }
                })
                .map_err(|e| PluginError::Host(format!("epoch thread: {e}")))?;
        }
        Ok(Arc::new(Self {
            engine,
            transform_linker,
            destination_linker,
            ingress_linker,
            cache: Mutex::default(),
            compiling: tokio::sync::Semaphore::new(1),
            stop,
            warm,
            warm_max: (opts.max_instances / 4) as usize,
        }))
    }

    /// The sha256 (hex) of an upload: its content address.
    pub fn sha256(bytes: &[u8]) -> String {
        hex::encode(sha2::Sha256::digest(bytes))
    }

    /// Validates and compiles an upload (or returns the cached compile of the same bytes):
    /// WebAssembly, a component, importing nothing beyond WASI 0.2 and its world's
    /// interfaces, exporting one of the Rewind worlds.
    pub async fn compile(&self, bytes: &[u8]) -> Result<Arc<Compiled>, PluginError> {
        if bytes.len() > MAX_UPLOAD_BYTES {
            return Err(PluginError::TooLarge(bytes.len()));
        }
        if bytes.len() < 8 || &bytes[..4] != b"\0asm" {
            return Err(PluginError::NotWasm);
        }
        // Bytes 6..8 are the layer: 0 for a core module, 1 for a component.
        if bytes[6..8] == [0, 0] {
            return Err(PluginError::CoreModule);
        }
        let sha = Self::sha256(bytes);
        if let Some(c) = self.cache.lock().expect("lock").get(&sha) {
            return Ok(c.clone());
        }
        // One compile at a time, each with a deadline, off the async workers.
        let _permit = self
            .compiling
            .acquire()
            .await
            .map_err(|_| PluginError::Host("the plugin host is shutting down".into()))?;
        let engine = self.engine.clone();
        let owned = bytes.to_vec();
        let job = tokio::task::spawn_blocking(move || Component::new(&engine, &owned));
        let component = match tokio::time::timeout(COMPILE_TIMEOUT, job).await {
            Err(_) => return Err(PluginError::CompileTimeout(COMPILE_TIMEOUT)),
            Ok(Err(e)) => return Err(PluginError::Host(format!("compile task: {e}"))),
            Ok(Ok(Err(e))) => return Err(PluginError::Invalid(format!("{e:#}"))),
            Ok(Ok(Ok(c))) => c,
        };
        let compiled = Arc::new(self.classify(component, sha.clone(), bytes.len())?);
        let mut cache = self.cache.lock().expect("lock");
        if cache.len() >= CACHE_ENTRIES {
            let victim = cache.keys().next().cloned();
            if let Some(v) = victim {
                cache.remove(&v);
            }
        }
        cache.insert(sha, compiled.clone());
        Ok(compiled)
    }

    fn classify(
        &self,
        component: Component,
        sha256: String,
        bytes: usize,
    ) -> Result<Compiled, PluginError> {
        let ty = component.component_type();
        let exports: Vec<String> = ty
            .exports(&self.engine)
            .map(|(n, _)| n.to_string())
            .collect();
        let has = |n: &str| exports.iter().any(|e| e == n);
        let kind = if has("transform") && has("init") {
            PluginKind::Transform
        } else if has("deliver") && has("init") {
            PluginKind::Destination
        } else if has("handle") && has("init") {
            PluginKind::Ingress
        } else {
            let list = if exports.is_empty() {
                "nothing".to_string()
            } else {
                exports.join(", ")
            };
            return Err(PluginError::UnknownWorld(list));
        };
        let own: &[&str] = match kind {
            PluginKind::Transform | PluginKind::Ingress => &["log", "types"],
            PluginKind::Destination => &["log", "types", "http", "nats"],
        };
        for (name, _) in ty.imports(&self.engine) {
            let allowed = if let Some(rest) = name.strip_prefix("wasi:") {
                rest.contains("@0.2.")
            } else if let Some(rest) = name.strip_prefix("rewind:plugin/") {
                let (iface, version) = rest.split_once('@').unwrap_or((rest, ""));
                own.contains(&iface) && version.starts_with("0.1.")
            } else {
                false
            };
            if !allowed {
                return Err(PluginError::ForbiddenImport(name.to_string()));
            }
        }
        let linker = match kind {
            PluginKind::Transform => &self.transform_linker,
            PluginKind::Destination => &self.destination_linker,
            PluginKind::Ingress => &self.ingress_linker,
        };
        let pre = linker
            .instantiate_pre(&component)
            .map_err(|e| PluginError::Invalid(format!("it cannot be linked: {e:#}")))?;
        let invalid = |e: wasmtime::Error| {
            PluginError::Invalid(format!(
                "its exports do not match the {} world of rewind:plugin@0.1.0: {e:#}",
                kind.as_str()
            ))
        };
        let pre = match kind {
            PluginKind::Transform => {
                Pre::Transform(transform::TransformPre::new(pre).map_err(invalid)?)
            }
            PluginKind::Destination => {
                Pre::Destination(destination::DestinationPre::new(pre).map_err(invalid)?)
            }
            PluginKind::Ingress => Pre::Ingress(ingress::IngressPre::new(pre).map_err(invalid)?),
        };
        Ok(Compiled {
            sha256,
            kind,
            bytes,
            pre,
        })
    }

    /// A fresh store for one call, with the call's limits.
    fn store(&self, plugin: &str, limits: &Limits) -> Store<HostState> {
        let pipe = MemoryOutputPipe::new(LOG_CAPTURE_BYTES);
        let wasi = WasiCtxBuilder::new()
            .stdout(pipe.clone())
            .stderr(pipe.clone())
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            .build();
        let state = HostState {
            wasi,
            table: ResourceTable::new(),
            limits: Limiter {
                inner: StoreLimitsBuilder::new()
                    .memory_size(limits.memory_bytes)
                    .table_elements(100_000)
                    .instances(16)
                    .tables(16)
                    .memories(4)
                    .trap_on_grow_failure(true)
                    .build(),
                memory: 0,
            },
            out: pipe,
            plugin: plugin.to_string(),
            log_lines: 0,
            started: Instant::now(),
            io: Duration::ZERO,
            cpu: limits.cpu,
            wall_deadline: Instant::now() + limits.wall,
            caps: None,
            nats_unflushed: false,
        };
        let mut store = Store::new(&self.engine, state);
        store.limiter(|s| &mut s.limits);
        Self::rearm(&mut store, limits);
        store.epoch_deadline_callback(|ctx| {
            let s = ctx.data();
            let guest = s.started.elapsed().saturating_sub(s.io);
            if guest >= s.cpu {
                return Ok(UpdateDeadline::Interrupt);
            }
            let left = ticks(s.cpu - guest).max(1);
            Ok(UpdateDeadline::Yield(left.min(SLICE_TICKS)))
        });
        store
    }

    /// Gives a store the budgets of a new call: CPU and wall-clock from now, log lines.
    fn rearm(store: &mut Store<HostState>, limits: &Limits) {
        let s = store.data_mut();
        s.started = Instant::now();
        s.io = Duration::ZERO;
        s.cpu = limits.cpu;
        s.wall_deadline = s.started + limits.wall;
        s.log_lines = 0;
        store.set_epoch_deadline(SLICE_TICKS.min(ticks(limits.cpu)));
    }

    /// The warm transform instances kept now.
    pub fn warm_stats(&self) -> WarmStats {
        let pool = self.warm.lock().expect("lock");
        WarmStats {
            instances: pool.total,
            memory_bytes: pool
                .by_key
                .values()
                .flatten()
                .map(|w| w.store.data().limits.memory)
                .sum(),
        }
    }

    /// Drops every warm instance (tests and benchmarks; idle ones also expire by themselves).
    pub fn drop_warm(&self) {
        let mut pool = self.warm.lock().expect("lock");
        pool.by_key.clear();
        pool.total = 0;
    }

    /// Instantiates a plugin and runs its `init` with `config` only: checks a config before
    /// it is saved.
    pub async fn init_only(
        &self,
        plugin: &Compiled,
        name: &str,
        config: &str,
        limits: &Limits,
    ) -> Result<(), PluginError> {
        let mut store = self.store(name, limits);
        let call = async {
            let r = match &plugin.pre {
                Pre::Transform(pre) => {
                    let i = pre.instantiate_async(&mut store).await;
                    match i {
                        Ok(i) => i.call_init(&mut store, config).await,
                        Err(e) => Err(e),
                    }
                }
                Pre::Destination(pre) => match pre.instantiate_async(&mut store).await {
                    Ok(i) => i.call_init(&mut store, config).await,
                    Err(e) => Err(e),
                },
                Pre::Ingress(pre) => match pre.instantiate_async(&mut store).await {
                    Ok(i) => i.call_init(&mut store, config).await,
                    Err(e) => Err(e),
                },
            };
            init_outcome(r, limits)
        };
        let r = tokio::time::timeout(limits.wall, call)
            .await
            .unwrap_or_else(|_| {
                Err(PluginError::Init(
                    "init ran past its wall-clock deadline".into(),
                ))
            });
        flush_output(&mut store);
        r
    }

    /// Creates a store and instantiates the component, nothing more (benchmarks: the cost of
    /// getting an instance from the pre-instantiated component).
    pub async fn instantiate_only(
        &self,
        plugin: &Compiled,
        limits: &Limits,
    ) -> Result<(), PluginError> {
        let mut store = self.store("probe", limits);
        let r = match &plugin.pre {
            Pre::Transform(pre) => pre.instantiate_async(&mut store).await.map(|_| ()),
            Pre::Destination(pre) => pre.instantiate_async(&mut store).await.map(|_| ()),
            Pre::Ingress(pre) => pre.instantiate_async(&mut store).await.map(|_| ()),
        };
        r.map_err(|e| PluginError::Call(describe(&e, limits)))
    }

    /// Runs a transform over one encoded batch, returning its raw result buffer.
    pub async fn transform_raw(
        &self,
        plugin: &Compiled,
        name: &str,
        config: &str,
        limits: &Limits,
        batch: Vec<u8>,
    ) -> Result<Vec<u8>, PluginError> {
        let Pre::Transform(pre) = &plugin.pre else {
            return Err(PluginError::Host(format!(
                "{name} is a {} plugin, not a transform",
                plugin.kind.as_str()
            )));
        };
        let input = batch.len();
        let key = WarmKey {
            sha256: plugin.sha256.clone(),
            name: name.to_string(),
            config: config.to_string(),
            memory_bytes: limits.memory_bytes,
        };
        let warm = self.warm.lock().expect("lock").take(&key);
        let (mut store, warm_instance) = match warm {
            Some(w) => {
                let mut store = w.store;
                Self::rearm(&mut store, limits);
                (store, Some(w.instance))
            }
            None => (self.store(name, limits), None),
        };
        let call = async {
            let inst = match warm_instance {
                Some(i) => i,
                None => {
                    let i = pre
                        .instantiate_async(&mut store)
                        .await
                        .map_err(|e| PluginError::Call(describe(&e, limits)))?;
                    init_outcome(i.call_init(&mut store, config).await, limits)?;
                    i
                }
            };
            let out = inst
                .call_transform(&mut store, &batch)
                .await
                .map_err(|e| PluginError::Call(describe(&e, limits)))?;
            Ok((inst, out))
        };
        let out = match tokio::time::timeout(limits.wall, call).await {
            Ok(r) => r,
            Err(_) => Err(PluginError::Call(format!(
                "the call ran past its wall-clock deadline of {} ms",
                limits.wall.as_millis()
            ))),
        };
        // Output capture is per store: an instance that printed is not reused (its next
        // call's lines would be mixed with these).
        let printed = !store.data().out.contents().is_empty();
        flush_output(&mut store);
        let out = match out {
            Ok((inst, out)) => {
                if !printed {
                    let w = Warm {
                        store,
                        instance: inst,
                        idle_since: Instant::now(),
                    };
                    self.warm.lock().expect("lock").put(key, w, self.warm_max);
                }
                Ok(out)
            }
            Err(e) => Err(e),
        };
        let out = out?;
        let cap = input * MAX_OUTPUT_FACTOR + (64 << 10);
        if out.len() > cap {
            return Err(PluginError::BadResult(format!(
                "it returned {} bytes for {input} bytes in (at most {MAX_OUTPUT_FACTOR}× the input plus 64 KiB)",
                out.len()
            )));
        }
        Ok(out)
    }

    /// Runs a transform over events: one result per input event, in order. A call that fails
    /// as a whole (trap, limit, malformed result) is retried on halves of the batch until the
    /// events that make it fail are isolated; they fail with the call's reason, their
    /// neighbours go through. An init failure fails every event with its reason.
    pub async fn transform(
        &self,
        plugin: &Compiled,
        name: &str,
        config: &str,
        limits: &Limits,
        events: &[PluginEvent],
    ) -> Vec<TransformResult> {
        let mut results: Vec<Option<TransformResult>> = vec![None; events.len()];
        let mut todo: Vec<(usize, usize)> = vec![(0, events.len())];
        while let Some((lo, hi)) = todo.pop() {
            if lo >= hi {
                continue;
            }
            let slice = &events[lo..hi];
            match self
                .transform_once(plugin, name, config, limits, slice)
                .await
            {
                Ok(rs) => {
                    for (i, r) in rs.into_iter().enumerate() {
                        results[lo + i] = Some(r);
                    }
                }
                Err(PluginError::Init(reason)) => {
                    for r in &mut results[lo..hi] {
                        *r = Some(TransformResult::Failed(format!(
                            "plugin init failed: {reason}"
                        )));
                    }
                }
                Err(e) if hi - lo == 1 => {
                    results[lo] = Some(TransformResult::Failed(e.to_string()))
                }
                Err(_) => {
                    let mid = lo + (hi - lo) / 2;
                    todo.push((mid, hi));
                    todo.push((lo, mid));
                }
            }
        }
        results
            .into_iter()
            .map(|r| r.expect("every event gets a result"))
            .collect()
    }

    /// Delivers events through a destination: one result per event, in order. A call that
    /// fails as a whole is retried on halves of the batch to isolate the events that make it
    /// fail; a call that ran out of wall-clock time is retryable, any other failure (trap,
    /// CPU or memory limit, init error) is permanent, with its reason.
    pub async fn deliver(
        &self,
        plugin: &Compiled,
        name: &str,
        config: &str,
        limits: &Limits,
        caps: Arc<DestinationCaps>,
        events: &[PluginEvent],
    ) -> Vec<DeliveryResult> {
        self.deliver_counting(plugin, name, config, limits, caps, events)
            .await
            .0
    }

    /// [`Self::deliver`], also counting the events sent again because a call failed as a
    /// whole (a plugin may have delivered some of them before it failed: at least once).
    pub async fn deliver_counting(
        &self,
        plugin: &Compiled,
        name: &str,
        config: &str,
        limits: &Limits,
        caps: Arc<DestinationCaps>,
        events: &[PluginEvent],
    ) -> (Vec<DeliveryResult>, usize) {
        let mut resent = 0;
        let mut results: Vec<Option<DeliveryResult>> = vec![None; events.len()];
        let mut todo: Vec<(usize, usize)> = vec![(0, events.len())];
        while let Some((lo, hi)) = todo.pop() {
            if lo >= hi {
                continue;
            }
            match self
                .deliver_once(plugin, name, config, limits, caps.clone(), &events[lo..hi])
                .await
            {
                Ok(rs) => {
                    for (i, r) in rs.into_iter().enumerate() {
                        results[lo + i] = Some(r);
                    }
                }
                Err(e @ PluginError::Init(_)) => {
                    for r in &mut results[lo..hi] {
                        *r = Some(DeliveryResult::Permanent(e.to_string()));
                    }
                }
                Err(PluginError::Timeout(reason)) => {
                    for r in &mut results[lo..hi] {
                        *r = Some(DeliveryResult::Retryable {
                            reason: reason.clone(),
                            retry_after: None,
                        });
                    }
                }
                Err(e) if hi - lo == 1 => {
                    results[lo] = Some(DeliveryResult::Permanent(e.to_string()))
                }
                Err(_) => {
                    resent += hi - lo;
                    let mid = lo + (hi - lo) / 2;
                    todo.push((mid, hi));
                    todo.push((lo, mid));
                }
            }
        }
        let results = results
            .into_iter()
            .map(|r| r.expect("every event gets a result"))
            .collect();
        (results, resent)
    }

    async fn deliver_once(
        &self,
        plugin: &Compiled,
        name: &str,
        config: &str,
        limits: &Limits,
        caps: Arc<DestinationCaps>,
        events: &[PluginEvent],
    ) -> Result<Vec<DeliveryResult>, PluginError> {
        let Pre::Destination(pre) = &plugin.pre else {
            return Err(PluginError::Host(format!(
                "{name} is a {} plugin, not a destination",
                plugin.kind.as_str()
            )));
        };
        let batch = encode(events);
        let mut store = self.store(name, limits);
        store.data_mut().caps = Some(caps);
        let call = async {
            let inst = pre
                .instantiate_async(&mut store)
                .await
                .map_err(|e| PluginError::Call(describe(&e, limits)))?;
            init_outcome(inst.call_init(&mut store, config).await, limits)?;
            inst.call_deliver(&mut store, &batch)
                .await
                .map_err(|e| PluginError::Call(describe(&e, limits)))
        };
        let out = match tokio::time::timeout(limits.wall, call).await {
            Ok(r) => r,
            Err(_) => Err(PluginError::Timeout(format!(
                "the delivery ran past its wall-clock deadline of {} ms",
                limits.wall.as_millis()
            ))),
        };
        flush_output(&mut store);
        let out = out?;
        if out.len() != events.len() {
            return Err(PluginError::BadResult(format!(
                "{} delivery results for {} events",
                out.len(),
                events.len()
            )));
        }
        // NATS publishes are buffered by the client: nothing is delivered until they are
        // flushed to the server.
        if store.data().nats_unflushed
            && let Some(client) = store.data().caps.as_ref().and_then(|c| c.nats.clone())
        {
            let left = store
                .data()
                .wall_deadline
                .saturating_duration_since(Instant::now())
                .max(Duration::from_millis(100));
            match tokio::time::timeout(left, client.flush()).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    return Err(PluginError::Timeout(format!(
                        "flushing NATS publishes: {e}"
                    )));
                }
                Err(_) => {
                    return Err(PluginError::Timeout(
                        "flushing NATS publishes ran past the wall-clock deadline".into(),
                    ));
                }
            }
        }
        use destination::rewind::plugin::types::Delivery;
        Ok(out
            .into_iter()
            .map(|d| match d {
                Delivery::Delivered => DeliveryResult::Delivered,
                Delivery::Retryable(r) => DeliveryResult::Retryable {
                    reason: r.reason,
                    retry_after: r.retry_after_ms.map(|ms| Duration::from_millis(ms.into())),
                },
                Delivery::Permanent(f) => DeliveryResult::Permanent(f.reason),
            })
            .collect())
    }

    /// Runs an ingress plugin on an inbound request or bus message: the events it makes
    /// (headers, payload), or its rejection `(status, reason)`. A failing call is a 500
    /// rejection with the reason.
    pub async fn ingress(
        &self,
        plugin: &Compiled,
        name: &str,
        config: &str,
        limits: &Limits,
        input: ingress::rewind::plugin::types::Inbound,
    ) -> Result<Vec<NewEvent>, (u16, String)> {
        let Pre::Ingress(pre) = &plugin.pre else {
            return Err((
                500,
                format!(
                    "{name} is a {} plugin, not an ingress adapter",
                    plugin.kind.as_str()
                ),
            ));
        };
        let mut store = self.store(name, limits);
        let call = async {
            let inst = pre
                .instantiate_async(&mut store)
                .await
                .map_err(|e| PluginError::Call(describe(&e, limits)))?;
            init_outcome(inst.call_init(&mut store, config).await, limits)?;
            inst.call_handle(&mut store, &input)
                .await
                .map_err(|e| PluginError::Call(describe(&e, limits)))
        };
        let out = match tokio::time::timeout(limits.wall, call).await {
            Ok(r) => r,
            Err(_) => Err(PluginError::Call(format!(
                "the call ran past its wall-clock deadline of {} ms",
                limits.wall.as_millis()
            ))),
        };
        flush_output(&mut store);
        match out {
            Err(e) => Err((500, e.to_string())),
            Ok(Err(rejection)) => Err((rejection.status.clamp(400, 599), rejection.reason)),
            Ok(Ok(buf)) => decode_batch(&buf).map_err(|e| (500, e.to_string())),
        }
    }

    async fn transform_once(
        &self,
        plugin: &Compiled,
        name: &str,
        config: &str,
        limits: &Limits,
        events: &[PluginEvent],
    ) -> Result<Vec<TransformResult>, PluginError> {
        let out = self
            .transform_raw(plugin, name, config, limits, encode(events))
            .await?;
        decode_outcomes(&bytes::Bytes::from(out), events)
    }
}

/// Encodes events as a batch buffer.
pub fn encode(events: &[PluginEvent]) -> Vec<u8> {
    let mut w = BatchWriter::with_capacity(events.iter().map(|e| e.payload.len() + 48).sum());
    for e in events {
        w.push(
            &e.id,
            e.received_at,
            e.headers.iter().map(|(k, v)| (k.as_str(), v.as_str())),
            &e.payload,
        );
    }
    w.finish()
}

/// Decodes a transform's result buffer against its input.
/// Payloads are slices of `out` (no copy); ids and headers are owned.
pub fn decode_outcomes(
    out: &bytes::Bytes,
    events: &[PluginEvent],
) -> Result<Vec<TransformResult>, PluginError> {
    let bad = |e: rewind_plugin_sdk::DecodeError| PluginError::BadResult(e.to_string());
    let reader = OutcomeReader::new(out).map_err(bad)?;
    if reader.remaining() as usize != events.len() {
        return Err(PluginError::BadResult(format!(
            "{} results for {} events",
            reader.remaining(),
            events.len()
        )));
    }
    let mut results = Vec::with_capacity(events.len());
    for (outcome, input) in reader.zip(events) {
        match outcome.map_err(bad)? {
            Outcome::Failed(reason) => results.push(TransformResult::Failed(reason.to_string())),
            Outcome::Unchanged => results.push(TransformResult::Events(vec![input.clone()])),
            Outcome::Events(batch) => {
                let mut v = Vec::new();
                for e in batch.events() {
                    let e = e.map_err(bad)?;
                    v.push(PluginEvent {
                        id: if e.id.is_empty() {
                            input.id.clone()
                        } else {
                            e.id.to_string()
                        },
                        received_at: input.received_at,
                        headers: e
                            .headers()
                            .map(|(k, v)| (k.to_string(), v.to_string()))
                            .collect(),
                        payload: if e.payload.is_empty() {
                            bytes::Bytes::new()
                        } else {
                            out.slice_ref(e.payload)
                        },
                    });
                }
                results.push(TransformResult::Events(v));
            }
        }
    }
    Ok(results)
}

/// An event an ingress plugin made: its headers and payload.
pub type NewEvent = (Vec<(String, String)>, bytes::Bytes);

/// Checks that a batch buffer decodes (used on what ingress plugins return).
pub fn decode_batch(buf: &[u8]) -> Result<Vec<NewEvent>, PluginError> {
    let reader = BatchReader::new(buf).map_err(|e| PluginError::BadResult(e.to_string()))?;
    reader
        .map(|e| {
            let e = e.map_err(|e| PluginError::BadResult(e.to_string()))?;
            Ok((
                e.headers()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                bytes::Bytes::copy_from_slice(e.payload),
            ))
        })
        .collect()
}

/// Whole ticks in `d`, rounded up (at least one).
fn ticks(d: Duration) -> u64 {
    (d.as_nanos().div_ceil(TICK.as_nanos()) as u64).max(1)
}

/// Whatever the plugin printed goes to its log.
fn flush_output(store: &mut Store<HostState>) {
    let s = store.data_mut();
    let text = s.out.contents();
    if text.is_empty() {
        return;
    }
    let text = String::from_utf8_lossy(&text).into_owned();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        s.write_log("info", line);
    }
}

/// What a plugin's `init` said: its refusal, or the trap that stopped it.
fn init_outcome(
    r: wasmtime::Result<Result<(), String>>,
    limits: &Limits,
) -> Result<(), PluginError> {
    match r {
        Ok(Ok(())) => Ok(()),
        Ok(Err(reason)) => Err(PluginError::Init(reason)),
        Err(e) => Err(PluginError::Init(describe(&e, limits))),
    }
}

/// A call's error, in words a plugin author can act on.
fn describe(e: &wasmtime::Error, limits: &Limits) -> String {
    if let Some(trap) = e.downcast_ref::<Trap>() {
        return match trap {
            Trap::Interrupt => format!(
                "the plugin ran past its CPU limit of {} ms (an endless loop?)",
                limits.cpu.as_millis()
            ),
            Trap::StackOverflow => "the plugin overflowed its stack (unbounded recursion?)".into(),
            // A Rust (or C) plugin keeps its stack in linear memory below its data: running
            // off it is an out-of-bounds access, not a host stack overflow.
            Trap::MemoryOutOfBounds => {
                "the plugin accessed memory out of bounds (an overflow of its own stack, e.g. unbounded recursion, or a bug)".into()
            }
            Trap::UnreachableCodeReached => {
                let root = format!("{e:#}");
                format!("the plugin trapped (a panic or abort): {}", first_line(&root))
            }
            other => format!("the plugin trapped: {other}"),
        };
    }
    let text = format!("{e:#}");
    if text.contains("forcing trap when growing memory")
        || text.contains("memory") && text.contains("limit")
    {
        return format!(
            "the plugin exceeded its memory limit of {} MiB",
            limits.memory_bytes >> 20
        );
    }
    format!("the plugin failed: {}", first_line(&text))
}

fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budgets_round_up_to_whole_ticks() {
        assert_eq!(ticks(Duration::ZERO), 1);
        assert_eq!(ticks(Duration::from_millis(1)), 1);
        assert_eq!(ticks(TICK), 1);
        assert_eq!(ticks(TICK + Duration::from_nanos(1)), 2);
        assert_eq!(
            ticks(Duration::from_millis(50)),
            50 / TICK.as_millis() as u64
        );
        // The guest yields every 10 ms while under budget; expiry runs about once a second.
        assert_eq!(SLICE_TICKS * TICK.as_millis() as u64, 10);
        assert_eq!(EXPIRE_TICKS as u128 * TICK.as_millis(), 1000);
    }
}
