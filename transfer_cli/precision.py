"""trainer.precision: one vocabulary (Lightning's canonical names) and what each name means for autocast.

Lightning accepts short aliases (`bf16`, `16`, `32`, `64`) and turns them into its canonical names; a run's config
is resolved to the canonical name once (config/resolve.py), so the trainer, the frozen-feature pre-pass, eval,
predict and screen all read one name and agree on the autocast dtype. Importable without torch: the check of the
value runs before torch loads.
"""

from __future__ import annotations

from typing import Optional

AUTO = "auto"  # ours: bf16-mixed on a CUDA GPU with bfloat16, else 32-true (resolve_auto)

# Lightning's canonical names (lightning_fabric's _PRECISION_INPUT_STR); tests/test_precision.py checks that a
# pl.Trainer reports each alias under the name given here, so a change in Lightning fails a test.
CANONICAL = ("32-true", "bf16-mixed", "16-mixed", "bf16-true", "16-true", "64-true", "transformer-engine",
             "transformer-engine-float16")
ALIASES = {"32": "32-true", "16": "16-mixed", "bf16": "bf16-mixed", "64": "64-true"}
NAMES = (AUTO, *CANONICAL, *ALIASES)  # every value trainer.precision accepts

# The dtype autocast runs in under each precision, where Lightning's precision plugin autocasts (mixed) or
# converts the weights (true half precision: inference of a restored model autocasts instead).
_AUTOCAST = {"bf16-mixed": "bfloat16", "bf16-true": "bfloat16", "16-mixed": "float16", "16-true": "float16"}


def canonical(value: object) -> Optional[str]:
    """The canonical name of a trainer.precision value (`auto` stays `auto`); None if Lightning knows no such
    precision."""
    name = str(value)
    if name in CANONICAL or name == AUTO:
        return name
    return ALIASES.get(name)


def is_mixed(precision: str) -> bool:
    """Mixed precision: fp32 weights, half-precision activations under autocast (Lightning unscales gradients)."""
    return str(canonical(precision)).endswith("-mixed")


def autocast_dtype(precision: str, device_type: str) -> Optional[str]:
    """The torch dtype name autocast uses for `precision` on `device_type`, or None for full precision: bf16
    anywhere, fp16 on CUDA only (CPU fp16 autocast is slow and not what Lightning trains with there)."""
    dtype = _AUTOCAST.get(str(canonical(precision)))
    if dtype == "float16" and device_type != "cuda":
        return None
    return dtype


def resolve_auto(precision: str, accelerator: str) -> tuple[str, str]:
    """(the canonical precision that runs on this machine, why): `auto` becomes bf16-mixed on a CUDA GPU that has
    bfloat16 (Ampere or newer: tensor cores, and no loss scaler to sync every step), else 32-true. Imports torch
    only for `auto`."""
    name = canonical(precision)
    if name is None:
        raise ValueError(f"unknown precision {precision!r}")  # config/checks.py refuses it before this
    if name != AUTO:
        return name, ""
    import torch

    if str(accelerator) not in ("gpu", "cuda", "auto") or not torch.cuda.is_available():
        return "32-true", "trainer.precision=auto: no CUDA GPU, so 32-true"
    device = torch.cuda.get_device_name()
    if torch.cuda.is_bf16_supported(including_emulation=False):
        return "bf16-mixed", f"trainer.precision=auto: bf16-mixed ({device} has bfloat16)"
    return "32-true", (f"trainer.precision=auto: {device} has no bfloat16, so 32-true (trainer.precision=16-mixed "
                       "for fp16 autocast with a loss scaler)")


__all__ = ["AUTO", "ALIASES", "CANONICAL", "NAMES", "autocast_dtype", "canonical", "is_mixed", "resolve_auto"]
