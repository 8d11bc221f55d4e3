"""Lightning's Trainer, with one more precision: "auto"."""
from __future__ import annotations

from typing import Literal

import lightning as L
from lightning.fabric.connector import _PRECISION_INPUT

from lit_mpdit.runtime import AUTO, resolve_precision


class Trainer(L.Trainer):
    """`precision: auto` trains in bf16-mixed where bf16 is faster than fp32 here and in 32-true elsewhere
    (`runtime.bf16_pays`, measured: on an AVX2-only CPU a bf16-mixed step ran 16x slower than fp32): the rule of
    the cpu profile, so one config file is fast on any machine. Every other value is Lightning's."""

    def __init__(self, *args, precision: _PRECISION_INPUT | Literal["auto"] | None = None, **kwargs):
        if precision == AUTO:
            precision = resolve_precision(AUTO, "bf16-mixed", "32-true")
        super().__init__(*args, precision=precision, **kwargs)
