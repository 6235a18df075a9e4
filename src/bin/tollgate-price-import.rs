//! How do I get a pricing section from a published price catalogue?
//!
//! `tollgate-price-import`: converts LiteLLM's
//! `model_prices_and_context_window.json` or models.dev's `api.json` into
//! tollgate's `pricing` section, and says what it could not map.
//!
//! ```text
//! tollgate-price-import (--litellm | --models-dev) FILE [--provider NAME]...
//! ```
//!
//! The section (JSON) goes to stdout; what was skipped or left unmapped goes
//! to stderr. Exit status: 0 when models were imported, 1 when none could
//! be, 2 on usage or read errors. The mapping is in
//! `tollgate::metering::catalogue`.

use std::process::ExitCode;

use tollgate::metering::catalogue::{from_litellm, from_models_dev};

const USAGE: &str = "usage: tollgate-price-import (--litellm | --models-dev) FILE [--provider NAME]...

Converts a price catalogue into tollgate's pricing section (stdout) and
reports what it could not map (stderr).

  --litellm      LiteLLM's model_prices_and_context_window.json
  --models-dev   models.dev's api.json
  --provider     keep only this provider (LiteLLM litellm_provider, or a
                 models.dev provider key); repeatable";

enum Format {
    LiteLlm,
    ModelsDev,
}

fn main() -> ExitCode {
    let mut format = None;
    let mut file = None;
    let mut providers = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--litellm" => format = Some(Format::LiteLlm),
            "--models-dev" => format = Some(Format::ModelsDev),
            "--provider" => match args.next() {
                Some(p) => providers.push(p),
                None => return usage("--provider needs a name"),
            },
            "-h" | "--help" => {
                println!("{USAGE}");
                return ExitCode::SUCCESS;
            }
            other if other.starts_with('-') => return usage(&format!("unknown option {other}")),
            path if file.is_none() => file = Some(path.to_string()),
            _ => return usage("one FILE only"),
        }
    }
    let (Some(format), Some(file)) = (format, file) else {
        return usage("a format and a FILE are required");
    };
    let doc = match std::fs::read(&file)
        .map_err(|e| e.to_string())
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).map_err(|e| e.to_string()))
    {
        Ok(doc) => doc,
        Err(e) => {
            eprintln!("tollgate-price-import: {file}: {e}");
            return ExitCode::from(2);
        }
    };
    let import = match format {
        Format::LiteLlm => from_litellm(&doc, &providers),
        Format::ModelsDev => from_models_dev(&doc, &providers),
    };
    let import = match import {
        Ok(i) => i,
        Err(e) => {
            eprintln!("tollgate-price-import: {file}: {e}");
            return ExitCode::from(1);
        }
    };
    match serde_json::to_string_pretty(&import.pricing) {
        Ok(text) => println!("{text}"),
        Err(e) => {
            eprintln!("tollgate-price-import: {e}");
            return ExitCode::from(2);
        }
    }
    let models = import.pricing.get("models").and_then(|m| m.as_object()).map_or(0, |m| m.len());
    eprintln!("imported {models} models; skipped {}", import.skipped.len());
    for (model, why) in &import.skipped {
        eprintln!("  skipped {model}: {why}");
    }
    for (field, n) in &import.unmapped {
        eprintln!("  not mapped: {field} (on {n} imported models)");
    }
    let default = import.pricing.get("default").cloned().unwrap_or_default();
    eprintln!("default (models not listed): the dearest rate of each kind imported: {default}");
    ExitCode::SUCCESS
}

fn usage(problem: &str) -> ExitCode {
    eprintln!("tollgate-price-import: {problem}\n\n{USAGE}");
    ExitCode::from(2)
}
