//! Which verified tokens may skip the signature check, and for how long?

use std::collections::VecDeque;

use hashbrown::HashMap;

use super::claims::{ProviderSelector, VerifiedIdentity};

struct CacheEntry {
    provider: usize,
    identity: VerifiedIdentity,
    /// First second at which the entry must not be used.
    valid_until: u64,
    /// `exp` plus leeway, when the token has an `exp`.
    expires_at: Option<u64>,
    seq: u64,
}

/// Bounded map from SHA-256(token) to the identity it verified to. Eviction
/// is oldest-inserted first, after dropping entries that are already stale.
pub(super) struct TokenCache {
    max_entries: usize,
    max_ttl_s: u64,
    map: HashMap<[u8; 32], CacheEntry>,
    order: VecDeque<([u8; 32], u64)>,
    next_seq: u64,
}

impl TokenCache {
    pub(super) fn new(max_entries: usize, max_ttl_s: u64) -> Self {
        Self { max_entries, max_ttl_s, map: HashMap::new(), order: VecDeque::new(), next_seq: 0 }
    }

    pub(super) fn len(&self) -> usize {
        self.map.len()
    }

    pub(super) fn lookup(
        &mut self,
        digest: &[u8; 32],
        selector: ProviderSelector,
        now: u64,
    ) -> Option<VerifiedIdentity> {
        let entry = self.map.get(digest)?;
        let expired = entry.expires_at.is_some_and(|e| now >= e);
        if now >= entry.valid_until || expired {
            // Fall through to a full verification, which gives the precise
            // error (expired) or re-validates after the cache TTL.
            self.map.remove(digest);
            return None;
        }
        match selector {
            ProviderSelector::Index(i) if i != entry.provider => None,
            _ => Some(entry.identity.clone()),
        }
    }

    pub(super) fn insert(
        &mut self,
        digest: [u8; 32],
        provider: usize,
        identity: VerifiedIdentity,
        expires_at: Option<u64>,
        now: u64,
    ) {
        if self.max_entries == 0 || self.max_ttl_s == 0 {
            return;
        }
        let valid_until = now.saturating_add(self.max_ttl_s).min(expires_at.unwrap_or(u64::MAX));
        if valid_until <= now {
            return;
        }
        if !self.map.contains_key(&digest) && self.map.len() >= self.max_entries {
            self.map.retain(|_, e| now < e.valid_until && e.expires_at.is_none_or(|x| now < x));
            while self.map.len() >= self.max_entries {
                let Some((old, seq)) = self.order.pop_front() else {
                    break;
                };
                if self.map.get(&old).is_some_and(|e| e.seq == seq) {
                    self.map.remove(&old);
                }
            }
        }
        let seq = self.next_seq;
        self.next_seq = self.next_seq.wrapping_add(1);
        self.map.insert(digest, CacheEntry { provider, identity, valid_until, expires_at, seq });
        self.order.push_back((digest, seq));
        // Entries removed other than by eviction leave stale queue slots.
        if self.order.len() > self.max_entries.saturating_mul(2).max(16) {
            let map = &self.map;
            self.order.retain(|(d, s)| map.get(d).is_some_and(|e| e.seq == *s));
        }
    }

    pub(super) fn remove_provider(&mut self, provider: usize) {
        self.map.retain(|_, e| e.provider != provider);
    }
}
