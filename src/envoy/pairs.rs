//! How are header maps and metadata maps encoded between Envoy and wasm?
//!
//! Envoy's serialization of map-valued properties to wasm.
//!
//! Reading a map (such as a `google.protobuf.Struct` in dynamic metadata)
//! through `get_property` yields proxy-wasm's pairs encoding, not protobuf or
//! JSON: a little-endian u32 count, then `count` pairs of (key length, value
//! length) u32s, then each key and value followed by a NUL byte. Nested maps
//! are encoded the same way inside a value; strings are raw bytes; numbers are
//! 8-byte little-endian doubles.

/// Splits one level of the pairs encoding. `None` when `bytes` is not one.
pub fn decode(bytes: &[u8]) -> Option<Vec<(&[u8], &[u8])>> {
    let word = |at: usize| -> Option<usize> {
        let b: [u8; 4] = bytes.get(at..at.checked_add(4)?)?.try_into().ok()?;
        Some(u32::from_le_bytes(b) as usize)
    };
    let count = word(0)?;
    if count > 4096 {
        return None;
    }
    let mut sizes = Vec::with_capacity(count);
    for i in 0..count {
        let at = 4usize.checked_add(i.checked_mul(8)?)?;
        sizes.push((word(at)?, word(at.checked_add(4)?)?));
    }
    let mut pos = 4usize.checked_add(count.checked_mul(8)?)?;
    let mut out = Vec::with_capacity(count);
    for (k, v) in sizes {
        let key = bytes.get(pos..pos.checked_add(k)?)?;
        pos = pos.checked_add(k)?;
        if bytes.get(pos) != Some(&0) {
            return None;
        }
        pos += 1;
        let value = bytes.get(pos..pos.checked_add(v)?)?;
        pos = pos.checked_add(v)?;
        if bytes.get(pos) != Some(&0) {
            return None;
        }
        pos += 1;
        out.push((key, value));
    }
    (pos == bytes.len()).then_some(out)
}

/// The `:status` of a response header map in the pairs encoding (0 when
/// absent or unreadable).
pub fn status(bytes: &[u8]) -> u16 {
    decode(bytes)
        .and_then(|p| p.into_iter().find(|(k, _)| *k == b":status"))
        .and_then(|(_, v)| std::str::from_utf8(v).ok()?.parse().ok())
        .unwrap_or(0)
}

/// A header map in the pairs encoding (`proxy_get_header_map_pairs`), as
/// text. Header bytes that are not UTF-8 (HTTP allows obs-text, bytes
/// 0x80-0xFF, in values) become U+FFFD here; the host's copy is untouched.
/// `None` when `bytes` is not a pairs encoding.
pub fn header_map(bytes: &[u8]) -> Option<Vec<(String, String)>> {
    if bytes.is_empty() {
        return Some(Vec::new());
    }
    let pairs = decode(bytes)?;
    Some(
        pairs
            .into_iter()
            .map(|(k, v)| (String::from_utf8_lossy(k).into_owned(), String::from_utf8_lossy(v).into_owned()))
            .collect(),
    )
}

/// Encodes pairs in the same form, for `proxy_set_header_map_pairs`.
pub fn encode<K: AsRef<[u8]>, V: AsRef<[u8]>>(pairs: &[(K, V)]) -> Vec<u8> {
    let len = |n: usize| u32::try_from(n).unwrap_or(u32::MAX).to_le_bytes();
    let data: usize = pairs.iter().map(|(k, v)| k.as_ref().len() + v.as_ref().len() + 2).sum();
    let mut out = Vec::with_capacity(4 + pairs.len() * 8 + data);
    out.extend(len(pairs.len()));
    for (k, v) in pairs {
        out.extend(len(k.as_ref().len()));
        out.extend(len(v.as_ref().len()));
    }
    for (k, v) in pairs {
        out.extend_from_slice(k.as_ref());
        out.push(0);
        out.extend_from_slice(v.as_ref());
        out.push(0);
    }
    out
}

/// A header map with `set` applied: every existing value of a header in
/// `set` (names compared without case) is dropped, the rest keep their
/// order and bytes, and `set` follows. Writing the result back replaces the
/// map in one host call instead of one per header.
pub fn with_headers_set(map: &[(&[u8], &[u8])], set: &[(String, String)]) -> Vec<(Vec<u8>, Vec<u8>)> {
    with_headers_replaced(map, &[], set)
}

/// [`with_headers_set`] that also drops every value of the headers named in
/// `remove` (names compared without case).
pub fn with_headers_replaced(
    map: &[(&[u8], &[u8])],
    remove: &[String],
    set: &[(String, String)],
) -> Vec<(Vec<u8>, Vec<u8>)> {
    let named = |k: &[u8]| {
        remove.iter().any(|name| name.as_bytes().eq_ignore_ascii_case(k))
            || set.iter().any(|(name, _)| name.as_bytes().eq_ignore_ascii_case(k))
    };
    let mut out: Vec<(Vec<u8>, Vec<u8>)> =
        map.iter().filter(|(k, _)| !named(k)).map(|(k, v)| (k.to_vec(), v.to_vec())).collect();
    out.extend(set.iter().map(|(k, v)| (k.as_bytes().to_vec(), v.as_bytes().to_vec())));
    out
}

/// The value at a dotted `path` (a key equal to the whole remaining path wins
/// over the dotted reading), rendered as a string: text as is, an 8-byte
/// non-text value as the number it encodes.
pub fn lookup(bytes: &[u8], path: &str) -> Option<String> {
    let pairs = decode(bytes)?;
    if let Some((_, v)) = pairs.iter().find(|(k, _)| *k == path.as_bytes()) {
        return render(v);
    }
    let (head, rest) = path.split_once('.')?;
    let (_, v) = pairs.iter().find(|(k, _)| *k == head.as_bytes())?;
    lookup(v, rest)
}

fn render(v: &[u8]) -> Option<String> {
    if let Ok(s) = std::str::from_utf8(v) {
        if !s.is_empty() && !s.chars().any(|c| c.is_control()) {
            return Some(s.to_string());
        }
    }
    if let Ok(b) = <[u8; 8]>::try_from(v) {
        let n = f64::from_le_bytes(b);
        if n.is_finite() && n.fract() == 0.0 && n.abs() < 9.007_199_254_740_992e15 {
            return Some(format!("{}", n as i64));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enc(pairs: &[(&[u8], &[u8])]) -> Vec<u8> {
        encode(pairs)
    }

    #[test]
    fn headers_are_set_over_a_map_without_touching_the_rest() {
        let raw = enc(&[
            (&b":status"[..], &b"200"[..]),
            (b"X-RateLimit-Limit-Requests", b"old"),
            (b"set-cookie", b"a=1"),
            (b"x-odd", b"caf\xe9"),
            (b"x-ratelimit-limit-requests", b"old2"),
            (b"set-cookie", b"b=2"),
        ]);
        assert_eq!(encode(&decode(&raw).unwrap()), raw, "encode is decode's inverse");
        let set = vec![
            ("x-ratelimit-limit-requests".to_string(), "60".to_string()),
            ("x-request-id".to_string(), "r1".to_string()),
        ];
        let out = with_headers_set(&decode(&raw).unwrap(), &set);
        let want: Vec<(&[u8], &[u8])> = vec![
            (b":status", b"200"),
            (b"set-cookie", b"a=1"),
            (b"x-odd", b"caf\xe9"),
            (b"set-cookie", b"b=2"),
            (b"x-ratelimit-limit-requests", b"60"),
            (b"x-request-id", b"r1"),
        ];
        let got: Vec<(&[u8], &[u8])> = out.iter().map(|(k, v)| (k.as_slice(), v.as_slice())).collect();
        assert_eq!(got, want);
        assert!(with_headers_set(&[], &[]).is_empty());
    }

    #[test]
    fn removed_headers_go_with_every_value_and_set_ones_replace_the_clients() {
        let raw = enc(&[
            (&b":path"[..], &b"/v1/chat/completions"[..]),
            (b"Authorization", b"Bearer client"),
            (b"x-odd", b"caf\xe9"),
            (b"x-api-key", b"k1"),
            (b"X-Tollgate-Tenant", b"forged"),
            (b"x-api-key", b"k2"),
        ]);
        let remove = vec!["x-api-key".to_string(), "x-tollgate-tenant".to_string()];
        let set = vec![
            ("authorization".to_string(), "Bearer provider".to_string()),
            ("x-tollgate-tenant".to_string(), "acme".to_string()),
        ];
        let out = with_headers_replaced(&decode(&raw).unwrap(), &remove, &set);
        let want: Vec<(&[u8], &[u8])> = vec![
            (b":path", b"/v1/chat/completions"),
            (b"x-odd", b"caf\xe9"),
            (b"authorization", b"Bearer provider"),
            (b"x-tollgate-tenant", b"acme"),
        ];
        let got: Vec<(&[u8], &[u8])> = out.iter().map(|(k, v)| (k.as_slice(), v.as_slice())).collect();
        assert_eq!(got, want);
    }

    #[test]
    fn header_maps_keep_every_pair_and_survive_bytes_that_are_not_utf8() {
        let raw = enc(&[
            (b":path", b"/v1/chat/completions"),
            (b"x-odd", b"caf\xe9"),
            (b"x-odd", b"second"),
            (b"\xff-name", b""),
        ]);
        let map = header_map(&raw).unwrap();
        assert_eq!(map.len(), 4);
        assert_eq!(map[0], (":path".to_string(), "/v1/chat/completions".to_string()));
        assert_eq!(map[1], ("x-odd".to_string(), "caf\u{fffd}".to_string()));
        assert_eq!(map[2].1, "second");
        assert_eq!(map[3], ("\u{fffd}-name".to_string(), String::new()));
        assert_eq!(header_map(&[]), Some(Vec::new()));
        assert_eq!(header_map(&raw[..raw.len() - 1]), None, "truncated");
    }

    #[test]
    fn nested_claims_as_envoy_sends_them() {
        let inner = enc(&[(b"tenant_id", b"acme")]);
        let iat = 1.7e9f64.to_le_bytes();
        let org = 42f64.to_le_bytes();
        let outer =
            enc(&[(b"iat", &iat), (b"app_metadata", &inner), (b"sub", b"user-42"), (b"https://x.com/org", &org)]);
        assert_eq!(lookup(&outer, "app_metadata.tenant_id").as_deref(), Some("acme"));
        assert_eq!(lookup(&outer, "sub").as_deref(), Some("user-42"));
        assert_eq!(lookup(&outer, "https://x.com/org").as_deref(), Some("42"));
        assert_eq!(lookup(&outer, "app_metadata.missing"), None);
        assert_eq!(lookup(&outer, "nope"), None);
    }

    #[test]
    fn garbage_is_not_pairs() {
        assert!(decode(b"").is_none());
        assert!(decode(b"\xff\xff\xff\xff").is_none());
        assert!(decode(b"{\"a\":1}").is_none());
        let mut truncated = enc(&[(b"a", b"b")]);
        truncated.pop();
        assert!(decode(&truncated).is_none());
    }

    #[test]
    fn status_is_read_from_the_pairs_or_zero() {
        assert_eq!(status(&encode(&[(":status", "429"), ("x", "y")])), 429);
        assert_eq!(status(&encode(&[("x", "y")])), 0);
        assert_eq!(status(&encode(&[(":status", "abc")])), 0);
        assert_eq!(status(b"junk"), 0);
    }
}
