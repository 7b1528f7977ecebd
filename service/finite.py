"""Whether arrays hold finite numbers: the inputs a request brings (as float32), the outputs a
model gives back.

NOTE (one numpy call): on one sample a numpy call costs more than its arithmetic, and in a server
it runs with cold caches (each call measured 4-5 us of CPU per request at 8 connections). The sum
of squares (np.vdot: one call, BLAS, no floating-point warnings) is finite when every value is,
as NaN and infinity carry through it; it settles the usual case, and only a sum too large to say
(values above 1.8e19 in float32) takes the exact two-call check.
"""

from __future__ import annotations

import math

import numpy as np

from service.backends import Array
from service.errors import InvalidInput

# float64 values below this round to a finite float32 (at most float32's max); at or above it, to
# infinity. float32's max itself, as numpy prints it (3.4028235e38), lies a bit above that max.
FLOAT32_LIMIT = 2.0**128 - 2.0**103
_SQUARED_LIMIT = FLOAT32_LIMIT * FLOAT32_LIMIT


def all_finite(values: Array) -> bool:
    """Whether every value of a float array is finite."""
    return math.isfinite(np.vdot(values, values)) or bool(np.isfinite(values).all())


def within_float32(values: Array) -> bool:
    """Whether every value of a float array is finite once cast to float32 (below the limit in
    magnitude): a sum of squares below the limit's square says so for all at once."""
    if values.dtype.itemsize <= 4:  # float16, float32: any finite value fits
        return all_finite(values)
    return float(np.vdot(values, values)) < _SQUARED_LIMIT or bool(
        np.abs(values).max(initial=0.0) < FLOAT32_LIMIT
    )


def check_finite_outputs(outputs: Array, first_sample: int = 0) -> None:
    """A finite input can still overflow inside the model (e.g. 3e38 times a weight above 1).

    NaN or infinity then comes back, and its arg-max would be a confident-looking label. Rows are
    independent (the model is folded and verified batch invariant), so only the request whose
    rows overflowed is refused; its batch mates' outputs are their own and finite.
    ``first_sample``: the request's number of its first row here (a chunk of a split request).
    """
    if all_finite(outputs):  # the usual case, in one pass: no per-row reduction
        return
    finite = np.isfinite(outputs.reshape(len(outputs), -1)).all(axis=1)
    if not finite.all():
        bad = (np.flatnonzero(~finite) + first_sample).tolist()
        shown = ", ".join(map(str, bad[:10])) + (", ..." if len(bad) > 10 else "")
        raise InvalidInput(
            "input is outside the range the model can compute: outputs are not finite "
            f"(NaN or infinity) for sample{'s' if len(bad) > 1 else ''} {shown}; "
            "send values of the scale the model was trained on"
        )
