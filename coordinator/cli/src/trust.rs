//! `zy ca` and `zy apitoken`: the site's certificates, and the tokens the API is driven with.

use std::time::Duration;

use clap::Subcommand;
use hyper::Method;
use zy_api::*;

use crate::client::Client;
use crate::{path_segment, print, table, CliError, JsonFlag};

#[derive(Debug, Subcommand)]
pub enum CaCmd {
    /// The site CA, the coordinator's server certificate, and how long certificates last.
    Show(JsonFlag),
}

#[derive(Debug, Subcommand)]
pub enum ApiTokenCmd {
    /// Create a named API token; its secret is printed this once.
    Create {
        /// 1 to 63 of a-z 0-9 -, unique among the tokens not revoked.
        name: String,
        /// Lifetime (1m to 3650d), e.g. 90d; without it the token lasts until revoked.
        #[arg(long, value_parser = parse_expiry)]
        expires: Option<Duration>,
        #[command(flatten)]
        json: JsonFlag,
    },
    /// List API tokens (never their secrets), with status and last use.
    Ls(JsonFlag),
    /// Revoke an API token: every request with it is refused from now on.
    Revoke {
        /// Its name or id.
        token: String,
        /// Also when it is the token this command uses.
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        json: JsonFlag,
    },
}

fn parse_expiry(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| format!("{e} (try 30d or 90d)"))?;
    if !API_TOKEN_TTL_SECS.contains(&d.as_secs()) {
        return Err("an API token lives between 1m and 3650d".into());
    }
    Ok(d)
}

pub async fn ca(c: &Client, cmd: CaCmd) -> Result<(), CliError> {
    match cmd {
        CaCmd::Show(j) => {
            let v: CaView = c.call(Method::GET, "/v1/ca", None).await?;
            print(j.json, &v, || {
                let cert = |title: &str, c: &CertView| {
                    format!(
                        "{title}\n  subject:     {}\n  serial:      {}\n  fingerprint: {}\n{}  valid:       {} to {} ({} days left)\n",
                        c.subject,
                        c.serial,
                        c.fingerprint,
                        match c.sans.is_empty() {
                            true => String::new(),
                            false => format!("  names:       {}\n", c.sans.join(", ")),
                        },
                        c.not_before,
                        c.not_after,
                        c.days_left
                    )
                };
                let days = |s: u64| humantime::format_duration(Duration::from_secs(s)).to_string();
                format!(
                    "{}{}  renewed at:  {}\n\nnode certificates last {}, the server's {}; each is renewed when a third is left\n",
                    cert("site CA", &v.ca),
                    cert("server certificate", &v.server),
                    v.server_renews_at,
                    days(v.node_validity_secs),
                    days(v.server_validity_secs)
                )
            })
        }
    }
}

pub async fn apitoken(c: &Client, cmd: ApiTokenCmd) -> Result<(), CliError> {
    match cmd {
        ApiTokenCmd::Create {
            name,
            expires,
            json,
        } => {
            let body =
                serde_json::json!({"name": name, "expires_in_secs": expires.map(|d| d.as_secs())});
            let t: CreatedApiToken = c.call(Method::POST, "/v1/apitokens", Some(body)).await?;
            print(json.json, &t, || {
                format!(
                    "{}\n\nAPI token `{}` ({}), {}. This is the only time it is shown: put it in a zy.toml (token = \"...\") or ZY_TOKEN.\n",
                    t.token,
                    t.name,
                    t.id,
                    t.expires_at
                        .as_deref()
                        .map(|e| format!("valid until {e}"))
                        .unwrap_or("valid until revoked".into())
                )
            })
        }
        ApiTokenCmd::Ls(j) => {
            let ts: Vec<ApiTokenView> = c.call(Method::GET, "/v1/apitokens", None).await?;
            print(j.json, &ts, || apitoken_table(&ts))
        }
        ApiTokenCmd::Revoke { token, force, json } => {
            let path = format!(
                "/v1/apitokens/{}{}",
                path_segment(&token)?,
                if force { "?force=true" } else { "" }
            );
            let t: ApiTokenView = c.call(Method::DELETE, &path, None).await?;
            print(json.json, &t, || {
                format!("API token {} ({}) is {}\n", t.name, t.id, t.status)
            })
        }
    }
}

fn apitoken_table(ts: &[ApiTokenView]) -> String {
    let dash = |s: &Option<String>| s.clone().unwrap_or("-".into());
    let rows: Vec<Vec<String>> = ts
        .iter()
        .map(|t| {
            vec![
                format!("{}{}", t.name, if t.current { " *" } else { "" }),
                t.id.clone(),
                t.status.clone(),
                t.created_at.clone(),
                t.expires_at.clone().unwrap_or("never".into()),
                dash(&t.last_used_at),
            ]
        })
        .collect();
    table(
        &["NAME", "ID", "STATUS", "CREATED", "EXPIRES", "LAST-USED"],
        &rows,
    ) + "(* the token this command used)\n"
}
