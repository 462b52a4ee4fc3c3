"""The layer-by-layer quantization of a whole decoder: each layer's linears are quantized from
what enters them when the layers before it are already quantized (so each layer corrects for
its predecessors' error, as GPTQ does), then the layer is rerun quantized to feed the next."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Iterable

import torch

from tokenmill.config import ModelConfig
from tokenmill.model.packed import GroupQuantWeight
from tokenmill.model.tokenizer import Tokenizer
from tokenmill.quantize import awq
from tokenmill.quantize.calibration import BlockRunner, LayerInputs, calibration_sequences
from tokenmill.quantize.gptq import gptq, hessian
from tokenmill.quantize.rtn import rtn
from tokenmill.quantize.selfgen import sample_sequences
from tokenmill.quantize.spec import QuantizeSpec
from tokenmill.quantize.threads import torch_threads

log = logging.getLogger(__name__)

# Each captured input (calibration.LINEARS) -> the checkpoint linears that read it.
SHARED_INPUT = {
    "self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "self_attn.o_proj": ("self_attn.o_proj",),
    "mlp.gate_up": ("mlp.gate_proj", "mlp.up_proj"),
    "mlp.down": ("mlp.down_proj",),
}


@dataclass
class QuantizeResult:
    weights: dict  # checkpoint names -> GroupQuantWeight (linears) or float tensors
    seconds: float
    calibration_tokens: int


def progress(items: Iterable, total: int, desc: str) -> Iterable:
    """A tqdm bar where tqdm is installed, else one log line per item."""
    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None
    if tqdm is not None:
        yield from tqdm(items, total=total, desc=desc, unit="layer")
        return
    start = time.perf_counter()
    for i, item in enumerate(items):
        yield item
        log.info("%s: layer %d/%d done (%.0f s)", desc, i + 1, total, time.perf_counter() - start)


def float_weights(weights: dict) -> dict[str, torch.Tensor]:
    """Every tensor as float32; GGUF blocks and quantized checkpoints dequantized."""
    return {k: (v if isinstance(v, torch.Tensor) else v.dequantize()).float() for k, v in weights.items()}


def quantize_model(cfg: ModelConfig, weights: dict, tokenizer: Tokenizer, spec: QuantizeSpec,
                   calibration=None) -> QuantizeResult:
    """`calibration`: a Path, a text, or None for the shipped calibration text."""
    with torch_threads(spec.threads):
        return _quantize_model(cfg, weights, tokenizer, spec, calibration)


def _quantize_model(cfg: ModelConfig, weights: dict, tokenizer: Tokenizer, spec: QuantizeSpec, calibration) -> QuantizeResult:
    start = time.perf_counter()
    for width in (cfg.hidden_size, cfg.intermediate_size, cfg.num_heads * cfg.head_dim):
        if width % spec.group_size:
            raise ValueError(f"--group-size {spec.group_size} does not divide the model's width {width} "
                             f"(hidden {cfg.hidden_size}, intermediate {cfg.intermediate_size})")
    work = float_weights(weights)
    calibrated = spec.method != "rtn"  # round-to-nearest looks at the weights only
    sequences = calibration_sequences(tokenizer, calibration, spec.seq_len, spec.max_tokens) if calibrated else []
    if calibrated and spec.generated_tokens:
        sequences += sample_sequences(cfg, work, tokenizer, spec.generated_tokens)
    runner = BlockRunner(cfg, sequences) if calibrated else None
    hidden = runner.embed(work) if calibrated else []
    out: dict = {}
    desc = f"{spec.method} {spec.bits}-bit g{spec.group_size}"
    for i in progress(range(cfg.num_layers), cfg.num_layers, desc):
        prefix = f"model.layers.{i}."
        inputs = runner.run(runner.layer(work, i), hidden, capture=True)[1] if calibrated else None
        in_scales = _awq_scales(work, prefix, inputs, spec) if spec.method == "awq" else {}
        for captured, names in SHARED_INPUT.items():
            names = [f"{prefix}{n}.weight" for n in names]
            # what enters the linear after AWQ's folds: the captured input divided by its scales
            x = None if spec.method == "rtn" else inputs[captured] / in_scales.get(captured, 1.0)
            parts = _quantize_stacked([work[n] for n in names], x, spec, captured)
            for name, q in zip(names, parts):
                out[name] = q
                work[name] = q.dequantize()
        if calibrated:  # the next layer sees this one quantized
            hidden, _ = runner.run(runner.layer(work, i), hidden)
    for name, w in work.items():
        out.setdefault(name, w)
    return QuantizeResult(out, time.perf_counter() - start, sum(len(s) for s in sequences))


def _awq_scales(work: dict, prefix: str, inputs: LayerInputs, spec: QuantizeSpec) -> dict[str, torch.Tensor]:
    """Search each shared input's scales and fold them: into the RMSNorm before q/k/v and before
    gate/up, into up_proj's rows before down_proj. o_proj is left unscaled: its input comes from
    v_proj, whose rows serve several query heads under GQA, so one scale per o_proj column
    cannot be folded there in general. Returns the scales by captured input."""
    grid, scales = spec.grid, {}
    folds = {
        "self_attn.qkv_proj": ("input_layernorm.weight", ("q_proj", "k_proj", "v_proj"), "self_attn."),
        "mlp.gate_up": ("post_attention_layernorm.weight", ("gate_proj", "up_proj"), "mlp."),
        "mlp.down": ("mlp.up_proj.weight", ("down_proj",), "mlp."),
    }
    for captured, (before, linears, sub) in folds.items():
        names = [f"{prefix}{sub}{n}.weight" for n in linears]
        x = _sample(inputs[captured], spec.awq_tokens)
        w = torch.cat([work[n] for n in names])
        s = awq.search_scale(x, w, grid, spec.group_size, spec.awq_grid)
        for n in names:
            work[n] = work[n] * s
        prev = prefix + before
        work[prev] = work[prev] / s if work[prev].dim() == 1 else work[prev] / s[:, None]
        scales[captured] = s
    return scales


def _sample(x: torch.Tensor, n: int) -> torch.Tensor:
    if x.shape[0] <= n:
        return x
    g = torch.Generator().manual_seed(0)
    return x[torch.randperm(x.shape[0], generator=g)[:n]]


def _quantize_stacked(ws: list[torch.Tensor], x: torch.Tensor | None, spec: QuantizeSpec,
                      captured: str) -> list[GroupQuantWeight]:
    """Linears sharing one input quantized as one stacked matrix (exact: every method works row
    by row given the input), split back into their own rows."""
    w = torch.cat(ws)
    grid, g = spec.grid, spec.group_size
    if spec.method == "gptq":
        q = gptq(w, hessian(x), grid, g, spec.act_order, spec.damp, mse=spec.mse)
    elif spec.method == "awq":
        lo = hi = None
        # Clip everything but q and k: their error moves attention scores, which a range clip
        # tuned on the linear's own output does not see (so the paper's code skips them too).
        start = 0 if captured != "self_attn.qkv_proj" else ws[0].shape[0] + ws[1].shape[0]
        if start < w.shape[0]:
            groups = w.view(w.shape[0], -1, g)
            lo, hi = groups.amin(-1), groups.amax(-1)
            lo[start:], hi[start:] = awq.search_clip(_sample(x, spec.awq_tokens), w[start:], grid, g, spec.awq_grid)
        q = rtn(w, grid, g, lo, hi)
    else:
        q = rtn(w, grid, g, mse=spec.mse)
    parts, row = [], 0
    for part in ws:
        n = part.shape[0]
        parts.append(GroupQuantWeight(q.q[row : row + n], q.scale[row : row + n], q.zero[row : row + n], q.g_idx, q.bits))
        row += n
    return parts
