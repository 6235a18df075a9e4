//! Which provider target serves this request?
//!
//! A provider may list failover targets (`providers.<name>.targets`): for
//! example OpenAI, then Azure OpenAI deployments in two regions. Each target
//! is a provider entry of its own, with its credential header, its tenants'
//! keys and its model names. A request goes to one target:
//! - `order`: the first one available;
//! - `weighted`: spread by weight (a per-worker turn), then the next
//!   available ones in list order;
//!
//! where *available* means the tenant holds a key for it and its circuit
//! ([`circuit`]) lets the request go. When none is, the caller gets a 503
//! with the time the first target may be back.

pub mod circuit;

use crate::admission::inflight::SlotStore;
use crate::config::{Provider, Target};
use circuit::{CircuitConfig, State, Take};

/// The target a request goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Choice {
    /// Index into the plugin's providers.
    pub provider: usize,
    /// This request is the half-open probe of the target's circuit.
    pub probe: bool,
    /// The target's record had nothing a success would reset.
    pub clean: bool,
    /// The probe's turn (see [`circuit::Answer::probe_token`]); 0 if no probe.
    pub probe_token: u64,
}

/// The targets a request may go to, and how one is chosen.
#[derive(Debug, Clone, Copy)]
pub struct Targets<'a> {
    pub list: &'a [Target],
    /// Spread by weight (else: the first available, in order).
    pub weighted: bool,
}

impl<'a> Targets<'a> {
    /// A provider's own targets.
    pub fn of(group: &'a Provider) -> Self {
        Targets { list: &group.targets, weighted: group.weighted }
    }
}

/// The outcome of a pick.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Picked {
    Target(Choice),
    /// The tenant holds a key for none of the targets.
    NoCredential,
    /// Every target the tenant has a key for is unavailable; the first may
    /// be back in this many ms.
    Unavailable {
        retry_after_ms: u64,
        open: usize,
    },
}

/// Picks one of `targets` for a request. `key_for(provider)` is the tenant's key
/// there (if any); `turn` is the worker's running count for weighted picks.
pub fn pick<'k>(
    providers: &[Provider],
    targets: Targets<'_>,
    turn: u64,
    key_for: impl Fn(usize) -> Option<&'k str>,
    store: &dyn SlotStore,
    now_ms: u64,
    cfg: &CircuitConfig,
) -> Picked {
    let weighted = targets.weighted;
    let targets = targets.list;
    let n = targets.len();
    let start = if weighted { weighted_start(targets, turn) } else { 0 };
    let mut soonest: Option<u64> = None;
    let mut open = 0;
    for i in 0..n {
        let Some(t) = targets.get((start + i) % n.max(1)) else { continue };
        let (Some(p), Some(key)) = (providers.get(t.provider), key_for(t.provider)) else { continue };
        match circuit::take(store, &p.circuit_key, key, now_ms, cfg) {
            Take::Go { probe, clean } => {
                // `take` wrote the probe's turn as now + the probe timeout.
                let probe_token = if probe { now_ms.saturating_add(cfg.probe_timeout_ms) } else { 0 };
                return Picked::Target(Choice { provider: t.provider, probe, clean, probe_token });
            }
            Take::Skip { until, state } => {
                open += usize::from(state != State::Closed);
                soonest = Some(soonest.map_or(until, |s| s.min(until)));
            }
        }
    }
    match soonest {
        None => Picked::NoCredential,
        Some(until) => Picked::Unavailable { retry_after_ms: until.saturating_sub(now_ms).max(1), open },
    }
}

/// Where a weighted pick starts: `turn` spread over the weights.
fn weighted_start(targets: &[Target], turn: u64) -> usize {
    let total: u64 = targets.iter().map(|t| u64::from(t.weight)).sum();
    if total == 0 {
        return 0;
    }
    let mut at = turn % total;
    for (i, t) in targets.iter().enumerate() {
        let w = u64::from(t.weight);
        if at < w {
            return i;
        }
        at -= w;
    }
    0
}

#[cfg(test)]
mod tests {
    use super::circuit::{report, Answer, Outcome, RateLimitedScope};
    use super::*;
    use crate::admission::inflight::LocalStore;

    fn provider(name: &str) -> Provider {
        Provider {
            name: name.into(),
            credential_header: "authorization".into(),
            credential_prefix: "Bearer ".into(),
            inject_stream_usage: true,
            targets: Vec::new(),
            weighted: false,
            model_map: Vec::new(),
            rate_limited_scope: RateLimitedScope::Credential,
            circuit_key: circuit::key(name),
        }
    }

    fn setup() -> (Vec<Provider>, Provider) {
        let providers = vec![provider("openai"), provider("azure-eu"), provider("azure-us")];
        let mut group = provider("openai");
        group.targets = (0..3).map(|provider| Target { provider, weight: 1 }).collect();
        (providers, group)
    }

    fn fail(store: &LocalStore, p: &Provider, times: usize, now: u64) {
        for _ in 0..times {
            let a = Answer {
                outcome: Outcome::Error,
                probe: false,
                clean: false,
                credential: "k",
                scope: RateLimitedScope::Credential,
                probe_token: 0,
            };
            let _ = report(store, &p.circuit_key, &a, now, &CircuitConfig::default());
        }
    }

    #[test]
    fn order_takes_the_first_available_target() {
        let (providers, group) = setup();
        let store = LocalStore::default();
        let cfg = CircuitConfig::default();
        let all = |_: usize| Some("k");
        let go = |p| Picked::Target(Choice { provider: p, probe: false, clean: true, probe_token: 0 });
        assert_eq!(pick(&providers, Targets::of(&group), 0, all, &store, 0, &cfg), go(0));
        fail(&store, &providers[0], 5, 0);
        assert_eq!(pick(&providers, Targets::of(&group), 0, all, &store, 1, &cfg), go(1));
        // A tenant without a key for the second target goes to the third.
        let no_eu = |p: usize| (p != 1).then_some("k");
        assert_eq!(pick(&providers, Targets::of(&group), 0, no_eu, &store, 1, &cfg), go(2));
        // Every target open: the soonest back says when to retry.
        fail(&store, &providers[1], 5, 2_000);
        fail(&store, &providers[2], 5, 4_000);
        assert_eq!(
            pick(&providers, Targets::of(&group), 0, all, &store, 5_000, &cfg),
            Picked::Unavailable { retry_after_ms: 5_000, open: 3 }
        );
        assert_eq!(pick(&providers, Targets::of(&group), 0, |_| None, &store, 5_000, &cfg), Picked::NoCredential);
        // Back at 10 s: the first target is probed.
        assert_eq!(
            pick(&providers, Targets::of(&group), 0, all, &store, 10_000, &cfg),
            Picked::Target(Choice {
                provider: 0,
                probe: true,
                clean: false,
                probe_token: 10_000 + cfg.probe_timeout_ms
            })
        );
    }

    #[test]
    fn weighted_spreads_by_weight_and_skips_open_targets() {
        let (providers, mut group) = setup();
        group.targets[0].weight = 3;
        group.weighted = true;
        let store = LocalStore::default();
        let cfg = CircuitConfig::default();
        let mut counts = [0; 3];
        for turn in 0..500 {
            if let Picked::Target(c) = pick(&providers, Targets::of(&group), turn, |_| Some("k"), &store, 0, &cfg) {
                counts[c.provider] += 1;
            }
        }
        assert_eq!(counts, [300, 100, 100]);
        fail(&store, &providers[0], 5, 0);
        let mut counts = [0; 3];
        for turn in 0..500 {
            if let Picked::Target(c) = pick(&providers, Targets::of(&group), turn, |_| Some("k"), &store, 1, &cfg) {
                counts[c.provider] += 1;
            }
        }
        // The open target's share moves to the next in the list.
        assert_eq!(counts, [0, 400, 100]);
    }
}
