"""Which librdkafka properties describe the connection to the cluster (address, security,
sockets): what a producer or admin client that ksup makes beside the consumers (the dead-letter
producer, the leftover-member probe, verify's producer) copies from the user's -X properties.
One list: a helper client that missed a sasl.* or ssl.* key would fail to authenticate."""

from __future__ import annotations

_CONNECTION_PREFIXES = ("bootstrap.servers", "security.", "sasl.", "ssl.", "client.", "socket.", "broker.",
                        "reconnect.", "api.version", "metadata.")


def connection_properties(kafka: dict[str, str]) -> dict[str, str]:
    """The connection properties among ``kafka`` (librdkafka properties)."""
    return {k: v for k, v in kafka.items() if k.startswith(_CONNECTION_PREFIXES)}
