"""Record what a QEMU binary answers to capsa's probe, for the unit tests.

    python tests/data/qemu/record.py /usr/bin/qemu-system-x86_64 > tests/data/qemu/7.2-x86_64.json

The replies are stored as QEMU gave them, except the QAPI schema: only the entries the
probe follows (``netdev_add``, its argument type, and that type's ``type`` enum) are kept,
which keeps a recording at a few tens of KiB instead of several hundred.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from capsa.backends.qemu.probe import ask_qemu


def prune_schema(schema: list[dict[str, Any]]) -> list[dict[str, Any]]:
    by_name = {e["name"]: e for e in schema}
    command = by_name["netdev_add"]
    arg = by_name[command["arg-type"]]
    tag = next(m["type"] for m in arg["members"] if m["name"] == "type")
    return [command, arg, by_name[tag]]


def main() -> None:
    replies = ask_qemu(sys.argv[1])
    replies["query-qmp-schema"] = prune_schema(replies["query-qmp-schema"])
    json.dump({"binary": sys.argv[1], "replies": replies}, sys.stdout, indent=None)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
