//! How is a failing dependency told in the log without a line per request?
//!
//! An [`Incident`] follows one dependency (the rate-limit service, the
//! tenant registry). The first failure is told at once; the ones after it
//! are counted, with the tenants they hit, and summarised once per interval;
//! the recovery is told once. During an outage at 300 requests/s that is a
//! handful of lines instead of one per request. Sans-IO: it answers the
//! lines, the caller writes them.

/// How often a failing dependency's failures are summarised (ms).
pub const SUMMARY_MS: u64 = 10_000;

/// Tenants named in one summary; beyond it they are counted.
const MAX_NAMED: usize = 8;
/// Distinct tenants counted in one summary; beyond it "or more".
const MAX_COUNTED: usize = 1024;

/// The log state of one dependency.
#[derive(Debug)]
pub struct Incident {
    what: &'static str,
    interval_ms: u64,
    /// Since when it fails (ms); `None` while it answers.
    since_ms: Option<u64>,
    last_report_ms: u64,
    /// Failures since the last line, and in the whole incident.
    count: u64,
    total: u64,
    tenants: Vec<String>,
    /// Distinct tenants beyond the named ones (bounded by `MAX_COUNTED`).
    others: hashbrown::HashSet<String>,
    why: String,
}

impl Incident {
    pub fn new(what: &'static str, interval_ms: u64) -> Self {
        Incident {
            what,
            interval_ms,
            since_ms: None,
            last_report_ms: 0,
            count: 0,
            total: 0,
            tenants: Vec::new(),
            others: hashbrown::HashSet::new(),
            why: String::new(),
        }
    }

    /// Whether the dependency is failing now.
    pub fn open(&self) -> bool {
        self.since_ms.is_some()
    }

    /// One failure; answers the line to log now, if any (the first one).
    pub fn failure(&mut self, tenant: &str, why: &str, now_ms: u64) -> Option<String> {
        self.total += 1;
        if self.since_ms.is_none() {
            self.since_ms = Some(now_ms);
            self.last_report_ms = now_ms;
            return Some(format!(
                "tollgate: {} unavailable ({why}); tenant {tenant}; further failures are summarised every {} s",
                self.what,
                self.interval_ms / 1000
            ));
        }
        self.count += 1;
        if self.why != why {
            why.clone_into(&mut self.why);
        }
        if !tenant.is_empty() && !self.tenants.iter().any(|t| t == tenant) {
            if self.tenants.len() < MAX_NAMED {
                self.tenants.push(tenant.to_string());
            } else if self.others.len() < MAX_COUNTED && !self.others.contains(tenant) {
                self.others.insert(tenant.to_string());
            }
        }
        None
    }

    /// The summary of the failures counted since the last line, once per
    /// interval.
    pub fn tick(&mut self, now_ms: u64) -> Option<String> {
        if self.count == 0 || now_ms.saturating_sub(self.last_report_ms) < self.interval_ms {
            return None;
        }
        Some(self.summary(now_ms))
    }

    fn summary(&mut self, now_ms: u64) -> String {
        let secs = now_ms.saturating_sub(self.last_report_ms).div_ceil(1000);
        let mut tenants = self.tenants.join(", ");
        match self.others.len() {
            0 => {}
            n if n >= MAX_COUNTED => tenants.push_str(&format!(" (+{n} or more)")),
            n => tenants.push_str(&format!(" (+{n} more)")),
        }
        let line = format!(
            "tollgate: {} still unavailable ({}): {} more failures in the last {secs} s; tenants: {tenants}",
            self.what, self.why, self.count
        );
        self.count = 0;
        self.tenants.clear();
        self.others.clear();
        self.last_report_ms = now_ms;
        line
    }

    /// The dependency answered; answers the lines to log when it had
    /// failed (the last summary, then the recovery).
    pub fn success(&mut self, now_ms: u64) -> Vec<String> {
        let Some(since) = self.since_ms.take() else { return Vec::new() };
        let mut out = Vec::new();
        if self.count > 0 {
            out.push(self.summary(now_ms));
        }
        out.push(format!(
            "tollgate: {} answers again after {} s ({} failures)",
            self.what,
            now_ms.saturating_sub(since).div_ceil(1000),
            self.total
        ));
        self.total = 0;
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_outage_is_one_line_then_a_summary_per_interval_then_one_recovery() {
        let mut i = Incident::new("rate-limit service", 10_000);
        let first = i.failure("acme", "grpc status 14", 1_000).unwrap();
        assert!(first.contains("unavailable (grpc status 14); tenant acme"), "{first}");
        // 3000 requests over 20 s: no line each.
        let mut lines = Vec::new();
        for n in 0..3000u64 {
            let now = 1_000 + n * 7;
            let tenant = format!("t{}", n % 12);
            assert_eq!(i.failure(&tenant, "grpc status 14", now), None);
            lines.extend(i.tick(now));
        }
        assert_eq!(lines.len(), 2, "{lines:?}");
        assert!(lines[0].contains("still unavailable (grpc status 14)"), "{}", lines[0]);
        assert!(lines[0].contains("(+4 more)"), "eight tenants named, the rest counted: {}", lines[0]);
        let back = i.success(22_000);
        assert_eq!(back.len(), 2, "{back:?}");
        assert!(back[1].contains("answers again after 21 s (3001 failures)"), "{}", back[1]);
        assert!(i.success(23_000).is_empty(), "the recovery is told once");
        assert!(!i.open());
    }

    #[test]
    fn a_single_blip_is_one_line_and_one_recovery() {
        let mut i = Incident::new("tenant registry", 10_000);
        assert!(i.failure("acme", "timeout", 5).is_some());
        assert_eq!(i.tick(20_000), None);
        assert_eq!(i.success(20_000).len(), 1);
    }
}
