"""Optional edges of the supervisor (control socket, systemd, metrics). Each is wired in by the
CLI, does nothing when not configured, and never raises into the supervisor loop."""
