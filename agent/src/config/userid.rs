//! `[userid]`: the Palo Alto firewalls idgate tells who is behind each address (User-ID).

use std::{collections::BTreeSet, path::PathBuf, time::Duration};

use super::{
    FirewallConfig, TagConfig, UserIdConfig,
    parse::{absolute_path, duration, or_default},
    reader::{Diags, Table, Val},
};

/// Entries one request carries at most by default.
const DEFAULT_BATCH_SIZE: i64 = 500;
/// Largest batch: PAN-OS documents a few thousand entries per uid-message as the sweet spot.
const MAX_BATCH_SIZE: i64 = 5_000;
/// Updates waiting per firewall by default.
const DEFAULT_QUEUE_SIZE: i64 = 10_000;
const MAX_QUEUE_SIZE: i64 = 1_000_000;

pub(super) fn read_userid(mut t: Table<'_, '_>, d: &mut Diags<'_>) -> Option<UserIdConfig> {
    let firewalls = t
        .required(
            d,
            "firewalls",
            "[[userid.firewalls]] tables with `url`, `api_key_file` and `ca_file`",
        )
        .and_then(|v| read_firewalls(&v, d));
    let register_tags = or_default(t.get("register_tags"), None, |v| read_tags(&v, d));
    let batch_size = or_default(t.get("batch_size"), DEFAULT_BATCH_SIZE, |v| {
        v.int(d, 1, MAX_BATCH_SIZE)
    });
    let queue_size = or_default(t.get("queue_size"), DEFAULT_QUEUE_SIZE, |v| {
        v.int(d, 1, MAX_QUEUE_SIZE)
    });
    let flush_interval = or_default(t.get("flush_interval"), Duration::from_secs(1), |v| {
        duration(&v, d, Duration::ZERO, Duration::from_secs(60))
    });
    let request_timeout = or_default(t.get("request_timeout"), Duration::from_secs(10), |v| {
        duration(&v, d, Duration::from_secs(1), Duration::from_secs(300))
    });
    let max_backoff = or_default(t.get("max_backoff"), Duration::from_secs(60), |v| {
        duration(&v, d, Duration::from_secs(1), Duration::from_secs(3600))
    });
    t.finish(d);
    Some(UserIdConfig {
        firewalls: firewalls?,
        register_tags: register_tags?,
        batch_size: usize::try_from(batch_size?).ok()?,
        queue_size: usize::try_from(queue_size?).ok()?,
        flush_interval: flush_interval?,
        request_timeout: request_timeout?,
        max_backoff: max_backoff?,
    })
}

/// `register_tags = true` (the groups as tags), `false`, or a prefix (`"idgate-"`).
fn read_tags(v: &Val<'_, '_>, d: &mut Diags<'_>) -> Option<Option<TagConfig>> {
    let mut probe = Diags::new("");
    if let Some(b) = v.bool(&mut probe) {
        return Some(b.then(|| TagConfig {
            prefix: String::new(),
        }));
    }
    let mut probe = Diags::new("");
    let Some(prefix) = v.str(&mut probe) else {
        v.error(
            d,
            "expected true, false or a tag prefix such as \"idgate-\"",
        );
        return None;
    };
    if prefix.is_empty() || prefix.len() > 63 || prefix.chars().any(char::is_control) {
        v.error(
            d,
            format!("expected a tag prefix of 1 to 63 printable characters, found {prefix:?}"),
        );
        return None;
    }
    Some(Some(TagConfig {
        prefix: prefix.to_owned(),
    }))
}

fn read_firewalls(v: &Val<'_, '_>, d: &mut Diags<'_>) -> Option<Vec<FirewallConfig>> {
    let items = v.array(d)?;
    if items.is_empty() {
        v.error(
            d,
            "expected at least one [[userid.firewalls]] entry (leave [userid] out to send nothing)",
        );
        return None;
    }
    let mut out = Vec::new();
    let mut ok = true;
    let mut seen = BTreeSet::new();
    for item in items {
        match item.table(d).and_then(|t| read_firewall(t, d, &mut seen)) {
            Some(f) => out.push(f),
            None => ok = false,
        }
    }
    ok.then_some(out)
}

fn read_firewall(
    mut t: Table<'_, '_>,
    d: &mut Diags<'_>,
    seen: &mut BTreeSet<String>,
) -> Option<FirewallConfig> {
    let url = t
        .required(
            d,
            "url",
            "the firewall's management URL, such as \"https://fw1.example.com\"",
        )
        .and_then(|v| {
            let s = v.str(d)?;
            let url = check_url(&v, s, d)?;
            if !seen.insert(url.clone()) {
                v.error(d, format!("firewall {s:?} is configured twice"));
                return None;
            }
            Some(url)
        });
    let api_key_file = t
        .required(
            d,
            "api_key_file",
            "an absolute path to a file holding the firewall's API key",
        )
        .and_then(|v| absolute_path(&v, d));
    let ca_file: Option<Option<PathBuf>> =
        or_default(t.get("ca_file"), None, |v| absolute_path(&v, d).map(Some));
    let vsys = or_default(t.get("vsys"), None, |v| {
        let s = v.str(d)?;
        let valid = s.len() > 4
            && s.len() <= 8
            && s.starts_with("vsys")
            && s[4..].chars().all(|c| c.is_ascii_digit());
        if !valid {
            v.error(
                d,
                format!("expected a virtual system such as \"vsys1\", found {s:?}"),
            );
            return None;
        }
        Some(Some(s.to_owned()))
    });
    t.finish(d);
    Some(FirewallConfig {
        url: url?,
        api_key_file: api_key_file?,
        ca_file: ca_file?,
        vsys: vsys?,
    })
}

/// An `https://host[:port]` URL, without path, query or credentials; returned normalised
/// (`https://host:port`, no trailing slash).
fn check_url(v: &Val<'_, '_>, s: &str, d: &mut Diags<'_>) -> Option<String> {
    let url = match url::Url::parse(s) {
        Ok(u) => u,
        Err(e) => {
            v.error(
                d,
                format!("expected a URL such as \"https://fw1.example.com\", found {s:?} ({e})"),
            );
            return None;
        }
    };
    if url.scheme() != "https" {
        v.error(
            d,
            format!(
                "expected an https:// URL, found scheme {:?}: the API key travels with every \
                 request",
                url.scheme()
            ),
        );
        return None;
    }
    if url.query().is_some()
        || url.fragment().is_some()
        || !url.username().is_empty()
        || url.password().is_some()
        || !matches!(url.path(), "" | "/")
        || url.host().is_none()
    {
        v.error(
            d,
            "expected the firewall's address only (https://host or https://host:port): no \
             path, query or credentials; requests go to /api/ and the key is read from \
             api_key_file",
        );
        return None;
    }
    Some(url.as_str().trim_end_matches('/').to_owned())
}
