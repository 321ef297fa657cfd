"""Compile configuration: presets, config files and command-line overrides, merged in that order.

A configuration is one flat, frozen record. Presets are named sets of overrides; a TOML or YAML
file and ``--set key=value`` arguments override them field by field, and every key is checked
against the record's fields so a typo is an error, not a silently ignored setting.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from .errors import ConfigError
from .quant import check_bits

# Linears inside the transformer blocks get weights *and* activations quantized (attention
# q/k/v/o, cross-attention, FFN). Excluded inside blocks: the adaLN modulation linears
# (``norm*.linear``), which act on the timestep embedding of a handful of tokens, cost nothing at
# run time and steer every activation of the block. Outside the blocks (patch/time/text
# embedders) linears get weight-only quantization; the final projection stays float
# (see qsc.schemes).
DEFAULT_INCLUDE = (r"^(blocks|transformer_blocks|single_transformer_blocks)\.\d+\.",)
DEFAULT_EXCLUDE = (r"(^|\.)norm[^.]*\.",)
DEFAULT_KEEP_FLOAT = (r"^proj_out\.",)
AUTO_ALPHA = "auto"


@dataclass(frozen=True)
class CompileConfig:
    preset: str = "w8a8"
    w_bits: int = 8
    a_bits: int = 8
    group_size: int = 0  # 0 = one scale per output channel
    a_clip: float = 1.0  # activation clipping ratio of the per-token max
    # Quantized linears take their input in a randomised block-Hadamard basis, the weight rotated
    # to match (pass ``rotate_inputs``, QuaRot): outlier channels spread over their block.
    rotate_inputs: bool = False
    smooth_quant: bool = True
    # Migration strength a of s_j = max|X_j|^a / max|W_j|^(1-a): a number in [0, 1] for every
    # layer, or "auto": each layer searches a grid (and no migration) for its lowest output error.
    smooth_alpha: float | str = AUTO_ALPHA
    include: tuple[str, ...] = DEFAULT_INCLUDE  # regexes on layer paths: candidates
    exclude: tuple[str, ...] = DEFAULT_EXCLUDE  # regexes on layer paths: removed from candidates
    weight_only_bits: int = 8  # the other linears: int weights, float activations (0 = keep float)
    keep_float: tuple[str, ...] = DEFAULT_KEEP_FLOAT  # regexes: linears never quantized
    calib_samples: int = 16  # calibration samples used, chosen by ``calib_selection``
    # How the samples are chosen: "uniform" (evenly spread over the set), "salient" (S2Q-VDiT's
    # Hessian-aware selection: diffusion x quantization saliency, pass ``select_calibration``),
    # "salient-per-step" (the most salient of every sampling step alike) or "random" (a seeded
    # draw, for the ablation).
    calib_selection: str = "uniform"
    # Block-wise scale learning against the FP teacher (pass ``learn_scales``): per-channel
    # smoothing (lr ``lr_smooth``), per-channel weight clipping and per-layer activation clipping
    # (lr ``lr_clip``), ``scale_epochs`` passes over the samples per block, AdamW + cosine.
    learn_scales: bool = False
    scale_epochs: int = 15
    lr_smooth: float = 5e-3
    lr_clip: float = 5e-2
    # The reconstruction loss: "mse" (block-output MSE) or "token" (S2Q-VDiT's sparse-token
    # distillation: tokens weighted by the FP attention they receive, in [token_weight_min, 1]).
    recon_loss: str = "mse"
    token_weight_min: float = 0.5
    # QuantSparse's MSAD terms, each normalised by its first value then weighted (0 = off): global
    # (attention of Q and K average-pooled with stride ``msad_stride``) and local (the
    # ``msad_topk`` most attended tokens as queries against all keys).
    msad_global: float = 0.0
    msad_local: float = 0.0
    msad_stride: int = 128
    msad_topk: int = 256
    # GPTQ's error compensation (pass ``compensate_weights``): each layer's codes chosen column by
    # column so its output on the calibration inputs moves least, under the scales it has anyway;
    # ``compensation_damping`` (of the mean diagonal) keeps the inverse of X^T X finite.
    # Its X^T X comes from ``compensation_samples`` calls of the set, evenly spread (0 = all of
    # them), not from the samples ``calib_selection`` chose for learning: one forward per sample
    # is cheap, and a Hessian of S2Q's 40 late-step samples misses the steps that set the layout.
    compensate_weights: bool = False
    compensation_damping: float = 0.01
    compensation_samples: int = 0
    # Attention sparsity: the fraction of 128-query x 64-key tiles each self-attention computes
    # (1.0 = dense, no sparsification), and regexes on attention layer paths kept dense.
    density: float = 1.0
    dense_attention: tuple[str, ...] = ()
    # Heads that attend across frames (the same position in every frame) run in position-major
    # token order where that layout keeps more of their measured attention (Sparse VideoGen).
    # Off by default: on the reference model it keeps more attention and raises PSNR but draws
    # fewer prompts (benchmarks/README.md).
    reorder_tokens: bool = False
    # SSAR: a dense refresh every ``ssar_tau`` denoising steps (0 = no residual correction), the
    # rank of the SVD that denoises the second-order residual (0 = not truncated), and leading
    # steps kept all dense.
    ssar_tau: int = 0
    ssar_rank: int = 16
    dense_steps: int = 0
    # "hold": D + low_rank(D - D_prev) until the next refresh (QuantSparse); "linear": the second
    # term scaled by the steps since the refresh over the steps between the last two refreshes
    # (benchmarks/README.md: better PSNR, SSIM and FD on the reference model, the same adherence).
    ssar_extrapolation: str = "linear"
    seed: int = 0
    backend: str = "reference"
    passes: tuple[str, ...] = ()  # explicit pipeline; empty = derived from the fields above
    check_numerics: bool = True  # compare each pass's graph with the FP graph on one sample

    def __post_init__(self) -> None:
        check_bits(self.w_bits, self.a_bits)
        if self.weight_only_bits:
            check_bits(self.weight_only_bits, 16)
        if self.group_size < 0:
            raise ConfigError(f"group_size must be >= 0 (0 = per channel), got {self.group_size}")
        if not 0.0 < self.a_clip <= 1.0:
            raise ConfigError(f"a_clip must be in (0, 1], got {self.a_clip}")
        alpha = self.smooth_alpha
        number = isinstance(alpha, (int, float)) and not isinstance(alpha, bool)
        if alpha != AUTO_ALPHA and not (number and 0.0 <= alpha <= 1.0):
            raise ConfigError(f"smooth_alpha must be {AUTO_ALPHA!r} or a number in [0, 1], got {alpha!r}")
        if self.calib_samples < 1:
            raise ConfigError(f"calib_samples must be >= 1, got {self.calib_samples}")
        if self.calib_selection not in CALIB_SELECTIONS:
            raise ConfigError(f"calib_selection must be one of {CALIB_SELECTIONS}, got {self.calib_selection!r}")
        if self.recon_loss not in RECON_LOSSES:
            raise ConfigError(f"recon_loss must be one of {RECON_LOSSES}, got {self.recon_loss!r}")
        if self.scale_epochs < 1 or self.msad_stride < 1 or self.msad_topk < 1:
            raise ConfigError(
                "scale_epochs, msad_stride and msad_topk must be >= 1, "
                f"got {self.scale_epochs}, {self.msad_stride}, {self.msad_topk}"
            )
        if min(self.lr_smooth, self.lr_clip, self.msad_global, self.msad_local) < 0:
            raise ConfigError("learning rates and MSAD weights must be >= 0")
        if self.compensation_samples < 0:
            raise ConfigError(f"compensation_samples must be >= 0 (0 = every sample), got {self.compensation_samples}")
        if not 0.0 < self.compensation_damping <= 1.0:
            raise ConfigError(f"compensation_damping must be in (0, 1], got {self.compensation_damping}")
        if not 0.0 <= self.token_weight_min <= 1.0:
            raise ConfigError(f"token_weight_min must be in [0, 1], got {self.token_weight_min}")
        if not 0.0 < self.density <= 1.0:
            raise ConfigError(f"density must be in (0, 1] (1 = dense attention), got {self.density}")
        if self.ssar_tau < 0 or self.ssar_rank < 0 or self.dense_steps < 0:
            raise ConfigError(
                "ssar_tau, ssar_rank and dense_steps must be >= 0, "
                f"got {self.ssar_tau}, {self.ssar_rank}, {self.dense_steps}"
            )
        if self.ssar_extrapolation not in SSAR_EXTRAPOLATIONS:
            raise ConfigError(
                f"ssar_extrapolation must be one of {SSAR_EXTRAPOLATIONS}, got {self.ssar_extrapolation!r}"
            )
        if self.ssar_tau and self.density == 1.0:
            raise ConfigError("ssar_tau > 0 corrects sparse attention: set density below 1 (or ssar_tau = 0)")
        if self.dense_steps and not self.ssar_tau:
            raise ConfigError("dense_steps runs the first steps on SSAR's dense refresh program: set ssar_tau > 0 "
                              "(or dense_steps = 0)")
        if self.backend not in BACKENDS:
            raise ConfigError(f"unknown backend {self.backend!r}: choose one of {BACKENDS}")

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


# What runs the compressed program: the ops' PyTorch reference, Triton kernels on CUDA, or a
# TensorRT engine (the artifact also gets ``tensorrt/``: the plugin graph, its kernels as PTX and,
# where TensorRT and a GPU are there, the engine; the compile's own checks run the reference ops).
BACKENDS = ("reference", "triton", "tensorrt")
SSAR_EXTRAPOLATIONS = ("hold", "linear")
CALIB_SELECTIONS = ("uniform", "salient", "salient-per-step", "random")
RECON_LOSSES = ("mse", "token")

# S2Q-VDiT: 40 salient samples (the paper's K), scale learning with sparse-token distillation;
# qsc takes the salient samples step by step ("salient-per-step": the paper's ranking keeps only
# the last steps, 2 dB of PSNR on the reference model) and adds GPTQ's error compensation under
# the learned scales (benchmarks/README.md: W4A6 +4.5 dB over round-to-nearest, W4A8 +5.3 dB).
# ``calib_selection = "salient"`` is the paper's selection.
# Its scale learning learns the smoothing only: clipping ratios fitted to the 40 samples' block
# outputs cost more under GPTQ's codes than they gain (W4A8 +1.9 dB and two videos more with them
# left at 1; W4A6 +0.7 dB, one video fewer).
S2Q = dict(calib_selection="salient-per-step", calib_samples=40, learn_scales=True, recon_loss="token",
           compensate_weights=True, lr_clip=0.0)
# QuantSparse: scale learning with multi-scale salient attention distillation, then the same
# error compensation.
MSAD = dict(learn_scales=True, calib_samples=40, msad_global=1.0, msad_local=1.0, compensate_weights=True)
# QuaRot's recipe: the quantized linears' inputs in a randomised Hadamard basis, round-to-nearest
# scales, GPTQ codes. No learning, in a third of the S2Q compile time: on the reference model the
# best W4A4 and W4A6's best adherence (benchmarks/README.md: W4A6 25.8 dB, one video above FP).
ROTATED = dict(rotate_inputs=True, smooth_quant=False, compensate_weights=True)
# At W4A6, S2Q learns on rotated layers (ROTATED's rotation; SmoothQuant's migration stays the
# start of the learned smoothing): 25.8 dB and FP's adherence on the reference model, against
# 25.9 dB and three videos of 48 fewer unrotated; at W4A8 the rotation costs 0.6 dB and gains no
# prompt, so ``w4a8-s2q`` stays unrotated (benchmarks/README.md).
S2Q_ROTATED = dict(S2Q, rotate_inputs=True)
# ``--fast``: a short compile with the same passes (tests, CI, a first look).
FAST = dict(scale_epochs=1, calib_samples=8)

PRESETS: dict[str, dict[str, Any]] = {
    "w8a8": dict(w_bits=8, a_bits=8),
    "w6a6": dict(w_bits=6, a_bits=6),
    "w4a8": dict(w_bits=4, a_bits=8),
    "w4a6": dict(w_bits=4, a_bits=6),
    "w4a4": dict(w_bits=4, a_bits=4),
    "w4a8-s2q": dict(w_bits=4, a_bits=8, **S2Q),
    "w4a6-s2q": dict(w_bits=4, a_bits=6, **S2Q_ROTATED),
    "w4a6-rot": dict(w_bits=4, a_bits=6, **ROTATED),
    "w4a4-rot": dict(w_bits=4, a_bits=4, **ROTATED),
    # QuantSparse's pipeline: W4A8 learned with MSAD, 15% attention tiles, SSAR refreshing every 3
    # steps (``learn_scales = false`` gives the PTQ version, for the ablation). The paper refreshes
    # every 5; on the reference model the refresh interval, not the density, sets how many prompts
    # survive (benchmarks/README.md: every 3 steps 22.0 dB and 41 of 48 prompts against 19.0 dB and
    # 37 every 5, for 43% of dense attention's work instead of 32%; 25% of the tiles gain at most one).
    "w4a8-sparse": dict(w_bits=4, a_bits=8, density=0.15, ssar_tau=3, **MSAD),
    "w8a16": dict(w_bits=8, a_bits=16, smooth_quant=False),
    "w4a16": dict(w_bits=4, a_bits=16, smooth_quant=False),
}

_FIELDS = {f.name: f for f in dataclasses.fields(CompileConfig)}


def _coerce(key: str, value: Any, origin: str) -> Any:
    """Convert ``value`` to the type of field ``key``; strings come from ``--set key=value``."""
    if key not in _FIELDS:
        raise ConfigError(f"{origin}: unknown setting {key!r}; known settings: {', '.join(_FIELDS)}")
    default = _FIELDS[key].default
    try:
        if key == "smooth_alpha":
            return _alpha(value)  # the one field that is a number or a word
        if isinstance(default, bool):
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0", "yes", "no", "on", "off"):
                    raise ValueError(value)
                return value.lower() in ("true", "1", "yes", "on")
            return bool(value)
        if isinstance(default, tuple):
            if isinstance(value, str):
                value = json.loads(value) if value.startswith("[") else [s for s in value.split(",") if s]
            return tuple(str(v) for v in value)
        return type(default)(value)
    except (TypeError, ValueError):
        raise ConfigError(
            f"{origin}: {key} = {value!r} is not a valid {type(default).__name__}"
        ) from None


def _alpha(value: Any) -> Any:
    """Text that spells a number (from ``--set``) becomes the number; ``CompileConfig`` checks the rest."""
    try:
        return float(value) if isinstance(value, str) and value != AUTO_ALPHA else value
    except ValueError:
        return value


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a TOML (``.toml``) or YAML (``.yaml``/``.yml``) file of settings."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        if path.suffix == ".toml":
            data = tomllib.loads(path.read_text())
        elif path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(path.read_text()) or {}
        else:
            raise ConfigError(f"{path}: config files must be .toml, .yaml or .yml")
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    except Exception as e:  # yaml.YAMLError without importing yaml up front
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a table of settings at the top level")
    return data


def parse_overrides(pairs: list[str]) -> dict[str, str]:
    """``["a_bits=6", "smooth_quant=false"]`` -> dict (values converted later, per field)."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise ConfigError(f"--set expects KEY=VALUE, got {pair!r}")
        out[key.strip()] = value.strip()
    return out


def resolve_config(
    preset: str | None = None,
    config_file: str | Path | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> CompileConfig:
    """Preset, then config file, then overrides; the file may itself name the preset."""
    layers: list[tuple[str, Mapping[str, Any]]] = []
    file_settings = load_config_file(config_file) if config_file else {}
    name = preset or file_settings.get("preset") or CompileConfig.preset
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}: choose one of {', '.join(PRESETS)}")
    layers.append((f"preset {name}", PRESETS[name]))
    layers.append((str(config_file), {k: v for k, v in file_settings.items() if k != "preset"}))
    layers.append(("overrides", dict(overrides or {})))
    merged: dict[str, Any] = {"preset": name}
    for origin, settings in layers:
        for key, value in settings.items():
            merged[key] = _coerce(key, value, origin)
    return CompileConfig(**merged)
