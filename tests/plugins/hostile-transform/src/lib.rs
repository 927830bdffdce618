//! A test fixture: one transform whose behaviour is chosen by `{"mode": …}` in its config,
//! so the host's containment can be tested case by case: `noop` (keeps every event), `upper`
//! (upper-cases payloads), `loop` (never returns), `grow` (allocates without bound),
//! `amplify` (returns 100× its input), `trap` (panics on every event), `poison` (panics on
//! events whose payload contains "poison"), `fail` (fails events containing "bad" with a
//! reason), `recurse` (unbounded recursion), `print` (writes to stdout and the log), `count`
//! (replaces each payload with how many events this instance has seen; panics on "trap").

use rewind_plugin_sdk::{Config, Emit, Event, Level, Transform, log};

pub struct Hostile {
    mode: String,
    seen: u64,
}

fn spin(n: u64) -> u64 {
    let mut x = n;
    loop {
        x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
        if x == 42 {
            return x;
        }
    }
}

#[allow(unconditional_recursion)]
fn recurse(n: u64, buf: &mut [u8; 256]) -> u64 {
    buf[(n % 256) as usize] = n as u8;
    recurse(n + 1, &mut [0; 256]) + buf[0] as u64
}

impl Transform for Hostile {
    fn new(config: Config) -> Result<Self, String> {
        let mode = config.opt_str("mode")?.unwrap_or("noop").to_string();
        if mode == "bad-config" {
            return Err("mode `bad-config` refuses to start".into());
        }
        Ok(Self { mode, seen: 0 })
    }

    fn transform(&mut self, event: &Event<'_>, out: &mut Emit<'_>) -> Result<(), String> {
        let contains = |needle: &[u8]| event.payload.windows(needle.len()).any(|w| w == needle);
        match self.mode.as_str() {
            "noop" => out.keep(),
            "upper" => out.payload(&event.payload.to_ascii_uppercase()),
            "loop" => {
                let n = spin(event.received_at as u64);
                out.payload(&n.to_le_bytes());
            }
            "grow" => {
                let mut hoard: Vec<Vec<u8>> = Vec::new();
                loop {
                    hoard.push(vec![1u8; 1 << 20]);
                    if hoard.len() == usize::MAX {
                        break;
                    }
                }
                out.keep();
            }
            "amplify" => {
                let big = event.payload.repeat(100);
                out.payload(&big);
            }
            "trap" => panic!("this plugin panics on every event"),
            "poison" => {
                if contains(b"poison") {
                    panic!("poisoned event {}", event.id);
                }
                out.keep();
            }
            "fail" => {
                if contains(b"bad") {
                    return Err(format!("event {} is bad", event.id));
                }
                out.keep();
            }
            "recurse" => {
                let n = recurse(0, &mut [0; 256]);
                out.payload(&n.to_le_bytes());
            }
            "print" => {
                println!("stdout line for {}", event.id);
                log(Level::Info, &format!("log line for {}", event.id));
                out.keep();
            }
            "count" => {
                if contains(b"trap") {
                    panic!("asked to trap");
                }
                self.seen += 1;
                out.payload(self.seen.to_string().as_bytes());
            }
            other => return Err(format!("unknown mode {other}")),
        }
        Ok(())
    }
}

rewind_plugin_sdk::export_transform!(Hostile);
