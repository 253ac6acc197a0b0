//! Reads an exported PAN-OS configuration (firewall or Panorama) into the rules to translate, in
//! evaluation order, and the objects they may name.

use std::collections::BTreeMap;

use roxmltree::{Document, Node};

use super::ImportError;

/// Where an address object or group is defined, and as what.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum AddressDef {
    /// `ip-netmask`: a network or a bare address.
    IpNetmask(String),
    /// `ip-range`: `a-b`.
    IpRange(String),
    /// `fqdn`, `ip-wildcard` or anything else: kept as (kind, value) to be reported.
    Unsupported(String, String),
}

/// An address group.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum GroupDef {
    /// Static members (objects, groups or literals).
    Static(Vec<String>),
    /// A tag filter (membership is decided at run time on the firewall).
    Dynamic(String),
}

/// A service object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct ServiceDef {
    /// `tcp`, `udp`, or another protocol element's name.
    pub(super) protocol: String,
    /// The destination ports as written (`80,443,8000-8010`).
    pub(super) ports: String,
    /// A source-port condition, if any.
    pub(super) source_port: Option<String>,
}

/// The objects of one scope (a vsys, a device group, or shared).
#[derive(Clone, Debug, Default)]
pub(super) struct Objects {
    pub(super) addresses: BTreeMap<String, AddressDef>,
    pub(super) address_groups: BTreeMap<String, GroupDef>,
    pub(super) services: BTreeMap<String, ServiceDef>,
    pub(super) service_groups: BTreeMap<String, Vec<String>>,
}

/// A security rule as written, with where it came from.
#[derive(Clone, Debug, Default)]
pub(super) struct SourceRule {
    /// Which rulebase: `shared pre-rulebase`, `device-group dc pre-rulebase`, `vsys1 rulebase`...
    pub(super) rulebase: String,
    pub(super) name: String,
    pub(super) from: Vec<String>,
    pub(super) to: Vec<String>,
    pub(super) source: Vec<String>,
    pub(super) destination: Vec<String>,
    pub(super) source_user: Vec<String>,
    pub(super) application: Vec<String>,
    pub(super) service: Vec<String>,
    pub(super) category: Vec<String>,
    pub(super) source_hip: Vec<String>,
    pub(super) destination_hip: Vec<String>,
    pub(super) negate_source: bool,
    pub(super) negate_destination: bool,
    pub(super) disabled: bool,
    pub(super) action: Option<String>,
    pub(super) description: Option<String>,
    pub(super) log_start: bool,
    pub(super) log_end: bool,
    pub(super) schedule: Option<String>,
    pub(super) rule_type: Option<String>,
}

/// What was read: a description of the source, the rules in order, and the object scopes in
/// lookup order (the most specific first, shared last).
#[derive(Clone, Debug)]
pub(super) struct PanosConfig {
    pub(super) source: String,
    pub(super) rules: Vec<SourceRule>,
    pub(super) scopes: Vec<Objects>,
}

fn bad(msg: impl Into<String>) -> ImportError {
    ImportError::Panos(msg.into())
}

fn child<'a, 'i>(n: Node<'a, 'i>, name: &str) -> Option<Node<'a, 'i>> {
    n.children().find(|c| c.has_tag_name(name))
}

fn path<'a, 'i>(n: Node<'a, 'i>, names: &[&str]) -> Option<Node<'a, 'i>> {
    names.iter().try_fold(n, |n, name| child(n, name))
}

fn entries<'a, 'i>(n: Option<Node<'a, 'i>>) -> impl Iterator<Item = Node<'a, 'i>> {
    n.into_iter()
        .flat_map(|n| n.children().filter(|c| c.has_tag_name("entry")))
}

fn entry<'a, 'i>(n: Option<Node<'a, 'i>>, name: &str) -> Option<Node<'a, 'i>> {
    entries(n).find(|e| e.attribute("name") == Some(name))
}

fn text(n: Option<Node<'_, '_>>) -> Option<String> {
    n.and_then(|n| n.text()).map(|t| t.trim().to_owned())
}

/// `<x><member>a</member>...</x>`; a missing element is `[]`.
fn members(n: Node<'_, '_>, name: &str) -> Vec<String> {
    child(n, name)
        .map(|c| {
            c.children()
                .filter(|m| m.has_tag_name("member"))
                .filter_map(|m| m.text().map(|t| t.trim().to_owned()))
                .collect()
        })
        .unwrap_or_default()
}

fn yes(n: Node<'_, '_>, name: &str) -> Option<bool> {
    text(child(n, name)).map(|t| t == "yes")
}

/// Reads the document; `vsys` or `device_group` choose the part of it to read.
pub(super) fn read(
    xml: &str,
    vsys: Option<&str>,
    device_group: Option<&str>,
) -> Result<PanosConfig, ImportError> {
    let doc = Document::parse(xml).map_err(|e| bad(format!("not well-formed XML: {e}")))?;
    let config = doc.root_element();
    if !config.has_tag_name("config") {
        return Err(bad(format!(
            "expected a <config> document (an exported running or candidate configuration), found <{}>",
            config.tag_name().name()
        )));
    }
    let device = entries(child(config, "devices")).next();
    let shared = child(config, "shared");
    let shared_objects = shared.map(read_objects).transpose()?.unwrap_or_default();
    let dgs = device.and_then(|d| child(d, "device-group"));
    let panorama = dgs.is_some()
        || shared.is_some_and(|s| {
            child(s, "pre-rulebase").is_some() || child(s, "post-rulebase").is_some()
        })
        || child(config, "panorama").is_some();
    if panorama {
        if vsys.is_some() {
            return Err(bad(
                "this is a Panorama configuration: the mapping's `vsys` applies to firewall configurations; name a `device_group`",
            ));
        }
        let names: Vec<&str> = entries(dgs).filter_map(|e| e.attribute("name")).collect();
        let dg_name = match (device_group, names.as_slice()) {
            (Some(n), _) => Some(n),
            (None, []) => None,
            (None, [one]) => Some(*one),
            (None, many) => {
                return Err(bad(format!(
                    "this Panorama configuration has several device groups ({}): set `device_group` in the mapping",
                    many.join(", ")
                )));
            }
        };
        let dg = match dg_name {
            Some(n) => Some(entry(dgs, n).ok_or_else(|| {
                bad(format!(
                    "device group {n:?} not found (there are: {})",
                    if names.is_empty() {
                        "none".to_owned()
                    } else {
                        names.join(", ")
                    }
                ))
            })?),
            None => None,
        };
        // Panorama's order: shared pre, device-group pre, (the firewall's own rules), device-group
        // post, shared post.
        let mut rules = Vec::new();
        rules.extend(read_rules(
            rulebase(shared, "pre-rulebase"),
            "shared pre-rulebase",
        )?);
        if let (Some(dg), Some(n)) = (dg, dg_name) {
            rules.extend(read_rules(
                rulebase(Some(dg), "pre-rulebase"),
                &format!("device-group {n} pre-rulebase"),
            )?);
            rules.extend(read_rules(
                rulebase(Some(dg), "post-rulebase"),
                &format!("device-group {n} post-rulebase"),
            )?);
        }
        rules.extend(read_rules(
            rulebase(shared, "post-rulebase"),
            "shared post-rulebase",
        )?);
        let mut scopes = Vec::new();
        if let Some(dg) = dg {
            scopes.push(read_objects(dg)?);
        }
        scopes.push(shared_objects);
        return Ok(PanosConfig {
            source: match dg_name {
                Some(n) => format!("Panorama, device group {n}"),
                None => "Panorama, shared rules only".to_owned(),
            },
            rules,
            scopes,
        });
    }
    if device_group.is_some() {
        return Err(bad(
            "this is a firewall configuration: the mapping's `device_group` applies to Panorama configurations; name a `vsys`",
        ));
    }
    let vsyses = device.and_then(|d| child(d, "vsys"));
    let names: Vec<&str> = entries(vsyses)
        .filter_map(|e| e.attribute("name"))
        .collect();
    let name = vsys.unwrap_or("vsys1");
    let v = entry(vsyses, name).ok_or_else(|| {
        bad(format!(
            "vsys {name:?} not found under /config/devices/entry/vsys (there are: {})",
            if names.is_empty() {
                "none".to_owned()
            } else {
                names.join(", ")
            }
        ))
    })?;
    let rules = read_rules(
        path_rules(Some(v), &["rulebase", "security", "rules"]),
        &format!("{name} rulebase"),
    )?;
    Ok(PanosConfig {
        source: format!("firewall, {name}"),
        rules,
        scopes: vec![read_objects(v)?, shared_objects],
    })
}

fn rulebase<'a, 'i>(n: Option<Node<'a, 'i>>, which: &str) -> Option<Node<'a, 'i>> {
    path_rules(n, &[which, "security", "rules"])
}

fn path_rules<'a, 'i>(n: Option<Node<'a, 'i>>, names: &[&str]) -> Option<Node<'a, 'i>> {
    n.and_then(|n| path(n, names))
}

fn read_rules(rules: Option<Node<'_, '_>>, rulebase: &str) -> Result<Vec<SourceRule>, ImportError> {
    entries(rules)
        .map(|e| {
            let name = e
                .attribute("name")
                .ok_or_else(|| bad(format!("a rule in the {rulebase} has no name attribute")))?;
            Ok(SourceRule {
                rulebase: rulebase.to_owned(),
                name: name.to_owned(),
                from: members(e, "from"),
                to: members(e, "to"),
                source: members(e, "source"),
                destination: members(e, "destination"),
                source_user: members(e, "source-user"),
                application: members(e, "application"),
                service: members(e, "service"),
                category: members(e, "category"),
                source_hip: members(e, "source-hip"),
                destination_hip: members(e, "destination-hip"),
                negate_source: yes(e, "negate-source").unwrap_or(false),
                negate_destination: yes(e, "negate-destination").unwrap_or(false),
                disabled: yes(e, "disabled").unwrap_or(false),
                action: text(child(e, "action")),
                description: text(child(e, "description")).filter(|d| !d.is_empty()),
                log_start: yes(e, "log-start").unwrap_or(false),
                // PAN-OS logs at session end unless told not to.
                log_end: yes(e, "log-end").unwrap_or(true),
                schedule: text(child(e, "schedule")).filter(|s| !s.is_empty()),
                rule_type: text(child(e, "rule-type")),
            })
        })
        .collect()
}

fn read_objects(scope: Node<'_, '_>) -> Result<Objects, ImportError> {
    let mut o = Objects::default();
    let named = |e: Node<'_, '_>, what: &str| {
        e.attribute("name")
            .map(str::to_owned)
            .ok_or_else(|| bad(format!("an {what} entry has no name attribute")))
    };
    for e in entries(child(scope, "address")) {
        let name = named(e, "address")?;
        let def = match e
            .children()
            .find(|c| c.is_element() && !c.has_tag_name("description") && !c.has_tag_name("tag"))
        {
            Some(c) if c.has_tag_name("ip-netmask") => {
                AddressDef::IpNetmask(text(Some(c)).unwrap_or_default())
            }
            Some(c) if c.has_tag_name("ip-range") => {
                AddressDef::IpRange(text(Some(c)).unwrap_or_default())
            }
            Some(c) => AddressDef::Unsupported(
                c.tag_name().name().to_owned(),
                text(Some(c)).unwrap_or_default(),
            ),
            None => {
                return Err(bad(format!(
                    "address {name:?} has no value (ip-netmask, ip-range, fqdn...)"
                )));
            }
        };
        o.addresses.insert(name, def);
    }
    for e in entries(child(scope, "address-group")) {
        let name = named(e, "address-group")?;
        let def = if child(e, "static").is_some() {
            GroupDef::Static(members(e, "static"))
        } else if let Some(d) = child(e, "dynamic") {
            GroupDef::Dynamic(text(child(d, "filter")).unwrap_or_default())
        } else {
            return Err(bad(format!(
                "address group {name:?} is neither static nor dynamic"
            )));
        };
        o.address_groups.insert(name, def);
    }
    for e in entries(child(scope, "service")) {
        let name = named(e, "service")?;
        let proto = child(e, "protocol")
            .and_then(|p| p.children().find(Node::is_element))
            .ok_or_else(|| bad(format!("service {name:?} has no protocol")))?;
        o.services.insert(
            name,
            ServiceDef {
                protocol: proto.tag_name().name().to_owned(),
                ports: text(child(proto, "port")).unwrap_or_default(),
                source_port: text(child(proto, "source-port")).filter(|s| !s.is_empty()),
            },
        );
    }
    for e in entries(child(scope, "service-group")) {
        let name = named(e, "service-group")?;
        o.service_groups.insert(name, members(e, "members"));
    }
    Ok(o)
}
