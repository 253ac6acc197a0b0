//! The owners of pinned sessions, kept across restarts.
//!
//! The kernel's sessions map is pinned, so sessions outlive the agent; the map only knows each
//! session by source, service and identity id. This journal keeps what the session table knows
//! about each source (who logged in, with which token claims, under which rules), so that a
//! restarted agent can adopt the surviving sessions: name them (whois, `sessions list`), revoke
//! them, audit their end, and re-evaluate them against the policy it starts with.
//!
//! It is an append-only file of JSON lines, one `put` (the whole record of a source) or `del`
//! per change, rewritten compactly (to a temporary file, then renamed over) at start and when it
//! has grown to several times what it holds. Appends are single `write(2)` calls without fsync:
//! the file only has to survive the agent, not the machine (the pins do not survive a reboot
//! either), and a line torn by a crash is skipped on reading. The file is mode 0600: it holds
//! the identities and token claims of everyone logged in.
//!
//! A journal is advisory, never authoritative: what the kernel holds decides which sessions
//! exist; a record only names them. A session the journal does not name is removed at start.

use std::{
    collections::HashMap,
    fs::{self, File, OpenOptions},
    io::{self, BufRead as _, BufReader, Write as _},
    net::IpAddr,
    os::unix::fs::OpenOptionsExt as _,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use serde::{Deserialize, Serialize};

use super::table::SourceRecord;
use crate::policy::Identity;

/// The journal's format version, written in every line.
pub const JOURNAL_VERSION: u32 = 1;

/// Below this size the journal is never rewritten.
const COMPACT_MIN_BYTES: u64 = 1 << 20;
/// Rewritten once it holds this many times the bytes of its live records.
const COMPACT_RATIO: u64 = 4;

/// One source's record, as the journal keeps it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OwnerRecord {
    /// The source address.
    pub source: IpAddr,
    /// The identity id its kernel entries carry.
    pub identity_id: u32,
    /// The token's issuer.
    pub issuer: String,
    /// The token's `sub`.
    pub subject: String,
    /// The user.
    pub user: String,
    /// The groups.
    pub groups: Vec<String>,
    /// When this identity first logged in from this source (Unix milliseconds).
    pub since_ms: u64,
    /// The latest token's `exp` (Unix milliseconds).
    pub token_expires_ms: u64,
    /// The services it may reach.
    pub grants: Vec<GrantRecord>,
    /// The identity as the policy saw it at login (scopes and claims), if known.
    #[serde(default)]
    pub policy_identity: Option<Identity>,
}

/// One service of an [`OwnerRecord`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrantRecord {
    /// The service's id.
    pub service_id: u32,
    /// The service's name.
    pub service: String,
    /// The id of the rule that allowed it.
    pub rule_id: u32,
    /// That rule's name.
    pub rule: String,
    /// Whether the rule asks for logging.
    pub log: bool,
    /// When it was granted (the kernel's monotonic clock, nanoseconds).
    pub started_ns: u64,
}

impl OwnerRecord {
    /// The record of `source` in the session table.
    pub fn of(source: IpAddr, r: &SourceRecord) -> OwnerRecord {
        OwnerRecord {
            source,
            identity_id: r.identity.id,
            issuer: r.identity.issuer.clone(),
            subject: r.identity.subject.clone(),
            user: r.identity.user.clone(),
            groups: r.identity.groups.clone(),
            since_ms: unix_ms(r.since),
            token_expires_ms: unix_ms(r.token_expires_at),
            grants: r
                .grants
                .values()
                .map(|g| GrantRecord {
                    service_id: g.service.get(),
                    service: g.service_name.clone(),
                    rule_id: g.rule.id,
                    rule: g.rule.name.clone(),
                    log: g.log,
                    started_ns: g.started.as_ns(),
                })
                .collect(),
            policy_identity: r.policy_identity.as_deref().cloned(),
        }
    }

    /// The policy identity, shared.
    pub fn policy_identity(&self) -> Option<Arc<Identity>> {
        self.policy_identity.clone().map(Arc::new)
    }
}

/// Milliseconds since the Unix epoch (0 before it).
pub fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The instant `ms` milliseconds after the Unix epoch.
pub fn from_unix_ms(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}

/// One line: `{"v":1,"put":{…}}` or `{"v":1,"del":"192.0.2.7"}`.
#[derive(Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Line {
    v: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    put: Option<Box<OwnerRecord>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    del: Option<IpAddr>,
}

/// Why the journal could not be opened or written.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    /// An I/O operation on the file failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
}

/// What reading a journal found.
#[derive(Debug, Default)]
pub struct Replayed {
    /// The last record of each source still present.
    pub records: Vec<OwnerRecord>,
    /// Lines that could not be read (torn by a crash, or not ours); skipped.
    pub skipped: usize,
}

/// The open journal.
#[derive(Debug)]
pub struct SessionJournal {
    path: PathBuf,
    file: File,
    /// Bytes in the file.
    written: u64,
    /// The length of each source's latest `put` line.
    live: HashMap<IpAddr, u64>,
    live_bytes: u64,
}

impl SessionJournal {
    /// Opens the journal at `path` (creating it and its directory if missing) and reads what it
    /// holds. Nothing is rewritten until [`rewrite`](Self::rewrite).
    pub fn open(path: &Path) -> Result<(SessionJournal, Replayed), JournalError> {
        let io = |op| {
            move |source| JournalError::Io {
                op,
                path: path.to_owned(),
                source,
            }
        };
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir).map_err(io("creating the directory of"))?;
        }
        let file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .mode(0o600)
            .open(path)
            .map_err(io("opening"))?;
        let mut replayed = Replayed::default();
        let mut records: HashMap<IpAddr, OwnerRecord> = HashMap::new();
        let mut written = 0;
        for line in BufReader::new(&file).split(b'\n') {
            let line = line.map_err(io("reading"))?;
            written += line.len() as u64 + 1;
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            match serde_json::from_slice::<Line>(&line) {
                Ok(Line {
                    v: JOURNAL_VERSION,
                    put: Some(r),
                    del: None,
                }) => {
                    records.insert(r.source, *r);
                }
                Ok(Line {
                    v: JOURNAL_VERSION,
                    put: None,
                    del: Some(source),
                }) => {
                    records.remove(&source);
                }
                _ => replayed.skipped += 1,
            }
        }
        replayed.records = records.into_values().collect();
        replayed.records.sort_by_key(|r| r.source);
        let journal = SessionJournal {
            path: path.to_owned(),
            file,
            written,
            live: HashMap::new(),
            live_bytes: 0,
        };
        Ok((journal, replayed))
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Bytes in the file.
    pub fn len(&self) -> u64 {
        self.written
    }

    /// Whether the file is empty.
    pub fn is_empty(&self) -> bool {
        self.written == 0
    }

    /// Records `record` as its source's current state.
    pub fn put(&mut self, record: &OwnerRecord) -> Result<(), JournalError> {
        let line = encode(Line {
            put: Some(Box::new(record.clone())),
            ..Line::default()
        });
        self.append(&line)?;
        let len = line.len() as u64;
        if let Some(old) = self.live.insert(record.source, len) {
            self.live_bytes -= old;
        }
        self.live_bytes += len;
        Ok(())
    }

    /// Records that `source` has no sessions any more.
    pub fn del(&mut self, source: IpAddr) -> Result<(), JournalError> {
        if let Some(old) = self.live.remove(&source) {
            self.live_bytes -= old;
        }
        self.append(&encode(Line {
            del: Some(source),
            ..Line::default()
        }))
    }

    /// Whether the file has grown enough past what it holds to be worth rewriting.
    pub fn wants_rewrite(&self) -> bool {
        self.written >= COMPACT_MIN_BYTES
            && self.written >= COMPACT_RATIO.saturating_mul(self.live_bytes.max(1))
    }

    /// Replaces the whole file with `records` (written to a temporary file, then renamed over,
    /// so a crash leaves either the old or the new journal).
    pub fn rewrite<'a>(
        &mut self,
        records: impl IntoIterator<Item = &'a OwnerRecord>,
    ) -> Result<(), JournalError> {
        let io = |op| {
            let path = self.path.clone();
            move |source| JournalError::Io { op, path, source }
        };
        let mut name = self.path.file_name().unwrap_or_default().to_owned();
        name.push(".new");
        let tmp = self.path.with_file_name(name);
        let mut out = Vec::new();
        let mut live = HashMap::new();
        for r in records {
            let line = encode(Line {
                put: Some(Box::new(r.clone())),
                ..Line::default()
            });
            live.insert(r.source, line.len() as u64);
            out.extend_from_slice(&line);
        }
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io("creating"))?;
        file.write_all(&out).map_err(io("writing"))?;
        fs::rename(&tmp, &self.path).map_err(io("renaming over"))?;
        self.file = OpenOptions::new()
            .append(true)
            .open(&self.path)
            .map_err(io("reopening"))?;
        self.written = out.len() as u64;
        self.live_bytes = live.values().sum();
        self.live = live;
        Ok(())
    }

    fn append(&mut self, line: &[u8]) -> Result<(), JournalError> {
        // One write(2) per line: appends from one process never interleave, and a crash tears at
        // most the last line.
        self.file
            .write_all(line)
            .map_err(|source| JournalError::Io {
                op: "appending to",
                path: self.path.clone(),
                source,
            })?;
        self.written += line.len() as u64;
        Ok(())
    }
}

fn encode(mut line: Line) -> Vec<u8> {
    line.v = JOURNAL_VERSION;
    // Addresses, strings, numbers and JSON values: serializing cannot fail.
    let mut out = serde_json::to_vec(&line).unwrap_or_default();
    out.push(b'\n');
    out
}
