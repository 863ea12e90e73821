"""ksup: a graceful-shutdown process supervisor for Kafka consumers.

Kept nearly empty on purpose: the worker process imports this package too, and must not
pull in the supervisor's modules.
"""

__version__ = "0.1.0"
