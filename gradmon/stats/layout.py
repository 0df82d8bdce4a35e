"""The partials layout shared by every backend: one float64 row of 8 columns per tensor.

Every column combines across tensors, chunks and ranks with a plain sum, max or min,
which is what makes FSDP shards and cross-rank recording rules exact.
"""

from __future__ import annotations

from enum import IntEnum


class Col(IntEnum):
    SUM_SQ = 0  # sum of squares of finite entries          (combine: sum)
    SUM = 1  # sum of finite entries                         (combine: sum)
    ABS_MAX = 2  # max |x| over finite entries, 0 if none    (combine: max)
    MIN = 3  # min over finite entries, +inf if none         (combine: min)
    MAX = 4  # max over finite entries, -inf if none         (combine: max)
    ZERO_COUNT = 5  # entries exactly equal to zero          (combine: sum)
    NAN_COUNT = 6  # NaN entries                             (combine: sum)
    INF_COUNT = 7  # +inf or -inf entries                    (combine: sum)


NCOLS = len(Col)
