"""``ksup verify``: run ksup against the user's own cluster with faults injected, and prove from
the records that nothing was lost. An edge tool: it drives a real ``ksup start`` process."""
