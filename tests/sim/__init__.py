"""A deterministic simulation of a Kafka consumer group and of ksup's worker processes, for
driving the real parent core (``supervisor.parent.core``) through any order of events."""
