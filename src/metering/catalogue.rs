//! How does a published price catalogue become tollgate's `pricing` section?
//!
//! Converts LiteLLM's `model_prices_and_context_window.json` and models.dev's
//! `api.json` into the `pricing` section of the configuration
//! ([`crate::metering::pricing::PricingConfig`]), saying what it could not
//! map. Pure functions over parsed JSON; the command is
//! `tollgate-price-import`. Native only (not in the filter).
//!
//! A model is kept only when its entry compiles as tollgate prices it; a
//! model whose prices tollgate cannot express exactly (two context
//! thresholds, no token prices) is skipped, not approximated, so it falls to
//! the `default` price, which is the dearest input and output rates imported.

use std::collections::BTreeMap;

use serde_json::{json, Map, Value};

use crate::metering::pricing::PricingConfig;

/// What an import produced.
#[derive(Debug, Clone, PartialEq)]
pub struct Import {
    /// The `pricing` section: `models` and a `default`.
    pub pricing: Value,
    /// Models left out, with why.
    pub skipped: Vec<(String, String)>,
    /// Price fields not mapped, with how many kept models carried them.
    pub unmapped: BTreeMap<String, usize>,
}

/// LiteLLM per-token fields and the tollgate field each becomes.
const LITELLM_RATES: &[(&str, &str)] = &[
    ("input_cost_per_token", "input"),
    ("output_cost_per_token", "output"),
    ("cache_read_input_token_cost", "cached_input"),
    ("cache_creation_input_token_cost", "cache_write"),
    ("cache_creation_input_token_cost_above_1hr", "cache_write_1h"),
    ("input_cost_per_audio_token", "input_audio"),
    ("output_cost_per_audio_token", "output_audio"),
    // DeepSeek-style entries name cache reads this way.
    ("input_cost_per_token_cache_hit", "cached_input"),
];

/// LiteLLM service-tier suffixes and tollgate's tier names.
const LITELLM_TIERS: &[(&str, &str)] = &[("_priority", "priority"), ("_flex", "flex"), ("_batches", "batch")];

/// Rates of one tier at one input size: tollgate field -> USD per million.
type Rates = BTreeMap<&'static str, f64>;

/// Per token to per million tokens, rounded to 9 decimals (far below a
/// pico-dollar per token) so `3e-06` becomes `3`, not `2.9999999999999996`.
fn per_million(per_token: f64) -> f64 {
    (per_token * 1e15).round() / 1e9
}

/// `_above_<N>k_tokens` at the end of `key`: the rest and N * 1000.
fn strip_threshold(key: &str) -> (&str, Option<u64>) {
    if let Some(rest) = key.strip_suffix("k_tokens") {
        if let Some((base, n)) = rest.rsplit_once("_above_") {
            if let Ok(n) = n.parse::<u64>() {
                return (base, Some(n.saturating_mul(1000)));
            }
        }
    }
    (key, None)
}

/// A LiteLLM entry's rates: by tier (`None` is standard), then by threshold
/// (`None` is the base), plus the unmapped price fields.
#[derive(Default)]
struct Parsed {
    rates: BTreeMap<Option<&'static str>, BTreeMap<Option<u64>, Rates>>,
    web_search_per_1k: Option<f64>,
    unmapped: Vec<String>,
}

fn parse_litellm(entry: &Map<String, Value>) -> Parsed {
    let mut p = Parsed::default();
    for (key, value) in entry {
        if key == "search_context_cost_per_query" {
            // USD per query by context size: the dearest, per 1000.
            let dearest = value.as_object().and_then(|o| o.values().filter_map(Value::as_f64).reduce(f64::max));
            p.web_search_per_1k = dearest.map(|usd| (usd * 1e12).round() / 1e9);
            continue;
        }
        if !key.contains("cost") && !key.contains("multiplier") {
            continue; // Metadata: context sizes, capabilities, sources.
        }
        let (rest, tier) = LITELLM_TIERS
            .iter()
            .find_map(|(suffix, tier)| key.strip_suffix(suffix).map(|r| (r, Some(*tier))))
            .unwrap_or((key.as_str(), None));
        let (base, threshold) = strip_threshold(rest);
        let field = LITELLM_RATES.iter().find(|(k, _)| *k == base).map(|(_, f)| *f);
        match (field, value.as_f64()) {
            (Some(field), Some(per_token)) => {
                p.rates.entry(tier).or_default().entry(threshold).or_default().insert(field, per_million(per_token));
            }
            _ => p.unmapped.push(key.clone()),
        }
    }
    p
}

/// A tollgate rate object: `rates`, with what it lacks taken from `fallback`.
fn rate_object(rates: &Rates, fallback: Option<&Rates>) -> Map<String, Value> {
    let mut out = Map::new();
    for (field, usd) in fallback.into_iter().flatten().chain(rates) {
        out.insert((*field).to_string(), json!(usd));
    }
    out
}

/// One model's tollgate entry from a parsed LiteLLM entry, or why not.
fn litellm_model(p: &Parsed) -> Result<Value, String> {
    let standard = p.rates.get(&None).ok_or("no standard token prices")?;
    let base = standard.get(&None).ok_or("no token prices")?;
    if !base.contains_key("input") || !base.contains_key("output") {
        return Err("no input and output token prices".into());
    }
    let thresholds: Vec<u64> = p.rates.values().flat_map(|by| by.keys().flatten().copied()).collect();
    let threshold = thresholds.first().copied();
    if thresholds.iter().any(|t| Some(*t) != threshold) {
        return Err(format!("several context thresholds {thresholds:?}: tollgate prices one"));
    }
    let base_long: Option<&Rates> = threshold.and_then(|t| standard.get(&Some(t)));
    let mut model = rate_object(base, None);
    if let (Some(t), Some(long)) = (threshold, base_long) {
        let mut obj = rate_object(long, Some(base));
        obj.insert("above_input_tokens".into(), json!(t));
        model.insert("long_context".into(), Value::Object(obj));
    }
    if let Some(fee) = p.web_search_per_1k {
        model.insert("web_search_per_1k".into(), json!(fee));
    }
    let empty = Rates::new();
    let mut tiers = Map::new();
    for (tier, by) in &p.rates {
        let Some(tier) = tier else { continue };
        // What a tier does not say costs what the standard tier charges.
        let mut obj = rate_object(by.get(&None).unwrap_or(&empty), Some(base));
        if let Some(t) = threshold {
            let tier_long = by.get(&Some(t));
            if tier_long.is_some() || base_long.is_some() {
                let fallback: Rates = base.iter().chain(base_long.unwrap_or(&empty)).map(|(k, v)| (*k, *v)).collect();
                let mut long = rate_object(tier_long.unwrap_or(&empty), Some(&fallback));
                long.insert("above_input_tokens".into(), json!(t));
                obj.insert("long_context".into(), Value::Object(long));
            }
        }
        tiers.insert((*tier).to_string(), Value::Object(obj));
    }
    if !tiers.is_empty() {
        model.insert("service_tiers".into(), Value::Object(tiers));
    }
    Ok(Value::Object(model))
}

/// Converts LiteLLM's `model_prices_and_context_window.json`. `providers`,
/// when not empty, keeps the entries whose `litellm_provider` is one of them.
pub fn from_litellm(doc: &Value, providers: &[String]) -> Result<Import, String> {
    let entries = doc.as_object().ok_or("expected a JSON object of models")?;
    let mut models = Map::new();
    let mut skipped = Vec::new();
    let mut unmapped = BTreeMap::new();
    for (name, entry) in entries {
        if name == "sample_spec" {
            continue;
        }
        let Some(entry) = entry.as_object() else {
            skipped.push((name.clone(), "not an object".into()));
            continue;
        };
        let provider = entry.get("litellm_provider").and_then(Value::as_str).unwrap_or("");
        if !providers.is_empty() && !providers.iter().any(|p| p == provider) {
            continue;
        }
        let parsed = parse_litellm(entry);
        match litellm_model(&parsed).and_then(|m| checked(name, m)) {
            Ok(m) => {
                for field in parsed.unmapped {
                    *unmapped.entry(field).or_insert(0) += 1;
                }
                models.insert(name.clone(), m);
            }
            Err(why) => skipped.push((name.clone(), why)),
        }
    }
    finish(models, skipped, unmapped)
}

/// models.dev cost fields and the tollgate field each becomes.
const MODELS_DEV_RATES: &[(&str, &str)] = &[
    ("input", "input"),
    ("output", "output"),
    ("cache_read", "cached_input"),
    ("cache_write", "cache_write"),
    ("input_audio", "input_audio"),
    ("output_audio", "output_audio"),
];

/// The tollgate rates of a models.dev cost object; unmapped keys are pushed.
fn models_dev_rates(cost: &Map<String, Value>, unmapped: &mut Vec<String>) -> Rates {
    let mut rates = Rates::new();
    for (key, value) in cost {
        match (MODELS_DEV_RATES.iter().find(|(k, _)| k == key), value.as_f64()) {
            (Some((_, field)), Some(usd)) => {
                rates.insert(field, usd);
            }
            _ if matches!(key.as_str(), "context_over_200k" | "tiers") => {}
            // Reasoning billed as output is what tollgate does.
            _ if key == "reasoning" && value.as_f64() == cost.get("output").and_then(Value::as_f64) => {}
            _ => unmapped.push(key.clone()),
        }
    }
    rates
}

/// One model's tollgate entry from a models.dev `cost`, or why not.
fn models_dev_model(cost: &Map<String, Value>, unmapped: &mut Vec<String>) -> Result<Value, String> {
    if let Some(r) = cost.get("reasoning").and_then(Value::as_f64) {
        if Some(r) != cost.get("output").and_then(Value::as_f64) {
            return Err("reasoning priced apart from output: tollgate bills it as output".into());
        }
    }
    let base = models_dev_rates(cost, unmapped);
    if !base.contains_key("input") || !base.contains_key("output") {
        return Err("no input and output token prices".into());
    }
    // Context tiers: the `tiers` list (`{"tier": {"type": "context", "size": N}, ...}`),
    // else the older `context_over_200k`.
    let mut longs: Vec<(u64, Rates)> = Vec::new();
    if let Some(Value::Array(tiers)) = cost.get("tiers") {
        for t in tiers {
            let kind = t.pointer("/tier/type").and_then(Value::as_str);
            let size = t.pointer("/tier/size").and_then(Value::as_u64);
            match (kind, size, t.as_object()) {
                (Some("context"), Some(size), Some(obj)) => {
                    let mut rest = obj.clone();
                    rest.remove("tier");
                    longs.push((size, models_dev_rates(&rest, unmapped)));
                }
                _ => return Err("a price tier that is not a context size".into()),
            }
        }
    } else if let Some(Value::Object(over)) = cost.get("context_over_200k") {
        longs.push((200_000, models_dev_rates(over, unmapped)));
    }
    let mut model = rate_object(&base, None);
    match longs.as_slice() {
        [] => {}
        [(size, rates)] => {
            let mut long = rate_object(rates, Some(&base));
            long.insert("above_input_tokens".into(), json!(size));
            model.insert("long_context".into(), Value::Object(long));
        }
        _ => return Err(format!("{} context tiers: tollgate prices one", longs.len())),
    }
    Ok(Value::Object(model))
}

/// Converts models.dev's `api.json` (`{provider: {models: {id: {cost}}}}`).
/// `providers`, when not empty, keeps those providers. A model id listed by
/// several providers at different prices is kept once, from the first
/// provider in name order, and the others are reported.
pub fn from_models_dev(doc: &Value, providers: &[String]) -> Result<Import, String> {
    let by_provider = doc.as_object().ok_or("expected a JSON object of providers")?;
    let mut models = Map::new();
    let mut skipped = Vec::new();
    let mut unmapped = BTreeMap::new();
    for (provider, p) in by_provider {
        if !providers.is_empty() && !providers.iter().any(|x| x == provider) {
            continue;
        }
        let Some(list) = p.get("models").and_then(Value::as_object) else {
            skipped.push((provider.clone(), "a provider without models".into()));
            continue;
        };
        for (id, m) in list {
            let label = format!("{provider}/{id}");
            let Some(cost) = m.get("cost").and_then(Value::as_object) else {
                skipped.push((label, "no cost".into()));
                continue;
            };
            let mut fields = Vec::new();
            match models_dev_model(cost, &mut fields).and_then(|m| checked(id, m)) {
                Ok(entry) => match models.get(id) {
                    Some(first) if *first != entry => {
                        skipped.push((label, "listed by an earlier provider at other prices".into()));
                    }
                    Some(_) => {}
                    None => {
                        for f in fields {
                            *unmapped.entry(f).or_insert(0) += 1;
                        }
                        models.insert(id.clone(), entry);
                    }
                },
                Err(why) => skipped.push((label, why)),
            }
        }
    }
    finish(models, skipped, unmapped)
}

/// `model` if it compiles as a tollgate price.
fn checked(name: &str, model: Value) -> Result<Value, String> {
    let probe = json!({"models": {name: model}, "default": {"input": 0, "output": 0}});
    let bytes = serde_json::to_vec(&probe).map_err(|e| e.to_string())?;
    PricingConfig::from_json(&bytes).and_then(|c| c.compile()).map_err(|e| e.to_string())?;
    Ok(model)
}

/// The section, with the dearest rate of each kind imported as its `default`
/// (an unknown model is never priced below a known one).
fn finish(
    models: Map<String, Value>,
    skipped: Vec<(String, String)>,
    unmapped: BTreeMap<String, usize>,
) -> Result<Import, String> {
    if models.is_empty() {
        return Err("no model could be imported".into());
    }
    let mut default = Map::new();
    for field in ["input", "output", "cached_input", "cache_write", "cache_write_1h", "input_audio", "output_audio"] {
        let dearest = models.values().filter_map(|m| m.get(field).and_then(Value::as_f64)).reduce(f64::max);
        if let Some(usd) = dearest {
            default.insert(field.to_string(), json!(usd));
        }
    }
    let pricing = json!({"models": models, "default": default});
    Ok(Import { pricing, skipped, unmapped })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metering::pricing::{PriceTable, Rates as UnitRates};
    use crate::metering::usage::{ServedAs, Usage};

    fn litellm() -> Import {
        let doc: Value =
            serde_json::from_slice(include_bytes!("../../tests/fixtures/catalogue/litellm_sample.json")).expect("json");
        from_litellm(&doc, &[]).expect("import")
    }

    fn compiled(import: &Import) -> PriceTable {
        let bytes = serde_json::to_vec(&import.pricing).expect("bytes");
        PricingConfig::from_json(&bytes).and_then(|c| c.compile()).expect("the import compiles")
    }

    fn pico(usd_per_mtok: u64) -> u64 {
        usd_per_mtok * 1_000_000
    }

    #[test]
    fn litellm_sample_maps_rates_tiers_and_long_context() {
        let import = litellm();
        let t = compiled(&import);
        // claude-sonnet-4-5: $3 / $15, reads $0.30, 5m writes $3.75, 1h writes $6,
        // web search $0.01 per query, batch at half.
        let (p, _) = t.prices("claude-sonnet-4-5");
        assert_eq!(
            *p.base(),
            UnitRates {
                input: pico(3),
                cached_input: 300_000,
                cache_write: 3_750_000,
                cache_write_1h: pico(6),
                output: pico(15),
                input_audio: pico(3),
                output_audio: pico(15),
            }
        );
        assert_eq!(p.web_search, 10_000_000_000, "$0.01 per search");
        let u = Usage { input_uncached: 1_000_000, output: 1_000_000, total: 2_000_000, ..Usage::default() };
        let batch = ServedAs { tier: Some("batch".into()), ..ServedAs::default() };
        assert_eq!(t.cost_as("claude-sonnet-4-5", &u, &batch).micros, 9_000_000);
        // gpt-5.4: long context above 272k, priority, flex (with its own long rates).
        let long = Usage { input_uncached: 272_001, total: 272_001, ..Usage::default() };
        assert_eq!(t.cost("gpt-5.4", &long).pico, 272_001 * pico(5) as u128);
        let flex = ServedAs { tier: Some("flex".into()), ..ServedAs::default() };
        assert_eq!(t.cost_as("gpt-5.4", &long, &flex).pico, 272_001 * 2_500_000);
        let prio = ServedAs { tier: Some("priority".into()), ..ServedAs::default() };
        let short = Usage { input_uncached: 100_000, output: 100_000, total: 200_000, ..Usage::default() };
        assert_eq!(t.cost_as("gpt-5.4", &short, &prio).micros, 500_000 + 3_000_000);
        // Priority has no long-context rates of its own here: standard long ones.
        assert_eq!(t.cost_as("gpt-5.4", &u, &prio).micros, 5_000_000 + 22_500_000);
        // Audio rates.
        let audio = t.prices("gpt-4o-audio-preview-2024-12-17").0.base();
        assert_eq!((audio.input_audio, audio.output_audio), (pico(40), pico(80)));
        // Bedrock's 1-hour writes above 200k.
        let bedrock = Usage { cache_write: 300_000, cache_write_1h: 300_000, total: 300_000, ..Usage::default() };
        assert_eq!(t.cost("anthropic.claude-sonnet-4-5-20250929-v1:0", &bedrock).pico, 300_000 * pico(12) as u128);
    }

    #[test]
    fn litellm_sample_reports_what_it_left_out() {
        let import = litellm();
        let skipped: BTreeMap<&str, &str> = import.skipped.iter().map(|(m, w)| (m.as_str(), w.as_str())).collect();
        assert!(skipped["low/1024-x-1024/gpt-image-1.5"].contains("token prices"), "{skipped:?}");
        assert!(skipped["kyma/qwen3.7-flash"].contains("several context thresholds"), "{skipped:?}");
        assert!(!skipped.contains_key("sample_spec"));
        assert!(import.pricing["models"].get("sample_spec").is_none());
        // OpenAI's regional uplift is not a region tollgate sees in responses.
        assert!(import.unmapped.contains_key("regional_processing_uplift_multiplier_us"), "{:?}", import.unmapped);
        // The default is the dearest imported rate of each kind.
        let models = import.pricing["models"].as_object().expect("models");
        for field in ["input", "output", "cache_write_1h", "input_audio", "output_audio"] {
            let dearest = models.values().filter_map(|m| m[field].as_f64()).fold(0.0, f64::max);
            assert_eq!(import.pricing["default"][field].as_f64(), Some(dearest), "{field}");
        }
        assert_eq!(import.pricing["default"]["output_audio"], json!(80.0));
    }

    #[test]
    fn litellm_provider_filter() {
        let doc: Value =
            serde_json::from_slice(include_bytes!("../../tests/fixtures/catalogue/litellm_sample.json")).expect("json");
        let import = from_litellm(&doc, &["anthropic".to_string()]).expect("import");
        let names: Vec<&String> = import.pricing["models"].as_object().expect("models").keys().collect();
        assert_eq!(names, ["claude-sonnet-4-5"]);
        assert!(from_litellm(&doc, &["nobody".to_string()]).is_err());
    }

    #[test]
    fn models_dev_sample() {
        let doc: Value =
            serde_json::from_slice(include_bytes!("../../tests/fixtures/catalogue/models_dev_sample.json"))
                .expect("json");
        let import = from_models_dev(&doc, &[]).expect("import");
        let t = compiled(&import);
        let (p, _) = t.prices("claude-sonnet-4-5");
        assert_eq!((p.base().input, p.base().cached_input, p.base().cache_write), (pico(3), 300_000, 3_750_000));
        // context_over_200k becomes long-context rates above 200000.
        let long = Usage { input_uncached: 200_001, total: 200_001, ..Usage::default() };
        assert_eq!(t.cost("gemini-2.5-pro", &long).pico, 200_001 * 2_500_000);
        // A `tiers` list with one context tier.
        assert_eq!(
            t.cost("gpt-5.4", &Usage { input_uncached: 272_001, ..Usage::default() }).pico,
            272_001 * pico(5) as u128
        );
        let skipped: BTreeMap<&str, &str> = import.skipped.iter().map(|(m, w)| (m.as_str(), w.as_str())).collect();
        assert!(skipped["example/reasoner"].contains("reasoning"), "{skipped:?}");
        assert!(skipped["example/image-only"].contains("token prices"), "{skipped:?}");
        // The same id from a later provider at other prices is reported.
        assert!(skipped["openrouter/claude-sonnet-4-5"].contains("earlier provider"), "{skipped:?}");
    }
}
