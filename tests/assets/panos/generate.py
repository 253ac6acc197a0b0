"""Renders the objects and rules of firewall.xml and panorama.xml with pan-os-python's object
model, as an independent check of the hand-written fixtures' format.

Usage: generate.py OUTDIR  (writes OUTDIR/firewall.xml and OUTDIR/panorama.xml)

Each object renders its own element and knows its place in the configuration (its xpath); this
script only assembles those elements into one <config> document, as a configuration export has
them. The idgate tests import both documents and require the same translation as the fixtures'.
"""

import re
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

from panos.firewall import Firewall
from panos.objects import AddressGroup, AddressObject, ServiceGroup, ServiceObject
from panos.panorama import DeviceGroup, Panorama
from panos.policies import PostRulebase, PreRulebase, Rulebase, SecurityRule

SEGMENT = re.compile(r"([\w-]+)(?:\[@name='([^']*)'\])?")


def place(root, obj):
    """Puts obj's element at its xpath under root (a <config> element)."""
    parts = obj.xpath().strip("/").split("/")
    assert parts[0] == "config", parts
    node = root
    for part in parts[1:-1]:
        tag, name = SEGMENT.fullmatch(part).groups()
        found = None
        for c in node.findall(tag):
            if c.get("name") == name:
                found = c
        if found is None:
            found = ET.SubElement(node, tag)
            if name is not None:
                found.set("name", name)
        node = found
    node.append(obj.element())


def rule(name, action, destination, service, **kw):
    kw.setdefault("source", ["any"])
    kw.setdefault("source_user", ["any"])
    kw.setdefault("application", ["any"])
    return SecurityRule(
        name,
        fromzone=kw.pop("fromzone", ["any"]),
        tozone=kw.pop("tozone", ["any"]),
        destination=destination,
        service=service,
        action=action,
        **kw,
    )


def firewall():
    shared = Firewall(vsys="shared")
    fw = Firewall(vsys="vsys1")
    objs = [
        shared.add(AddressObject("web-v4", "10.99.99.99")),
        shared.add(AddressObject("bad-v6", "2001:db8:bad::/48")),
        fw.add(AddressObject("web-v4", "10.1.2.10")),
        fw.add(AddressObject("web-v6", "2001:db8:1::10/128")),
        fw.add(AddressObject("db-server", "10.1.2.50")),
        fw.add(AddressObject("bad-v4", "203.0.113.0/24")),
        fw.add(AddressObject("bad-range", "198.51.100.10-198.51.100.20", type="ip-range")),
        fw.add(AddressObject("lb-net", "10.20.0.0/24", description="load balancers")),
        fw.add(AddressObject("office-net", "10.40.0.0/16")),
        fw.add(AddressObject("app-fqdn", "app.example.com", type="fqdn")),
        fw.add(AddressGroup("web-host", static_value=["web-v4", "web-v6"])),
        fw.add(AddressGroup("bad-nets", static_value=["bad-v4", "bad-range"])),
        fw.add(AddressGroup("blocklist", static_value=["bad-nets", "bad-v6"])),
        fw.add(ServiceObject("svc-api", protocol="tcp", destination_port="8000")),
        fw.add(ServiceObject("svc-metrics", protocol="tcp", destination_port="9100-9102")),
        fw.add(ServiceObject("svc-ssh", protocol="tcp", destination_port="22")),
        fw.add(ServiceGroup("web-services", value=["svc-api", "service-https"])),
        fw.add(ServiceGroup("all-web", value=["web-services", "service-http"])),
    ]
    rb = fw.add(Rulebase())
    web = ["web-host"]
    rules = [
        rule("Block bad ranges", "drop", ["any"], ["any"], source=["blocklist"],
             fromzone=["untrust"], tozone=["dmz"]),
        rule("LB health", "allow", web, ["svc-api"], source=["lb-net"], log_end=False),
        rule("API users", "allow", web, ["all-web"],
             source_user=["cn=api-users,ou=groups,dc=example,dc=com", "corp\\alice"],
             application=["web-browsing"], description="people of the API"),
        rule("Contractors out", "reset-both", web, ["svc-api"],
             source_user=["cn=contractors,ou=groups,dc=example,dc=com"]),
        rule("Metrics only from the office", "deny", web, ["svc-metrics"],
             source=["office-net"], negate_source=True),
        rule("Metrics for known users", "allow", web, ["svc-metrics"], source_user=["known-user"]),
        rule("Admins (off)", "allow", web, ["any"],
             source_user=["cn=admins,ou=groups,dc=example,dc=com"], disabled=True),
        rule("Database", "allow", ["db-server"], ["svc-api"]),
        rule("SSH", "allow", web, ["svc-ssh"], application=["ssh"]),
        rule("DNS", "allow", web, ["application-default"], source_user=["known-user"],
             application=["dns"]),
        rule("App by name", "allow", ["app-fqdn"], ["svc-api"]),
        rule("No unknown users", "deny", web, ["svc-api"], source_user=["unknown"]),
        rule("Auditors", "allow", web, ["svc-api"],
             source_user=["cn=auditors,ou=groups,dc=example,dc=com"]),
        rule("Late LB", "allow", web, ["svc-api"], source=["10.20.1.0/24"]),
    ]
    root = ET.Element("config", version="10.2.0")
    for o in objs:
        place(root, o)
    for r in rules:
        place(root, rb.add(r))
    return root


def panorama():
    pano = Panorama("panorama.example.com")
    east = pano.add(DeviceGroup("dc-east"))
    west = pano.add(DeviceGroup("dc-west"))
    objs = [
        pano.add(AddressObject("api-host", "192.0.2.99")),
        pano.add(AddressObject("scanners", "192.0.2.200-192.0.2.255", type="ip-range")),
        pano.add(ServiceObject("svc-api", protocol="tcp", destination_port="8000,8443-8445")),
        east.add(AddressObject("api-host", "10.1.2.10/32")),
    ]
    host = ["api-host"]
    rules = [
        pano.add(PreRulebase()).add(
            rule("shared-pre-scanners", "reset-client", ["any"], ["any"], source=["scanners"])),
        pano.add(PostRulebase()).add(rule("shared-post-deny", "deny", ["any"], ["any"])),
        east.add(PreRulebase()).add(
            rule("dg-pre-admins", "allow", host, ["svc-api"], source_user=["corp\\ops"])),
        east.add(PostRulebase()).add(
            rule("dg-post-users", "allow", host, ["svc-api"], source=["10.0.0.0/8"],
                 source_user=["cn=api-users,ou=groups,dc=example,dc=com"])),
        west.add(PreRulebase()).add(rule("west-only", "allow", ["any"], ["any"])),
    ]
    root = ET.Element("config", version="10.2.0")
    ET.SubElement(root, "panorama")
    for o in objs + rules:
        place(root, o)
    return root


def main():
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    for name, build in [("firewall.xml", firewall), ("panorama.xml", panorama)]:
        tree = ET.ElementTree(build())
        ET.indent(tree)
        tree.write(out / name, encoding="utf-8", xml_declaration=True)


if __name__ == "__main__":
    main()
