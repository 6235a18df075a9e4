//! How many requests does a tenant have in flight across every worker?
//!
//! The per-tenant in-flight cap, counted across every worker of one Envoy.
//!
//! Each Envoy worker runs its own VM, so a count kept in VM memory caps a
//! tenant per worker, not per instance. The count lives instead in the host's
//! shared data (one table per `vm_id` for the whole Envoy process), updated
//! with compare-and-swap so that two workers admitting at the same moment
//! cannot both take the last slot.
//!
//! One value per tenant holds one entry per VM: `(vm, count, heartbeat)`. A
//! VM only ever changes its own entry; the total is the sum of the entries.
//! That is what makes the cap leak-proof:
//! - a stream that is reset still ends in `on_log`, which releases its slot;
//! - a VM that dies (or is replaced by a reload) stops refreshing its
//!   heartbeat, and its entry stops counting after [`STALE_MS`] and is pruned
//!   by the next writer, so its slots cannot stay taken.
//!
//! Live VMs refresh the heartbeat of every entry they hold at least every
//! [`HEARTBEAT_MS`] from their tick.

use std::fmt;

/// An entry whose heartbeat is older than this no longer counts.
pub const STALE_MS: u64 = 15_000;
/// How often a VM refreshes the heartbeat of the entries it holds.
pub const HEARTBEAT_MS: u64 = 2_000;
/// Compare-and-swap attempts before giving up on the shared table.
const CAS_ATTEMPTS: usize = 16;
const ENTRY_LEN: usize = 8 + 4 + 8;

/// Why a write to the store failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreError {
    /// Someone else wrote the value since it was read.
    CasMismatch,
    /// The host refused (for example, no shared data support).
    Unavailable,
}

/// Where the table lives: Envoy's shared data in the filter, a map in tests.
pub trait SlotStore {
    /// The value and its compare-and-swap token.
    fn get(&self, key: &str) -> Result<(Option<Vec<u8>>, Option<u32>), StoreError>;
    /// Writes `value` if the value's token is still `cas`.
    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), StoreError>;
}

/// The answer to an acquire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Acquire {
    Granted,
    /// The tenant already has this many requests in flight on this Envoy.
    Full(u64),
    /// The shared table could not be used; the caller falls back to a count
    /// local to its worker.
    Unavailable,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Entry {
    vm: u64,
    count: u32,
    heartbeat_ms: u64,
}

/// The shared-data key of a tenant's table.
pub fn key(tenant: &str) -> String {
    format!("tollgate.inflight.{tenant}")
}

fn decode(bytes: &[u8]) -> Vec<Entry> {
    bytes
        .chunks_exact(ENTRY_LEN)
        .filter_map(|c| {
            // `chunks_exact` gives ENTRY_LEN bytes: every conversion holds.
            let vm: [u8; 8] = c.get(..8)?.try_into().ok()?;
            let count: [u8; 4] = c.get(8..12)?.try_into().ok()?;
            let hb: [u8; 8] = c.get(12..)?.try_into().ok()?;
            Some(Entry {
                vm: u64::from_le_bytes(vm),
                count: u32::from_le_bytes(count),
                heartbeat_ms: u64::from_le_bytes(hb),
            })
        })
        .collect()
}

fn encode(entries: &[Entry]) -> Vec<u8> {
    let mut out = Vec::with_capacity(entries.len() * ENTRY_LEN);
    for e in entries {
        out.extend_from_slice(&e.vm.to_le_bytes());
        out.extend_from_slice(&e.count.to_le_bytes());
        out.extend_from_slice(&e.heartbeat_ms.to_le_bytes());
    }
    out
}

fn live(e: &Entry, me: u64, now_ms: u64) -> bool {
    e.vm == me || now_ms.saturating_sub(e.heartbeat_ms) < STALE_MS
}

/// Reads a table, lets `change` edit this VM's view of it, and writes it back
/// with compare-and-swap, retrying when another worker wrote in between.
/// `change` answers `Err(x)` to stop without writing.
fn update<T>(
    store: &dyn SlotStore,
    key: &str,
    me: u64,
    now_ms: u64,
    mut change: impl FnMut(&mut Vec<Entry>) -> Result<T, T>,
) -> Result<Result<T, T>, StoreError> {
    for _ in 0..CAS_ATTEMPTS {
        let (value, cas) = store.get(key)?;
        if cas.is_none() {
            // Envoy creates a key unconditionally (no compare-and-swap on a
            // key that does not exist), so the table is created empty first
            // and then changed under compare-and-swap like any other. Tables
            // are also created at configuration (see [`create`]), so this runs
            // at most once per tenant and process.
            store.set(key, &[], None)?;
            continue;
        }
        let mut entries = decode(value.as_deref().unwrap_or_default());
        entries.retain(|e| live(e, me, now_ms) && (e.count > 0 || e.vm == me));
        let outcome = change(&mut entries);
        if outcome.is_err() {
            return Ok(outcome);
        }
        entries.retain(|e| e.count > 0);
        match store.set(key, &encode(&entries), cas) {
            Ok(()) => return Ok(outcome),
            Err(StoreError::CasMismatch) => continue,
            Err(e) => return Err(e),
        }
    }
    Err(StoreError::Unavailable)
}

/// Creates a tenant's table if it does not exist yet. Called when the
/// configuration is loaded, before any request, so that acquires always work
/// on an existing key under compare-and-swap.
pub fn create(store: &dyn SlotStore, key: &str) -> Result<(), StoreError> {
    match store.get(key)? {
        (_, Some(_)) => Ok(()),
        (_, None) => store.set(key, &[], None),
    }
}

/// Takes a slot for VM `me` if the tenant has fewer than `cap` in flight.
pub fn acquire(store: &dyn SlotStore, key: &str, me: u64, cap: u64, now_ms: u64) -> Acquire {
    let result = update(store, key, me, now_ms, |entries| {
        let total: u64 = entries.iter().map(|e| u64::from(e.count)).sum();
        if total >= cap {
            return Err(total);
        }
        match entries.iter_mut().find(|e| e.vm == me) {
            Some(e) => {
                e.count = e.count.saturating_add(1);
                e.heartbeat_ms = now_ms;
            }
            None => entries.push(Entry { vm: me, count: 1, heartbeat_ms: now_ms }),
        }
        Ok(total)
    });
    match result {
        Ok(Ok(_)) => Acquire::Granted,
        Ok(Err(total)) => Acquire::Full(total),
        Err(_) => Acquire::Unavailable,
    }
}

/// Gives back a slot taken by VM `me`.
pub fn release(store: &dyn SlotStore, key: &str, me: u64, now_ms: u64) -> Result<(), StoreError> {
    update(store, key, me, now_ms, |entries| match entries.iter_mut().find(|e| e.vm == me) {
        Some(e) => {
            e.count = e.count.saturating_sub(1);
            e.heartbeat_ms = now_ms;
            Ok(())
        }
        None => Err(()),
    })
    .map(|_| ())
}

/// Refreshes the heartbeat of VM `me`'s entry, if it holds one.
pub fn heartbeat(store: &dyn SlotStore, key: &str, me: u64, now_ms: u64) -> Result<(), StoreError> {
    update(store, key, me, now_ms, |entries| match entries.iter_mut().find(|e| e.vm == me && e.count > 0) {
        Some(e) => {
            e.heartbeat_ms = now_ms;
            Ok(())
        }
        None => Err(()),
    })
    .map(|_| ())
}

/// The store used when none is given: a table private to this VM, which makes
/// the cap per worker. The filter replaces it with the host's shared data.
#[derive(Default)]
pub struct LocalStore {
    values: std::cell::RefCell<hashbrown::HashMap<String, (Vec<u8>, u32)>>,
}

impl SlotStore for LocalStore {
    fn get(&self, key: &str) -> Result<(Option<Vec<u8>>, Option<u32>), StoreError> {
        Ok(match self.values.borrow().get(key) {
            Some((v, cas)) => (Some(v.clone()), Some(*cas)),
            None => (None, None),
        })
    }

    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), StoreError> {
        let mut values = self.values.borrow_mut();
        let current = values.get(key).map(|(_, c)| *c);
        if cas.is_some() && cas != current {
            return Err(StoreError::CasMismatch);
        }
        let next = current.unwrap_or(0).wrapping_add(1);
        values.insert(key.to_string(), (value.to_vec(), next));
        Ok(())
    }
}

impl fmt::Debug for dyn SlotStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SlotStore")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    #[test]
    fn cap_holds_across_vms_and_slots_come_back() {
        let store = LocalStore::default();
        let k = key("acme");
        assert_eq!(acquire(&store, &k, 1, 2, 1000), Acquire::Granted);
        assert_eq!(acquire(&store, &k, 2, 2, 1000), Acquire::Granted);
        assert_eq!(acquire(&store, &k, 1, 2, 1000), Acquire::Full(2));
        assert_eq!(acquire(&store, &k, 3, 2, 1000), Acquire::Full(2));
        release(&store, &k, 2, 1100).unwrap();
        assert_eq!(acquire(&store, &k, 3, 2, 1200), Acquire::Granted);
        // Other tenants are untouched.
        assert_eq!(acquire(&store, &key("other"), 1, 1, 1200), Acquire::Granted);
    }

    #[test]
    fn a_dead_vm_stops_counting_after_the_stale_window() {
        let store = LocalStore::default();
        let k = key("acme");
        assert_eq!(acquire(&store, &k, 7, 1, 0), Acquire::Granted);
        assert_eq!(acquire(&store, &k, 8, 1, STALE_MS - 1), Acquire::Full(1));
        // VM 7 never comes back: its slot expires and is pruned.
        assert_eq!(acquire(&store, &k, 8, 1, STALE_MS), Acquire::Granted);
        let (v, _) = store.get(&k).unwrap();
        assert_eq!(decode(&v.unwrap()), vec![Entry { vm: 8, count: 1, heartbeat_ms: STALE_MS }]);
    }

    #[test]
    fn heartbeats_keep_long_streams_counted() {
        let store = LocalStore::default();
        let k = key("acme");
        assert_eq!(acquire(&store, &k, 7, 1, 0), Acquire::Granted);
        let mut now = 0;
        while now < 5 * STALE_MS {
            now += HEARTBEAT_MS;
            heartbeat(&store, &k, 7, now).unwrap();
            assert_eq!(acquire(&store, &k, 8, 1, now), Acquire::Full(1));
        }
    }

    #[test]
    fn release_without_a_slot_changes_nothing() {
        let store = LocalStore::default();
        let k = key("acme");
        release(&store, &k, 1, 0).unwrap();
        assert_eq!(store.get(&k).unwrap().0.unwrap_or_default(), Vec::<u8>::new());
        assert_eq!(acquire(&store, &k, 1, 1, 0), Acquire::Granted);
        release(&store, &k, 1, 0).unwrap();
        release(&store, &k, 1, 0).unwrap();
        assert_eq!(acquire(&store, &k, 2, 1, 0), Acquire::Granted);
        assert_eq!(acquire(&store, &k, 1, 1, 0), Acquire::Full(1));
    }

    /// A store where another worker writes between every read and write,
    /// `conflicts` times.
    struct Racy {
        inner: LocalStore,
        conflicts: Cell<usize>,
    }

    impl SlotStore for Racy {
        fn get(&self, key: &str) -> Result<(Option<Vec<u8>>, Option<u32>), StoreError> {
            self.inner.get(key)
        }
        fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), StoreError> {
            if self.conflicts.get() > 0 {
                self.conflicts.set(self.conflicts.get() - 1);
                // The other worker takes a slot first.
                let (v, c) = self.inner.get(key)?;
                let mut entries = decode(v.as_deref().unwrap_or_default());
                entries.push(Entry { vm: 99, count: 1, heartbeat_ms: 0 });
                self.inner.set(key, &encode(&entries), c)?;
            }
            self.inner.set(key, value, cas)
        }
    }

    #[test]
    fn compare_and_swap_sees_the_other_workers_slot() {
        let store = Racy { inner: LocalStore::default(), conflicts: Cell::new(1) };
        let k = key("acme");
        create(&store.inner, &k).unwrap();
        // The racing worker took the only slot between our read and write.
        assert_eq!(acquire(&store, &k, 1, 1, 0), Acquire::Full(1));
        let store = Racy { inner: LocalStore::default(), conflicts: Cell::new(CAS_ATTEMPTS) };
        create(&store.inner, &k).unwrap();
        assert_eq!(acquire(&store, &k, 1, 1000, 0), Acquire::Unavailable);
    }

    #[test]
    fn create_keeps_an_existing_table() {
        let store = LocalStore::default();
        let k = key("acme");
        create(&store, &k).unwrap();
        assert_eq!(acquire(&store, &k, 1, 1, 0), Acquire::Granted);
        create(&store, &k).unwrap();
        assert_eq!(acquire(&store, &k, 2, 1, 0), Acquire::Full(1));
    }

    #[test]
    fn garbage_in_the_table_is_not_a_crash() {
        let store = LocalStore::default();
        let k = key("acme");
        store.set(&k, b"short", None).unwrap();
        assert_eq!(acquire(&store, &k, 1, 1, 0), Acquire::Granted);
    }
}
