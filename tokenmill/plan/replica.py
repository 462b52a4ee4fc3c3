"""One replica as the planner sees it: a model shape on tp chips of one hardware type, in one
weight format, with the engine's scheduling settings; from it, the KV pool, the cost model,
the price, and simulators over fleets of it."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from tokenmill.config import EngineConfig
from tokenmill.plan.catalog import Hardware, ModelShape
from tokenmill.plan.cost import CostModel, Profile
from tokenmill.plan.memory import cpu_pool_blocks, gpu_plan
from tokenmill.plan.simulator import Simulator


@dataclass(frozen=True)
class ReplicaSpec:
    shape: ModelShape
    hw: Hardware
    tp: int
    profile: Profile
    config: EngineConfig
    max_model_len: int = 8192

    @property
    def on_cpu(self) -> bool:
        return self.hw.name.startswith("cpu")

    @cached_property
    def num_blocks(self) -> int:
        """The pool the engine would allocate: the CPU budget, or what the chips have left."""
        if self.on_cpu or self.config.cache.num_kv_blocks:
            return cpu_pool_blocks(self.shape, self.config, self.profile.kv_bytes)
        c = self.config
        return gpu_plan(self.shape, self.hw, self.tp, self.profile.weight_format, c.cache.block_size,
                        c.scheduler.max_num_batched_tokens, c.scheduler.max_num_seqs, c.cache.gpu_memory_utilization,
                        kv_bytes=self.profile.kv_bytes).num_blocks

    @property
    def fits(self) -> bool:
        return self.num_blocks * self.config.cache.block_size >= min(self.max_model_len, 2048)

    @cached_property
    def cost_model(self) -> CostModel:
        return CostModel(self.shape, self.hw, self.profile, self.tp)

    def price_per_hour(self, spot: bool = False) -> float:
        return self.hw.price_per_hour(spot) * self.tp

    def simulator(self, num_replicas: int = 1, **kwargs) -> Simulator:
        return Simulator(self.config, self.num_blocks, self.max_model_len, self.cost_model, self.shape.vocab_size,
                         num_replicas=num_replicas, **kwargs)

    @property
    def label(self) -> str:
        return f"{self.hw.name} x{self.tp} {self.profile.weight_format} seqs={self.config.scheduler.max_num_seqs}"
