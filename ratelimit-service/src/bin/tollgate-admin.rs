//! `tollgate-admin`: how does an operator drive the registry's admin API from
//! a shell? One subcommand per endpoint; JSON answers on stdout, errors on
//! stderr with a non-zero exit (1: the API refused, 2: usage, 3: unreachable).
//! The token and provider secrets never come from the command line.

use std::io::{Read as _, Write as _};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use rls_contract::registry::{valid_key_digest, valid_provider, valid_tenant_id};
use serde_json::{json, Map, Value};

/// Manage tollgate tenants, client keys and provider credentials.
#[derive(Debug, Parser)]
#[command(name = "tollgate-admin", version)]
struct Cli {
    /// Base URL of the admin API, e.g. http://127.0.0.1:8084.
    #[arg(long, env = "TOLLGATE_ADMIN_URL")]
    url: String,
    /// File holding the admin bearer token (else the env var TOLLGATE_ADMIN_TOKEN).
    #[arg(long, env = "TOLLGATE_ADMIN_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Tenants.
    #[command(subcommand)]
    Tenant(TenantCmd),
    /// Client API keys.
    #[command(subcommand)]
    Key(KeyCmd),
    /// Provider credentials (sealed at rest).
    #[command(subcommand)]
    Credential(CredentialCmd),
    /// Usage from the ledger (one tenant, or every tenant).
    Usage {
        /// First day, YYYY-MM-DD (the tenant's billing days).
        #[arg(long)]
        from: String,
        /// Last day, inclusive.
        #[arg(long)]
        to: String,
        #[arg(long)]
        tenant: Option<String>,
        /// Only this API key id.
        #[arg(long)]
        key: Option<String>,
        /// Only this end user.
        #[arg(long)]
        user: Option<String>,
        /// Only this model.
        #[arg(long)]
        model: Option<String>,
        /// Comma-separated subset of day, model, key, user (default day,model,key).
        #[arg(long)]
        group_by: Option<String>,
        /// Print CSV instead of JSON.
        #[arg(long)]
        csv: bool,
        /// RLS domain (default tollgate).
        #[arg(long)]
        domain: Option<String>,
    },
    /// Every limit the service has decided for a tenant, with what is left.
    Quota {
        tenant: String,
        /// RLS domain (default tollgate).
        #[arg(long)]
        domain: Option<String>,
    },
    /// The alert webhook delivery log, newest first.
    Deliveries {
        #[arg(long)]
        limit: Option<u32>,
        /// `next` of the previous page.
        #[arg(long)]
        before: Option<String>,
    },
    /// The audit trail, newest first.
    Audit {
        #[arg(long)]
        limit: Option<u32>,
        /// `next` of the previous page.
        #[arg(long)]
        before: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
enum TenantCmd {
    Create {
        id: String,
        #[arg(long)]
        tier: String,
        #[arg(long)]
        disabled: bool,
        /// Tier fields this tenant overrides, as JSON.
        #[arg(long)]
        overrides: Option<String>,
        /// `key=value`, repeatable.
        #[arg(long = "label")]
        labels: Vec<String>,
    },
    Get {
        id: String,
    },
    List {
        #[arg(long)]
        limit: Option<u32>,
        #[arg(long)]
        cursor: Option<String>,
    },
    Update {
        id: String,
        #[arg(long)]
        tier: Option<String>,
        /// JSON, or `null` to clear.
        #[arg(long)]
        overrides: Option<String>,
        /// Replaces all labels; `key=value`, repeatable.
        #[arg(long = "label")]
        labels: Option<Vec<String>>,
    },
    Disable {
        id: String,
    },
    Enable {
        id: String,
    },
    /// Delete the tenant with its keys and credentials.
    Delete {
        id: String,
    },
}

#[derive(Debug, Args)]
struct KeyFields {
    #[arg(long)]
    label: String,
    /// Unix seconds.
    #[arg(long)]
    expires_at: Option<u64>,
    /// Comma-separated model names this key may call.
    #[arg(long, value_delimiter = ',')]
    models: Option<Vec<String>>,
    /// The key's name within its tenant (needed with --limits or --shadow).
    #[arg(long)]
    name: Option<String>,
    /// The key's own limits, as JSON: `{"usd_per_day": 5, "requests_per_minute": 30}`.
    #[arg(long)]
    limits: Option<String>,
    /// Evaluate the key's limits without refusing.
    #[arg(long)]
    shadow: bool,
}

#[derive(Debug, Subcommand)]
enum KeyCmd {
    /// Issue a new key; the answer shows it once.
    Issue {
        tenant: String,
        #[command(flatten)]
        fields: KeyFields,
    },
    /// Register an existing key by its SHA-256 digest.
    Import {
        tenant: String,
        #[arg(long)]
        sha256: String,
        #[command(flatten)]
        fields: KeyFields,
    },
    List {
        tenant: String,
        #[arg(long)]
        limit: Option<u32>,
        #[arg(long)]
        cursor: Option<String>,
    },
    Get {
        sha256: String,
    },
    Revoke {
        sha256: String,
    },
    Delete {
        sha256: String,
    },
}

#[derive(Debug, Args)]
#[group(required = true, multiple = false)]
struct SecretSource {
    /// Read the secret from this environment variable.
    #[arg(long)]
    from_env: Option<String>,
    /// Read the secret from this file (trailing newline dropped).
    #[arg(long)]
    from_file: Option<PathBuf>,
    /// Read the secret from standard input (trailing newline dropped).
    #[arg(long)]
    from_stdin: bool,
}

#[derive(Debug, Subcommand)]
enum CredentialCmd {
    /// Set or rotate the tenant's credential for a provider.
    Set {
        tenant: String,
        provider: String,
        #[command(flatten)]
        source: SecretSource,
    },
    Delete {
        tenant: String,
        provider: String,
    },
}

/// Why the command failed, and its exit code.
enum Failure {
    Usage(String),
    Refused(String),
    Unreachable(String),
}

type Outcome = Result<Option<Value>, Failure>;

fn tenant(id: &str) -> Result<&str, Failure> {
    if valid_tenant_id(id) {
        Ok(id)
    } else {
        Err(Failure::Usage(format!("invalid tenant id {id:?}")))
    }
}

fn digest(d: &str) -> Result<&str, Failure> {
    if valid_key_digest(d) {
        Ok(d)
    } else {
        Err(Failure::Usage("a key digest is 64 lowercase hex characters".into()))
    }
}

fn json_arg(what: &str, text: &str) -> Result<Value, Failure> {
    serde_json::from_str(text).map_err(|e| Failure::Usage(format!("{what} is not JSON: {e}")))
}

fn labels(items: &[String]) -> Result<Value, Failure> {
    let mut map = Map::new();
    for item in items {
        let (k, v) =
            item.split_once('=').ok_or_else(|| Failure::Usage(format!("label {item:?}: expected key=value")))?;
        map.insert(k.to_owned(), json!(v));
    }
    Ok(Value::Object(map))
}

fn page(path: &str, limit: Option<u32>, cursor: Option<&str>, cursor_name: &str) -> String {
    let mut q = vec![];
    if let Some(l) = limit {
        q.push(format!("limit={l}"));
    }
    if let Some(c) = cursor {
        // Cursors are ids, digests or stream ids: URL-safe.
        q.push(format!("{cursor_name}={c}"));
    }
    if q.is_empty() {
        path.to_owned()
    } else {
        format!("{path}?{}", q.join("&"))
    }
}

fn key_body(fields: &KeyFields, sha256: Option<&str>) -> Result<Value, Failure> {
    let mut body = json!({"label": fields.label});
    if let Some(obj) = body.as_object_mut() {
        if let Some(s) = sha256 {
            obj.insert("sha256".into(), json!(s));
        }
        if let Some(e) = fields.expires_at {
            obj.insert("expires_at".into(), json!(e));
        }
        if let Some(m) = &fields.models {
            obj.insert("models".into(), json!(m));
        }
        if let Some(n) = &fields.name {
            obj.insert("name".into(), json!(n));
        }
        if let Some(l) = &fields.limits {
            let v: Value = serde_json::from_str(l).map_err(|e| Failure::Usage(format!("--limits is not JSON: {e}")))?;
            obj.insert("limits".into(), v);
        }
        if fields.shadow {
            obj.insert("shadow".into(), json!(true));
        }
    }
    Ok(body)
}

fn read_secret(source: &SecretSource) -> Result<String, Failure> {
    let raw = if let Some(var) = &source.from_env {
        std::env::var(var).map_err(|_| Failure::Usage(format!("environment variable {var} is not set")))?
    } else if let Some(path) = &source.from_file {
        std::fs::read_to_string(path).map_err(|e| Failure::Usage(format!("cannot read {}: {e}", path.display())))?
    } else {
        let mut s = String::new();
        std::io::stdin().read_to_string(&mut s).map_err(|e| Failure::Usage(format!("cannot read stdin: {e}")))?;
        s
    };
    let secret = raw.trim_end_matches(['\r', '\n']).to_owned();
    if secret.is_empty() {
        return Err(Failure::Usage("the secret is empty".into()));
    }
    Ok(secret)
}

struct Client {
    agent: ureq::Agent,
    base: String,
    token: String,
}

impl Client {
    fn call(&self, method: &str, path: &str, body: Option<Value>) -> Outcome {
        let url = format!("{}{path}", self.base);
        let auth = format!("Bearer {}", self.token);
        let a = &self.agent;
        let result = match (method, body) {
            ("GET", _) => a.get(&url).header("authorization", &auth).call(),
            ("DELETE", _) => a.delete(&url).header("authorization", &auth).call(),
            ("POST", None) => a.post(&url).header("authorization", &auth).send_empty(),
            ("POST", Some(b)) => a.post(&url).header("authorization", &auth).send_json(b),
            ("PUT", b) => a.put(&url).header("authorization", &auth).send_json(b.unwrap_or(Value::Null)),
            (_, b) => a.patch(&url).header("authorization", &auth).send_json(b.unwrap_or(Value::Null)),
        };
        let mut resp = result.map_err(|e| Failure::Unreachable(format!("{method} {url}: {e}")))?;
        let status = resp.status();
        let text = resp.body_mut().read_to_string().unwrap_or_default();
        if !status.is_success() {
            let detail = serde_json::from_str::<Value>(&text)
                .ok()
                .and_then(|v| v.get("error").cloned())
                .map_or_else(|| text.clone(), |e| e.to_string());
            return Err(Failure::Refused(format!("{method} {path}: {status}: {detail}")));
        }
        if text.is_empty() {
            return Ok(None);
        }
        if !resp
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .starts_with("application/json")
        {
            return Ok(Some(Value::String(text)));
        }
        serde_json::from_str(&text).map(Some).map_err(|e| Failure::Refused(format!("unreadable answer: {e}")))
    }
}

fn run(cli: Cli) -> Outcome {
    let token = match &cli.token_file {
        Some(p) => {
            std::fs::read_to_string(p).map_err(|e| Failure::Usage(format!("cannot read {}: {e}", p.display())))?
        }
        None => std::env::var("TOLLGATE_ADMIN_TOKEN")
            .map_err(|_| Failure::Usage("no token: --token-file or TOLLGATE_ADMIN_TOKEN".into()))?,
    };
    let config =
        ureq::Agent::config_builder().http_status_as_error(false).timeout_global(Some(Duration::from_secs(30))).build();
    let c = Client {
        agent: ureq::Agent::new_with_config(config),
        base: cli.url.trim_end_matches('/').to_owned(),
        token: token.trim().to_owned(),
    };
    match cli.command {
        Command::Tenant(cmd) => match cmd {
            TenantCmd::Create { id, tier, disabled, overrides, labels: l } => {
                let mut body = json!({"id": tenant(&id)?, "tier": tier, "enabled": !disabled, "labels": labels(&l)?});
                if let (Some(o), Some(obj)) = (overrides, body.as_object_mut()) {
                    obj.insert("overrides".into(), json_arg("--overrides", &o)?);
                }
                c.call("POST", "/v1/tenants", Some(body))
            }
            TenantCmd::Get { id } => c.call("GET", &format!("/v1/tenants/{}", tenant(&id)?), None),
            TenantCmd::List { limit, cursor } => {
                c.call("GET", &page("/v1/tenants", limit, cursor.as_deref(), "cursor"), None)
            }
            TenantCmd::Update { id, tier, overrides, labels: l } => {
                let mut body = Map::new();
                if let Some(t) = tier {
                    body.insert("tier".into(), json!(t));
                }
                if let Some(o) = overrides {
                    body.insert("overrides".into(), json_arg("--overrides", &o)?);
                }
                if let Some(l) = l {
                    body.insert("labels".into(), labels(&l)?);
                }
                c.call("PATCH", &format!("/v1/tenants/{}", tenant(&id)?), Some(Value::Object(body)))
            }
            TenantCmd::Disable { id } => {
                c.call("PATCH", &format!("/v1/tenants/{}", tenant(&id)?), Some(json!({"enabled": false})))
            }
            TenantCmd::Enable { id } => {
                c.call("PATCH", &format!("/v1/tenants/{}", tenant(&id)?), Some(json!({"enabled": true})))
            }
            TenantCmd::Delete { id } => c.call("DELETE", &format!("/v1/tenants/{}", tenant(&id)?), None),
        },
        Command::Key(cmd) => match cmd {
            KeyCmd::Issue { tenant: t, fields } => {
                c.call("POST", &format!("/v1/tenants/{}/keys", tenant(&t)?), Some(key_body(&fields, None)?))
            }
            KeyCmd::Import { tenant: t, sha256, fields } => c.call(
                "POST",
                &format!("/v1/tenants/{}/keys/import", tenant(&t)?),
                Some(key_body(&fields, Some(digest(&sha256)?))?),
            ),
            KeyCmd::List { tenant: t, limit, cursor } => c.call(
                "GET",
                &page(&format!("/v1/tenants/{}/keys", tenant(&t)?), limit, cursor.as_deref(), "cursor"),
                None,
            ),
            KeyCmd::Get { sha256 } => c.call("GET", &format!("/v1/keys/{}", digest(&sha256)?), None),
            KeyCmd::Revoke { sha256 } => c.call("POST", &format!("/v1/keys/{}/revoke", digest(&sha256)?), None),
            KeyCmd::Delete { sha256 } => c.call("DELETE", &format!("/v1/keys/{}", digest(&sha256)?), None),
        },
        Command::Credential(cmd) => match cmd {
            CredentialCmd::Set { tenant: t, provider, source } => {
                if !valid_provider(&provider) {
                    return Err(Failure::Usage(format!("invalid provider {provider:?}")));
                }
                let secret = read_secret(&source)?;
                c.call(
                    "PUT",
                    &format!("/v1/tenants/{}/credentials/{provider}", tenant(&t)?),
                    Some(json!({ "secret": secret })),
                )
            }
            CredentialCmd::Delete { tenant: t, provider } => {
                if !valid_provider(&provider) {
                    return Err(Failure::Usage(format!("invalid provider {provider:?}")));
                }
                c.call("DELETE", &format!("/v1/tenants/{}/credentials/{provider}", tenant(&t)?), None)
            }
        },
        Command::Usage { from, to, tenant: t, key, user, model, group_by, csv, domain } => {
            let mut q: Vec<(&str, String)> = vec![("from", from), ("to", to)];
            if let Some(t) = t {
                q.push(("tenant", tenant(&t)?.to_owned()));
            }
            for (name, v) in
                [("key", key), ("user", user), ("model", model), ("group_by", group_by), ("domain", domain)]
            {
                if let Some(v) = v {
                    q.push((name, v));
                }
            }
            if csv {
                q.push(("format", "csv".into()));
            }
            let query = serde_urlencoded::to_string(&q).map_err(|e| Failure::Usage(e.to_string()))?;
            c.call("GET", &format!("/v1/usage?{query}"), None)
        }
        Command::Quota { tenant: t, domain } => {
            let mut path = format!("/v1/tenants/{}/quota", tenant(&t)?);
            if let Some(d) = domain {
                let q = serde_urlencoded::to_string([("domain", d)]).map_err(|e| Failure::Usage(e.to_string()))?;
                path = format!("{path}?{q}");
            }
            c.call("GET", &path, None)
        }
        Command::Deliveries { limit, before } => {
            c.call("GET", &page("/v1/alerts/deliveries", limit, before.as_deref(), "before"), None)
        }
        Command::Audit { limit, before } => c.call("GET", &page("/v1/audit", limit, before.as_deref(), "before"), None),
    }
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(Some(Value::String(text))) => {
            let _ = write!(std::io::stdout().lock(), "{text}");
            ExitCode::SUCCESS
        }
        Ok(Some(v)) => {
            // A closed pipe (`| head`) is not an error worth a panic.
            let _ = writeln!(std::io::stdout().lock(), "{}", serde_json::to_string_pretty(&v).unwrap_or_default());
            ExitCode::SUCCESS
        }
        Ok(None) => ExitCode::SUCCESS,
        Err(Failure::Refused(m)) => {
            eprintln!("tollgate-admin: {m}");
            ExitCode::from(1)
        }
        Err(Failure::Usage(m)) => {
            eprintln!("tollgate-admin: {m}");
            ExitCode::from(2)
        }
        Err(Failure::Unreachable(m)) => {
            eprintln!("tollgate-admin: {m}");
            ExitCode::from(3)
        }
    }
}
