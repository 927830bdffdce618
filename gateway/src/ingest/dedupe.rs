//! Remembering client ids (idempotency keys) so a retried event is stored once.
//!
//! A key moves through two states: *pending* while its first append is in flight, and *stored*
//! once the bus made it durable. A retry that arrives while the first attempt is pending waits
//! for it: it must not be acknowledged before the event is durable, and it must not be stored
//! a second time. If the first attempt fails, the key is forgotten and the waiter stores the
//! event itself. Keys are kept for a window (default 24 h) and up to a count; after a restart
//! the local bus lists the keys of the window, so dedupe survives restarts too.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::watch;

enum Slot {
    Pending {
        id: String,
        done: watch::Receiver<Option<bool>>,
    },
    Stored {
        id: String,
        at: i64,
    },
}

struct Inner {
    map: HashMap<String, Slot>,
    /// Stored keys in insertion order, for eviction by age and count.
    order: VecDeque<(i64, String)>,
}

pub struct DedupeIndex {
    inner: Mutex<Inner>,
    window_micros: i64,
    max_keys: usize,
}

/// What the index says about one key.
pub enum Lookup {
    /// Stored before under this id: do not store again.
    Stored(String),
    /// Another request is storing it right now; wait, then look again.
    InFlight(watch::Receiver<Option<bool>>),
    /// New: the caller reserved it and must store the event (then call `complete`).
    Reserved,
}

/// Pending keys a request reserved; resolving it (or dropping it) settles them.
pub struct Reservation<'a> {
    index: &'a DedupeIndex,
    keys: Vec<String>,
    done: Option<watch::Sender<Option<bool>>>,
}

pub fn key(team_id: &str, collection_id: &str, client_id: &str) -> String {
    format!("{team_id}\u{0}{collection_id}\u{0}{client_id}")
}

impl DedupeIndex {
    pub fn new(window: Duration, max_keys: usize) -> Self {
        Self {
            inner: Mutex::new(Inner {
                map: HashMap::new(),
                order: VecDeque::new(),
            }),
            window_micros: window.as_micros().min(i64::MAX as u128) as i64,
            max_keys,
        }
    }

    pub fn len(&self) -> usize {
        self.inner.lock().expect("lock").map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Looks up each `(key, proposed_id)`; new keys are reserved under the proposed id in one
    /// reservation.
    pub fn lookup(&self, keys: &[(String, String)]) -> (Vec<Lookup>, Reservation<'_>) {
        let (tx, rx) = watch::channel(None);
        let mut reserved = Vec::new();
        let mut inner = self.inner.lock().expect("lock");
        let results = keys
            .iter()
            .map(|(key, id)| match inner.map.get(key) {
                Some(Slot::Stored { id, .. }) => Lookup::Stored(id.clone()),
                Some(Slot::Pending { done, .. }) => Lookup::InFlight(done.clone()),
                None => {
                    inner.map.insert(
                        key.clone(),
                        Slot::Pending {
                            id: id.clone(),
                            done: rx.clone(),
                        },
                    );
                    reserved.push(key.clone());
                    Lookup::Reserved
                }
            })
            .collect();
        (
            results,
            Reservation {
                index: self,
                keys: reserved,
                done: Some(tx),
            },
        )
    }

    /// Records keys already on the bus (rebuilding after a restart).
    pub fn insert_stored(&self, key: String, id: String, at: i64) {
        let mut inner = self.inner.lock().expect("lock");
        inner.map.insert(key.clone(), Slot::Stored { id, at });
        inner.order.push_back((at, key));
        self.evict(&mut inner, at);
    }

    fn evict(&self, inner: &mut Inner, now: i64) {
        while let Some((at, _)) = inner.order.front() {
            let too_old = *at < now - self.window_micros;
            if !too_old && inner.order.len() <= self.max_keys {
                break;
            }
            let (at, key) = inner.order.pop_front().expect("front");
            // Only drop the slot this order entry stands for (a key can be stored again later).
            if matches!(inner.map.get(&key), Some(Slot::Stored { at: stored_at, .. }) if *stored_at == at)
            {
                inner.map.remove(&key);
            }
        }
    }
}

impl Reservation<'_> {
    /// Settles the reservation: stored (durable) or failed (forget the keys).
    pub fn complete(mut self, stored: bool, at: i64) {
        self.settle(stored, at);
    }

    fn settle(&mut self, stored: bool, at: i64) {
        let Some(done) = self.done.take() else { return };
        let mut inner = self.index.inner.lock().expect("lock");
        for key in std::mem::take(&mut self.keys) {
            if stored {
                if let Some(Slot::Pending { id, .. }) = inner.map.remove(&key) {
                    inner.map.insert(key.clone(), Slot::Stored { id, at });
                    inner.order.push_back((at, key));
                }
            } else {
                inner.map.remove(&key);
            }
        }
        if stored {
            self.index.evict(&mut inner, at);
        }
        drop(inner);
        let _ = done.send(Some(stored));
    }
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        self.settle(false, 0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one<'a>(index: &'a DedupeIndex, k: &str, id: &str) -> (Lookup, Reservation<'a>) {
        let (mut r, res) = index.lookup(&[(k.into(), id.into())]);
        (r.remove(0), res)
    }

    #[test]
    fn stored_keys_return_their_first_id() {
        let index = DedupeIndex::new(Duration::from_secs(60), 100);
        let (l, res) = one(&index, "k", "id1");
        assert!(matches!(l, Lookup::Reserved));
        res.complete(true, 1);
        let (l, _res) = one(&index, "k", "id2");
        assert!(matches!(l, Lookup::Stored(ref id) if id == "id1"));
    }

    #[tokio::test]
    async fn a_retry_waits_for_the_pending_attempt_and_failures_are_forgotten() {
        let index = DedupeIndex::new(Duration::from_secs(60), 100);
        let (_, first) = one(&index, "k", "id1");
        let (l, _) = one(&index, "k", "id2");
        let Lookup::InFlight(mut rx) = l else {
            panic!("expected in flight")
        };
        drop(first); // the first attempt failed (or its task was dropped)
        assert_eq!(*rx.wait_for(|v| v.is_some()).await.unwrap(), Some(false));
        let (l, _) = one(&index, "k", "id3");
        assert!(matches!(l, Lookup::Reserved));
    }

    #[test]
    fn old_and_excess_keys_are_evicted() {
        let index = DedupeIndex::new(Duration::from_micros(100), 3);
        for (i, k) in ["a", "b", "c", "d"].iter().enumerate() {
            index.insert_stored(k.to_string(), format!("id-{k}"), i as i64);
        }
        assert_eq!(index.len(), 3);
        index.insert_stored("e".into(), "id-e".into(), 1_000);
        assert_eq!(index.len(), 1);
    }
}
