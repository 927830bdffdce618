//! `rewind-bench --plugins`: the plugin host's figures of `docs/benchmarks.md`.
//!
//! - a no-op transform (every event kept) over batches of 1,000 events of 1 KiB, through the
//!   host (instantiate, init, one call, decode), in ns per event and events/s on one core,
//!   beside the same transform run natively over the same buffers (the limit);
//! - `redact` on realistic 1 KiB JSON events, the same way;
//! - instantiation from the pre-instantiated component, and the memory an instance holds.

use std::time::Instant;

use rewind_gateway::plugins::PluginKind;
use rewind_gateway::plugins::host::{PluginEvent, PluginHost, encode};

use super::{cpu_seconds, realistic_event};

fn events(n: usize, event_bytes: usize, json: bool) -> Vec<PluginEvent> {
    let mut rng = rand::rng();
    (0..n)
        .map(|i| PluginEvent {
            id: ulid::Ulid::new().to_string(),
            received_at: 1_700_000_000_000_000 + i as i64,
            headers: vec![("content-type".into(), "application/json".into())],
            payload: if json {
                realistic_event(event_bytes, &mut rng).into()
            } else {
                "x".repeat(event_bytes).into()
            },
        })
        .collect()
}

async fn through_host(
    host: &PluginHost,
    wasm: &[u8],
    config: &str,
    batch: &[PluginEvent],
    secs: f64,
) -> anyhow::Result<(f64, f64)> {
    let plugin = host.compile(wasm).await?;
    let limits = PluginKind::Transform.default_limits();
    let buf = encode(batch);
    // Warm up.
    for _ in 0..20 {
        host.transform_raw(&plugin, "bench", config, &limits, buf.clone())
            .await?;
    }
    let (cpu0, t0) = (cpu_seconds(), Instant::now());
    let mut n = 0usize;
    while t0.elapsed().as_secs_f64() < secs {
        let out = host
            .transform_raw(&plugin, "bench", config, &limits, buf.clone())
            .await?;
        let decoded = rewind_gateway::plugins::host::decode_outcomes(&out.into(), batch)?;
        anyhow::ensure!(decoded.len() == batch.len());
        n += batch.len();
    }
    let cpu = cpu_seconds() - cpu0;
    Ok((cpu * 1e9 / n as f64, n as f64 / cpu))
}

/// The identity transform, natively: what the no-op plugin does, without WASM.
struct Identity;

impl rewind_plugin_sdk::Transform for Identity {
    fn new(_: rewind_plugin_sdk::Config) -> Result<Self, String> {
        Ok(Identity)
    }
    fn transform(
        &mut self,
        _: &rewind_plugin_sdk::Event<'_>,
        out: &mut rewind_plugin_sdk::Emit<'_>,
    ) -> Result<(), String> {
        out.keep();
        Ok(())
    }
}

fn natively<T: rewind_plugin_sdk::Transform>(
    config: &str,
    batch: &[PluginEvent],
    secs: f64,
) -> (f64, f64) {
    let mut t = T::new(rewind_plugin_sdk::Config::parse(config).unwrap()).unwrap();
    let buf = encode(batch);
    let (cpu0, t0) = (cpu_seconds(), Instant::now());
    let mut n = 0usize;
    while t0.elapsed().as_secs_f64() < secs {
        let out = rewind_plugin_sdk::transform_batch(&mut t, &buf).unwrap();
        let decoded = rewind_gateway::plugins::host::decode_outcomes(&out.into(), batch).unwrap();
        assert_eq!(decoded.len(), batch.len());
        n += batch.len();
    }
    let cpu = cpu_seconds() - cpu0;
    (cpu * 1e9 / n as f64, n as f64 / cpu)
}

pub async fn run(secs: u64, event_bytes: usize) -> anyhow::Result<()> {
    let secs = secs as f64;
    let host = PluginHost::new(Default::default())?;
    // REWIND_BENCH_REDACT_WASM=a.wasm,b.wasm,…: only `redact`, these builds in alternating
    // rounds (so that a slow stretch of a shared machine hits every build alike).
    if let Some(list) = std::env::var("REWIND_BENCH_REDACT_WASM")
        .ok()
        .filter(|l| l.contains(','))
    {
        let batch = events(1000, event_bytes, true);
        let cfg = r#"{"paths":["account.email","session.ip"]}"#;
        let builds: Vec<(&str, Vec<u8>)> = list
            .split(',')
            .map(|p| Ok((p, std::fs::read(p)?)))
            .collect::<anyhow::Result<_>>()?;
        for round in 1..=6 {
            for (path, wasm) in &builds {
                let (ns, eps) = through_host(&host, wasm, cfg, &batch, secs).await?;
                println!("  round {round} {path}: {ns:.0} ns/event ({eps:.0} events/s per core)");
            }
        }
        return Ok(());
    }
    let noop = std::fs::read(rewind_gateway::plugins::fixtures::build(
        "hostile-transform",
    ))?;
    // REWIND_BENCH_REDACT_WASM=path: another build of `redact` in place of the workspace's.
    let redact = match std::env::var_os("REWIND_BENCH_REDACT_WASM") {
        Some(path) => std::fs::read(path)?,
        None => std::fs::read(rewind_gateway::plugins::fixtures::build(
            "rewind-plugin-redact",
        ))?,
    };
    let noop_cfg = r#"{"mode":"noop"}"#;
    let redact_cfg = r#"{"paths":["account.email","session.ip"]}"#;
    println!(
        "plugin benchmark: batches of 1,000 events of ~{event_bytes} bytes, {secs} s per case, CPU time of this process"
    );
    for size in [100usize, 1000] {
        let batch = events(size, event_bytes, false);
        let (ns, eps) = through_host(&host, &noop, noop_cfg, &batch, secs).await?;
        let (nns, neps) = natively::<Identity>(noop_cfg, &batch, secs);
        println!(
            "  no-op transform, batch {size}: {ns:.0} ns/event ({eps:.0} events/s per core) through the host; native identity over the same buffers {nns:.0} ns/event ({neps:.0}/s)"
        );
    }
    let batch = events(1000, event_bytes, true);
    let (ns, eps) = through_host(&host, &redact, redact_cfg, &batch, secs).await?;
    let (nns, neps) = natively::<rewind_plugin_redact::Redact>(redact_cfg, &batch, secs);
    println!(
        "  redact (2 paths) on 1 KiB JSON, batch 1000: {ns:.0} ns/event ({eps:.0} events/s per core) through the host; native {nns:.0} ns/event ({neps:.0}/s)"
    );
    let plugin = host.compile(&noop).await?;
    let limits = PluginKind::Transform.default_limits();
    for _ in 0..100 {
        host.instantiate_only(&plugin, &limits).await?;
    }
    let n = 5000;
    let t0 = Instant::now();
    for _ in 0..n {
        host.instantiate_only(&plugin, &limits).await?;
    }
    println!(
        "  instantiation from the pre-instantiated component (fresh store, pooling allocator, slot reused): {:.1} µs",
        t0.elapsed().as_secs_f64() * 1e6 / n as f64
    );
    // Warm instances: what the pool holds after the cases above, per instance.
    let stats = host.warm_stats();
    println!(
        "  warm (idle) instances after the runs: {} holding {:.1} MiB of linear memory ({:.1} MiB each); component: {} bytes of wasm",
        stats.instances,
        stats.memory_bytes as f64 / (1 << 20) as f64,
        stats.memory_bytes as f64 / (1 << 20) as f64 / stats.instances.max(1) as f64,
        noop.len()
    );
    // A call on a warm instance, one event: the per-call overhead once an instance exists.
    let one = events(1, 64, false);
    let buf = encode(&one);
    let plugin = host.compile(&noop).await?;
    for _ in 0..100 {
        host.transform_raw(&plugin, "bench-one", noop_cfg, &limits, buf.clone())
            .await?;
    }
    let t0 = Instant::now();
    for _ in 0..n {
        host.transform_raw(&plugin, "bench-one", noop_cfg, &limits, buf.clone())
            .await?;
    }
    println!(
        "  a call of one event on a warm instance (checkout, budgets, call, return): {:.1} µs",
        t0.elapsed().as_secs_f64() * 1e6 / n as f64
    );
    Ok(())
}
