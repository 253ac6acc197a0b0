//! The User-ID API's `uid-message` documents, and the firewall's answers.
//!
//! The layout is the one `pan-os-python`'s `panos.userid` builds (version `1.0`, type `update`,
//! one `<login>`, `<logout>`, `<register-user>` and `<unregister-user>` section each); a test
//! holds the two to the same structure.

use std::{fmt::Write as _, net::IpAddr};

/// The uid-message version, as `panos.userid` sends it.
pub const VERSION: &str = "1.0";

/// One update for a firewall.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// Maps `ip` to `user` for `timeout_min` minutes (never 0: that would mean forever).
    Login {
        /// The user.
        user: String,
        /// The address.
        ip: IpAddr,
        /// Minutes until the firewall drops the mapping by itself.
        timeout_min: u32,
    },
    /// Removes the mapping of `ip` to `user`.
    Logout {
        /// The user.
        user: String,
        /// The address.
        ip: IpAddr,
    },
    /// Registers tags on `user` for `timeout_s` seconds.
    Tag {
        /// The user.
        user: String,
        /// The tags.
        tags: Vec<String>,
        /// Seconds until the firewall drops the tags by itself.
        timeout_s: u64,
    },
    /// Unregisters tags from `user`.
    Untag {
        /// The user.
        user: String,
        /// The tags.
        tags: Vec<String>,
    },
}

/// Text or attribute value escaped for XML 1.0. Characters XML cannot carry at all (most
/// controls) become U+FFFD; tab, newline and carriage return are written as references so that
/// attribute normalisation keeps them.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            '\t' => out.push_str("&#9;"),
            '\n' => out.push_str("&#10;"),
            '\r' => out.push_str("&#13;"),
            c if (c as u32) < 0x20 || matches!(c, '\u{FFFE}' | '\u{FFFF}') => out.push('\u{FFFD}'),
            c => out.push(c),
        }
    }
    out
}

/// The `uid-message` carrying `ops`, sections in the order login, logout, register-user,
/// unregister-user (the firewall applies login before logout; callers never put the same
/// address in both).
pub fn uid_message(ops: &[Op]) -> String {
    let mut login = String::new();
    let mut logout = String::new();
    let mut register = String::new();
    let mut unregister = String::new();
    for op in ops {
        match op {
            Op::Login {
                user,
                ip,
                timeout_min,
            } => {
                let _ = write!(
                    login,
                    "<entry name=\"{}\" ip=\"{ip}\" timeout=\"{timeout_min}\"/>",
                    escape(user)
                );
            }
            Op::Logout { user, ip } => {
                let _ = write!(logout, "<entry name=\"{}\" ip=\"{ip}\"/>", escape(user));
            }
            Op::Tag {
                user,
                tags,
                timeout_s,
            } => {
                let _ = write!(register, "<entry user=\"{}\"><tag>", escape(user));
                for t in tags {
                    let _ = write!(
                        register,
                        "<member timeout=\"{timeout_s}\">{}</member>",
                        escape(t)
                    );
                }
                register.push_str("</tag></entry>");
            }
            Op::Untag { user, tags } => {
                let _ = write!(unregister, "<entry user=\"{}\"><tag>", escape(user));
                for t in tags {
                    let _ = write!(unregister, "<member>{}</member>", escape(t));
                }
                unregister.push_str("</tag></entry>");
            }
        }
    }
    let mut out = format!("<uid-message><version>{VERSION}</version><type>update</type><payload>");
    for (name, body) in [
        ("login", login),
        ("logout", logout),
        ("register-user", register),
        ("unregister-user", unregister),
    ] {
        if !body.is_empty() {
            let _ = write!(out, "<{name}>{body}</{name}>");
        }
    }
    out.push_str("</payload></uid-message>");
    out
}

/// Reads the firewall's answer: `Ok` for `<response status="success">`, and for the errors
/// PAN-OS raises when a tag is registered twice or unregistered when absent (harmless, and
/// ignored by `panos.userid` too); otherwise the status and message.
pub fn check_response(body: &str) -> Result<(), String> {
    let doc = roxmltree::Document::parse(body)
        .map_err(|e| format!("not a PAN-OS API response ({e}): {}", excerpt(body)))?;
    let root = doc.root_element();
    if root.tag_name().name() != "response" {
        return Err(format!("not a PAN-OS API response: {}", excerpt(body)));
    }
    let status = root.attribute("status").unwrap_or_default();
    if status == "success" {
        return Ok(());
    }
    let message = root
        .descendants()
        .filter(|n| n.is_text())
        .filter_map(|n| n.text())
        .flat_map(str::split_whitespace)
        .collect::<Vec<_>>()
        .join(" ");
    if message.ends_with("already exists, ignore")
        || message.ends_with("does not exist, ignore unreg")
    {
        return Ok(());
    }
    Err(format!("status {status:?}: {}", excerpt(&message)))
}

/// At most 200 characters of `s`, for logs.
fn excerpt(s: &str) -> String {
    let s = s.trim();
    match s.char_indices().nth(200) {
        Some((i, _)) => format!("{}...", &s[..i]),
        None => s.to_owned(),
    }
}
