"""What pan-os-python's panos.userid sends for the User-ID operations idgate performs.

Prints one JSON object: case name -> the `cmd` uid-message pan-os-python would POST, captured
through a stub device instead of a firewall. agent/src/userid/tests.rs builds the same cases with
idgate's encoder and compares the two documents' structure.

Run with the venv `cargo xtask setup` creates: target/venv/bin/python expected.py
"""

import json
import sys
import xml.etree.ElementTree as ET

from panos.userid import UserId

# The same values idgate's test uses: names with a backslash, quotes, '&' and '<'.
USER = 'CORP\\al"ice & <bob>'
OTHER = "o'brien"


class StubXapi:
    """Records what UserId.send would give pan.xapi.PanXapi.user_id."""

    def __init__(self):
        self.sent = []

    def user_id(self, cmd=None, vsys=None, extra_qs=None):
        self.sent.append(cmd.decode() if isinstance(cmd, bytes) else cmd)


class StubDevice:
    def __init__(self):
        self.xapi = StubXapi()
        self.vsys = None


def capture(calls):
    device = StubDevice()
    uid = UserId(device)
    calls(uid)
    if len(device.xapi.sent) != 1:
        sys.exit(f"expected one request, got {len(device.xapi.sent)}")
    # Round-trip through a parser so the output is plain, well-formed XML text.
    return ET.tostring(ET.fromstring(device.xapi.sent[0]), encoding="unicode")


def batch(uid):
    uid.batch_start()
    uid.login(USER, "10.1.1.1", timeout=60)
    uid.login(OTHER, "2001:db8::7", timeout=1)
    uid.logout(USER, "10.1.1.2")
    uid.tag_user(USER, ["idgate-web", "idgate-ops"], timeout=3600)
    uid.untag_user(OTHER, ["idgate-web"])
    uid.batch_end()


CASES = {
    "login": lambda uid: uid.login(USER, "10.1.1.1", timeout=60),
    "logout": lambda uid: uid.logout(USER, "10.1.1.1"),
    "tag_user": lambda uid: uid.tag_user(USER, ["idgate-web", "idgate-ops"], timeout=3600),
    "untag_user": lambda uid: uid.untag_user(OTHER, ["idgate-web"]),
    "batch": batch,
}

print(json.dumps({name: capture(calls) for name, calls in CASES.items()}))
