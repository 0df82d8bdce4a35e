"""Signal quality: the zoo of tests/zoo.py with the default health config.

Healthy runs of common shapes raise no anomaly at all; each injected fault is found within
2 collections of its step, naming the right layer. `python -m tests.zoo` prints the README
table from the same cases.
"""

from __future__ import annotations

import logging
import re

import pytest

from gradmon.snapshot import GLOBAL_LAYER
from tests import zoo

HEALTHY = [c for c in zoo.CASES if c.fault is None]
FAULTS = [c for c in zoo.CASES if c.fault is not None]


# Said once each (a warning), never reported as an anomaly: Conv2d biases before BatchNorm.
STRUCTURALLY_ZERO = {"cnn_batchnorm": ["0.bias", "3.bias", "7.bias"]}


@pytest.mark.parametrize("case", HEALTHY, ids=lambda c: c.name)
def test_healthy_run_raises_nothing(case: zoo.Case, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="gradmon"):
        result = zoo.run_case(case)
    assert result.false_alarms == [], zoo._describe(result.false_alarms)
    warned = " ".join(
        r.getMessage() for r in caplog.records if "Structurally zero" in r.getMessage()
    )
    named = sorted(set(re.findall(r"([\w.]+) \(rms", warned)))
    assert named == STRUCTURALLY_ZERO.get(case.name, [])


@pytest.mark.parametrize("case", FAULTS, ids=lambda c: c.name)
def test_fault_is_found_within_two_collections(case: zoo.Case) -> None:
    result = zoo.run_case(case)
    assert result.false_alarms == [], zoo._describe(result.false_alarms)
    assert result.latency is not None and result.latency <= 2, result.latency
    assert result.named, zoo._describe(result.found)
    if case.name == "branch_jump":
        # the case is what it says: no global spike, only the layer's own history tells
        assert not any(a.layer == GLOBAL_LAYER for a in result.found)
        after = result.snapshots[zoo.FAULT_STEP].global_norm
        assert after < 3 * result.snapshots[zoo.FAULT_STEP - 1].global_norm
