"""The contract every framework adapter meets, as a suite each adapter's test file subclasses:

class TestTorchAdapter(AdapterContract):
    name = "torch"
    def native(self, ddp_kwargs): return {"ddp_kwargs": ddp_kwargs}
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from adapters import registry
from adapters.config import compose, validate
from adapters.policy import Backend
from adapters.schemas import conf_dir

REPO = Path(__file__).resolve().parents[1]
PRESETS = sorted(p.stem for p in (conf_dir() / "ddp").glob("*.yaml"))
# Every conf/ddp preset -> the DDP keyword arguments it means, whatever the framework.
PRESET_DDP_KWARGS = {
    "strict": {},
    "safe": {"find_unused_parameters": True},
    "static": {"static_graph": True},
    "debug": {"find_unused_parameters": True},
    # decided in each run from its first steps (or ddp.ignore); nothing fixed at translation time
    "auto": {},
    "ignore": {},
}


class AdapterContract:
    name: str

    def native(self, ddp_kwargs: dict, backend: Backend) -> dict:
        """The framework's own settings that carry ``ddp_kwargs`` on ``backend``."""
        raise NotImplementedError

    @property
    def adapter(self):
        return registry.load_adapter(self.name)

    def test_every_preset_is_in_the_table(self):
        assert sorted(PRESET_DDP_KWARGS) == PRESETS

    @pytest.mark.parametrize("preset", PRESETS)
    def test_preset_translates_to_native_settings(self, preset):
        checked = validate(compose([f"framework={self.name}", f"ddp={preset}"]), for_run=False)
        for backend in (Backend.gloo, Backend.nccl):
            native = self.adapter.translate(checked.policy, backend=backend)
            assert dict(native.settings) == self.native(PRESET_DDP_KWARGS[preset], backend)
            assert native == self.adapter.translate(checked.policy, backend=backend), "translate is pure"
            json.dumps(dict(native.settings))
            assert set(native.env) <= {"TORCH_DISTRIBUTED_DEBUG"}
            assert native.snippet

    def test_identity(self):
        assert self.adapter.name == self.name
        assert registry.entry(self.name).module.endswith(f".{self.name}")
        assert dataclasses.is_dataclass(self.adapter.schema)
        assert compose([f"framework={self.name}"]).framework.name == self.name

    def test_one_conf_file_and_one_docs_page(self):
        assert (conf_dir() / "framework" / f"{self.name}.yaml").is_file()
        assert (REPO / "docs" / "frameworks" / f"{self.name}.md").is_file()

    def test_translation_imports_no_framework(self):
        # The adapter module and its translation must stay importable without any framework installed.
        code = (
            "import sys; from adapters import registry; from adapters.config import compose, validate; "
            "from adapters.policy import Backend; "
            f"c = validate(compose(['framework={self.name}', 'ddp=safe']), for_run=False); "
            f"registry.load_adapter('{self.name}').translate(c.policy, backend=Backend.gloo); "
            "heavy = ('mmengine', 'mmdet', 'mmcv', 'fastNLP', 'nnunetv2', 'lightning', 'accelerate', 'transformers'); "
            "print(sorted(m for m in heavy if m in sys.modules))"
        )
        out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
        assert out.stdout.strip() == "[]"
