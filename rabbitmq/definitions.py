"""Writes rabbitmq/definitions.json for one exchange, vhost and sidecar user.

Everything in the file that names the exchange follows from ``--exchange``: the exchange itself,
the lazy-queue policy on its device queues (``<exchange>/<device_id>``) and the sidecar user's
permissions, which reach that exchange and those queues and nothing else. So another exchange
(``AMQP_QUEUE_EXCHANGE``) or a vhost per tenant is one command::

    python3 rabbitmq/definitions.py --exchange acme.commands --vhost tenant-a \\
        --password "$SECRET" > rabbitmq/definitions.json

Standard library only, so it runs with any Python 3.11 and without the project installed.
The committed file is this script's output for the defaults (tests/test_deploy_files.py).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import re
import sys
from typing import Any

SEPARATOR = "/"  # amqp_queue.config.SEPARATOR: between the exchange and the device id
RABBIT_VERSION = "3.10.8"


def password_hash(password: str, salt: bytes) -> str:
    """RabbitMQ's rabbit_password_hashing_sha256: base64(salt + sha256(salt + password))."""
    if len(salt) != 4:
        raise ValueError("the salt is 4 bytes")
    return base64.b64encode(salt + hashlib.sha256(salt + password.encode()).digest()).decode()


def namespace_pattern(exchange: str) -> str:
    """The exchange and every one of its device queues, anchored at both ends: ``E.sub`` and
    ``E2`` are other namespaces, not more of ``E``'s."""
    return f"^{re.escape(exchange)}({re.escape(SEPARATOR)}.*)?$"


def device_queue_pattern(exchange: str) -> str:
    return f"^{re.escape(exchange + SEPARATOR)}"


def definitions(
    *, exchange: str, vhost: str, user: str, password: str, salt: bytes
) -> dict[str, Any]:
    allowed = namespace_pattern(exchange)
    return {
        "rabbit_version": RABBIT_VERSION,
        "rabbitmq_version": RABBIT_VERSION,
        "users": [
            {
                "name": user,
                "password_hash": password_hash(password, salt),
                "hashing_algorithm": "rabbit_password_hashing_sha256",
                # No tag: the sidecar needs no management UI, no policy or user changes.
                "tags": [],
                "limits": {},
            }
        ],
        "vhosts": [{"name": vhost}],
        "permissions": [
            {"user": user, "vhost": vhost, "configure": allowed, "write": allowed, "read": allowed}
        ],
        "topic_permissions": [],
        "parameters": [],
        "global_parameters": [],
        "policies": [
            {
                "vhost": vhost,
                "name": f"{exchange}-device-queues",
                "pattern": device_queue_pattern(exchange),
                "apply-to": "queues",
                "priority": 0,
                "definition": {"queue-mode": "lazy"},
            }
        ],
        "queues": [],
        "exchanges": [
            {
                "name": exchange,
                "vhost": vhost,
                "type": "direct",
                "durable": True,
                "auto_delete": False,
                "internal": False,
                "arguments": {},
            }
        ],
        "bindings": [],
    }


def render(document: dict[str, Any]) -> str:
    return json.dumps(document, indent=2) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--exchange", default="ble.commands", help="AMQP_QUEUE_EXCHANGE")
    parser.add_argument("--vhost", default="/", help="the vhost of the exchange and its queues")
    parser.add_argument("--user", default="amqp_queue", help="the sidecar's broker user")
    parser.add_argument("--password", default="amqp_queue", help="its password")
    parser.add_argument(
        "--salt", help="8 hex digits; random by default (give one for a reproducible file)"
    )
    args = parser.parse_args(argv)
    if not args.exchange or args.exchange.startswith("amq."):
        parser.error(f"exchange name {args.exchange!r} is empty or AMQP-reserved")
    salt = bytes.fromhex(args.salt) if args.salt else os.urandom(4)
    if len(salt) != 4:
        parser.error("--salt is 8 hex digits")
    document = definitions(
        exchange=args.exchange,
        vhost=args.vhost,
        user=args.user,
        password=args.password,
        salt=salt,
    )
    sys.stdout.write(render(document))
    return 0


if __name__ == "__main__":
    sys.exit(main())
