"""What a quantization run is asked to do, validated before any model is loaded."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # grid imports torch: `tokenmill --help` and `tokenmill router` build this parser
    from tokenmill.quantize.grid import QuantGrid

METHODS = ("rtn", "gptq", "awq")
FORMATS = ("gptq", "gptq_v2", "awq", "compressed-tensors")


@dataclass(frozen=True)
class QuantizeSpec:
    method: str = "gptq"
    bits: int = 4
    group_size: int = 128
    sym: bool = False
    act_order: bool = False
    format: str | None = None  # None: awq for 4-bit AWQ, else gptq
    # GPTQ: fraction of the mean Hessian diagonal added to it. 0.1, not the paper's 0.01: with a
    # calibration set of ~1,500 tokens, H of a 1,536-wide down_proj is nearly singular and GPTQ
    # overfits it (SmolLM2 layer 3, error on held-out text: 0.0080 at 0.01, 0.0052 at 0.1,
    # round-to-nearest 0.0044; q/k/v and gate/up gain from GPTQ at either damping).
    damp: float = 0.1
    # GPTQ: each group's range shrunk to the least diag(H)-weighted rounding error (grid.fit_mse);
    # RTN: the least plain rounding error. AWQ has its own output-error clip search.
    mse: bool = False
    seq_len: int = 512  # calibration sequence length
    # tokens sampled from the model itself added to the calibration text (selfgen.py); None: 4,096
    # for GPTQ (it overfits the ~1,500 shipped tokens), none for AWQ (its searches sample 512 rows)
    calib_generate: int | None = None
    max_tokens: int | None = None  # use at most this many calibration tokens
    awq_grid: int = 20  # AWQ: alpha and clip-ratio grid points
    # AWQ: calibration rows its searches sample. 256 overfitted: SmolLM2 at 3 bits g64 came out at
    # perplexity 86.0 on an Intel Xeon (worse than round-to-nearest's 77.2) where an AMD EPYC's
    # rounding of the same inputs gave 43.4; 512 and 1,024 rows gave 43.8 and 44.6 on the Xeon.
    awq_tokens: int = 512
    threads: int = 1  # torch threads while quantizing (threads.py says why one)

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"--method must be one of {METHODS}, got {self.method!r}")
        if self.bits not in (2, 3, 4, 8):
            raise ValueError(f"--bits must be 2, 3, 4 or 8, got {self.bits}")
        if self.threads < 1:
            raise ValueError(f"--threads must be at least 1, got {self.threads}")
        if self.calib_generate is not None and self.calib_generate < 0:
            raise ValueError(f"--calib-generate must be at least 0, got {self.calib_generate}")
        if self.mse and self.method == "awq":
            raise ValueError("--mse applies to --method gptq and rtn (AWQ searches its clip on the output error)")
        if self.group_size < 8:
            raise ValueError(f"--group-size must be at least 8, got {self.group_size}")
        if self.checkpoint_format not in FORMATS:
            raise ValueError(f"--format must be one of {FORMATS}, got {self.format!r}")
        if self.checkpoint_format == "awq" and (self.bits != 4 or self.act_order):
            raise ValueError("--format awq holds 4-bit weights in plain groups (no --act-order)")
        if self.checkpoint_format == "compressed-tensors" and self.bits not in (4, 8):
            raise ValueError("--format compressed-tensors holds 4 or 8 bits (W4A16 / W8A16)")
        if self.act_order and self.method != "gptq":
            raise ValueError("--act-order applies to --method gptq")

    @property
    def checkpoint_format(self) -> str:
        if self.format is not None:
            return self.format
        return "awq" if self.method == "awq" and self.bits == 4 else "gptq"

    @property
    def generated_tokens(self) -> int:
        if self.calib_generate is not None:
            return self.calib_generate
        return 4096 if self.method == "gptq" else 0

    @property
    def grid(self) -> QuantGrid:
        from tokenmill.quantize.grid import QuantGrid

        # A GPTQ v1 file stores zero - 1, so its zero points start at 1 (model/packed/gptq.py).
        return QuantGrid(self.bits, self.sym, min_zero=1 if self.checkpoint_format == "gptq" else 0)
