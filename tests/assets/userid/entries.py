"""Reads a uid-message on standard input with Python's XML parser and prints its entries as JSON:
[[section, user, ip, timeout, [tags]], ...]. tests/tests/userid.rs reads what idgate sent with it
(an independent parser, not idgate's own)."""

import json
import sys
import xml.etree.ElementTree as ET

msg = ET.fromstring(sys.stdin.read())
assert msg.tag == "uid-message", msg.tag
assert [c.tag for c in msg] == ["version", "type", "payload"], [c.tag for c in msg]
assert msg.find("type").text == "update"
out = []
for section in msg.find("payload"):
    for entry in section:
        user = entry.get("name", entry.get("user"))
        tags = [m.text for m in entry.iterfind("./tag/member")]
        out.append([section.tag, user, entry.get("ip"), entry.get("timeout"), tags])
print(json.dumps(out))
