"""The worker process: one explicit-store Kafka consumer running the user's handler.
Never imports ``supervisor.parent``."""
