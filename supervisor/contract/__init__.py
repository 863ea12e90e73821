"""The contract between supervisor and worker: typed messages, their wire format, the pipe
ends and the exit-code tables. Imports nothing else from ksup, so both processes can use it."""
