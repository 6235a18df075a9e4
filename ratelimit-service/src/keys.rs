//! Redis key construction. Every key of one tenant starts with the same
//! `{<domain>|<first entry value>}` hash tag, so one Lua script may touch them
//! all in Redis Cluster.

use crate::plan::Mode;

/// Escape the characters that structure keys (`{ } | : = %`), so a value
/// cannot end the hash tag early or collide with another key's layout.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '{' | '}' | '|' | ':' | '=' | '%' => {
                out.push('%');
                out.push_str(&format!("{:02X}", c as u32));
            }
            c => out.push(c),
        }
    }
    out
}

/// The hash tag of a tenant, braces included.
pub fn hash_tag(domain: &str, first_value: &str) -> String {
    format!("{{{}|{}}}", escape(domain), escape(first_value))
}

/// `tg:{tag}:<unit>[:<window start ms>]:<k=v|k=v...>`
pub fn counter_key(tag: &str, unit: &str, window_start_ms: Option<i64>, entries: &[(&str, &str)]) -> String {
    let mut key = format!("tg:{tag}:{unit}:");
    if let Some(w) = window_start_ms {
        key.push_str(&w.to_string());
        key.push(':');
    }
    for (i, (k, v)) in entries.iter().enumerate() {
        if i > 0 {
            key.push('|');
        }
        key.push_str(&escape(k));
        key.push('=');
        key.push_str(&escape(v));
    }
    key
}

/// `tg:{tag}:idem:<mode>:<key>`: a reserve and a settle may reuse one request id.
pub fn idempotency_key(tag: &str, mode: Mode, key: &str) -> String {
    let mode = match mode {
        Mode::Reserve => "reserve",
        Mode::Settle => "settle",
    };
    format!("tg:{tag}:idem:{mode}:{}", escape(key))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaping_keeps_the_tag_whole() {
        assert_eq!(hash_tag("d", "a}b{c"), "{d|a%7Db%7Bc}");
        assert_eq!(counter_key("{d|x}", "m", None, &[("tenant", "x"), ("m", "a=b")]), "tg:{d|x}:m:tenant=x|m=a%3Db");
        assert_eq!(counter_key("{d|x}", "D", Some(5), &[("t", "x")]), "tg:{d|x}:D:5:t=x");
    }
}
