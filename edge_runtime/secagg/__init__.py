"""Secure aggregation and the privacy math a device runs: shared-grid quantization, SecAgg+ masking,
Shamir shares, distributed DP noise, private statistics. Pure functions and state machines, no I/O."""
