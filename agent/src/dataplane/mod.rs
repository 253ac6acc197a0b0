//! The data plane: loads idgate's XDP/TC programs, attaches them, and keeps their maps.
//!
//! This is the typed API the identity layer drives: services and CIDR rules from the
//! configuration, sessions from verified tokens, counters and events back out. Every method
//! validates its whole input before touching a map, so bad input changes nothing.

mod events;
mod pin;
#[expect(
    unsafe_code,
    reason = "raw bpf(2) batch commands and clock_gettime; SAFETY notes inside"
)]
mod sys;
mod types;

use std::{
    collections::{BTreeMap, BTreeSet},
    io,
    net::IpAddr,
    os::fd::AsFd,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{
        Array, HashMap, IterableMap, Map, MapData, MapError, PerCpuArray, RingBuf,
        lpm_trie::{Key, LpmTrie},
    },
    programs::{
        ProgramError, SchedClassifier, TcAttachType, Xdp, XdpMode,
        links::{FdLink, PinnedLink},
        tc::SchedClassifierLink,
        xdp::XdpLink,
    },
};
use idgate_common::{self as common, Reason};
use ipnet::IpNet;
use thiserror::Error;

pub use events::{AsyncEventReader, DataplaneEvent, EventKind, EventReader};
pub use pin::{DEFAULT_PIN_DIR, cleanup};
pub use types::{
    CidrAction, CidrRule, Count, EventStats, Expiry, Protocol, Service, ServiceAction,
    ServiceCounters, ServiceId, Session, addr_from_kernel, addr_to_kernel,
};

/// The compiled eBPF object (an empty stub when the build skipped the eBPF crate).
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/idgate-ebpf"));

/// Whether this build embeds the eBPF programs (false for a stub build without bpf-linker).
pub fn has_programs() -> bool {
    !OBJECT.is_empty()
}

/// Errors of the data plane, each naming the operation and the object it failed on.
#[derive(Debug, Error)]
pub enum DataplaneError {
    /// The embedded object is the empty stub: the eBPF build was skipped.
    #[error(
        "this idgate binary was built without its eBPF programs (bpf-linker was missing); \
         rebuild after `cargo xtask setup`"
    )]
    NoObject,
    /// Loading the object or a program failed (the verifier's log is in the message).
    #[error("loading {what}: {source}")]
    Load {
        /// What was being loaded.
        what: String,
        /// Why it failed.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// Attaching or detaching a program failed.
    #[error("{op} on interface {iface}: {source}")]
    Attach {
        /// The operation.
        op: &'static str,
        /// The interface.
        iface: String,
        /// Why it failed.
        #[source]
        source: ProgramError,
    },
    /// A map operation failed.
    #[error("{op} in map {map}: {source}")]
    Map {
        /// The operation.
        op: &'static str,
        /// The map.
        map: &'static str,
        /// Why it failed.
        #[source]
        source: MapError,
    },
    /// A batched map operation failed part-way.
    #[error("{op} in map {map}: {written} of {total} entries written, then: {source}")]
    Batch {
        /// The operation.
        op: &'static str,
        /// The map.
        map: &'static str,
        /// Entries processed before the failure.
        written: usize,
        /// Entries requested.
        total: usize,
        /// Why it failed (E2BIG: the map is full).
        #[source]
        source: io::Error,
    },
    /// A system call outside the map API failed.
    #[error("{op}: {source}")]
    Io {
        /// The operation.
        op: String,
        /// Why it failed.
        #[source]
        source: io::Error,
    },
    /// The input was refused; nothing was changed.
    #[error("invalid input: {0}")]
    Invalid(String),
    /// The interface has no idgate program attached.
    #[error("interface {0} has no idgate program attached")]
    NotAttached(String),
}

/// How to attach to an interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AttachMode {
    /// The measured best for the interface's driver: TC on a veth (where any XDP program costs
    /// the bulk path its GSO/GRO batching: `bench/REPORT.md`, clean-path tax), else [`Xdp`].
    ///
    /// [`Xdp`]: AttachMode::Xdp
    Auto,
    /// XDP in the driver; falls back to generic XDP, with a warning, where the driver lacks it.
    Xdp,
    /// XDP in the driver only; fails where the driver lacks it.
    XdpNative,
    /// Generic (skb) XDP: works everywhere, runs after the skb is allocated.
    XdpGeneric,
    /// A TC classifier on ingress (a TCX link on kernels ≥ 6.6, else clsact).
    Tc,
}

impl std::str::FromStr for AttachMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(AttachMode::Auto),
            "xdp" => Ok(AttachMode::Xdp),
            "xdp-native" => Ok(AttachMode::XdpNative),
            "xdp-generic" => Ok(AttachMode::XdpGeneric),
            "tc" => Ok(AttachMode::Tc),
            other => Err(format!(
                "unknown attach mode {other:?}: expected auto, xdp, xdp-native, xdp-generic or tc"
            )),
        }
    }
}

/// How a program ended up attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Attached {
    /// XDP in the driver.
    XdpNative,
    /// Generic XDP.
    XdpGeneric,
    /// TC ingress.
    Tc,
}

impl std::fmt::Display for Attached {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Attached::XdpNative => "xdp-native",
            Attached::XdpGeneric => "xdp-generic",
            Attached::Tc => "tc",
        })
    }
}

/// Load-time settings.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// Capacity of the sessions map (preallocated).
    pub max_sessions: u32,
    /// Events per second each CPU may emit.
    pub events_per_sec: u64,
    /// Burst of events each CPU may emit.
    pub events_burst: u64,
    /// Where to pin maps, programs and links (on bpffs), or `None` for nothing pinned.
    ///
    /// Pinned, enforcement outlives the data plane: dropping it (or the agent dying) leaves the
    /// programs attached, and the next load with the same directory reuses the maps (sessions
    /// survive) and swaps the new programs in atomically (`BPF_LINK_UPDATE`). [`cleanup`] ends
    /// it. Unpinned, dropping the data plane detaches everything.
    pub pin_dir: Option<PathBuf>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            max_sessions: common::DEFAULT_MAX_SESSIONS,
            events_per_sec: 200,
            events_burst: 400,
            pin_dir: None,
        }
    }
}

/// The loaded programs and their maps.
pub struct Dataplane {
    ebpf: Ebpf,
    ports: Array<MapData, u32>,
    service_values: Array<MapData, common::ServiceValue>,
    sessions_map: HashMap<MapData, common::SessionKey, common::SessionValue>,
    cidr_deny: LpmTrie<MapData, common::CidrData, common::CidrValue>,
    cidr_allow: LpmTrie<MapData, common::CidrData, common::CidrValue>,
    counters: PerCpuArray<MapData, common::Counter>,
    bucket: PerCpuArray<MapData, common::EventBucket>,
    config: Array<MapData, common::GlobalConfig>,
    events: Option<RingBuf<MapData>>,
    logger: Option<aya_log::EbpfLogger<ForwardToTracing>>,
    options: LoadOptions,
    services: BTreeMap<ServiceId, Service>,
    cidr_rules: Vec<CidrRule>,
    links: BTreeMap<String, (Attached, FdLink)>,
}

fn take<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, DataplaneError>
where
    T: TryFrom<aya::maps::Map, Error = MapError>,
{
    let map = ebpf.take_map(name).ok_or_else(|| DataplaneError::Load {
        what: format!("map {name}"),
        source: "not in the eBPF object".into(),
    })?;
    T::try_from(map).map_err(|source| DataplaneError::Map {
        op: "opening",
        map: name,
        source,
    })
}

fn map_err(op: &'static str, map: &'static str) -> impl FnOnce(MapError) -> DataplaneError {
    move |source| DataplaneError::Map { op, map, source }
}

/// Whether a map error is "no such key".
fn is_not_found(e: &MapError) -> bool {
    matches!(e, MapError::KeyNotFound)
        || matches!(e, MapError::SyscallError(s) if s.io_error.raw_os_error() == Some(libc::ENOENT))
}

impl Dataplane {
    /// Loads the programs (verifying them) and creates the maps. Attaches nothing.
    pub fn load(options: LoadOptions) -> Result<Dataplane, DataplaneError> {
        if OBJECT.is_empty() {
            return Err(DataplaneError::NoObject);
        }
        if options.max_sessions == 0 {
            return Err(DataplaneError::Invalid(
                "max_sessions must be at least 1".into(),
            ));
        }
        let mut options = options;
        let mut reused = false;
        let mut sessions_v1 = None;
        if let Some(dir) = &options.pin_dir {
            pin::prepare_dir(dir)?;
            let pinned = pin::check_layout(dir)?;
            reused = pinned.reused;
            if let Some(old) = pinned.sessions_v1 {
                // Out of the way of the new sessions map; the attached programs keep using it.
                let moved = pin::sessions_v1_path(dir);
                if old != moved {
                    std::fs::rename(&old, &moved).map_err(|source| DataplaneError::Io {
                        op: format!("renaming {} to {}", old.display(), moved.display()),
                        source,
                    })?;
                }
                sessions_v1 = Some(moved);
            }
            if let Some(n) = pinned.max_sessions
                && n != options.max_sessions
            {
                tracing::warn!(
                    pinned = n,
                    configured = options.max_sessions,
                    "the pinned sessions map keeps its capacity; run `idgate cleanup` to resize it"
                );
                options.max_sessions = n;
            }
        }
        let mut loader = EbpfLoader::new();
        loader.map_max_entries(common::maps::SESSIONS, options.max_sessions);
        if let Some(dir) = &options.pin_dir {
            for m in &pin::MAPS {
                loader.map_pin_path(m.name, dir.join(m.name));
            }
        }
        let mut ebpf = loader.load(OBJECT).map_err(|e| DataplaneError::Load {
            what: "the idgate eBPF object".into(),
            source: Box::new(e),
        })?;
        let logger = match aya_log::EbpfLogger::init_with_logger(&mut ebpf, ForwardToTracing) {
            Ok(l) => Some(l),
            Err(e) => {
                tracing::warn!(error = %e, "eBPF log forwarding unavailable");
                None
            }
        };
        for name in [common::programs::XDP, common::programs::XDP_FLOOR] {
            let prog: &mut Xdp = program_mut(&mut ebpf, name)?;
            verify(name, || prog.load())?;
        }
        let tc: &mut SchedClassifier = program_mut(&mut ebpf, common::programs::TC)?;
        verify(common::programs::TC, || tc.load())?;
        if let Some(dir) = &options.pin_dir {
            pin_programs(&mut ebpf, dir)?;
        }

        let mut dp = Dataplane {
            ports: take(&mut ebpf, common::maps::PORTS)?,
            service_values: take(&mut ebpf, common::maps::SERVICES)?,
            sessions_map: take(&mut ebpf, common::maps::SESSIONS)?,
            cidr_deny: take(&mut ebpf, common::maps::CIDR_DENY)?,
            cidr_allow: take(&mut ebpf, common::maps::CIDR_ALLOW)?,
            counters: take(&mut ebpf, common::maps::COUNTERS)?,
            bucket: take(&mut ebpf, common::maps::EVENT_BUCKET)?,
            config: take(&mut ebpf, common::maps::CONFIG)?,
            events: Some(take(&mut ebpf, common::maps::EVENTS)?),
            ebpf,
            logger,
            options,
            services: BTreeMap::new(),
            cidr_rules: Vec::new(),
            links: BTreeMap::new(),
        };
        if reused {
            dp.recover()?;
        }
        if let Some(old) = sessions_v1 {
            let migrated = dp.migrate_sessions_v1(&old)?;
            pin::remove_pin(&old)?;
            tracing::info!(
                sessions = migrated,
                "migrated the pinned sessions from map layout version 1"
            );
        }
        dp.write_config()?;
        Ok(dp)
    }

    /// Rebuilds the services and CIDR rules from reused pinned maps, so the next `set_services`
    /// and `set_cidr_rules` clear what the last run left and the configuration no longer has.
    fn recover(&mut self) -> Result<(), DataplaneError> {
        for index in 0..common::PORT_ENTRIES {
            let id = self
                .ports
                .get(&index, 0)
                .map_err(map_err("recovering the ports", common::maps::PORTS))?;
            if id == 0 {
                continue;
            }
            let value = self
                .service_values
                .get(&id, 0)
                .map_err(map_err("recovering a service", common::maps::SERVICES))?;
            let (Ok(sid), Some(protocol)) = (
                ServiceId::new(id),
                Protocol::from_number(if index < 65_536 {
                    common::IPPROTO_TCP
                } else {
                    common::IPPROTO_UDP
                }),
            ) else {
                continue;
            };
            let action = if value.action == common::DefaultAction::Reset as u32 {
                ServiceAction::Reset
            } else {
                ServiceAction::Drop
            };
            self.services.insert(
                sid,
                Service {
                    id: sid,
                    protocol,
                    port: (index % 65_536) as u16,
                    action,
                },
            );
        }
        for (trie, name, action) in [
            (&self.cidr_deny, common::maps::CIDR_DENY, CidrAction::Deny),
            (
                &self.cidr_allow,
                common::maps::CIDR_ALLOW,
                CidrAction::Allow,
            ),
        ] {
            for entry in trie.iter() {
                let (k, v) = entry.map_err(map_err("recovering CIDR rules", name))?;
                if let Some(r) = cidr_rule_from_key(&k, action, v.rule_id) {
                    self.cidr_rules.push(r);
                }
            }
        }
        tracing::info!(
            services = self.services.len(),
            cidr_rules = self.cidr_rules.len(),
            "reusing the pinned maps"
        );
        Ok(())
    }

    /// Starts forwarding the programs' aya-log records into `tracing` (needs a tokio runtime).
    pub fn spawn_log_forwarder(&mut self) -> Result<(), DataplaneError> {
        let Some(logger) = self.logger.take() else {
            return Ok(());
        };
        let mut fd = sys::register_readable(logger).map_err(|e| DataplaneError::Io {
            op: "registering the eBPF log ring with tokio".into(),
            source: e,
        })?;
        tokio::spawn(async move {
            loop {
                let Ok(mut guard) = fd.readable_mut().await else {
                    return;
                };
                guard.get_inner_mut().flush();
                guard.clear_ready();
            }
        });
        Ok(())
    }

    /// Writes any pending aya-log records now (for callers without a tokio runtime).
    pub fn flush_logs(&mut self) {
        if let Some(l) = self.logger.as_mut() {
            l.flush();
        }
    }

    fn write_config(&mut self) -> Result<(), DataplaneError> {
        let protects = self
            .services
            .values()
            .fold(0, |acc, s| acc | common::protects_bit(s.protocol.number()));
        let cfg = common::GlobalConfig {
            events_per_sec: self.options.events_per_sec.min(common::MAX_EVENTS_PER_SEC),
            events_burst: self.options.events_burst.min(common::MAX_EVENT_BURST),
            protects,
            layout_version: common::MAP_LAYOUT_VERSION,
        };
        self.config
            .set(0, cfg, 0)
            .map_err(map_err("writing the configuration", common::maps::CONFIG))
    }

    /// Attaches the enforcement program to `iface`'s ingress; returns how it ended up attached.
    pub fn attach(&mut self, iface: &str, mode: AttachMode) -> Result<Attached, DataplaneError> {
        if self.links.contains_key(iface) {
            return Err(DataplaneError::Invalid(format!(
                "interface {iface} is already attached"
            )));
        }
        let mode = resolve_mode(iface, mode);
        let Some(dir) = self.options.pin_dir.clone() else {
            let (attached, link) = self.attach_new(iface, mode)?;
            tracing::info!(iface, mode = %attached, "enforcement attached");
            self.links.insert(iface.to_owned(), (attached, link));
            return Ok(attached);
        };
        let old = pin::find_link(&dir, iface)?;
        if let Some((old_mode, path)) = &old
            && mode_accepts(mode, *old_mode)
        {
            match self.replace_program(iface, *old_mode, path) {
                Ok(link) => {
                    tracing::info!(iface, mode = %old_mode, "enforcement taken over: new programs swapped in");
                    self.links.insert(iface.to_owned(), (*old_mode, link));
                    return Ok(*old_mode);
                }
                Err(e) => tracing::warn!(
                    iface,
                    error = %e,
                    "the pinned link could not be updated; attaching a new one"
                ),
            }
        }
        // A new link, attached while the old one (if any) still enforces, then pinned in its
        // place: there is no moment without a program.
        let (attached, link) = self.attach_new(iface, mode).map_err(|e| match &old {
            Some((old_mode, path)) => DataplaneError::Invalid(format!(
                "{e}; note that {} is still attached as {old_mode} (pinned at {}): to change \
                 the mode, run `idgate cleanup` first",
                iface,
                path.display()
            )),
            None => e,
        })?;
        let path = pin::link_path(&dir, iface, attached);
        let tmp = pin::tmp_link_path(&dir, iface, attached);
        pin::remove_pin(&tmp)?;
        let link = pin_link(link, &tmp)?;
        if let Some((old_mode, old_path)) = &old {
            let old_link = open_pinned_link(old_path)?;
            force_detach(iface, &old_link)?;
            pin::remove_pin(old_path)?;
            tracing::info!(iface, mode = %old_mode, "previous enforcement link detached");
        }
        std::fs::rename(&tmp, &path).map_err(|source| DataplaneError::Io {
            op: format!("renaming {} to {}", tmp.display(), path.display()),
            source,
        })?;
        tracing::info!(iface, mode = %attached, pin = %path.display(), "enforcement attached");
        self.links.insert(iface.to_owned(), (attached, link));
        Ok(attached)
    }

    /// Swaps this load's program into the link pinned at `path` (`BPF_LINK_UPDATE`: atomic).
    fn replace_program(
        &mut self,
        iface: &str,
        mode: Attached,
        path: &Path,
    ) -> Result<FdLink, DataplaneError> {
        let update_err = |source| DataplaneError::Attach {
            op: "replacing the program",
            iface: iface.to_owned(),
            source,
        };
        let fd = open_pinned_link(path)?;
        Ok(match mode {
            Attached::Tc => {
                let link = SchedClassifierLink::try_from(fd).map_err(|e| link_err(iface, e))?;
                let prog: &mut SchedClassifier = program_mut(&mut self.ebpf, common::programs::TC)?;
                let id = prog.attach_to_link(link).map_err(update_err)?;
                let link = prog.take_link(id).map_err(update_err)?;
                FdLink::try_from(link).map_err(|e| link_err(iface, e))?
            }
            Attached::XdpNative | Attached::XdpGeneric => {
                let link = XdpLink::try_from(fd).map_err(|e| link_err(iface, e))?;
                let prog: &mut Xdp = program_mut(&mut self.ebpf, common::programs::XDP)?;
                let id = prog.attach_to_link(link).map_err(update_err)?;
                let link = prog.take_link(id).map_err(update_err)?;
                FdLink::try_from(link).map_err(|e| link_err(iface, e))?
            }
        })
    }

    fn attach_new(
        &mut self,
        iface: &str,
        mode: AttachMode,
    ) -> Result<(Attached, FdLink), DataplaneError> {
        let attach_err = |source| DataplaneError::Attach {
            op: "attaching",
            iface: iface.to_owned(),
            source,
        };
        Ok(match mode {
            AttachMode::Tc => {
                let prog: &mut SchedClassifier = program_mut(&mut self.ebpf, common::programs::TC)?;
                let id = prog
                    .attach(iface, TcAttachType::Ingress)
                    .map_err(attach_err)?;
                let link = prog.take_link(id).map_err(attach_err)?;
                (
                    Attached::Tc,
                    FdLink::try_from(link).map_err(|e| link_err(iface, e))?,
                )
            }
            AttachMode::XdpGeneric => (Attached::XdpGeneric, self.attach_xdp(iface, XdpMode::Skb)?),
            AttachMode::XdpNative => (
                Attached::XdpNative,
                self.attach_xdp(iface, XdpMode::Driver)?,
            ),
            AttachMode::Xdp | AttachMode::Auto => match self.attach_xdp(iface, XdpMode::Driver) {
                Ok(link) => (Attached::XdpNative, link),
                Err(e) => {
                    tracing::warn!(
                        iface,
                        error = %e,
                        "native XDP unavailable; falling back to generic XDP, which runs later \
                         and costs more per packet"
                    );
                    (Attached::XdpGeneric, self.attach_xdp(iface, XdpMode::Skb)?)
                }
            },
        })
    }

    fn attach_xdp(&mut self, iface: &str, mode: XdpMode) -> Result<FdLink, DataplaneError> {
        let attach_err = |source| DataplaneError::Attach {
            op: "attaching",
            iface: iface.to_owned(),
            source,
        };
        let prog: &mut Xdp = program_mut(&mut self.ebpf, common::programs::XDP)?;
        let id = prog.attach(iface, mode).map_err(attach_err)?;
        let link = prog.take_link(id).map_err(attach_err)?;
        FdLink::try_from(link).map_err(|e| link_err(iface, e))
    }

    /// Detaches from `iface`: its traffic is no longer enforced, as soon as this returns.
    ///
    /// The link is detached explicitly (`BPF_LINK_DETACH`) rather than by closing its descriptor:
    /// a copy of the descriptor held elsewhere (a child process between fork and exec, say) would
    /// otherwise keep the program attached.
    pub fn detach(&mut self, iface: &str) -> Result<(), DataplaneError> {
        let Some((attached, link)) = self.links.remove(iface) else {
            return Err(DataplaneError::NotAttached(iface.to_owned()));
        };
        force_detach(iface, &link)?;
        if let Some(dir) = &self.options.pin_dir {
            pin::remove_pin(&pin::link_path(dir, iface, attached))?;
        }
        tracing::info!(iface, mode = %attached, "enforcement detached");
        Ok(())
    }

    /// Interfaces with a program attached, and how.
    pub fn attachments(&self) -> Vec<(String, Attached)> {
        self.links
            .iter()
            .map(|(i, (a, _))| (i.clone(), *a))
            .collect()
    }

    /// Replaces the set of protected services. Refused whole if two services share an id or a
    /// (protocol, port), or if a CIDR rule would be left naming a removed service.
    pub fn set_services(&mut self, services: &[Service]) -> Result<(), DataplaneError> {
        let mut by_id = BTreeMap::new();
        let mut ports = BTreeSet::new();
        for s in services {
            if by_id.insert(s.id, *s).is_some() {
                return Err(DataplaneError::Invalid(format!(
                    "service id {} is used twice",
                    s.id.get()
                )));
            }
            if !ports.insert((s.protocol, s.port)) {
                return Err(DataplaneError::Invalid(format!(
                    "{}/{} is protected twice",
                    s.port, s.protocol
                )));
            }
        }
        if let Some(r) = self
            .cidr_rules
            .iter()
            .find(|r| !by_id.contains_key(&r.service))
        {
            return Err(DataplaneError::Invalid(format!(
                "CIDR rule {} for {} names service {}, which would no longer exist; \
                 change the CIDR rules first",
                r.rule_id,
                r.net,
                r.service.get()
            )));
        }
        let old = std::mem::replace(&mut self.services, by_id);
        // Values first, then the ports that point at them; clear stale ports before their values.
        // A port that stays protected never opens, and no port points at a missing value.
        for s in self.services.values() {
            self.service_values
                .set(s.id.get(), self.service_value(s), 0)
                .map_err(map_err("writing a service", common::maps::SERVICES))?;
            self.ports
                .set(port_index(s), s.id.get(), 0)
                .map_err(map_err("protecting a port", common::maps::PORTS))?;
        }
        let kept: BTreeSet<u32> = self.services.values().map(port_index).collect();
        for s in old.values() {
            if !kept.contains(&port_index(s)) {
                self.ports
                    .set(port_index(s), 0, 0)
                    .map_err(map_err("unprotecting a port", common::maps::PORTS))?;
            }
            if !self.services.contains_key(&s.id) {
                self.service_values
                    .set(s.id.get(), common::ServiceValue::default(), 0)
                    .map_err(map_err("clearing a service", common::maps::SERVICES))?;
            }
        }
        self.write_config()
    }

    /// The protected services.
    pub fn services(&self) -> Vec<Service> {
        self.services.values().copied().collect()
    }

    fn service_value(&self, s: &Service) -> common::ServiceValue {
        let mut flags = 0;
        for r in self.cidr_rules.iter().filter(|r| r.service == s.id) {
            flags |= match r.action {
                CidrAction::Allow => common::SERVICE_HAS_ALLOW,
                CidrAction::Deny => common::SERVICE_HAS_DENY,
            };
        }
        common::ServiceValue {
            service_id: s.id.get(),
            action: match s.action {
                ServiceAction::Drop => common::DefaultAction::Drop as u32,
                ServiceAction::Reset => common::DefaultAction::Reset as u32,
            },
            flags,
        }
    }

    /// Replaces all CIDR rules. Refused whole if a rule names an unknown service or the same
    /// network appears twice for a service with the same action.
    pub fn set_cidr_rules(&mut self, rules: &[CidrRule]) -> Result<(), DataplaneError> {
        let mut seen = BTreeSet::new();
        let mut normalized = Vec::with_capacity(rules.len());
        for r in rules {
            if !self.services.contains_key(&r.service) {
                return Err(DataplaneError::Invalid(format!(
                    "CIDR rule {} for {} names unknown service {}",
                    r.rule_id,
                    r.net,
                    r.service.get()
                )));
            }
            let net = r.net.trunc();
            if !seen.insert((r.service, net, r.action == CidrAction::Allow)) {
                return Err(DataplaneError::Invalid(format!(
                    "{net} appears twice for service {}",
                    r.service.get()
                )));
            }
            normalized.push(CidrRule { net, ..*r });
        }
        let limit = common::MAX_CIDR_RULES as usize;
        for action in [CidrAction::Allow, CidrAction::Deny] {
            let n = normalized.iter().filter(|r| r.action == action).count();
            if n > limit {
                return Err(DataplaneError::Invalid(format!(
                    "{n} {action:?} rules exceed the limit of {limit}"
                )));
            }
        }

        let old = std::mem::replace(&mut self.cidr_rules, normalized);
        // New entries first, then the service flags that make the kernel look at them, then the
        // stale entries: no moment where a deny rule that stays is not consulted.
        for r in &self.cidr_rules {
            let (trie, name) = match r.action {
                CidrAction::Allow => (&mut self.cidr_allow, common::maps::CIDR_ALLOW),
                CidrAction::Deny => (&mut self.cidr_deny, common::maps::CIDR_DENY),
            };
            trie.insert(&cidr_key(r), common::CidrValue { rule_id: r.rule_id }, 0)
                .map_err(map_err("inserting a CIDR rule", name))?;
        }
        for s in self.services.values() {
            self.service_values
                .set(s.id.get(), self.service_value(s), 0)
                .map_err(map_err("updating service flags", common::maps::SERVICES))?;
        }
        let kept: BTreeSet<_> = self
            .cidr_rules
            .iter()
            .map(|r| (r.service, r.net, r.action == CidrAction::Allow))
            .collect();
        for r in old {
            if kept.contains(&(r.service, r.net, r.action == CidrAction::Allow)) {
                continue;
            }
            let (trie, name) = match r.action {
                CidrAction::Allow => (&mut self.cidr_allow, common::maps::CIDR_ALLOW),
                CidrAction::Deny => (&mut self.cidr_deny, common::maps::CIDR_DENY),
            };
            match trie.remove(&cidr_key(&r)) {
                Ok(()) => {}
                Err(e) if is_not_found(&e) => {}
                Err(e) => return Err(map_err("removing a CIDR rule", name)(e)),
            }
        }
        Ok(())
    }

    fn check_session(&self, s: &Session) -> Result<(), DataplaneError> {
        if !self.services.contains_key(&s.service) {
            return Err(DataplaneError::Invalid(format!(
                "session for {} names unknown service {}",
                s.source,
                s.service.get()
            )));
        }
        Ok(())
    }

    /// Inserts or replaces one session.
    pub fn upsert_session(&mut self, s: &Session) -> Result<(), DataplaneError> {
        self.check_session(s)?;
        self.sessions_map
            .insert(s.key(), s.value(), 0)
            .map_err(map_err("inserting a session", common::maps::SESSIONS))
    }

    /// Inserts or replaces many sessions with batched system calls. Validated whole first; if the
    /// kernel fails part-way (the map is full), the error says how many were written.
    pub fn upsert_sessions(&mut self, sessions: &[Session]) -> Result<(), DataplaneError> {
        for s in sessions {
            self.check_session(s)?;
        }
        let keys: Vec<_> = sessions.iter().map(Session::key).collect();
        let values: Vec<_> = sessions.iter().map(Session::value).collect();
        let fd = self.sessions_map.map().fd().as_fd();
        sys::map_update_batch(fd, &keys, &values).map_err(|(written, source)| {
            DataplaneError::Batch {
                op: "inserting sessions",
                map: common::maps::SESSIONS,
                written,
                total: keys.len(),
                source,
            }
        })
    }

    /// Removes one session; `Ok(false)` if there was none.
    pub fn remove_session(
        &mut self,
        source: IpAddr,
        service: ServiceId,
    ) -> Result<bool, DataplaneError> {
        match self
            .sessions_map
            .remove(&types::session_key(source, service))
        {
            Ok(()) => Ok(true),
            Err(e) if is_not_found(&e) => Ok(false),
            Err(e) => Err(map_err("removing a session", common::maps::SESSIONS)(e)),
        }
    }

    /// Removes many sessions with batched system calls; missing ones are skipped. Returns how
    /// many were removed.
    pub fn remove_sessions(
        &mut self,
        keys: &[(IpAddr, ServiceId)],
    ) -> Result<usize, DataplaneError> {
        let keys: Vec<_> = keys
            .iter()
            .map(|(a, s)| types::session_key(*a, *s))
            .collect();
        let fd = self.sessions_map.map().fd().as_fd();
        let mut removed = 0;
        let mut rest = &keys[..];
        while !rest.is_empty() {
            match sys::map_delete_batch(fd, rest) {
                Ok(()) => {
                    removed += rest.len();
                    break;
                }
                // The batch stops at a missing key: count what went, skip it, go on.
                Err((done, e)) if e.raw_os_error() == Some(libc::ENOENT) => {
                    removed += done;
                    rest = &rest[(done + 1).min(rest.len())..];
                }
                Err((done, source)) => {
                    return Err(DataplaneError::Batch {
                        op: "removing sessions",
                        map: common::maps::SESSIONS,
                        written: removed + done,
                        total: keys.len(),
                        source,
                    });
                }
            }
        }
        Ok(removed)
    }

    /// Removes every session of `source`, whatever the service. Returns how many were removed.
    pub fn remove_source(&mut self, source: IpAddr) -> Result<usize, DataplaneError> {
        let keys: Vec<_> = self.services.keys().map(|id| (source, *id)).collect();
        self.remove_sessions(&keys)
    }

    /// All sessions in the map, expired ones included (the kernel refuses those by itself).
    pub fn sessions(&self) -> Result<Vec<Session>, DataplaneError> {
        let mut out = Vec::new();
        for entry in self.sessions_map.iter() {
            let (k, v) = entry.map_err(map_err("listing sessions", common::maps::SESSIONS))?;
            if let Some(s) = Session::from_entry(&k, &v) {
                out.push(s);
            }
        }
        Ok(out)
    }

    /// Copies every session of the version-1 sessions map pinned at `old` into this data plane's
    /// sessions map (no idle timeout; written now, which counts as activity). Returns how many.
    fn migrate_sessions_v1(&mut self, old: &std::path::Path) -> Result<usize, DataplaneError> {
        const KEY: usize = std::mem::size_of::<common::SessionKey>();
        let data = MapData::from_pin(old).map_err(map_err(
            "opening the version-1 sessions map",
            common::maps::SESSIONS,
        ))?;
        let map: HashMap<MapData, [u8; KEY], [u8; common::SESSION_VALUE_V1_SIZE]> =
            HashMap::try_from(Map::HashMap(data)).map_err(map_err(
                "opening the version-1 sessions map",
                common::maps::SESSIONS,
            ))?;
        let mut sessions = Vec::new();
        for entry in map.iter() {
            let (k, v) = entry.map_err(map_err(
                "reading the version-1 sessions map",
                common::maps::SESSIONS,
            ))?;
            let word = |b: &[u8]| u32::from_ne_bytes([b[0], b[1], b[2], b[3]]);
            let mut addr = [0u8; 16];
            addr.copy_from_slice(&k[..16]);
            let Ok(service) = ServiceId::new(word(&k[16..20])) else {
                continue;
            };
            let mut expires = [0u8; 8];
            expires.copy_from_slice(&v[..8]);
            sessions.push(Session {
                source: types::addr_from_kernel(addr),
                service,
                expires: Expiry::from_ns(u64::from_ne_bytes(expires)),
                identity_id: word(&v[8..12]),
                rule_id: word(&v[12..16]),
                idle: None,
            });
        }
        if sessions.is_empty() {
            return Ok(0);
        }
        // Written as they were, whatever services the recovered maps name: the next start-up step
        // (adoption and the new policy) decides what stays.
        let keys: Vec<_> = sessions.iter().map(Session::key).collect();
        let values: Vec<_> = sessions.iter().map(Session::value).collect();
        let fd = self.sessions_map.map().fd().as_fd();
        sys::map_update_batch(fd, &keys, &values).map_err(|(written, source)| {
            DataplaneError::Batch {
                op: "migrating sessions",
                map: common::maps::SESSIONS,
                written,
                total: keys.len(),
                source,
            }
        })?;
        Ok(sessions.len())
    }

    /// When each of `keys` last let a packet through (or was written), on the kernel's clock;
    /// `None` for a session the map does not hold. For idle timeouts.
    pub fn last_seen(
        &self,
        keys: &[(IpAddr, ServiceId)],
    ) -> Result<Vec<Option<Expiry>>, DataplaneError> {
        keys.iter()
            .map(
                |(a, s)| match self.sessions_map.get(&types::session_key(*a, *s), 0) {
                    Ok(v) => Ok(Some(Expiry::from_ns(v.last_seen_ns))),
                    Err(e) if is_not_found(&e) => Ok(None),
                    Err(e) => Err(map_err(
                        "reading a session's activity",
                        common::maps::SESSIONS,
                    )(e)),
                },
            )
            .collect()
    }

    /// Removes sessions whose expiry has passed; returns them (for auditing).
    pub fn remove_expired(&mut self) -> Result<Vec<Session>, DataplaneError> {
        let now = Expiry::after(std::time::Duration::ZERO);
        let expired: Vec<_> = self
            .sessions()?
            .into_iter()
            .filter(|s| s.expires <= now)
            .collect();
        let keys: Vec<_> = expired.iter().map(|s| (s.source, s.service)).collect();
        self.remove_sessions(&keys)?;
        Ok(expired)
    }

    /// Capacity of the sessions map.
    pub fn max_sessions(&self) -> u32 {
        self.options.max_sessions
    }

    /// Counters per service (and for id 0, unattributed traffic), summed over CPUs.
    pub fn counters(&self) -> Result<Vec<ServiceCounters>, DataplaneError> {
        let ids = std::iter::once(0).chain(self.services.keys().map(|id| id.get()));
        let mut out = Vec::new();
        for id in ids {
            let read = |slot: u32| -> Result<Count, DataplaneError> {
                let per_cpu = self
                    .counters
                    .get(&common::counter_index(id, slot), 0)
                    .map_err(map_err("reading counters", common::maps::COUNTERS))?;
                Ok(per_cpu.iter().fold(Count::default(), |acc, c| Count {
                    packets: acc.packets + c.packets,
                    bytes: acc.bytes + c.bytes,
                }))
            };
            let mut by_reason = Vec::with_capacity(Reason::ALL.len());
            for r in Reason::ALL {
                by_reason.push((r, read(r as u32)?));
            }
            out.push(ServiceCounters {
                service_id: id,
                by_reason,
                rst_sent: read(common::COUNTER_SLOT_RST_SENT)?,
            });
        }
        Ok(out)
    }

    /// How many events the kernel suppressed or lost, summed over CPUs.
    pub fn event_stats(&self) -> Result<EventStats, DataplaneError> {
        let per_cpu = self
            .bucket
            .get(&0, 0)
            .map_err(map_err("reading event stats", common::maps::EVENT_BUCKET))?;
        Ok(per_cpu
            .iter()
            .fold(EventStats::default(), |acc, b| EventStats {
                suppressed: acc.suppressed + b.suppressed,
                ring_full: acc.ring_full + b.ring_full,
            }))
    }

    /// Takes the event reader; there is one, so a second call fails.
    pub fn take_events(&mut self) -> Result<EventReader, DataplaneError> {
        self.events
            .take()
            .map(EventReader::new)
            .ok_or_else(|| DataplaneError::Invalid("the event reader was already taken".into()))
    }

    /// The XDP program, loaded (for BPF_PROG_TEST_RUN and benchmarks).
    pub fn xdp_program(&self) -> Result<&Xdp, DataplaneError> {
        program(&self.ebpf, common::programs::XDP)
    }

    /// The TC program, loaded (for BPF_PROG_TEST_RUN and benchmarks).
    pub fn tc_program(&self) -> Result<&SchedClassifier, DataplaneError> {
        program(&self.ebpf, common::programs::TC)
    }

    /// An XDP program that passes everything: the benchmark floor.
    pub fn floor_program(&self) -> Result<&Xdp, DataplaneError> {
        program(&self.ebpf, common::programs::XDP_FLOOR)
    }
}

fn port_index(s: &Service) -> u32 {
    common::port_index(s.protocol.number(), s.port).expect("TCP and UDP always have a port index")
}

/// The trie key of a rule: service id, family, then the network. The family keeps an IPv6 rule
/// such as `::/0` from matching IPv4 sources through their IPv4-mapped form; an IPv6 rule written
/// in IPv4-mapped form (`::ffff:192.0.2.0/120`) is an IPv4 rule.
fn cidr_key(r: &CidrRule) -> Key<common::CidrData> {
    let mapped_v4 =
        |n: &ipnet::Ipv6Net| n.prefix_len() >= 96 && n.network().to_ipv4_mapped().is_some();
    let (family, bits) = match r.net {
        IpNet::V4(n) => (4, common::CIDR_V4_MAPPED_BITS + u32::from(n.prefix_len())),
        IpNet::V6(n) if mapped_v4(&n) => (4, u32::from(n.prefix_len())),
        IpNet::V6(n) => (6, u32::from(n.prefix_len())),
    };
    Key::new(
        common::CIDR_SERVICE_BITS + bits,
        common::CidrData {
            service_id_be: r.service.get().to_be_bytes(),
            family,
            addr: addr_to_kernel(r.net.network()),
        },
    )
}

/// Loads (verifies) a program, retrying when the verifier gave up with EAGAIN: it does so when a
/// signal arrives mid-verification (a child process exiting is enough), and a retry succeeds.
fn verify(
    name: &str,
    mut load: impl FnMut() -> Result<(), ProgramError>,
) -> Result<(), DataplaneError> {
    const ATTEMPTS: usize = 5;
    let mut attempt = 1;
    loop {
        match load() {
            Ok(()) => return Ok(()),
            Err(ProgramError::LoadError { io_error, .. })
                if io_error.raw_os_error() == Some(libc::EAGAIN) && attempt < ATTEMPTS =>
            {
                tracing::debug!(
                    program = name,
                    attempt,
                    "verification interrupted; retrying"
                );
                attempt += 1;
            }
            Err(e) => {
                return Err(DataplaneError::Load {
                    what: format!("program {name}"),
                    source: Box::new(e),
                });
            }
        }
    }
}

/// Whether an interface attached as `old` satisfies a request for `mode`.
/// [`AttachMode::Auto`] made concrete for `iface` (in the calling thread's namespace): TC on a
/// veth, XDP (native, else generic) anywhere else, including where the driver cannot be told.
fn resolve_mode(iface: &str, mode: AttachMode) -> AttachMode {
    if mode != AttachMode::Auto {
        return mode;
    }
    match sys::driver_name(iface) {
        Ok(driver) if driver == "veth" => {
            tracing::info!(
                iface,
                "attach mode auto: tc on a veth (XDP would cost the bulk path its GSO batching)"
            );
            AttachMode::Tc
        }
        Ok(driver) => {
            tracing::info!(iface, driver, "attach mode auto: xdp");
            AttachMode::Xdp
        }
        Err(e) => {
            tracing::info!(iface, error = %e, "attach mode auto: driver unknown; xdp");
            AttachMode::Xdp
        }
    }
}

fn mode_accepts(mode: AttachMode, old: Attached) -> bool {
    matches!(
        (mode, old),
        (AttachMode::Xdp, Attached::XdpNative | Attached::XdpGeneric)
            | (AttachMode::XdpNative, Attached::XdpNative)
            | (AttachMode::XdpGeneric, Attached::XdpGeneric)
            | (AttachMode::Tc, Attached::Tc)
    )
}

fn open_pinned_link(path: &Path) -> Result<FdLink, DataplaneError> {
    PinnedLink::from_pin(path)
        .map(FdLink::from)
        .map_err(|e| DataplaneError::Io {
            op: format!("opening the pinned link {}", path.display()),
            source: io::Error::other(e),
        })
}

/// Pins `link` at `path`, keeping the descriptor.
fn pin_link(link: FdLink, path: &Path) -> Result<FdLink, DataplaneError> {
    link.pin(path)
        .map(FdLink::from)
        .map_err(|e| DataplaneError::Io {
            op: format!("pinning the link at {}", path.display()),
            source: io::Error::other(e),
        })
}

/// Pins the attachable programs of this load under `dir/programs`, replacing the last load's.
fn pin_programs(ebpf: &mut Ebpf, dir: &Path) -> Result<(), DataplaneError> {
    let pin_err = |path: &Path| {
        let op = format!("pinning the program at {}", path.display());
        move |e: aya::pin::PinError| DataplaneError::Io {
            op,
            source: io::Error::other(e),
        }
    };
    let path = dir.join("programs").join(common::programs::XDP);
    pin::remove_pin(&path)?;
    let xdp: &mut Xdp = program_mut(ebpf, common::programs::XDP)?;
    xdp.pin(&path).map_err(pin_err(&path))?;
    let path = dir.join("programs").join(common::programs::TC);
    pin::remove_pin(&path)?;
    let tc: &mut SchedClassifier = program_mut(ebpf, common::programs::TC)?;
    tc.pin(&path).map_err(pin_err(&path))?;
    Ok(())
}

/// The rule a CIDR trie key stands for (the inverse of [`cidr_key`]).
fn cidr_rule_from_key(
    key: &Key<common::CidrData>,
    action: CidrAction,
    rule_id: u32,
) -> Option<CidrRule> {
    let data = key.data();
    let service = ServiceId::new(u32::from_be_bytes(data.service_id_be)).ok()?;
    let bits = key.prefix_len().checked_sub(common::CIDR_SERVICE_BITS)?;
    let net = match data.family {
        4 => {
            let IpAddr::V4(a) = addr_from_kernel(data.addr) else {
                return None;
            };
            let len = bits.checked_sub(common::CIDR_V4_MAPPED_BITS)?;
            IpNet::V4(ipnet::Ipv4Net::new(a, u8::try_from(len).ok()?).ok()?)
        }
        6 => IpNet::V6(
            ipnet::Ipv6Net::new(
                std::net::Ipv6Addr::from(data.addr),
                u8::try_from(bits).ok()?,
            )
            .ok()?,
        ),
        _ => return None,
    };
    Some(CidrRule {
        service,
        net,
        action,
        rule_id,
    })
}

fn link_err(iface: &str, e: aya::programs::links::LinkError) -> DataplaneError {
    DataplaneError::Io {
        op: format!("taking the link on {iface} (idgate needs bpf_link attachments: kernel ≥ 6.6)"),
        source: io::Error::other(e),
    }
}

fn force_detach(iface: &str, link: &FdLink) -> Result<(), DataplaneError> {
    let info = link.info().map_err(|e| DataplaneError::Io {
        op: format!("reading the link on {iface}"),
        source: io::Error::other(e),
    })?;
    sys::link_detach(info.id()).map_err(|source| DataplaneError::Io {
        op: format!("detaching link {} from {iface}", info.id()),
        source,
    })
}

impl Drop for Dataplane {
    /// Unpinned, dropping the data plane detaches it everywhere, at once (see
    /// [`Dataplane::detach`]). Pinned, it detaches nothing: enforcement stays in place for the
    /// next load (or until [`cleanup`]).
    fn drop(&mut self) {
        if self.options.pin_dir.is_some() {
            return;
        }
        for (iface, (_, link)) in std::mem::take(&mut self.links) {
            if let Err(e) = force_detach(&iface, &link) {
                tracing::error!(iface, error = %e, "detaching on shutdown failed");
            }
        }
    }
}

fn program<'a, T>(ebpf: &'a Ebpf, name: &'static str) -> Result<&'a T, DataplaneError>
where
    &'a T: TryFrom<&'a aya::programs::Program, Error = ProgramError>,
{
    let p = ebpf.program(name).ok_or_else(|| DataplaneError::Load {
        what: format!("program {name}"),
        source: "not in the eBPF object".into(),
    })?;
    p.try_into()
        .map_err(|e: ProgramError| DataplaneError::Load {
            what: format!("program {name}"),
            source: Box::new(e),
        })
}

fn program_mut<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, DataplaneError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = ProgramError>,
{
    let p = ebpf.program_mut(name).ok_or_else(|| DataplaneError::Load {
        what: format!("program {name}"),
        source: "not in the eBPF object".into(),
    })?;
    p.try_into()
        .map_err(|e: ProgramError| DataplaneError::Load {
            what: format!("program {name}"),
            source: Box::new(e),
        })
}

/// Sends aya-log records from the programs to `tracing`, under the `idgate::ebpf` target.
pub struct ForwardToTracing;

impl log::Log for ForwardToTracing {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        let msg = record.args();
        match record.level() {
            log::Level::Error => tracing::error!(target: "idgate::ebpf", "{msg}"),
            log::Level::Warn => tracing::warn!(target: "idgate::ebpf", "{msg}"),
            log::Level::Info => tracing::info!(target: "idgate::ebpf", "{msg}"),
            log::Level::Debug => tracing::debug!(target: "idgate::ebpf", "{msg}"),
            log::Level::Trace => tracing::trace!(target: "idgate::ebpf", "{msg}"),
        }
    }

    fn flush(&self) {}
}
