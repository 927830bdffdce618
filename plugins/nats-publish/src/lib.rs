//! `nats-publish`: publishes each event's payload to a NATS subject.
//!
//! Config: `{"subject": "orders.replayed"}`. The gateway lets a destination publish only to
//! the subjects of its config (`subject`, or the `nats_subjects` list with NATS wildcards), on
//! the NATS server of its bus. Each message carries `Nats-Msg-Id` (the event id, so JetStream
//! drops a redelivered duplicate), `rewind-event-id` and the event's `rewind-*` headers.
//! A publish error is retryable.

use rewind_plugin_sdk::host::nats_publish;
use rewind_plugin_sdk::{Config, Delivery, Destination, Event};

pub struct NatsPublish {
    subject: String,
}

impl Destination for NatsPublish {
    fn new(config: Config) -> Result<Self, String> {
        let subject = config.str("subject")?.to_string();
        if subject.is_empty() || subject.contains(['*', '>', ' ']) {
            return Err(format!(
                "config `subject` must be a plain subject (no wildcards), got {subject:?}"
            ));
        }
        Ok(Self { subject })
    }

    fn deliver(&mut self, event: &Event<'_>) -> Delivery {
        let mut headers = vec![
            ("Nats-Msg-Id".to_string(), event.id.to_string()),
            ("rewind-event-id".to_string(), event.id.to_string()),
        ];
        for (k, v) in event.headers() {
            if k.starts_with("rewind-") && k != "rewind-event-id" {
                headers.push((k.to_string(), v.to_string()));
            }
        }
        match nats_publish(&self.subject, &headers, event.payload) {
            Ok(()) => Delivery::Delivered,
            Err(reason) if reason.contains("not among") => Delivery::Permanent(reason),
            Err(reason) => Delivery::Retryable {
                reason,
                retry_after_ms: None,
            },
        }
    }
}

rewind_plugin_sdk::export_destination!(NatsPublish);
