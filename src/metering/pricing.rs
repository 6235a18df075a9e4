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
//!
//! Within a model, the rates are chosen by what the response says served it
//! ([`ServedAs`]: service tier, speed, region) and by the size of the input
//! (`long_context`: every token of a request whose input exceeds the
//! threshold is priced at the long-context rates, as providers bill).
//! Multipliers are kept in parts per million and applied to integer
//! pico-dollars, rounding up.

use std::collections::{BTreeMap, HashMap};

use serde::Deserialize;

use crate::metering::usage::{Iteration, ServedAs, Usage};

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

/// Prices of one model in USD per million tokens (tool fees per thousand
/// requests). Only `input` and `output` are required.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelPrice {
    /// Uncached input tokens.
    pub input: f64,
    /// Input tokens read from the prompt cache. Defaults to `input` (never
    /// under-charging when the operator did not say).
    #[serde(default)]
    pub cached_input: Option<f64>,
    /// Input tokens written to the prompt cache for 5 minutes (Anthropic
    /// charges more than plain input), and any write whose lifetime the
    /// provider did not say. Defaults to `input`.
    #[serde(default)]
    pub cache_write: Option<f64>,
    /// Input tokens written to the prompt cache for 1 hour (Anthropic
    /// `ephemeral_1h_input_tokens`, dearer than 5-minute writes). Defaults to
    /// `cache_write`: set it for models that offer 1-hour caching.
    #[serde(default)]
    pub cache_write_1h: Option<f64>,
    /// Output tokens, reasoning included (reasoning is billed as output).
    pub output: f64,
    /// Uncached audio input tokens. Defaults to `input`.
    #[serde(default)]
    pub input_audio: Option<f64>,
    /// Audio output tokens. Defaults to `output`.
    #[serde(default)]
    pub output_audio: Option<f64>,
    /// USD per 1000 server-side web searches (Anthropic
    /// `server_tool_use.web_search_requests`). Default 0.
    #[serde(default)]
    pub web_search_per_1k: Option<f64>,
    /// USD per 1000 server-side web fetches. Default 0.
    #[serde(default)]
    pub web_fetch_per_1k: Option<f64>,
    /// Rates for requests whose input (uncached, cache reads and writes)
    /// exceeds a threshold; they apply to every token of such a request.
    #[serde(default)]
    pub long_context: Option<LongContextPrice>,
    /// Prices by the service tier the response reports (canonical names:
    /// `standard`, `priority`, `flex`, `batch`, `scale`, `provisioned`). A
    /// tier not listed is priced at the model's own rates.
    #[serde(default)]
    pub service_tiers: BTreeMap<String, TierPrice>,
    /// Multipliers by speed mode (Anthropic `usage.speed`), e.g. `{"fast": 6}`.
    /// Applied to token costs, not tool fees. A mode not listed is 1.
    #[serde(default)]
    pub speed: BTreeMap<String, f64>,
    /// Multipliers by inference region (Anthropic `usage.inference_geo`), e.g.
    /// `{"us": 1.1}`. Applied to token costs, not tool fees. Not listed: 1.
    #[serde(default)]
    pub inference_geo: BTreeMap<String, f64>,
}

/// Long-context rates of a model, in USD per million tokens.
#[derive(Debug, Clone, Copy, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LongContextPrice {
    /// The rates apply when the input is more than this many tokens
    /// (e.g. 200000 for Gemini Pro, 272000 for recent GPT models).
    pub above_input_tokens: u64,
    /// Uncached input tokens.
    pub input: f64,
    /// Output tokens.
    pub output: f64,
    /// Cache reads. Defaults to this section's `input`.
    #[serde(default)]
    pub cached_input: Option<f64>,
    /// 5-minute cache writes. Defaults to this section's `input`.
    #[serde(default)]
    pub cache_write: Option<f64>,
    /// 1-hour cache writes. Defaults to this section's `cache_write`.
    #[serde(default)]
    pub cache_write_1h: Option<f64>,
    /// Audio input. Defaults to this section's `input`.
    #[serde(default)]
    pub input_audio: Option<f64>,
    /// Audio output. Defaults to this section's `output`.
    #[serde(default)]
    pub output_audio: Option<f64>,
}

/// The price of a model in one service tier: either a `multiplier` of the
/// model's rates (long-context ones included), or rates of its own (`input`
/// and `output` required; the others default as for a model).
#[derive(Debug, Clone, Copy, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TierPrice {
    /// E.g. `2` for priority, `0.5` for flex and batch, `0` for provisioned
    /// throughput (paid for apart).
    #[serde(default)]
    pub multiplier: Option<f64>,
    #[serde(default)]
    pub input: Option<f64>,
    #[serde(default)]
    pub output: Option<f64>,
    #[serde(default)]
    pub cached_input: Option<f64>,
    #[serde(default)]
    pub cache_write: Option<f64>,
    #[serde(default)]
    pub cache_write_1h: Option<f64>,
    #[serde(default)]
    pub input_audio: Option<f64>,
    #[serde(default)]
    pub output_audio: Option<f64>,
    /// The tier's long-context rates (only with rates of its own).
    #[serde(default)]
    pub long_context: Option<LongContextPrice>,
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
    /// A multiplier is negative, NaN, infinite or above [`MAX_MULTIPLIER`].
    #[error("multiplier {field} {key:?} of {model:?} is {value}: it must be a finite number from 0 to {max}", max = MAX_MULTIPLIER)]
    InvalidMultiplier {
        /// The model (or `default`).
        model: String,
        /// `service_tiers`, `speed` or `inference_geo`.
        field: &'static str,
        /// The tier, speed or region.
        key: String,
        /// The rejected value.
        value: f64,
    },
    /// A service tier has both a multiplier and rates, or neither, or rates
    /// without `input` and `output`.
    #[error("service tier {tier:?} of {model:?} must have either a multiplier or its own input and output rates")]
    TierShape {
        /// The model (or `default`).
        model: String,
        /// The tier.
        tier: String,
    },
    /// An empty tier, speed or region name.
    #[error("an empty name in {field} of {model:?}")]
    EmptyKey {
        /// The model (or `default`).
        model: String,
        /// `service_tiers`, `speed` or `inference_geo`.
        field: &'static str,
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

/// Highest accepted multiplier (a typo guard).
pub const MAX_MULTIPLIER: f64 = 1000.0;
/// Parts per million of a multiplier of 1.
const PPM_ONE: u64 = 1_000_000;

/// Compiled token rates, in pico-dollars per token.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Rates {
    /// Per uncached (non-audio) input token.
    pub input: u64,
    /// Per cache-read input token.
    pub cached_input: u64,
    /// Per 5-minute (or unspecified) cache-write token.
    pub cache_write: u64,
    /// Per 1-hour cache-write token.
    pub cache_write_1h: u64,
    /// Per (non-audio) output token, reasoning included.
    pub output: u64,
    /// Per uncached audio input token.
    pub input_audio: u64,
    /// Per audio output token.
    pub output_audio: u64,
}

impl Rates {
    /// Exact cost of `usage`'s tokens in pico-dollars. Reasoning tokens are
    /// part of `usage.output` and are not charged again; audio and 1-hour
    /// writes are the parts of their counts priced apart.
    pub fn cost_pico(&self, usage: &Usage) -> u128 {
        let part = |tokens: u64, price: u64| u128::from(tokens).saturating_mul(u128::from(price));
        let audio_in = usage.input_audio.min(usage.input_uncached);
        let write_1h = usage.cache_write_1h.min(usage.cache_write);
        let audio_out = usage.output_audio.min(usage.output);
        part(usage.input_uncached.saturating_sub(audio_in), self.input)
            .saturating_add(part(audio_in, self.input_audio))
            .saturating_add(part(usage.cache_read, self.cached_input))
            .saturating_add(part(usage.cache_write.saturating_sub(write_1h), self.cache_write))
            .saturating_add(part(write_1h, self.cache_write_1h))
            .saturating_add(part(usage.output.saturating_sub(audio_out), self.output))
            .saturating_add(part(audio_out, self.output_audio))
    }
}

/// Rates by input size: the base ones, and those above a threshold.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RateCard {
    /// Rates up to the threshold (or always, without one).
    pub base: Rates,
    /// The threshold (input tokens) and the rates for inputs above it.
    pub long: Option<(u64, Rates)>,
}

impl RateCard {
    /// The rates for a request of `input_tokens` input tokens.
    pub fn for_input(&self, input_tokens: u64) -> &Rates {
        match &self.long {
            Some((above, rates)) if input_tokens > *above => rates,
            _ => &self.base,
        }
    }
}

/// How a service tier is priced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TierRule {
    /// The model's rates times this many parts per million.
    Multiplier(u64),
    /// Rates of its own.
    Rates(RateCard),
}

/// Compiled prices of one model.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UnitPrices {
    /// Token rates by input size.
    pub card: RateCard,
    /// Rules by canonical service tier.
    pub tiers: Vec<(String, TierRule)>,
    /// Multipliers (ppm) by speed mode.
    pub speed: Vec<(String, u64)>,
    /// Multipliers (ppm) by inference region.
    pub geo: Vec<(String, u64)>,
    /// Pico-dollars per web search request.
    pub web_search: u64,
    /// Pico-dollars per web fetch request.
    pub web_fetch: u64,
}

/// `pico` times `ppm` parts per million, rounded up.
fn scale(pico: u128, ppm: u64) -> u128 {
    pico.saturating_mul(u128::from(ppm)).div_ceil(u128::from(PPM_ONE))
}

fn lookup<'a, T>(list: &'a [(String, T)], key: Option<&str>) -> Option<&'a T> {
    let key = key?;
    list.iter().find(|(k, _)| k == key).map(|(_, v)| v)
}

impl UnitPrices {
    /// The base rates (standard tier, short context).
    pub fn base(&self) -> &Rates {
        &self.card.base
    }

    /// Exact cost of `usage` served as `served`, in pico-dollars: the token
    /// rates of the served tier for the input's size, times the speed and
    /// region multipliers, plus the per-request tool fees.
    pub fn cost_pico(&self, usage: &Usage, served: &ServedAs) -> u128 {
        let input = usage.input_total();
        let tokens = match lookup(&self.tiers, served.tier.as_deref()) {
            Some(TierRule::Rates(card)) => card.for_input(input).cost_pico(usage),
            Some(TierRule::Multiplier(ppm)) => scale(self.card.for_input(input).cost_pico(usage), *ppm),
            None => self.card.for_input(input).cost_pico(usage),
        };
        let mut tokens = tokens;
        if let Some(ppm) = lookup(&self.speed, served.speed.as_deref()) {
            tokens = scale(tokens, *ppm);
        }
        if let Some(ppm) = lookup(&self.geo, served.geo.as_deref()) {
            tokens = scale(tokens, *ppm);
        }
        let fee = |n: u64, price: u64| u128::from(n).saturating_mul(u128::from(price));
        tokens
            .saturating_add(fee(usage.web_search_requests, self.web_search))
            .saturating_add(fee(usage.web_fetch_requests, self.web_fetch))
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
    /// Alias -> a key of `models`.
    aliases: HashMap<String, String>,
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
            if !models.contains_key(target) {
                return Err(PricingError::UnknownAliasTarget { alias: alias.clone(), target: target.clone() });
            }
            aliases.insert(alias.clone(), target.clone());
        }
        Ok(PriceTable { models, aliases, prefix_match: self.prefix_match, default })
    }
}

/// The rate fields of a model, a long-context section or a tier, before
/// their defaults.
struct RateFields {
    input: f64,
    output: f64,
    cached_input: Option<f64>,
    cache_write: Option<f64>,
    cache_write_1h: Option<f64>,
    input_audio: Option<f64>,
    output_audio: Option<f64>,
}

fn unit(model: &str, field: &'static str, usd: f64) -> Result<u64, PricingError> {
    if !usd.is_finite() || !(0.0..=MAX_USD_PER_MTOK).contains(&usd) {
        return Err(PricingError::InvalidPrice { model: model.to_string(), field, value: usd });
    }
    // In range by the check above, so the conversion cannot saturate.
    Ok((usd * PICO_PER_USD_PER_MTOK).round() as u64)
}

fn compile_rates(model: &str, f: &RateFields) -> Result<Rates, PricingError> {
    let cache_write = f.cache_write.unwrap_or(f.input);
    Ok(Rates {
        input: unit(model, "input", f.input)?,
        cached_input: unit(model, "cached_input", f.cached_input.unwrap_or(f.input))?,
        cache_write: unit(model, "cache_write", cache_write)?,
        cache_write_1h: unit(model, "cache_write_1h", f.cache_write_1h.unwrap_or(cache_write))?,
        output: unit(model, "output", f.output)?,
        input_audio: unit(model, "input_audio", f.input_audio.unwrap_or(f.input))?,
        output_audio: unit(model, "output_audio", f.output_audio.unwrap_or(f.output))?,
    })
}

fn compile_card(model: &str, base: &RateFields, long: Option<&LongContextPrice>) -> Result<RateCard, PricingError> {
    let long = match long {
        Some(l) => {
            let fields = RateFields {
                input: l.input,
                output: l.output,
                cached_input: l.cached_input,
                cache_write: l.cache_write,
                cache_write_1h: l.cache_write_1h,
                input_audio: l.input_audio,
                output_audio: l.output_audio,
            };
            Some((l.above_input_tokens, compile_rates(model, &fields)?))
        }
        None => None,
    };
    Ok(RateCard { base: compile_rates(model, base)?, long })
}

fn multiplier(model: &str, field: &'static str, key: &str, m: f64) -> Result<u64, PricingError> {
    if key.is_empty() {
        return Err(PricingError::EmptyKey { model: model.to_string(), field });
    }
    if !m.is_finite() || !(0.0..=MAX_MULTIPLIER).contains(&m) {
        return Err(PricingError::InvalidMultiplier {
            model: model.to_string(),
            field,
            key: key.to_string(),
            value: m,
        });
    }
    // In range by the check above.
    Ok((m * PPM_ONE as f64).round() as u64)
}

fn compile_price(model: &str, p: &ModelPrice) -> Result<UnitPrices, PricingError> {
    let base = RateFields {
        input: p.input,
        output: p.output,
        cached_input: p.cached_input,
        cache_write: p.cache_write,
        cache_write_1h: p.cache_write_1h,
        input_audio: p.input_audio,
        output_audio: p.output_audio,
    };
    let card = compile_card(model, &base, p.long_context.as_ref())?;
    let mut tiers = Vec::with_capacity(p.service_tiers.len());
    for (name, t) in &p.service_tiers {
        let has_rates =
            [t.input, t.output, t.cached_input, t.cache_write, t.cache_write_1h, t.input_audio, t.output_audio]
                .iter()
                .any(Option::is_some)
                || t.long_context.is_some();
        let rule = match (t.multiplier, has_rates, t.input, t.output) {
            (Some(m), false, _, _) => TierRule::Multiplier(multiplier(model, "service_tiers", name, m)?),
            (None, true, Some(input), Some(output)) if !name.is_empty() => {
                let fields = RateFields {
                    input,
                    output,
                    cached_input: t.cached_input,
                    cache_write: t.cache_write,
                    cache_write_1h: t.cache_write_1h,
                    input_audio: t.input_audio,
                    output_audio: t.output_audio,
                };
                TierRule::Rates(compile_card(model, &fields, t.long_context.as_ref())?)
            }
            _ if name.is_empty() => {
                return Err(PricingError::EmptyKey { model: model.to_string(), field: "service_tiers" })
            }
            _ => return Err(PricingError::TierShape { model: model.to_string(), tier: name.clone() }),
        };
        tiers.push((name.clone(), rule));
    }
    let multipliers = |field: &'static str, map: &BTreeMap<String, f64>| -> Result<Vec<(String, u64)>, PricingError> {
        map.iter().map(|(k, m)| Ok((k.clone(), multiplier(model, field, k, *m)?))).collect()
    };
    // Per 1000 requests: $1 per 1000 = 1000 µ$ per request = 1e9 p$.
    let fee =
        |field: &'static str, usd: Option<f64>| unit(model, field, usd.unwrap_or(0.0)).map(|p| p.saturating_mul(1000));
    Ok(UnitPrices {
        card,
        tiers,
        speed: multipliers("speed", &p.speed)?,
        geo: multipliers("inference_geo", &p.inference_geo)?,
        web_search: fee("web_search_per_1k", p.web_search_per_1k)?,
        web_fetch: fee("web_fetch_per_1k", p.web_fetch_per_1k)?,
    })
}

impl PriceTable {
    /// The prices that apply to `model` and how they were found.
    pub fn prices(&self, model: &str) -> (&UnitPrices, PricedBy) {
        if let Some(p) = self.models.get(model) {
            return (p, PricedBy::Exact);
        }
        if let Some(p) = self.aliases.get(model).and_then(|target| self.models.get(target)) {
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

    /// The cost of `usage` answered by `model` at its standard rates.
    pub fn cost(&self, model: &str, usage: &Usage) -> Cost {
        self.cost_as(model, usage, &ServedAs::default())
    }

    /// The cost of `usage` answered by `model` served as `served` (the tier,
    /// speed and region the response reports, or for an estimate, those the
    /// request asks for).
    pub fn cost_as(&self, model: &str, usage: &Usage, served: &ServedAs) -> Cost {
        let (prices, priced_by) = self.prices(model);
        let pico = prices.cost_pico(usage, served);
        Cost { micros: pico_to_micros_ceil(pico), pico, priced_by }
    }

    /// The cost of a response whose top-level `usage` was answered by
    /// `model`, plus each of its `iterations` (work outside the top-level
    /// totals) at its own model's prices, or `model`'s when it names none;
    /// all served as `served`. Summed in pico-dollars, rounded up once.
    /// `priced_by` is the top-level model's, or [`PricedBy::Default`] when
    /// any iteration's model fell to the default price.
    pub fn cost_with_iterations(
        &self,
        model: &str,
        usage: &Usage,
        served: &ServedAs,
        iterations: &[Iteration],
    ) -> Cost {
        let mut cost = self.cost_as(model, usage, served);
        for it in iterations {
            let (prices, by) = self.prices(it.model.as_deref().unwrap_or(model));
            cost.pico = cost.pico.saturating_add(prices.cost_pico(&it.usage, served));
            if by == PricedBy::Default {
                cost.priced_by = PricedBy::Default;
            }
        }
        cost.micros = pico_to_micros_ceil(cost.pico);
        cost
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
            total: input_uncached + cache_read + cache_write + output,
            ..Usage::default()
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
            *p.base(),
            Rates {
                input: 2_500_000,
                cached_input: 1_250_000,
                cache_write: 2_500_000,
                cache_write_1h: 2_500_000,
                output: 10_000_000,
                input_audio: 2_500_000,
                output_audio: 10_000_000,
            }
        );
        assert_eq!(t.prices("gpt-4o-mini").0.base().cached_input, 75_000);
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
        assert_eq!(t.prices("sonnet").0.base().cache_write, 3_750_000);
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
            default: Some(ModelPrice { input: f64::NAN, output: 1.0, ..ModelPrice::default() }),
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
            total: u64::MAX,
            web_search_requests: u64::MAX,
            ..Usage::default()
        };
        assert_eq!(t.cost("x", &u).micros, u64::MAX);
    }

    #[test]
    fn free_model_on_purpose() {
        let t = table(r#"{"models": {"local": {"input": 0, "output": 0}}, "default": {"input": 1, "output": 1}}"#);
        assert_eq!(t.cost("local", &usage(100, 0, 0, 100)).micros, 0);
    }

    const RICH: &str = r#"{
        "models": {
            "gemini-2.5-pro": {"input": 1.25, "cached_input": 0.125, "output": 10,
                "long_context": {"above_input_tokens": 200000, "input": 2.5, "cached_input": 0.25, "output": 15},
                "service_tiers": {"provisioned": {"multiplier": 0}}},
            "claude-sonnet-4-5": {"input": 3, "cached_input": 0.3, "cache_write": 3.75, "cache_write_1h": 6, "output": 15,
                "web_search_per_1k": 10, "web_fetch_per_1k": 0,
                "inference_geo": {"us": 1.1}, "speed": {"fast": 6},
                "service_tiers": {"batch": {"multiplier": 0.5}}},
            "gpt-5.4": {"input": 2.5, "cached_input": 0.25, "output": 15,
                "long_context": {"above_input_tokens": 272000, "input": 5, "cached_input": 0.5, "output": 22.5},
                "service_tiers": {"priority": {"input": 5, "cached_input": 0.5, "output": 30}, "flex": {"multiplier": 0.5}}},
            "gpt-4o-audio": {"input": 2.5, "output": 10, "input_audio": 40, "output_audio": 80}
        },
        "default": {"input": 15, "output": 75}
    }"#;

    fn served(tier: Option<&str>, speed: Option<&str>, geo: Option<&str>) -> ServedAs {
        ServedAs { tier: tier.map(str::to_string), speed: speed.map(str::to_string), geo: geo.map(str::to_string) }
    }

    #[test]
    fn long_context_rates_start_one_token_past_the_threshold() {
        let t = table(RICH);
        // 200000 input: short rates. 200000*1.25 + 1000*10 µ$.
        assert_eq!(t.cost("gemini-2.5-pro", &usage(200_000, 0, 0, 1000)).micros, 260_000);
        // 200001: every token at long rates. 200001*2.5 + 1000*15 = 515002.5 µ$.
        let c = t.cost("gemini-2.5-pro", &usage(200_001, 0, 0, 1000));
        assert_eq!((c.pico, c.micros), (515_002_500_000, 515_003));
        // Cache reads count towards the threshold, and are priced long too.
        let c = t.cost("gemini-2.5-pro", &usage(150_000, 50_001, 0, 0));
        assert_eq!(c.pico, 150_000 * 2_500_000 + 50_001 * 250_000);
        // An estimate (input from the body size, as the reserve prices it) of
        // a long request is at long rates too.
        let estimate = Usage { input_uncached: 300_000, output: 4096, total: 304_096, ..Usage::default() };
        assert_eq!(t.cost("gpt-5.4", &estimate).micros, 300_000 * 5 + 4096 * 45 / 2);
    }

    #[test]
    fn one_hour_cache_writes_tool_fees_and_region() {
        let t = table(RICH);
        let u = Usage {
            cache_write_1h: 4000,
            web_search_requests: 2,
            web_fetch_requests: 1,
            ..usage(40, 20_000, 5600, 350)
        };
        // 40*3 + 20000*0.3 + (5600-4000)*3.75 (the write total beyond the split
        // is at 5-minute rates) + 4000*6 + 350*15 = 41370 µ$ of tokens, plus
        // 2 searches at $10 per 1000 = 20000 µ$.
        assert_eq!(t.cost("claude-sonnet-4-5", &u).micros, 41_370 + 20_000);
        // The same writes all at 5-minute rates would cost 9000 µ$ less.
        let all_5m = Usage { cache_write_1h: 0, ..u };
        assert_eq!(t.cost("claude-sonnet-4-5", &all_5m).micros, 41_370 - 4000 * 6 + 4000 * 15 / 4 + 20_000);
        // Served in the US: tokens x1.1, not the tool fees.
        let us = t.cost_as("claude-sonnet-4-5", &u, &served(None, None, Some("us")));
        assert_eq!(us.micros, 45_507 + 20_000);
        // Fast and batch compose: x6 x0.5.
        let fast_batch = t.cost_as("claude-sonnet-4-5", &u, &served(Some("batch"), Some("fast"), Some("global")));
        assert_eq!(fast_batch.micros, 41_370 * 3 + 20_000);
    }

    #[test]
    fn priority_flex_and_unknown_tiers() {
        let t = table(RICH);
        let u = usage(10_000, 0, 0, 1000);
        let cost = |tier: Option<&str>| t.cost_as("gpt-5.4", &u, &served(tier, None, None)).micros;
        assert_eq!(cost(None), 40_000);
        assert_eq!(cost(Some("standard")), 40_000);
        assert_eq!(cost(Some("priority")), 80_000);
        assert_eq!(cost(Some("flex")), 20_000);
        // A tier the table does not know is priced at the model's rates.
        assert_eq!(cost(Some("scale")), 40_000);
        // Long context: the multiplier applies to long rates; a tier with rates
        // of its own and no long_context keeps them.
        let long = usage(200_000, 100_000, 0, 2000);
        let cost = |tier: Option<&str>| t.cost_as("gpt-5.4", &long, &served(tier, None, None)).micros;
        assert_eq!(cost(None), 1_095_000);
        assert_eq!(cost(Some("flex")), 547_500);
        assert_eq!(cost(Some("priority")), 1_110_000);
        // Provisioned throughput has no marginal cost when configured so.
        let p = t.cost_as("gemini-2.5-pro", &usage(100, 0, 0, 20), &served(Some("provisioned"), None, None));
        assert_eq!(p.micros, 0);
    }

    #[test]
    fn audio_is_priced_apart() {
        let t = table(RICH);
        let u = Usage { input_audio: 300, output_audio: 600, ..usage(800, 500, 200, 800) };
        // 500*2.5 + 300*40 + 500*2.5 (cache read defaults to input) + 200*2.5
        // + 200*10 + 600*80.
        assert_eq!(t.cost("gpt-4o-audio", &u).micros, 1250 + 12_000 + 1250 + 500 + 2000 + 48_000);
        // Without audio rates, audio costs what text does.
        assert_eq!(t.cost("gpt-5.4", &u).micros, t.cost("gpt-5.4", &usage(800, 500, 200, 800)).micros);
    }

    #[test]
    fn tier_and_multiplier_errors() {
        let model = |m: &str| format!(r#"{{"models": {{"m": {m}}}, "default": {{"input": 1, "output": 1}}}}"#);
        let compile = |json: String| PricingConfig::from_json(json.as_bytes()).and_then(|c| c.compile());
        for tier in [
            r#"{"multiplier": 2, "input": 1, "output": 1}"#,
            r#"{}"#,
            r#"{"input": 1}"#,
            r#"{"multiplier": 2, "long_context": {"above_input_tokens": 1, "input": 1, "output": 1}}"#,
        ] {
            let json = model(&format!(r#"{{"input": 1, "output": 1, "service_tiers": {{"priority": {tier}}}}}"#));
            assert!(matches!(compile(json), Err(PricingError::TierShape { .. })), "{tier}");
        }
        for (field, bad) in [("speed", r#"{"fast": -1}"#), ("inference_geo", r#"{"us": 1e9}"#)] {
            let json = model(&format!(r#"{{"input": 1, "output": 1, "{field}": {bad}}}"#));
            assert!(matches!(compile(json), Err(PricingError::InvalidMultiplier { .. })), "{field}");
        }
        let json = model(r#"{"input": 1, "output": 1, "speed": {"": 2}}"#);
        assert!(matches!(compile(json), Err(PricingError::EmptyKey { field: "speed", .. })));
        let json =
            model(r#"{"input": 1, "output": 1, "long_context": {"above_input_tokens": 5, "input": 1e7, "output": 1}}"#);
        assert!(matches!(compile(json), Err(PricingError::InvalidPrice { field: "input", .. })));
        let json = model(r#"{"input": 1, "output": 1, "long_context": {"above": 5, "input": 1, "output": 1}}"#);
        assert!(matches!(compile(json), Err(PricingError::Parse(_))));
        let json = model(r#"{"input": 1, "output": 1, "web_search_per_1k": -10}"#);
        assert!(matches!(compile(json), Err(PricingError::InvalidPrice { field: "web_search_per_1k", .. })));
    }
}
