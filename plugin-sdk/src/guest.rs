//! The plugin side: the traits a plugin implements, the export macros that bind them to the
//! WIT worlds, and the host capabilities (logging, HTTP and NATS for destinations).

use std::any::Any;
use std::cell::RefCell;

use crate::codec::{BatchReader, Event, OutcomeWriter};
use crate::config::Config;

thread_local! {
    /// The plugin's state, set by `init` (a component instance is single-threaded).
    static STATE: RefCell<Option<Box<dyn Any>>> = const { RefCell::new(None) };
}

fn with_state<P: 'static, R>(f: impl FnOnce(&mut P) -> R) -> Result<R, String> {
    STATE.with(|s| {
        let mut s = s.borrow_mut();
        let p = s
            .as_mut()
            .and_then(|b| b.downcast_mut::<P>())
            .ok_or_else(|| "the plugin was called before init".to_string())?;
        Ok(f(p))
    })
}

fn set_state<P: 'static>(p: P) {
    STATE.with(|s| *s.borrow_mut() = Some(Box::new(p)));
}

/// Where a transform writes what one input event becomes.
pub struct Emit<'w> {
    w: &'w mut OutcomeWriter,
    open: (usize, u32),
    input: Event<'w>,
    /// `keep()` was the first thing emitted and is not written yet: when it stays the only
    /// output, the outcome is the one-byte "unchanged" instead of a copy of the event.
    kept: bool,
}

impl Emit<'_> {
    /// Keeps the input event as it is.
    pub fn keep(&mut self) {
        if self.open.1 == 0 {
            self.kept = true;
            self.open.1 = 1;
            return;
        }
        self.write_kept();
        let input = self.input;
        self.w.event_unchanged(&mut self.open, &input);
    }

    /// Writes a pending `keep()` out as an event (something else is emitted after it).
    fn write_kept(&mut self) {
        if std::mem::take(&mut self.kept) {
            let input = self.input;
            self.open.1 = 0;
            self.w.event_unchanged(&mut self.open, &input);
        }
    }

    /// The input event with a new payload (same id, time and headers).
    pub fn payload(&mut self, payload: &[u8]) {
        self.write_kept();
        let input = self.input;
        self.w.event_with_payload(&mut self.open, &input, payload);
    }

    /// An event with new headers and payload (keeps the input's id and time).
    pub fn event<'h>(
        &mut self,
        headers: impl IntoIterator<Item = (&'h str, &'h str)>,
        payload: &[u8],
    ) {
        self.write_kept();
        let at = self.input.received_at;
        self.w.event(&mut self.open, "", at, headers, payload);
    }

    /// Events emitted so far for this input.
    pub fn count(&self) -> u32 {
        self.open.1
    }
}

/// A per-event transform: each input event becomes zero or more events, or fails.
pub trait Transform: Sized + 'static {
    /// Builds the plugin from its config; an error refuses the pipeline step.
    fn new(config: Config) -> Result<Self, String>;
    /// Writes what `event` becomes to `out` (nothing = drop it). An error fails this event
    /// alone (it goes to the dead-letter collection with the reason).
    fn transform(&mut self, event: &Event<'_>, out: &mut Emit<'_>) -> Result<(), String>;
}

#[doc(hidden)]
pub fn __init<P: 'static>(
    config: &str,
    new: impl FnOnce(Config) -> Result<P, String>,
) -> Result<(), String> {
    let p = new(Config::parse(config)?)?;
    set_state(p);
    Ok(())
}

/// Runs a transform over one encoded batch and encodes its outcomes (the guest side of the
/// `transform` export; also what [`crate::testing`] runs natively).
pub fn transform_batch<T: Transform>(
    t: &mut T,
    batch: &[u8],
) -> Result<Vec<u8>, crate::DecodeError> {
    let mut w = OutcomeWriter::with_capacity(batch.len() + batch.len() / 8);
    for e in BatchReader::new(batch)? {
        let e = e?;
        let at = w.begin_events();
        let mut out = Emit {
            w: &mut w,
            open: (at, 0),
            input: e,
            kept: false,
        };
        match t.transform(&e, &mut out) {
            Ok(()) if out.kept => {
                // Kept, and nothing else: one byte instead of the event.
                let open = out.open;
                w.truncate_to(open.0 - 1);
                w.unchanged();
            }
            Ok(()) => {
                let open = out.open;
                w.end_events(open);
            }
            Err(reason) => {
                // Drop what was emitted for it: cut the buffer back to the outcome's tag.
                let open = out.open;
                w.truncate_to(open.0 - 1);
                w.failed(&reason);
            }
        }
    }
    Ok(w.finish())
}

#[doc(hidden)]
pub fn __run_transform<T: Transform>(batch: &[u8]) -> Vec<u8> {
    match with_state::<T, _>(|t| transform_batch(t, batch)) {
        Ok(Ok(out)) => out,
        Ok(Err(e)) => panic!("{e}"),
        Err(e) => panic!("{e}"),
    }
}

/// What a destination did with one event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delivery {
    Delivered,
    /// Try again later; `retry_after_ms` when the receiver said how long to wait.
    Retryable {
        reason: String,
        retry_after_ms: Option<u32>,
    },
    /// Never deliverable (goes to dead letters).
    Permanent(String),
}

/// A destination: delivers events somewhere (HTTP, NATS, …) through the host's capabilities.
pub trait Destination: Sized + 'static {
    fn new(config: Config) -> Result<Self, String>;
    /// Delivers one event.
    fn deliver(&mut self, event: &Event<'_>) -> Delivery;
    /// Delivers a batch (one result per event, in order). The default delivers one by one;
    /// override it to send a batch in one request.
    fn deliver_batch(&mut self, events: &[Event<'_>]) -> Vec<Delivery> {
        events.iter().map(|e| self.deliver(e)).collect()
    }
}

#[doc(hidden)]
pub fn __decode(batch: &[u8]) -> Vec<Event<'_>> {
    match BatchReader::new(batch).and_then(|r| r.collect::<Result<Vec<_>, _>>()) {
        Ok(v) => v,
        Err(e) => panic!("{e}"),
    }
}

#[doc(hidden)]
pub fn __run_destination<D: Destination>(batch: &[u8]) -> Vec<Delivery> {
    let events = __decode(batch);
    let n = events.len();
    let mut out =
        with_state::<D, _>(|d| d.deliver_batch(&events)).unwrap_or_else(|e| panic!("{e}"));
    if out.len() != n {
        let reason = format!(
            "the destination returned {} results for {n} events",
            out.len()
        );
        out = vec![Delivery::Permanent(reason); n];
    }
    out
}

/// An inbound HTTP request for an ingress plugin.
#[derive(Debug, Clone)]
pub struct Request {
    pub method: String,
    /// The path after `/v1/hooks/{id}`, with the query string.
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Request {
    /// The first header named `name` (ASCII case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// A bus message for an ingress plugin (a source's subscription).
#[derive(Debug, Clone)]
pub struct Message {
    /// The bus it came from: `nats`.
    pub bus: String,
    /// The subject it was published to.
    pub subject: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Message {
    /// The first header named `name` (ASCII case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// An event an ingress plugin produces (the gateway assigns its id and time).
#[derive(Debug, Clone, Default)]
pub struct NewEvent {
    pub headers: Vec<(String, String)>,
    pub payload: Vec<u8>,
}

/// An ingress plugin's refusal: the HTTP status the sender gets, and why.
#[derive(Debug, Clone)]
pub struct Rejection {
    pub status: u16,
    pub reason: String,
}

impl Rejection {
    pub fn new(status: u16, reason: impl Into<String>) -> Self {
        Self {
            status,
            reason: reason.into(),
        }
    }
}

/// An ingress adapter: turns an inbound HTTP request (a hook) or a bus message (a source)
/// into events.
pub trait Ingress: Sized + 'static {
    fn new(config: Config) -> Result<Self, String>;
    fn handle(&mut self, request: &Request) -> Result<Vec<NewEvent>, Rejection>;
    /// A bus message; by default refused (the adapter takes HTTP requests only).
    fn handle_message(&mut self, message: &Message) -> Result<Vec<NewEvent>, Rejection> {
        let _ = message;
        Err(Rejection::new(
            415,
            "this ingress adapter takes HTTP requests (hooks) only, not bus messages",
        ))
    }
}

/// What an ingress plugin is given.
#[doc(hidden)]
pub enum Inbound {
    Request(Request),
    Message(Message),
}

#[doc(hidden)]
pub fn __run_ingress<I: Ingress>(input: &Inbound) -> Result<Vec<u8>, Rejection> {
    let events = with_state::<I, _>(|i| match input {
        Inbound::Request(r) => i.handle(r),
        Inbound::Message(m) => i.handle_message(m),
    })
    .map_err(|e| Rejection::new(500, e))??;
    let mut w = crate::codec::BatchWriter::new();
    for e in &events {
        w.push(
            "",
            0,
            e.headers.iter().map(|(k, v)| (k.as_str(), v.as_str())),
            &e.payload,
        );
    }
    Ok(w.finish())
}

/// Log levels for [`log`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Trace,
    Debug,
    Info,
    Warn,
    Error,
}

/// Writes a line to the plugin's log in the gateway.
pub fn log(level: Level, message: &str) {
    // Every world imports the same `log` interface; use the bindings of the one compiled in.
    macro_rules! write_with {
        ($world:ident) => {{
            use crate::bindings::$world::rewind::plugin::log as l;
            let level = match level {
                Level::Trace => l::Level::Trace,
                Level::Debug => l::Level::Debug,
                Level::Info => l::Level::Info,
                Level::Warn => l::Level::Warn,
                Level::Error => l::Level::Error,
            };
            l::log(level, message);
        }};
    }
    #[cfg(feature = "transform")]
    write_with!(transform);
    #[cfg(all(feature = "destination", not(feature = "transform")))]
    write_with!(destination);
    #[cfg(all(
        feature = "ingress",
        not(any(feature = "transform", feature = "destination"))
    ))]
    write_with!(ingress);
}

/// Outbound HTTP and NATS for destinations (through the host, within its allow-list).
#[cfg(feature = "destination")]
pub mod host {
    use crate::bindings::destination::rewind::plugin::{http, nats};
    pub use http::{Request as HttpRequest, Response as HttpResponse};

    /// Sends one HTTP request; `Err` carries the host's reason (refused address, timeout, …).
    pub fn http_send(request: &HttpRequest) -> Result<HttpResponse, String> {
        http::send(request)
    }

    /// Publishes to a NATS subject the destination's config allows.
    pub fn nats_publish(
        subject: &str,
        headers: &[(String, String)],
        payload: &[u8],
    ) -> Result<(), String> {
        nats::publish(subject, headers, payload)
    }
}

/// Exports a [`Transform`] implementation as the plugin's `transform` world.
#[cfg(feature = "transform")]
#[macro_export]
macro_rules! export_transform {
    ($t:ty) => {
        const _: () = {
            struct __RewindPlugin;
            impl $crate::bindings::transform::Guest for __RewindPlugin {
                fn init(
                    config: ::std::string::String,
                ) -> ::std::result::Result<(), ::std::string::String> {
                    $crate::__init::<$t>(&config, <$t as $crate::Transform>::new)
                }
                fn transform(batch: ::std::vec::Vec<u8>) -> ::std::vec::Vec<u8> {
                    $crate::__run_transform::<$t>(&batch)
                }
            }
            $crate::bindings::transform::__rewind_export_transform!(__RewindPlugin);
        };
    };
}

/// Exports a [`Destination`] implementation as the plugin's `destination` world.
#[cfg(feature = "destination")]
#[macro_export]
macro_rules! export_destination {
    ($t:ty) => {
        const _: () = {
            struct __RewindPlugin;
            impl $crate::bindings::destination::Guest for __RewindPlugin {
                fn init(
                    config: ::std::string::String,
                ) -> ::std::result::Result<(), ::std::string::String> {
                    $crate::__init::<$t>(&config, <$t as $crate::Destination>::new)
                }
                fn deliver(
                    batch: ::std::vec::Vec<u8>,
                ) -> ::std::vec::Vec<$crate::bindings::destination::rewind::plugin::types::Delivery>
                {
                    use $crate::bindings::destination::rewind::plugin::types as t;
                    $crate::__run_destination::<$t>(&batch)
                        .into_iter()
                        .map(|d| match d {
                            $crate::Delivery::Delivered => t::Delivery::Delivered,
                            $crate::Delivery::Retryable {
                                reason,
                                retry_after_ms,
                            } => t::Delivery::Retryable(t::Retry {
                                reason,
                                retry_after_ms,
                            }),
                            $crate::Delivery::Permanent(reason) => {
                                t::Delivery::Permanent(t::Failure { reason })
                            }
                        })
                        .collect()
                }
            }
            $crate::bindings::destination::__rewind_export_destination!(__RewindPlugin);
        };
    };
}

/// Exports an [`Ingress`] implementation as the plugin's `ingress` world.
#[cfg(feature = "ingress")]
#[macro_export]
macro_rules! export_ingress {
    ($t:ty) => {
        const _: () = {
            struct __RewindPlugin;
            impl $crate::bindings::ingress::Guest for __RewindPlugin {
                fn init(
                    config: ::std::string::String,
                ) -> ::std::result::Result<(), ::std::string::String> {
                    $crate::__init::<$t>(&config, <$t as $crate::Ingress>::new)
                }
                fn handle(
                    input: $crate::bindings::ingress::rewind::plugin::types::Inbound,
                ) -> ::std::result::Result<
                    ::std::vec::Vec<u8>,
                    $crate::bindings::ingress::rewind::plugin::types::Rejection,
                > {
                    use $crate::bindings::ingress::rewind::plugin::types::Inbound as I;
                    let input = match input {
                        I::Request(request) => $crate::Inbound::Request($crate::Request {
                            method: request.method,
                            path: request.path,
                            headers: request.headers,
                            body: request.body,
                        }),
                        I::Message(m) => $crate::Inbound::Message($crate::Message {
                            bus: m.bus,
                            subject: m.subject,
                            headers: m.headers,
                            body: m.body,
                        }),
                    };
                    $crate::__run_ingress::<$t>(&input).map_err(|e| {
                        $crate::bindings::ingress::rewind::plugin::types::Rejection {
                            status: e.status,
                            reason: e.reason,
                        }
                    })
                }
            }
            $crate::bindings::ingress::__rewind_export_ingress!(__RewindPlugin);
        };
    };
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{BatchWriter, Outcome, OutcomeReader};

    /// Keeps, keeps and adds, replaces, or fails, by the event's payload.
    struct Mixed;

    impl Transform for Mixed {
        fn new(_: Config) -> Result<Self, String> {
            Ok(Mixed)
        }
        fn transform(&mut self, e: &Event<'_>, out: &mut Emit<'_>) -> Result<(), String> {
            match e.payload {
                b"keep" => out.keep(),
                b"keep+add" => {
                    out.keep();
                    out.payload(b"added");
                }
                b"add+keep" => {
                    out.payload(b"added");
                    out.keep();
                }
                b"keep+fail" => {
                    out.keep();
                    return Err("no".into());
                }
                _ => {}
            }
            Ok(())
        }
    }

    #[test]
    fn a_kept_event_is_one_byte_unless_more_is_emitted() {
        let mut w = BatchWriter::new();
        for p in ["keep", "keep+add", "add+keep", "keep+fail", "drop"] {
            w.push("ID", 7, [("h", "v")], p.as_bytes());
        }
        let out = transform_batch(&mut Mixed, &w.finish()).unwrap();
        let got: Vec<_> = OutcomeReader::new(&out)
            .unwrap()
            .map(|o| match o.unwrap() {
                Outcome::Unchanged => vec!["unchanged".to_string()],
                Outcome::Failed(r) => vec![format!("failed {r}")],
                Outcome::Events(b) => b
                    .events()
                    .map(|e| {
                        let e = e.unwrap();
                        format!("{} {}", e.id, String::from_utf8_lossy(e.payload))
                    })
                    .collect(),
            })
            .collect();
        assert_eq!(
            got,
            vec![
                vec!["unchanged".to_string()],
                vec!["ID keep+add".into(), " added".into()],
                vec![" added".into(), "ID add+keep".into()],
                vec!["failed no".into()],
                vec![],
            ]
        );
        // "keep" costs one byte of the result buffer, not a copy of the event.
        assert_eq!(out[4], 2);
    }
}
