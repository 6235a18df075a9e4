//! What does a response cost?
//!
//! Model prices and the cost of a response's [`Usage`].
//!
//! Operators write prices the way providers publish them, in USD per million
//! tokens. [`PricingConfig::compile`] checks them and converts each to integer
//! pico-dollars per token ($1 per million tokens = 1 µ$ per token =
//! 1_000_000 p$ per token), so a cost is exact integer arithmetic with no
//! float drift, however many requests are added up.
//!
//! A model is priced by, in order: its exact name, an alias, the longest
//! configured model name that prefixes it (when `prefix_match` is on), and
//! finally the required `default` price. [`Cost::priced_by`] says which, so an
//! unknown model is never silently free and is visible as such.

use std::collections::{BTreeMap, HashMap};

use serde::Deserialize;

use crate::metering::usage::Usage;

/// Pico-dollars per micro-dollar.
const PICO_PER_MICRO: u128 = 1_000_000;
/// Pico-dollars per token for a price of $1 per million tokens.
const PICO_PER_USD_PER_MTOK: f64 = 1_000_000.0;
/// Highest accepted price, in USD per million tokens (a typo guard: the
/// dearest models today cost a few hundred).
pub const MAX_USD_PER_MTOK: f64 = 1_000_000.0;

/// The `pricing` section of the filter configuration.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PricingConfig {
    /// Prices by model name, as the provider reports it in responses
    /// (`"gpt-4o"`, `"claude-sonnet-4-5"`, `"gemini-2.5-flash"`).
    #[serde(default)]
    pub models: BTreeMap<String, ModelPrice>,
    /// Other names for models in `models`, e.g. a dated snapshot
    /// `"gpt-4o-2024-08-06": "gpt-4o"`. The target must be a key of `models`.
    #[serde(default)]
    pub aliases: BTreeMap<String, String>,
    /// When true, a model with no exact or alias entry takes the price of the
    /// longest key of `models` that its name starts with (`"gpt-4o-2024-11-20"`
    /// is priced as `"gpt-4o"`). Beware that `"gpt-4o-mini-x"` then matches
    /// `"gpt-4o"` unless `"gpt-4o-mini"` is listed too. Default false.
    #[serde(default)]
    pub prefix_match: bool,
    /// The price of any model not found otherwise. Required: a model missing
    /// from the table must still cost something, never $0 by accident. Set it
    /// to the dearest model you serve to fail safe, or to zeros on purpose.
    #[serde(default)]
    pub default: Option<ModelPrice>,
}

/// Prices of one model in USD per million tokens.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelPrice {
    /// Uncached input tokens.
    pub input: f64,
    /// Input tokens read from the prompt cache. Defaults to `input` (never
    /// under-charging when the operator did not say).
    #[serde(default)]
    pub cached_input: Option<f64>,
    /// Input tokens written to the prompt cache (Anthropic charges more than
    /// plain input). Defaults to `input`.
    #[serde(default)]
    pub cache_write: Option<f64>,
    /// Output tokens, reasoning included (reasoning is billed as output).
    pub output: f64,
}

/// A configuration that cannot be used.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PricingError {
    /// The JSON did not have the expected shape.
    #[error("invalid pricing config: {0}")]
    Parse(String),
    /// No `default` price was configured.
    #[error("pricing.default is required: models missing from the table must still be charged")]
    MissingDefault,
    /// A price is negative, NaN, infinite or implausibly large.
    #[error("price {field} of {model:?} is {value}: it must be a finite number from 0 to {max} USD per million tokens", max = MAX_USD_PER_MTOK)]
    InvalidPrice {
        /// The model (or `default`).
        model: String,
        /// The price field.
        field: &'static str,
        /// The rejected value.
        value: f64,
    },
    /// A model or alias name is empty.
    #[error("an empty model name in pricing.{0}")]
    EmptyName(&'static str),
    /// An alias points at a model that is not in `models`.
    #[error("alias {alias:?} points to {target:?}, which is not in pricing.models")]
    UnknownAliasTarget {
        /// The alias.
        alias: String,
        /// Its target.
        target: String,
    },
    /// A name is both a model and an alias.
    #[error("{0:?} is both in pricing.models and in pricing.aliases")]
    AliasShadowsModel(String),
}

/// Compiled prices of one model, in pico-dollars per token.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UnitPrices {
    /// Per uncached input token.
    pub input: u64,
    /// Per cache-read input token.
    pub cached_input: u64,
    /// Per cache-write input token.
    pub cache_write: u64,
    /// Per output token (reasoning included).
    pub output: u64,
}

impl UnitPrices {
    /// Exact cost of `usage` in pico-dollars. Reasoning tokens are part of
    /// `usage.output` and are not charged again.
    pub fn cost_pico(&self, usage: &Usage) -> u128 {
        let part = |tokens: u64, price: u64| u128::from(tokens).saturating_mul(u128::from(price));
        part(usage.input_uncached, self.input)
            .saturating_add(part(usage.cache_read, self.cached_input))
            .saturating_add(part(usage.cache_write, self.cache_write))
            .saturating_add(part(usage.output, self.output))
    }
}

/// How a model's price was found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PricedBy {
    /// The model name is a key of `models`.
    Exact,
    /// The model name is a key of `aliases`.
    Alias,
    /// The longest key of `models` that prefixes the model name (given).
    Prefix(String),
    /// Not found: the `default` price. Worth a metric and a log line.
    Default,
}

/// The cost of one response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cost {
    /// Cost in micro-dollars, rounded up (so a non-zero cost never rounds to 0).
    pub micros: u64,
    /// Exact cost in pico-dollars, for callers that sum before rounding.
    pub pico: u128,
    /// How the price was found.
    pub priced_by: PricedBy,
}

/// A checked price table, ready for lookups.
#[derive(Debug, Clone, PartialEq)]
pub struct PriceTable {
    models: HashMap<String, UnitPrices>,
    aliases: HashMap<String, UnitPrices>,
    prefix_match: bool,
    default: UnitPrices,
}

impl PricingConfig {
    /// Parse a JSON pricing section (shape only; call [`Self::compile`] next).
    pub fn from_json(json: &[u8]) -> Result<Self, PricingError> {
        serde_json::from_slice(json).map_err(|e| PricingError::Parse(e.to_string()))
    }

    /// Check the configuration's meaning and build the integer price table.
    pub fn compile(&self) -> Result<PriceTable, PricingError> {
        let default = match &self.default {
            Some(p) => compile_price("default", p)?,
            None => return Err(PricingError::MissingDefault),
        };
        let mut models = HashMap::with_capacity(self.models.len());
        for (name, price) in &self.models {
            if name.is_empty() {
                return Err(PricingError::EmptyName("models"));
            }
            models.insert(name.clone(), compile_price(name, price)?);
        }
        let mut aliases = HashMap::with_capacity(self.aliases.len());
        for (alias, target) in &self.aliases {
            if alias.is_empty() {
                return Err(PricingError::EmptyName("aliases"));
            }
            if models.contains_key(alias) {
                return Err(PricingError::AliasShadowsModel(alias.clone()));
            }
            let Some(prices) = models.get(target) else {
                return Err(PricingError::UnknownAliasTarget { alias: alias.clone(), target: target.clone() });
            };
            aliases.insert(alias.clone(), *prices);
        }
        Ok(PriceTable { models, aliases, prefix_match: self.prefix_match, default })
    }
}

fn compile_price(model: &str, p: &ModelPrice) -> Result<UnitPrices, PricingError> {
    let unit = |field: &'static str, usd: f64| -> Result<u64, PricingError> {
        if !usd.is_finite() || !(0.0..=MAX_USD_PER_MTOK).contains(&usd) {
            return Err(PricingError::InvalidPrice { model: model.to_string(), field, value: usd });
        }
        // In range by the check above, so the conversion cannot saturate.
        Ok((usd * PICO_PER_USD_PER_MTOK).round() as u64)
    };
    Ok(UnitPrices {
        input: unit("input", p.input)?,
        cached_input: unit("cached_input", p.cached_input.unwrap_or(p.input))?,
        cache_write: unit("cache_write", p.cache_write.unwrap_or(p.input))?,
        output: unit("output", p.output)?,
    })
}

impl PriceTable {
    /// The prices that apply to `model` and how they were found.
    pub fn prices(&self, model: &str) -> (&UnitPrices, PricedBy) {
        if let Some(p) = self.models.get(model) {
            return (p, PricedBy::Exact);
        }
        if let Some(p) = self.aliases.get(model) {
            return (p, PricedBy::Alias);
        }
        if self.prefix_match {
            // Longest prefix first: walk the name's char boundaries downwards.
            let mut ends: Vec<usize> = model.char_indices().map(|(i, _)| i).collect();
            ends.reverse();
            for end in ends {
                let Some(prefix) = model.get(..end) else {
                    continue;
                };
                if let Some(p) = self.models.get(prefix) {
                    return (p, PricedBy::Prefix(prefix.to_string()));
                }
            }
        }
        (&self.default, PricedBy::Default)
    }

    /// The cost of `usage` answered by `model`.
    pub fn cost(&self, model: &str, usage: &Usage) -> Cost {
        let (prices, priced_by) = self.prices(model);
        let pico = prices.cost_pico(usage);
        Cost { micros: pico_to_micros_ceil(pico), pico, priced_by }
    }
}

/// Round pico-dollars up to whole micro-dollars, saturating at `u64::MAX`.
pub fn pico_to_micros_ceil(pico: u128) -> u64 {
    let micros = pico.div_ceil(PICO_PER_MICRO);
    u64::try_from(micros).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(json: &str) -> PriceTable {
        PricingConfig::from_json(json.as_bytes()).expect("parse").compile().expect("compile")
    }

    fn usage(input_uncached: u64, cache_read: u64, cache_write: u64, output: u64) -> Usage {
        Usage {
            input_uncached,
            cache_read,
            cache_write,
            output,
            reasoning: 0,
            total: input_uncached + cache_read + cache_write + output,
        }
    }

    const CONFIG: &str = r#"{
        "models": {
            "gpt-4o": {"input": 2.5, "cached_input": 1.25, "output": 10.0},
            "gpt-4o-mini": {"input": 0.15, "cached_input": 0.075, "output": 0.6},
            "claude-sonnet-4-5": {"input": 3, "cached_input": 0.3, "cache_write": 3.75, "output": 15}
        },
        "aliases": {"gpt-4o-2024-08-06": "gpt-4o", "sonnet": "claude-sonnet-4-5"},
        "prefix_match": true,
        "default": {"input": 15, "output": 75}
    }"#;

    #[test]
    fn prices_become_pico_dollars_per_token() {
        let t = table(CONFIG);
        let (p, by) = t.prices("gpt-4o");
        assert_eq!(by, PricedBy::Exact);
        assert_eq!(
            *p,
            UnitPrices { input: 2_500_000, cached_input: 1_250_000, cache_write: 2_500_000, output: 10_000_000 }
        );
        assert_eq!(t.prices("gpt-4o-mini").0.cached_input, 75_000);
    }

    #[test]
    fn cost_is_exact_and_rounded_up() {
        let t = table(CONFIG);
        // 1M uncached input at $2.50 + 1M output at $10 = $12.50.
        let c = t.cost("gpt-4o", &usage(1_000_000, 0, 0, 1_000_000));
        assert_eq!(c.micros, 12_500_000);
        // One input token: 2.5 µ$ rounds up to 3.
        let c = t.cost("gpt-4o", &usage(1, 0, 0, 0));
        assert_eq!((c.pico, c.micros), (2_500_000, 3));
        assert_eq!(t.cost("gpt-4o", &Usage::default()).micros, 0);
    }

    #[test]
    fn each_kind_has_its_price_and_reasoning_is_not_charged_twice() {
        let t = table(CONFIG);
        let mut u = usage(1000, 10_000, 2000, 500);
        u.reasoning = 400;
        // 1000*3 + 10000*0.3 + 2000*3.75 + 500*15 = 3000+3000+7500+7500 µ$.
        assert_eq!(t.cost("claude-sonnet-4-5", &u).micros, 21_000);
    }

    #[test]
    fn no_float_drift_over_many_requests() {
        let t = table(CONFIG);
        let one = t.cost("gpt-4o-mini", &usage(7, 3, 0, 11));
        let total: u128 = (0..1_000_000).map(|_| one.pico).sum();
        assert_eq!(total, 1_000_000 * (7 * 150_000 + 3 * 75_000 + 11 * 600_000));
    }

    #[test]
    fn lookup_order_exact_alias_prefix_default() {
        let t = table(CONFIG);
        assert_eq!(t.prices("gpt-4o").1, PricedBy::Exact);
        assert_eq!(t.prices("gpt-4o-2024-08-06").1, PricedBy::Alias);
        assert_eq!(t.prices("sonnet").0.cache_write, 3_750_000);
        assert_eq!(t.prices("gpt-4o-mini-2024-07-18").1, PricedBy::Prefix("gpt-4o-mini".into()));
        assert_eq!(t.prices("gpt-4o-2024-11-20").1, PricedBy::Prefix("gpt-4o".into()));
        assert_eq!(t.prices("gpt-4").1, PricedBy::Default);
        assert_eq!(t.prices("").1, PricedBy::Default);
        assert_eq!(t.prices("ünïcödé-gpt").1, PricedBy::Default);
    }

    #[test]
    fn unknown_model_is_priced_by_default_never_free() {
        let t = table(CONFIG);
        let c = t.cost("mystery-model", &usage(1000, 0, 0, 1000));
        assert_eq!(c.priced_by, PricedBy::Default);
        assert_eq!(c.micros, 15_000 + 75_000);
    }

    #[test]
    fn prefix_match_is_off_by_default() {
        let t = table(r#"{"models": {"gpt-4o": {"input": 1, "output": 1}}, "default": {"input": 9, "output": 9}}"#);
        assert_eq!(t.prices("gpt-4o-2024-11-20").1, PricedBy::Default);
    }

    #[test]
    fn default_is_required() {
        let cfg = PricingConfig::from_json(br#"{"models": {}}"#).expect("parse");
        assert_eq!(cfg.compile(), Err(PricingError::MissingDefault));
    }

    #[test]
    fn invalid_prices_are_rejected() {
        for bad in ["-1", "1e7", "1e400"] {
            let json = format!(
                r#"{{"models": {{"m": {{"input": {bad}, "output": 1}}}}, "default": {{"input": 1, "output": 1}}}}"#
            );
            match PricingConfig::from_json(json.as_bytes()).and_then(|c| c.compile()) {
                Err(PricingError::InvalidPrice { .. }) | Err(PricingError::Parse(_)) => {}
                other => panic!("{bad}: {other:?}"),
            }
        }
        let nan = PricingConfig {
            default: Some(ModelPrice { input: f64::NAN, cached_input: None, cache_write: None, output: 1.0 }),
            ..PricingConfig::default()
        };
        assert!(matches!(nan.compile(), Err(PricingError::InvalidPrice { field: "input", .. })));
    }

    #[test]
    fn alias_errors() {
        let d = r#""default": {"input": 1, "output": 1}"#;
        let bad_target = format!(r#"{{"aliases": {{"a": "nope"}}, {d}}}"#);
        assert!(matches!(
            PricingConfig::from_json(bad_target.as_bytes()).and_then(|c| c.compile()),
            Err(PricingError::UnknownAliasTarget { .. })
        ));
        let shadow = format!(r#"{{"models": {{"m": {{"input": 1, "output": 1}}}}, "aliases": {{"m": "m"}}, {d}}}"#);
        assert!(matches!(
            PricingConfig::from_json(shadow.as_bytes()).and_then(|c| c.compile()),
            Err(PricingError::AliasShadowsModel(_))
        ));
        let chain =
            format!(r#"{{"models": {{"m": {{"input": 1, "output": 1}}}}, "aliases": {{"a": "m", "b": "a"}}, {d}}}"#);
        assert!(matches!(
            PricingConfig::from_json(chain.as_bytes()).and_then(|c| c.compile()),
            Err(PricingError::UnknownAliasTarget { .. })
        ));
        let empty = format!(r#"{{"models": {{"": {{"input": 1, "output": 1}}}}, {d}}}"#);
        assert!(matches!(
            PricingConfig::from_json(empty.as_bytes()).and_then(|c| c.compile()),
            Err(PricingError::EmptyName("models"))
        ));
    }

    #[test]
    fn unknown_fields_are_rejected() {
        for json in [
            r#"{"modles": {}, "default": {"input": 1, "output": 1}}"#,
            r#"{"default": {"input": 1, "output": 1, "cached": 0.5}}"#,
        ] {
            assert!(matches!(PricingConfig::from_json(json.as_bytes()), Err(PricingError::Parse(_))));
        }
    }

    #[test]
    fn huge_usage_saturates() {
        let t = table(r#"{"default": {"input": 1000000, "output": 1000000}}"#);
        let u = Usage {
            input_uncached: u64::MAX,
            cache_read: u64::MAX,
            cache_write: u64::MAX,
            output: u64::MAX,
            reasoning: 0,
            total: u64::MAX,
        };
        assert_eq!(t.cost("x", &u).micros, u64::MAX);
    }

    #[test]
    fn free_model_on_purpose() {
        let t = table(r#"{"models": {"local": {"input": 0, "output": 0}}, "default": {"input": 1, "output": 1}}"#);
        assert_eq!(t.cost("local", &usage(100, 0, 0, 100)).micros, 0);
    }
}
