"""`explain` prints the same native settings for every framework, ddp preset, backend and memory preset.

The snapshot (tests/snapshots/explain.json) was written from the code before its modules were reorganised;
a change to what any framework receives shows here as a difference naming the case. After an intended
change, rewrite it: ADAPTERS_UPDATE_SNAPSHOT=1 python -m pytest tests/test_explain_snapshot.py
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from adapters import registry
from adapters.cli import explain
from adapters.schemas import conf_dir

SNAPSHOT = Path(__file__).parent / "snapshots" / "explain.json"
PRESETS = sorted(p.stem for p in (conf_dir() / "ddp").glob("*.yaml"))
CASES = [
    [f"framework={fw}", f"ddp={preset}", f"launcher.backend={backend}"]
    for fw in registry.FRAMEWORKS
    for preset in PRESETS
    for backend in ("gloo", "nccl")
] + [
    [f"framework={fw}", "memory=lowmem", f"launcher.backend={b}"]
    for fw in registry.FRAMEWORKS
    for b in ("gloo", "nccl")
]


def _case(overrides: list[str]) -> dict:
    out = json.loads(explain(overrides, as_json=True))
    out.pop("policy")  # the composed ddp node: checked by the preset tests; the snapshot is about what it becomes
    return out


def test_every_case_is_covered():
    assert len(PRESETS) == 6 and len(registry.FRAMEWORKS) >= 4


def test_explain_prints_the_same_native_settings_as_the_snapshot():
    got = {" ".join(case): _case(case) for case in CASES}
    if os.environ.get("ADAPTERS_UPDATE_SNAPSHOT") == "1":
        SNAPSHOT.write_text(json.dumps(got, indent=1, sort_keys=True) + "\n")
        pytest.skip("snapshot rewritten")
    want = json.loads(SNAPSHOT.read_text())
    assert sorted(got) == sorted(want), "cases differ: rewrite the snapshot if a framework or preset was added"
    for case in want:
        assert got[case] == want[case], case
