//! What usage does a settle report for the ledger?
//!
//! A settle (`x-tollgate-mode: settle`) may carry usage rows in the gRPC
//! metadata [`META_USAGE`]: what finished requests used, one row per
//! (tenant, key, user, model, finish time). The service adds them to its
//! ledger in the same Redis call as the settle, at most once per idempotency
//! key, so a settle with rows **must** carry `x-tollgate-idempotency-key`.
//! A settle may carry rows and no descriptor at all (a ledger-only settle:
//! refused requests, or requests with no limits).
//!
//! # Wire format, version 1
//!
//! ```text
//! v1;<row>;<row>...
//! row = tenant,tz,finished_at_ms,key,user,model,requests,refusals,
//!       input,cached_read,cache_write,output,reasoning,micro_usd,estimated
//! refusals = <code>:<count>+<code>:<count>...   (empty: none)
//! ```
//!
//! - Exactly 15 comma-separated fields per row, in this order.
//! - `tz`, `key`, `user` are empty when absent; `refusals` is empty when none.
//! - Text fields (`tenant`, `tz`, `key`, `user`, `model`, refusal codes) are
//!   percent-escaped: every byte outside `A-Z a-z 0-9 - . _ ~ /` is written
//!   `%XX` (upper-case hex), so `,` `;` `:` `+` `%` never appear raw inside a
//!   value and the whole value is visible ASCII (valid gRPC metadata).
//! - Numbers are plain decimals (no sign, no leading `+`), at most
//!   [`crate::MAX_EXACT`].
//!
//! # Bounds
//!
//! At most [`MAX_USAGE_ROWS`] rows and [`MAX_USAGE_BYTES`] bytes per value,
//! and one tenant per settle (its rows are written in that tenant's Redis
//! Cluster slot). A caller with more rows sends several settles, each with its
//! own idempotency key: [`encode_chunks`] does the split.
//!
//! # Meaning of the counts
//!
//! - `requests`: requests that were admitted and finished (charged), whatever
//!   the upstream answered;
//! - `refusals`: requests tollgate refused, by code (an HTTP status such as
//!   `429`, or a short reason such as `budget`), not counted in `requests`;
//! - token counts as metered, each kind apart and none inside another:
//!   `input` is the uncached input (the access log's `tokens_input`),
//!   `cached_read` and `cache_write` the prompt-cache reads and writes,
//!   `output` all output with `reasoning` the part of it that was reasoning;
//! - `micro_usd`: the cost charged, in millionths of a US dollar;
//! - `estimated`: how many of `requests` were charged an estimate because the
//!   provider sent no usage (at most `requests`).
//!
//! The day a row counts on is the calendar day of `finished_at_ms` in `tz`
//! (the tenant's billing time zone, UTC when absent).

use std::collections::BTreeMap;

use crate::bounds::MAX_EXACT;
use crate::registry::valid_tenant_id;

/// The gRPC metadata key of the usage rows.
pub const META_USAGE: &str = "x-tollgate-usage";
/// The version prefix of [`META_USAGE`] values.
pub const USAGE_VERSION: &str = "v1";
/// Most rows in one value.
pub const MAX_USAGE_ROWS: usize = 16;
/// Longest value, in bytes.
pub const MAX_USAGE_BYTES: usize = 4096;
/// Longest text field (key, user, model), in bytes once decoded.
pub const MAX_TEXT_LEN: usize = 128;
/// Longest time zone name.
pub const MAX_TZ_LEN: usize = 64;
/// Most refusal codes in one row.
pub const MAX_REFUSAL_CODES: usize = 8;
/// Longest refusal code.
pub const MAX_CODE_LEN: usize = 64;

const FIELDS: usize = 15;

/// What requests of one tenant, key, user and model used.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UsageRow {
    /// Tenant id (the registry's rule: 1..=128 of letters, digits, `-_.`).
    pub tenant: String,
    /// IANA time zone of the tenant's billing days (UTC when absent).
    pub time_zone: Option<String>,
    /// When the requests finished (unix ms): picks the day.
    pub finished_at_ms: u64,
    /// The client key's id (e.g. its digest or a short id).
    pub api_key: Option<String>,
    /// The end user, when the tenant identifies one.
    pub user: Option<String>,
    /// The model billed.
    pub model: String,
    /// Requests admitted and finished.
    pub requests: u64,
    /// Requests refused, by code.
    pub refusals: BTreeMap<String, u64>,
    pub input_tokens: u64,
    pub cached_read_tokens: u64,
    pub cache_write_tokens: u64,
    pub output_tokens: u64,
    pub reasoning_tokens: u64,
    /// Cost charged, in micro-dollars.
    pub cost_micro_usd: u64,
    /// Requests of `requests` charged an estimate (no usage from the provider).
    pub estimated_requests: u64,
}

/// Why a usage value or row is refused. Messages name the row and field,
/// never the value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UsageError {
    /// The value does not start with `v1;`.
    Version,
    /// Longer than [`MAX_USAGE_BYTES`].
    TooLong(usize),
    /// More than [`MAX_USAGE_ROWS`] rows, or none.
    RowCount(usize),
    /// A row without exactly 15 fields.
    FieldCount { row: usize, got: usize },
    /// A field is malformed or out of bounds.
    Field { row: usize, field: &'static str, reason: &'static str },
    /// Rows of several tenants in one value.
    MixedTenants { row: usize },
}

impl std::fmt::Display for UsageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Version => write!(f, "{META_USAGE}: expected a value starting with \"{USAGE_VERSION};\""),
            Self::TooLong(n) => write!(f, "{META_USAGE}: {n} bytes, at most {MAX_USAGE_BYTES}"),
            Self::RowCount(n) => write!(f, "{META_USAGE}: {n} rows, expected 1..={MAX_USAGE_ROWS}"),
            Self::FieldCount { row, got } => write!(f, "{META_USAGE} row {row}: {got} fields, expected {FIELDS}"),
            Self::Field { row, field, reason } => write!(f, "{META_USAGE} row {row}: {field}: {reason}"),
            Self::MixedTenants { row } => {
                write!(f, "{META_USAGE} row {row}: another tenant than row 0 (one tenant per settle)")
            }
        }
    }
}

impl std::error::Error for UsageError {}

fn unescaped(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~' | b'/')
}

/// Percent-escape a text field.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if unescaped(b) {
            out.push(char::from(b));
        } else {
            const HEX: &[u8; 16] = b"0123456789ABCDEF";
            out.push('%');
            out.push(char::from(HEX.get(usize::from(b >> 4)).copied().unwrap_or(b'0')));
            out.push(char::from(HEX.get(usize::from(b & 15)).copied().unwrap_or(b'0')));
        }
    }
    out
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Undo [`escape`]: `None` for a raw byte outside the unescaped set, a broken
/// `%XX`, text that is not UTF-8, or a control character.
pub fn unescape(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        if b == b'%' {
            let hi = hex(*bytes.get(i + 1)?)?;
            let lo = hex(*bytes.get(i + 2)?)?;
            out.push(hi << 4 | lo);
            i += 3;
        } else if unescaped(b) {
            out.push(b);
            i += 1;
        } else {
            return None;
        }
    }
    let text = String::from_utf8(out).ok()?;
    (!text.chars().any(char::is_control)).then_some(text)
}

fn number(s: &str) -> Option<u64> {
    if s.is_empty() || s.len() > 16 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse::<u64>().ok().filter(|n| *n <= MAX_EXACT)
}

fn valid_tz(tz: &str) -> bool {
    !tz.is_empty()
        && tz.len() <= MAX_TZ_LEN
        && tz.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'/' | b'_' | b'+' | b'-'))
}

/// A refusal code: 1..=64 of lower-case letters, digits, `_`, `.`, `-`.
pub fn valid_refusal_code(code: &str) -> bool {
    !code.is_empty()
        && code.len() <= MAX_CODE_LEN
        && code.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'_' | b'.' | b'-'))
}

fn valid_text(s: &str) -> bool {
    !s.is_empty() && s.len() <= MAX_TEXT_LEN && !s.chars().any(char::is_control)
}

impl UsageRow {
    /// Check one row's fields (`row` names it in errors).
    pub fn check(&self, row: usize) -> Result<(), UsageError> {
        let bad = |field, reason| Err(UsageError::Field { row, field, reason });
        if !valid_tenant_id(&self.tenant) {
            return bad("tenant", "expected 1..=128 of letters, digits, '-', '_', '.'");
        }
        if self.time_zone.as_deref().is_some_and(|tz| !valid_tz(tz)) {
            return bad("tz", "expected an IANA time zone name");
        }
        if self.finished_at_ms == 0 || self.finished_at_ms > MAX_EXACT {
            return bad("finished_at_ms", "expected unix milliseconds");
        }
        if self.api_key.as_deref().is_some_and(|k| !valid_text(k)) {
            return bad("key", "expected 1..=128 bytes without control characters");
        }
        if self.user.as_deref().is_some_and(|u| !valid_text(u)) {
            return bad("user", "expected 1..=128 bytes without control characters");
        }
        if !valid_text(&self.model) {
            return bad("model", "expected 1..=128 bytes without control characters");
        }
        if self.refusals.len() > MAX_REFUSAL_CODES {
            return bad("refusals", "too many codes");
        }
        for (code, count) in &self.refusals {
            if !valid_refusal_code(code) || *count == 0 || *count > MAX_EXACT {
                return bad("refusals", "expected code:count with a count of 1..=2^53-1");
            }
        }
        for (field, v) in [
            ("requests", self.requests),
            ("input", self.input_tokens),
            ("cached_read", self.cached_read_tokens),
            ("cache_write", self.cache_write_tokens),
            ("output", self.output_tokens),
            ("reasoning", self.reasoning_tokens),
            ("micro_usd", self.cost_micro_usd),
            ("estimated", self.estimated_requests),
        ] {
            if v > MAX_EXACT {
                return bad(field, "above 2^53-1");
            }
        }
        if self.estimated_requests > self.requests {
            return bad("estimated", "more than requests");
        }
        if self.requests == 0 && self.refusals.is_empty() {
            return bad("requests", "a row counts at least one request or refusal");
        }
        Ok(())
    }

    fn encode_into(&self, out: &mut String) {
        let opt = |o: &Option<String>| o.as_deref().map(escape).unwrap_or_default();
        let refusals: Vec<String> = self.refusals.iter().map(|(c, n)| format!("{}:{n}", escape(c))).collect();
        let fields = [
            escape(&self.tenant),
            opt(&self.time_zone),
            self.finished_at_ms.to_string(),
            opt(&self.api_key),
            opt(&self.user),
            escape(&self.model),
            self.requests.to_string(),
            refusals.join("+"),
            self.input_tokens.to_string(),
            self.cached_read_tokens.to_string(),
            self.cache_write_tokens.to_string(),
            self.output_tokens.to_string(),
            self.reasoning_tokens.to_string(),
            self.cost_micro_usd.to_string(),
            self.estimated_requests.to_string(),
        ];
        out.push_str(&fields.join(","));
    }

    fn decode(row: usize, text: &str) -> Result<Self, UsageError> {
        let fields: Vec<&str> = text.split(',').collect();
        let [tenant, tz, at, key, user, model, requests, refusals, input, cached_read, cache_write, output, reasoning, micro_usd, estimated] =
            fields.as_slice()
        else {
            return Err(UsageError::FieldCount { row, got: fields.len() });
        };
        let bad = |field, reason| UsageError::Field { row, field, reason };
        let text_field = |field, s: &str| unescape(s).ok_or(bad(field, "bad percent-escaping"));
        let optional = |field, s: &str| if s.is_empty() { Ok(None) } else { text_field(field, s).map(Some) };
        let num = |field, s: &str| number(s).ok_or(bad(field, "expected a decimal 0..=2^53-1"));
        let mut refusal_map = BTreeMap::new();
        if !refusals.is_empty() {
            for pair in refusals.split('+') {
                let (code, count) = pair.split_once(':').ok_or(bad("refusals", "expected code:count"))?;
                let code = text_field("refusals", code)?;
                let count = num("refusals", count)?;
                if refusal_map.insert(code, count).is_some() {
                    return Err(bad("refusals", "a code appears twice"));
                }
                if refusal_map.len() > MAX_REFUSAL_CODES {
                    return Err(bad("refusals", "too many codes"));
                }
            }
        }
        let r = Self {
            tenant: text_field("tenant", tenant)?,
            time_zone: optional("tz", tz)?,
            finished_at_ms: num("finished_at_ms", at)?,
            api_key: optional("key", key)?,
            user: optional("user", user)?,
            model: text_field("model", model)?,
            requests: num("requests", requests)?,
            refusals: refusal_map,
            input_tokens: num("input", input)?,
            cached_read_tokens: num("cached_read", cached_read)?,
            cache_write_tokens: num("cache_write", cache_write)?,
            output_tokens: num("output", output)?,
            reasoning_tokens: num("reasoning", reasoning)?,
            cost_micro_usd: num("micro_usd", micro_usd)?,
            estimated_requests: num("estimated", estimated)?,
        };
        r.check(row)?;
        Ok(r)
    }
}

/// Encode rows as one [`META_USAGE`] value; the same checks as [`decode`].
pub fn encode(rows: &[UsageRow]) -> Result<String, UsageError> {
    if rows.is_empty() || rows.len() > MAX_USAGE_ROWS {
        return Err(UsageError::RowCount(rows.len()));
    }
    let mut out = String::from(USAGE_VERSION);
    for (i, r) in rows.iter().enumerate() {
        r.check(i)?;
        if rows.first().is_some_and(|f| f.tenant != r.tenant) {
            return Err(UsageError::MixedTenants { row: i });
        }
        out.push(';');
        r.encode_into(&mut out);
    }
    if out.len() > MAX_USAGE_BYTES {
        return Err(UsageError::TooLong(out.len()));
    }
    Ok(out)
}

/// Split rows (of any tenants, in any number) into values that each fit the
/// bounds: one tenant per value, at most [`MAX_USAGE_ROWS`] rows and
/// [`MAX_USAGE_BYTES`] bytes. Each value goes in its own settle (with its own
/// idempotency key). A row that is invalid on its own is an error.
pub fn encode_chunks(rows: &[UsageRow]) -> Result<Vec<String>, UsageError> {
    let mut by_tenant: BTreeMap<&str, Vec<&UsageRow>> = BTreeMap::new();
    for (i, r) in rows.iter().enumerate() {
        r.check(i)?;
        by_tenant.entry(r.tenant.as_str()).or_default().push(r);
    }
    let mut out = Vec::new();
    for rows in by_tenant.values() {
        let mut current = String::from(USAGE_VERSION);
        let mut count = 0;
        for r in rows {
            let mut one = String::new();
            r.encode_into(&mut one);
            if count == MAX_USAGE_ROWS || current.len() + 1 + one.len() > MAX_USAGE_BYTES {
                if count > 0 {
                    out.push(std::mem::replace(&mut current, String::from(USAGE_VERSION)));
                }
                count = 0;
            }
            if USAGE_VERSION.len() + 1 + one.len() > MAX_USAGE_BYTES {
                return Err(UsageError::TooLong(USAGE_VERSION.len() + 1 + one.len()));
            }
            current.push(';');
            current.push_str(&one);
            count += 1;
        }
        if count > 0 {
            out.push(current);
        }
    }
    Ok(out)
}

/// Decode a [`META_USAGE`] value: strict (every field checked, one tenant).
pub fn decode(value: &str) -> Result<Vec<UsageRow>, UsageError> {
    if value.len() > MAX_USAGE_BYTES {
        return Err(UsageError::TooLong(value.len()));
    }
    let body = value.strip_prefix(USAGE_VERSION).and_then(|v| v.strip_prefix(';')).ok_or(UsageError::Version)?;
    let parts: Vec<&str> = body.split(';').collect();
    if parts.len() > MAX_USAGE_ROWS || body.is_empty() {
        return Err(UsageError::RowCount(if body.is_empty() { 0 } else { parts.len() }));
    }
    let mut rows: Vec<UsageRow> = Vec::with_capacity(parts.len());
    for (i, p) in parts.iter().enumerate() {
        let r = UsageRow::decode(i, p)?;
        if rows.first().is_some_and(|f| f.tenant != r.tenant) {
            return Err(UsageError::MixedTenants { row: i });
        }
        rows.push(r);
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row() -> UsageRow {
        UsageRow {
            tenant: "acme".into(),
            time_zone: Some("America/New_York".into()),
            finished_at_ms: 1_764_806_400_000,
            api_key: Some("k,1;%:+ é".into()),
            user: Some("user@example.com".into()),
            model: "gpt-4o-mini".into(),
            requests: 3,
            refusals: BTreeMap::from([("429".into(), 2), ("budget".into(), 1)]),
            input_tokens: 1200,
            cached_read_tokens: 200,
            cache_write_tokens: 50,
            output_tokens: 300,
            reasoning_tokens: 100,
            cost_micro_usd: 4567,
            estimated_requests: 1,
        }
    }

    #[test]
    fn rows_round_trip_and_stay_visible_ascii() {
        let minimal = UsageRow {
            tenant: "t".into(),
            finished_at_ms: 1,
            model: "m".into(),
            refusals: BTreeMap::from([("403".into(), 1)]),
            ..UsageRow::default()
        };
        let rows = [row(), minimal.clone()];
        let v = encode(&rows[..1]).unwrap();
        assert!(v.bytes().all(|b| (0x21..=0x7e).contains(&b)), "{v}");
        assert!(v.starts_with("v1;acme,America/New_York,1764806400000,k%2C1%3B%25%3A%2B%20%C3%A9,"), "{v}");
        assert!(v.contains(",429:2+budget:1,"), "{v}");
        assert_eq!(decode(&v).unwrap(), rows[..1]);
        let v = encode(std::slice::from_ref(&minimal)).unwrap();
        assert_eq!(v, "v1;t,,1,,,m,0,403:1,0,0,0,0,0,0,0");
        assert_eq!(decode(&v).unwrap(), vec![minimal]);
        assert_eq!(unescape(&escape("a b/c%d")).as_deref(), Some("a b/c%d"));
    }

    #[test]
    fn hostile_values_are_refused() {
        let good = encode(&[row()]).unwrap();
        let cases: Vec<String> = vec![
            String::new(),
            "v1".into(),
            "v1;".into(),
            "v2;".to_string() + &good[3..],
            good.replace("acme", "ac me"),
            good.replace("acme", "a%2Fb"),
            good.replacen(",3,", ",-3,", 1),
            good.replacen(",3,", ",+3,", 1),
            good.replacen(",3,", ",9007199254740992,", 1),
            good.replacen(",3,", ",3,,", 1),
            good.replacen("gpt-4o-mini", "", 1),
            good.replacen("gpt-4o-mini", "a%0Ab", 1),
            good.replacen("gpt-4o-mini", "a%ZZ", 1),
            good.replacen("gpt-4o-mini", "a%4", 1),
            good.replacen("gpt-4o-mini", "a%FF", 1),
            good.replacen("gpt-4o-mini", "caf\u{e9}", 1),
            good.replacen("gpt-4o-mini", &"m".repeat(MAX_TEXT_LEN + 1), 1),
            good.replacen("budget:1", "budget:0", 1),
            good.replacen("budget:1", "budget:1+budget:2", 1),
            good.replacen("budget:1", "BUDGET:1", 1),
            good.replacen("budget:1", "budget", 1),
            good.replacen("America/New_York", "America/New York", 1),
            good.replacen("1764806400000", "0", 1),
            format!("{good};{}", &good[3..].replacen("acme", "other", 1)),
            format!("v1{}", format!(";{}", &good[3..]).repeat(MAX_USAGE_ROWS + 1)),
            format!("{good}{}", "x".repeat(MAX_USAGE_BYTES)),
        ];
        for c in cases {
            let e = decode(&c);
            assert!(e.is_err(), "accepted {c:?}");
            // messages never echo the value
            let msg = e.unwrap_err().to_string();
            assert!(!msg.contains("gpt") && !msg.contains("user@"), "{msg}");
        }
        // estimated above requests
        let mut r = row();
        r.estimated_requests = 4;
        assert!(encode(&[r]).is_err());
        // any prefix of a good value is either refused or a valid value: no panic
        for i in 0..good.len() {
            let _ = decode(good.get(..i).unwrap_or(""));
        }
    }

    #[test]
    fn chunks_respect_the_bounds_and_split_tenants() {
        let mut rows = Vec::new();
        for i in 0..40u64 {
            let mut r = row();
            r.tenant = if i % 3 == 0 { "b".into() } else { "a".into() };
            r.model = format!("model-{i}-{}", "x".repeat(100));
            rows.push(r);
        }
        let chunks = encode_chunks(&rows).unwrap();
        let mut back = Vec::new();
        for c in &chunks {
            assert!(c.len() <= MAX_USAGE_BYTES);
            let d = decode(c).unwrap();
            assert!(d.len() <= MAX_USAGE_ROWS);
            back.extend(d);
        }
        assert_eq!(back.len(), rows.len());
        let mut want = rows.clone();
        want.sort_by(|x, y| x.tenant.cmp(&y.tenant));
        assert_eq!(back, want);
        assert!(encode(&rows).is_err());
        assert_eq!(encode_chunks(&[]).unwrap(), Vec::<String>::new());
    }
}
