"""FedProx (Li et al. 2020): FedAvg on the server; devices add (mu/2)*||w - w_global||^2 to their loss."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from coordinator.aggregation.fedavg import FedAvg, FedAvgConfig


class FedProxConfig(FedAvgConfig):
    mu: float = Field(0.01, ge=0, le=100, description="proximal weight sent to devices as prox_mu")


class FedProx(FedAvg):
    name = "fedprox"
    Config = FedProxConfig
    config: FedProxConfig

    def client_config(self, round_number: int) -> dict[str, Any]:
        return {"prox_mu": self.config.mu}
