//! Pinning: the maps, programs and links under one bpffs directory, so enforcement outlives the
//! agent and a restart picks up where the last run left off.
//!
//! Layout of the pin directory:
//! - `IDGATE_*`: the maps, reused by the next load (sessions survive);
//! - `programs/<name>`: the attachable programs of the latest load (for inspection);
//! - `links/<iface>@<mode>`: one bpf_link per interface; the mode (`xdp-native`, `xdp-generic`,
//!   `tc`) is in the name because an XDP link does not tell which mode it was attached in (dots in
//!   the interface name become colons: bpffs refuses names with a dot).
//!
//! Pinned maps are only reused when their layout matches this build: the CONFIG map's
//! `layout_version`, and every map's type, key and value sizes. The one older layout this build
//! migrates is version 1, whose session values lacked the idle-timeout fields: the version-1
//! sessions map is renamed `IDGATE_SESSIONS@v1`, a new one is created and pinned, every session is
//! copied over, and the old pin is removed (an interrupted migration resumes from `@v1` at the
//! next start). The programs attached meanwhile keep using the old map until the new ones replace
//! them, so enforcement never stops. Anything else is refused, naming `idgate cleanup`; nothing
//! pinned is ever dropped silently.

use std::{
    fs, io,
    mem::size_of,
    path::{Path, PathBuf},
    process::Command,
};

use aya::maps::{Array, Map, MapData, MapInfo, MapType};
use idgate_common as common;

use super::{Attached, DataplaneError, sys};

/// The default pin directory of `idgate run` and `idgate cleanup`.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/idgate";

/// Where bpffs is conventionally mounted.
const BPFFS: &str = "/sys/fs/bpf";

/// Every map idgate pins, with the layout this build expects of it.
pub(super) struct MapLayout {
    pub name: &'static str,
    map_type: MapType,
    key_size: usize,
    value_size: usize,
}

const fn layout(name: &'static str, map_type: MapType, k: usize, v: usize) -> MapLayout {
    MapLayout {
        name,
        map_type,
        key_size: k,
        value_size: v,
    }
}

pub(super) const MAPS: [MapLayout; 10] = [
    layout(common::maps::PORTS, MapType::Array, 4, 4),
    layout(
        common::maps::SERVICES,
        MapType::Array,
        4,
        size_of::<common::ServiceValue>(),
    ),
    layout(
        common::maps::SESSIONS,
        MapType::Hash,
        size_of::<common::SessionKey>(),
        size_of::<common::SessionValue>(),
    ),
    layout(
        common::maps::CIDR_DENY,
        MapType::LpmTrie,
        4 + size_of::<common::CidrData>(),
        size_of::<common::CidrValue>(),
    ),
    layout(
        common::maps::CIDR_ALLOW,
        MapType::LpmTrie,
        4 + size_of::<common::CidrData>(),
        size_of::<common::CidrValue>(),
    ),
    layout(
        common::maps::COUNTERS,
        MapType::PerCpuArray,
        4,
        size_of::<common::Counter>(),
    ),
    layout(common::maps::EVENTS, MapType::RingBuf, 0, 0),
    layout(
        common::maps::EVENT_BUCKET,
        MapType::PerCpuArray,
        4,
        size_of::<common::EventBucket>(),
    ),
    layout(
        common::maps::CONFIG,
        MapType::Array,
        4,
        size_of::<common::GlobalConfig>(),
    ),
    layout(
        common::maps::FRAGMENTS,
        MapType::LruHash,
        size_of::<common::FragKey>(),
        size_of::<common::FragValue>(),
    ),
];

fn io_err(op: impl Into<String>) -> impl FnOnce(io::Error) -> DataplaneError {
    let op = op.into();
    move |source| DataplaneError::Io { op, source }
}

/// Makes sure `dir` can hold pins: mounts bpffs at `/sys/fs/bpf` when `dir` is below it and
/// nothing is mounted there, refuses a directory on any other file system, then creates `dir`.
pub(super) fn prepare_dir(dir: &Path) -> Result<(), DataplaneError> {
    // Two loads racing here would mount bpffs twice, the second hiding the first's pins.
    static MOUNT: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _serial = MOUNT.lock().unwrap_or_else(|e| e.into_inner());
    if !on_bpffs(dir)? {
        if !dir.starts_with(BPFFS) {
            return Err(DataplaneError::Invalid(format!(
                "pin directory {} is not on a bpf file system (mount one with \
                 `mount -t bpf bpf <dir>`, or use a directory under {BPFFS})",
                dir.display()
            )));
        }
        tracing::info!("mounting bpffs at {BPFFS}");
        let out = Command::new("mount")
            .args(["-t", "bpf", "bpf", BPFFS])
            .output()
            .map_err(io_err(format!("running mount -t bpf bpf {BPFFS}")))?;
        if !out.status.success() {
            return Err(DataplaneError::Io {
                op: format!("mount -t bpf bpf {BPFFS}"),
                source: io::Error::other(String::from_utf8_lossy(&out.stderr).trim().to_owned()),
            });
        }
    }
    for d in [dir.to_owned(), dir.join("links"), dir.join("programs")] {
        fs::create_dir_all(&d).map_err(io_err(format!("creating {}", d.display())))?;
    }
    Ok(())
}

/// Whether `dir` lies on a mounted bpffs (per `/proc/mounts`).
fn on_bpffs(dir: &Path) -> Result<bool, DataplaneError> {
    let mounts =
        fs::read_to_string("/proc/mounts").map_err(io_err("reading /proc/mounts".to_owned()))?;
    Ok(mounts.lines().any(|l| {
        let mut f = l.split_whitespace();
        let (_, Some(mount_point), Some(fstype)) = (f.next(), f.next(), f.next()) else {
            return false;
        };
        fstype == "bpf" && dir.starts_with(mount_point)
    }))
}

/// What the pinned maps in `dir` say, once they are known compatible.
pub(super) struct Pinned {
    /// Whether any map was already pinned (a restart rather than a first start).
    pub reused: bool,
    /// Capacity of the pinned sessions map, if there is one.
    pub max_sessions: Option<u32>,
    /// A version-1 sessions map to migrate (pinned under its own name or, after an interrupted
    /// migration, as `IDGATE_SESSIONS@v1`).
    pub sessions_v1: Option<PathBuf>,
}

/// Where a version-1 sessions map is kept while it is migrated.
pub(super) fn sessions_v1_path(dir: &Path) -> PathBuf {
    dir.join(format!("{}@v1", common::maps::SESSIONS))
}

fn refuse(dir: &Path, what: String) -> DataplaneError {
    DataplaneError::Invalid(format!(
        "the maps pinned in {} are incompatible with this idgate: {what}; refusing to reuse them. \
         Run `idgate cleanup --pin-dir {}` (it detaches enforcement and drops the sessions) and \
         start again",
        dir.display(),
        dir.display()
    ))
}

/// Checks every map pinned in `dir` against this build's layouts; refuses any mismatch.
pub(super) fn check_layout(dir: &Path) -> Result<Pinned, DataplaneError> {
    let mut pinned = Pinned {
        reused: false,
        max_sessions: None,
        sessions_v1: None,
    };
    let v1 = sessions_v1_path(dir);
    if v1.exists() {
        // An interrupted migration: the old map is still there under its temporary name.
        let info = MapInfo::from_pin(&v1).map_err(|e| DataplaneError::Map {
            op: "opening the pinned map",
            map: common::maps::SESSIONS,
            source: e,
        })?;
        if info.value_size() as usize != common::SESSION_VALUE_V1_SIZE {
            return Err(refuse(
                dir,
                format!("{} does not hold version-1 sessions", v1.display()),
            ));
        }
        pinned.reused = true;
        pinned.max_sessions = Some(info.max_entries());
        pinned.sessions_v1 = Some(v1);
    }
    for m in &MAPS {
        let path = dir.join(m.name);
        if !path.exists() {
            continue;
        }
        pinned.reused = true;
        let info = MapInfo::from_pin(&path).map_err(|e| DataplaneError::Map {
            op: "opening the pinned map",
            map: m.name,
            source: e,
        })?;
        let map_type = info.map_type().ok();
        let (key, value) = (info.key_size() as usize, info.value_size() as usize);
        if m.name == common::maps::SESSIONS
            && map_type == Some(m.map_type)
            && key == m.key_size
            && value == common::SESSION_VALUE_V1_SIZE
            && pinned.sessions_v1.is_none()
        {
            pinned.max_sessions = Some(info.max_entries());
            pinned.sessions_v1 = Some(path);
            continue;
        }
        if map_type != Some(m.map_type) || key != m.key_size || value != m.value_size {
            return Err(refuse(
                dir,
                format!(
                    "map {} is {map_type:?} with {key}-byte keys and {value}-byte values, \
                     this build expects {:?} with {}-byte keys and {}-byte values",
                    m.name, m.map_type, m.key_size, m.value_size
                ),
            ));
        }
        if m.name == common::maps::SESSIONS {
            pinned.max_sessions = Some(info.max_entries());
        }
    }
    if pinned.reused {
        let path = dir.join(common::maps::CONFIG);
        if !path.exists() {
            return Err(refuse(
                dir,
                format!(
                    "{} is missing, so the layout version is unknown",
                    common::maps::CONFIG
                ),
            ));
        }
        let data = MapData::from_pin(&path).map_err(|e| DataplaneError::Map {
            op: "opening the pinned map",
            map: common::maps::CONFIG,
            source: e,
        })?;
        let config: Array<MapData, common::GlobalConfig> = Array::try_from(Map::Array(data))
            .map_err(|e| DataplaneError::Map {
                op: "opening the pinned map",
                map: common::maps::CONFIG,
                source: e,
            })?;
        let cfg = config.get(&0, 0).map_err(|e| DataplaneError::Map {
            op: "reading the layout version",
            map: common::maps::CONFIG,
            source: e,
        })?;
        let migrating = cfg.layout_version == 1 && pinned.sessions_v1.is_some();
        if cfg.layout_version != common::MAP_LAYOUT_VERSION && !migrating {
            return Err(refuse(
                dir,
                format!(
                    "their map layout version is {}, this build's is {}",
                    cfg.layout_version,
                    common::MAP_LAYOUT_VERSION
                ),
            ));
        }
        if cfg.layout_version == common::MAP_LAYOUT_VERSION && pinned.sessions_v1.is_some() {
            // Only an interrupted migration leaves `@v1` beside a current layout.
            tracing::info!("resuming an interrupted migration of the version-1 sessions map");
        }
    }
    Ok(pinned)
}

/// The pin path of the link on `iface` attached as `attached`. bpffs refuses names with a dot,
/// which interface names may have (`eth0.100`), so dots become colons, which they may not.
pub(super) fn link_path(dir: &Path, iface: &str, attached: Attached) -> PathBuf {
    dir.join("links")
        .join(format!("{}@{attached}", iface.replace('.', ":")))
}

/// Where a new link is pinned before it is renamed over `link_path` (no dot: see there).
pub(super) fn tmp_link_path(dir: &Path, iface: &str, attached: Attached) -> PathBuf {
    let mut p = link_path(dir, iface, attached).into_os_string();
    p.push("@new");
    PathBuf::from(p)
}

/// The link pinned for `iface`, if any, and how it was attached.
pub(super) fn find_link(
    dir: &Path,
    iface: &str,
) -> Result<Option<(Attached, PathBuf)>, DataplaneError> {
    for a in [Attached::XdpNative, Attached::XdpGeneric, Attached::Tc] {
        let p = link_path(dir, iface, a);
        if p.exists() {
            return Ok(Some((a, p)));
        }
    }
    Ok(None)
}

/// Removes a pin, tolerating its absence.
pub(super) fn remove_pin(path: &Path) -> Result<(), DataplaneError> {
    // Checked first: bpffs answers the unlink of a missing name in a subdirectory with EPERM.
    if fs::symlink_metadata(path).is_err() {
        return Ok(());
    }
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err(format!("removing {}", path.display()))(e)),
    }
}

/// Detaches every link pinned in `dir` and removes the directory. Returns the interfaces (pin
/// names) it detached. A missing directory is nothing to do.
pub fn cleanup(dir: &Path) -> Result<Vec<String>, DataplaneError> {
    if !dir.exists() {
        return Ok(Vec::new());
    }
    let mut detached = Vec::new();
    let links = dir.join("links");
    if links.exists() {
        let entries =
            fs::read_dir(&links).map_err(io_err(format!("listing {}", links.display())))?;
        for entry in entries {
            let path = entry
                .map_err(io_err(format!("listing {}", links.display())))?
                .path();
            let link = aya::programs::links::PinnedLink::from_pin(&path).map_err(|e| {
                DataplaneError::Io {
                    op: format!("opening the pinned link {}", path.display()),
                    source: io::Error::other(e),
                }
            })?;
            let link = aya::programs::links::FdLink::from(link);
            let id = link
                .info()
                .map_err(|e| DataplaneError::Io {
                    op: format!("reading the pinned link {}", path.display()),
                    source: io::Error::other(e),
                })?
                .id();
            sys::link_detach(id)
                .map_err(io_err(format!("detaching link {id} ({})", path.display())))?;
            remove_pin(&path)?;
            let name = path
                .file_name()
                .map_or_else(String::new, |n| n.to_string_lossy().replace(':', "."));
            tracing::info!(link = name, "enforcement detached");
            detached.push(name);
        }
    }
    fs::remove_dir_all(dir).map_err(io_err(format!("removing {}", dir.display())))?;
    Ok(detached)
}
