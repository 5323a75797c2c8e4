"""The coordinator's privacy layer: the server side of secure aggregation, DP accounting, simulation."""
