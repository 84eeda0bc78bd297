"""PVC scheduling: which reflection hits become calibrations (Rust: src/pvc).

A `PVCSchedule` is attached to each stream (`ReflectionDetector.stream(schedule)`, or
`StreamBatch.add(slot, schedule)`), which keeps its own schedule state.
"""

from __future__ import annotations

from tvc_rs._native import Calibration, PVCSchedule

__all__ = ["Calibration", "PVCSchedule"]
