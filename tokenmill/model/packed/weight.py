"""GroupQuantWeight: the one in-memory form of a group-quantized linear weight, whatever file
format it came from, with what make_linear (quant.py) asks of a non-tensor weight."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from tokenmill.model.quant import pack_int4

log = logging.getLogger(__name__)
KERNEL_GROUP = 32  # the group size Int4Linear/Int8Linear.from_gguf build with (quant.py)


@dataclass
class GroupQuantWeight:
    """W[n, k] = (q[n, k] - zero[n, g]) * scale[n, g] with g = g_idx[k].

    q: [out, in] unsigned ints in [0, 2**bits); scale: [out, groups] float32; zero: [out, groups]
    unsigned ints; g_idx: [in] group of each input column (not sorted after GPTQ act-order)."""

    q: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    g_idx: torch.Tensor
    bits: int

    def __post_init__(self):
        out, inp = self.q.shape
        if self.scale.shape != self.zero.shape or self.scale.shape[0] != out or self.g_idx.shape != (inp,):
            raise ValueError(
                f"inconsistent quantized weight: q {list(self.q.shape)}, scale {list(self.scale.shape)}, "
                f"zero {list(self.zero.shape)}, g_idx {list(self.g_idx.shape)}"
            )
        if self.g_idx.numel() and (self.g_idx.min() < 0 or self.g_idx.max() >= self.scale.shape[1]):
            raise ValueError(f"g_idx names groups outside [0, {self.scale.shape[1]})")

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.q.shape)

    @property
    def group_size(self) -> int | None:
        """The size of contiguous groups, or None when g_idx is not k // G (act-order)."""
        inp, groups = self.q.shape[1], self.scale.shape[1]
        if inp % groups:
            return None
        g = inp // groups
        return g if torch.equal(self.g_idx, torch.arange(inp) // g) else None

    @property
    def symmetric(self) -> bool:
        return bool((self.zero == 1 << (self.bits - 1)).all())

    @property
    def nbytes(self) -> int:
        return self.q.numel() * self.bits // 8 + self.scale.numel() * 4

    @property
    def kernel_format(self) -> str | None:
        """'int4' or 'int8' when a CPU kernel runs these values as they are, else None (then the
        weight runs dequantized; unsupported_reason says why)."""
        if self.unsupported_reason is not None:
            return None
        return "int4" if self.bits <= 4 else "int8"

    @property
    def unsupported_reason(self) -> str | None:
        g = self.group_size
        if g is None:
            return "act-order groups (g_idx not k // group_size)"
        if g % KERNEL_GROUP:
            return f"group size {g} is not a multiple of {KERNEL_GROUP}"
        if self.bits == 8 and not self.symmetric:
            return "8-bit with zero points (the int8 kernel is symmetric)"
        if self.bits not in (2, 3, 4, 8):
            return f"{self.bits}-bit values"
        return None

    def dequantize(self) -> torch.Tensor:
        s, z = self.scale[:, self.g_idx], self.zero[:, self.g_idx].float()
        return (self.q.float() - z) * s

    def _per_kernel_group(self, t: torch.Tensor) -> torch.Tensor:
        # Contiguous groups of G = m * 32 are groups of 32 sharing one value: exact to repeat it.
        return t.repeat_interleave(self.group_size // KERNEL_GROUP, dim=1)

    def int4_values(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(q, d, m) with W = d*q + m per group of 32, as Int4Linear.from_gguf takes them."""
        d = self._per_kernel_group(self.scale.float())
        m = -self._per_kernel_group(self.zero.float()) * d
        return self.q.to(torch.int32), d, m

    def int4_blocks(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(nibbles [out, in/2] uint8 in the int4 kernel's (GGUF's) order, d, m) per group of 32,
        as Int4Linear.from_gguf takes them: int4_values, packed."""
        q, d, m = self.int4_values()
        return pack_int4(q), d, m

    def int8_values(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(q, d) with W = q*d per group of 32, q signed, as Int8Linear.from_gguf takes them."""
        return self.q.to(torch.int32) - (1 << (self.bits - 1)), self._per_kernel_group(self.scale.float())

    @staticmethod
    def stacked(weights: list) -> "GroupQuantWeight | None":
        """Stacked along the output dim (exact: groups run along the input dim), or None when
        they cannot be (mixed kinds, bits or input grouping)."""
        first = weights[0]
        if not all(
            isinstance(w, GroupQuantWeight) and w.bits == first.bits and torch.equal(w.g_idx, first.g_idx)
            and w.scale.shape[1] == first.scale.shape[1]
            for w in weights
        ):
            return None
        cat = lambda name: torch.cat([getattr(w, name) for w in weights])  # noqa: E731
        return GroupQuantWeight(cat("q"), cat("scale"), cat("zero"), first.g_idx, first.bits)


def warn_unsupported(name: str, weight: GroupQuantWeight) -> None:
    reason = weight.unsupported_reason
    if reason is not None:
        log.warning("%s: %s: no quantized kernel runs it, it runs dequantized (float)", name, reason)
