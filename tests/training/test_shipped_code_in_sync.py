"""The code copied into the committed pretrained pipeline folder is byte-identical to the package's current source,
so `DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)` runs the code the tests test."""

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = sorted((ROOT / "training" / "pretrained").rglob("*.py"))


def test_a_pretrained_folder_ships_code():
    assert SHIPPED, "training/pretrained/ holds no shipped code"


@pytest.mark.parametrize("shipped", SHIPPED, ids=lambda p: str(p.relative_to(ROOT)))
def test_shipped_copy_equals_source(shipped):
    sources = [ROOT / pkg / shipped.name for pkg in ("schedulers", "custom_pipelines")]
    source = next((s for s in sources if s.exists()), None)
    if source is None:  # a loader entry written by save_pretrained, e.g. scheduling_tutorial_ddim_entry.py
        assert shipped.stem.endswith("_entry"), f"{shipped.name} has no source in schedulers/ or custom_pipelines/"
        return
    assert shipped.read_bytes() == source.read_bytes(), (
        f"{shipped.relative_to(ROOT)} is stale: copy {source.relative_to(ROOT)} over it (or re-save the pipeline)"
    )
