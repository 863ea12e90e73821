"""The supervisor process. Never imports ``supervisor.child`` or confluent_kafka: the parent
holds no Kafka handle, so nothing Kafka-related is ever inherited by a worker."""
