//! The host against real components: the `hostile-transform` fixture in each of its modes,
//! and uploads that must be refused. Every hostile case ends in a recorded reason and the
//! host keeps serving the next call.

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use super::host::{PluginEvent, PluginHost, TransformResult};
use super::{Limits, PluginError, PluginKind};

fn hostile_wasm() -> &'static [u8] {
    static W: OnceLock<Vec<u8>> = OnceLock::new();
    W.get_or_init(|| std::fs::read(super::fixtures::build("hostile-transform")).unwrap())
}

fn host() -> Arc<PluginHost> {
    PluginHost::new(Default::default()).unwrap()
}

fn events(payloads: &[&str]) -> Vec<PluginEvent> {
    payloads
        .iter()
        .enumerate()
        .map(|(i, p)| PluginEvent {
            id: format!("01EVENT{i:03}"),
            received_at: 1_700_000_000_000_000 + i as i64,
            headers: vec![("content-type".into(), "application/json".into())],
            payload: bytes::Bytes::copy_from_slice(p.as_bytes()),
        })
        .collect()
}

fn limits() -> Limits {
    PluginKind::Transform.default_limits()
}

async fn run(host: &PluginHost, mode: &str, input: &[PluginEvent]) -> Vec<TransformResult> {
    let c = host.compile(hostile_wasm()).await.unwrap();
    assert_eq!(c.kind, PluginKind::Transform);
    let config = format!(r#"{{"mode":"{mode}"}}"#);
    host.transform(&c, "hostile", &config, &limits(), input)
        .await
}

fn failed(r: &TransformResult) -> &str {
    match r {
        TransformResult::Failed(reason) => reason,
        other => panic!("expected a failure, got {other:?}"),
    }
}

/// After any hostile call, a well-behaved call still works.
async fn still_serves(host: &PluginHost) {
    let input = events(&[r#"{"a":1}"#]);
    let out = run(host, "noop", &input).await;
    assert_eq!(out, vec![TransformResult::Events(input)]);
}

#[tokio::test]
async fn a_noop_transform_passes_events_through() {
    let host = host();
    let input = events(&[r#"{"a":1}"#, r#"{"b":2}"#, "raw bytes"]);
    let out = run(&host, "noop", &input).await;
    assert_eq!(
        out,
        input
            .iter()
            .map(|e| TransformResult::Events(vec![e.clone()]))
            .collect::<Vec<_>>()
    );
    let out = run(&host, "upper", &input).await;
    let TransformResult::Events(e) = &out[0] else {
        panic!()
    };
    assert_eq!(e[0].payload, r#"{"A":1}"#);
    assert_eq!(e[0].id, input[0].id, "an output keeps its input's id");
    assert_eq!(e[0].headers, input[0].headers);
    // The same bytes compile once.
    let a = host.compile(hostile_wasm()).await.unwrap();
    let b = host.compile(hostile_wasm()).await.unwrap();
    assert!(Arc::ptr_eq(&a, &b));
    assert_eq!(a.sha256, PluginHost::sha256(hostile_wasm()));
}

#[tokio::test]
async fn per_event_failures_keep_their_reasons() {
    let host = host();
    let out = run(&host, "fail", &events(&["ok", "bad one", "ok too"])).await;
    assert!(matches!(out[0], TransformResult::Events(_)));
    assert_eq!(failed(&out[1]), "event 01EVENT001 is bad");
    assert!(matches!(out[2], TransformResult::Events(_)));
    let out = run(&host, "bad-config", &events(&["x", "y"])).await;
    for r in &out {
        assert!(
            failed(r).contains("mode `bad-config` refuses to start"),
            "{r:?}"
        );
    }
}

#[tokio::test]
async fn an_endless_loop_is_stopped_at_its_cpu_limit() {
    let host = host();
    host.compile(hostile_wasm()).await.unwrap();
    let t = Instant::now();
    let out = run(&host, "loop", &events(&["x"])).await;
    assert!(failed(&out[0]).contains("CPU limit of 50 ms"), "{out:?}");
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "took {:?}",
        t.elapsed()
    );
    still_serves(&host).await;
}

#[tokio::test]
async fn unbounded_memory_is_stopped_at_the_memory_limit() {
    let host = host();
    let c = host.compile(hostile_wasm()).await.unwrap();
    // A generous CPU budget, so the memory limit is what stops it on a loaded machine too.
    let limits = Limits {
        cpu: Duration::from_secs(2),
        wall: Duration::from_secs(20),
        ..limits()
    };
    let out = host
        .transform(
            &c,
            "hostile",
            r#"{"mode":"grow"}"#,
            &limits,
            &events(&["x"]),
        )
        .await;
    assert!(
        failed(&out[0]).contains("memory limit of 32 MiB"),
        "{out:?}"
    );
    still_serves(&host).await;
}

#[tokio::test]
async fn an_amplifying_plugin_is_refused_its_output() {
    let host = host();
    let payload = "y".repeat(2048);
    let out = run(&host, "amplify", &events(&[&payload])).await;
    let reason = failed(&out[0]);
    assert!(reason.contains("16× the input"), "{reason}");
    still_serves(&host).await;
}

#[tokio::test]
async fn traps_and_stack_overflows_fail_the_call_not_the_host() {
    let host = host();
    let out = run(&host, "trap", &events(&["a", "b", "c"])).await;
    for r in &out {
        assert!(failed(r).contains("trapped"), "{r:?}");
    }
    let out = run(&host, "recurse", &events(&["a"])).await;
    assert!(failed(&out[0]).contains("stack"), "{out:?}");
    still_serves(&host).await;
}

#[tokio::test]
async fn a_poison_event_is_isolated_and_its_neighbours_go_through() {
    let host = host();
    let mut payloads: Vec<String> = (0..64).map(|i| format!("{{\"n\":{i}}}")).collect();
    payloads[37] = "{\"poison\":true}".into();
    let refs: Vec<&str> = payloads.iter().map(String::as_str).collect();
    let out = run(&host, "poison", &events(&refs)).await;
    for (i, r) in out.iter().enumerate() {
        if i == 37 {
            assert!(failed(r).contains("trapped"), "{r:?}");
        } else {
            assert!(
                matches!(r, TransformResult::Events(e) if e.len() == 1),
                "event {i}: {r:?}"
            );
        }
    }
}

#[tokio::test]
async fn printing_plugins_work() {
    let host = host();
    let input = events(&["a", "b"]);
    let out = run(&host, "print", &input).await;
    assert_eq!(out.len(), 2);
    assert!(matches!(out[0], TransformResult::Events(_)));
}

#[tokio::test]
async fn bad_uploads_are_refused_with_a_reason() {
    let host = host();
    let err = |r: Result<_, PluginError>| r.err().expect("must be refused").to_string();
    assert!(err(host.compile(b"#!/bin/sh\necho hi\n").await).contains("not WebAssembly"));
    assert!(err(host.compile(b"\0asm\x01\0\0\0").await).contains("core WebAssembly module"));
    let huge = vec![0u8; 100 << 20];
    assert!(err(host.compile(&huge).await).contains("at most 10485760 bytes"));
    // A valid component of no Rewind world.
    let empty = wat::parse_str("(component)").unwrap();
    assert!(err(host.compile(&empty).await).contains("does not implement a Rewind world"));
    let other = wat::parse_str(
        r#"(component
             (core module $m (func (export "f")))
             (core instance $i (instantiate $m))
             (func (export "run") (canon lift (core func $i "f"))))"#,
    )
    .unwrap();
    assert!(err(host.compile(&other).await).contains("it exports run"));
    // A component that imports something beyond WASI and its world.
    let sneaky = wat::parse_str(
        r#"(component
             (import "evil:net/raw-socket@1.0.0" (instance))
             (core module $m (func (export "f")))
             (core instance $i (instantiate $m))
             (func (export "init") (canon lift (core func $i "f")))
             (func (export "transform") (canon lift (core func $i "f"))))"#,
    )
    .unwrap();
    assert!(err(host.compile(&sneaky).await).contains("imports `evil:net/raw-socket@1.0.0`"));
    // Garbage after a component header.
    let mut broken = b"\0asm\x0d\0\x01\0".to_vec();
    broken.extend_from_slice(&[0xff; 64]);
    assert!(err(host.compile(&broken).await).contains("not valid"));
    still_serves(&host).await;
}

fn payloads(out: &[TransformResult]) -> Vec<String> {
    out.iter()
        .map(|r| match r {
            TransformResult::Events(e) => String::from_utf8_lossy(&e[0].payload).into_owned(),
            TransformResult::Failed(reason) => format!("failed: {reason}"),
        })
        .collect()
}

#[tokio::test]
async fn instances_stay_warm_between_good_calls_and_never_after_a_failure() {
    let host = host();
    assert_eq!(host.warm_stats().instances, 0);
    // The second call reuses the first call's instance (it has counted one event already).
    let one = events(&["a"]);
    assert_eq!(payloads(&run(&host, "count", &one).await), ["1"]);
    assert_eq!(payloads(&run(&host, "count", &one).await), ["2"]);
    let stats = host.warm_stats();
    assert_eq!(stats.instances, 1);
    assert!(
        stats.memory_bytes >= 64 << 10,
        "an idle instance holds its linear memory: {stats:?}"
    );
    // A different config is a different step: its own instance.
    let c = host.compile(hostile_wasm()).await.unwrap();
    let other = host
        .transform(&c, "hostile", r#"{"mode":"count","x":1}"#, &limits(), &one)
        .await;
    assert_eq!(payloads(&other), ["1"]);
    assert_eq!(host.warm_stats().instances, 2);
    // A call that traps drops its instance: the next call starts from a fresh one.
    let out = run(&host, "count", &events(&["trap"])).await;
    assert!(failed(&out[0]).contains("trapped"), "{out:?}");
    assert_eq!(payloads(&run(&host, "count", &one).await), ["1"]);
    // Instances that printed are not kept (their captured output is per store).
    host.drop_warm();
    assert_eq!(host.warm_stats(), Default::default());
    run(&host, "print", &one).await;
    assert_eq!(host.warm_stats().instances, 0);
}

/// `redact` compiled to WASM (with its SIMD scanner) against the same code run natively
/// (SSE2 or portable), over random payloads built to cross 16- and 64-byte block edges:
/// long strings full of escaped quotes, backslash runs and brackets, nesting, pretty
/// printing, escaped keys, and truncated (malformed) text. Both results must be identical.
#[tokio::test]
async fn redact_in_wasm_agrees_with_redact_run_natively() {
    let wasm = std::fs::read(super::fixtures::build("rewind-plugin-redact")).unwrap();
    let host = host();
    let c = host.compile(&wasm).await.unwrap();
    let mut seed = 0x5851_f42d_4c95_7f2du64;
    let mut rnd = move |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    };
    fn value(rnd: &mut dyn FnMut(u64) -> u64, out: &mut String, depth: u32) {
        match rnd(if depth > 3 { 3 } else { 5 }) {
            0 => out.push_str(&format!("{}", rnd(100_000) as f64 / 7.0)),
            1 | 2 => {
                out.push('"');
                for _ in 0..rnd(90) {
                    out.push_str(
                        ["x", "\\\"", "\\\\", "{", "]", "é", "\\n", " ", "\\u0041"]
                            [rnd(9) as usize],
                    );
                }
                out.push('"');
            }
            3 => {
                out.push('[');
                for k in 0..rnd(4) {
                    if k > 0 {
                        out.push(',');
                    }
                    value(rnd, out, depth + 1);
                }
                out.push(']');
            }
            _ => object(rnd, out, depth + 1),
        }
    }
    fn object(rnd: &mut dyn FnMut(u64) -> u64, out: &mut String, depth: u32) {
        let pretty = rnd(3) == 0;
        out.push('{');
        for k in 0..rnd(6) {
            if k > 0 {
                out.push(',');
            }
            if pretty {
                out.push_str("\n  ");
            }
            let key = [
                "a",
                "b",
                "c",
                "a.b",
                "\\u0061",
                "long_key_name_here",
                "b\\\"c",
            ];
            out.push_str(&format!("\"{}\":", key[rnd(7) as usize]));
            if pretty {
                out.push(' ');
            }
            value(rnd, out, depth);
        }
        out.push('}');
    }
    for (config, rounds) in [
        (r#"{"paths":["a.b","c"]}"#, 6),
        (r#"{"paths":["a","b.a.b"],"action":"drop"}"#, 6),
    ] {
        let mut native = <rewind_plugin_redact::Redact as rewind_plugin_sdk::Transform>::new(
            rewind_plugin_sdk::Config::parse(config).unwrap(),
        )
        .unwrap();
        for _ in 0..rounds {
            let payloads: Vec<String> = (0..400)
                .map(|i| {
                    let mut p = String::new();
                    object(&mut rnd, &mut p, 0);
                    if i % 10 == 0 {
                        // Malformed: cut at a char boundary.
                        let mut cut = rnd(p.len() as u64 + 1) as usize;
                        while !p.is_char_boundary(cut) {
                            cut -= 1;
                        }
                        p.truncate(cut);
                    }
                    p
                })
                .collect();
            let refs: Vec<&str> = payloads.iter().map(String::as_str).collect();
            let input = events(&refs);
            let got = host
                .transform(&c, "redact", config, &limits(), &input)
                .await;
            let out = rewind_plugin_sdk::transform_batch(&mut native, &super::host::encode(&input))
                .unwrap();
            let want = super::host::decode_outcomes(&out.into(), &input).unwrap();
            for ((g, w), p) in got.iter().zip(&want).zip(&payloads) {
                assert_eq!(g, w, "{config} on {p}");
            }
            assert_eq!(got.len(), want.len());
            let redacted = got
                .iter()
                .zip(&input)
                .filter(|(g, e)| {
                    matches!(g, TransformResult::Events(v) if v.len() == 1 && v[0].payload != e.payload)
                })
                .count();
            assert!(
                redacted > 40,
                "only {redacted} of 400 redacted: a weak comparison"
            );
        }
    }
}
