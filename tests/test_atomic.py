"""Outputs appear only complete: common.atomic."""

import pytest

from common import atomic


def test_output_appears_only_when_the_block_succeeds(tmp_path):
    final = tmp_path / "report.md"
    final.write_text("old")
    with pytest.raises(RuntimeError), atomic.open_text(final) as f:
        f.write("half")
        raise RuntimeError("killed mid-write")
    assert final.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.md"]  # no temporary left
    atomic.write_json(final, {"a": 1})
    assert final.read_text() == '{\n "a": 1\n}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.md"]


def test_temporary_name_keeps_the_extensions(tmp_path):
    with atomic.path(tmp_path / "pred.nii.gz") as tmp:
        assert tmp.name.endswith(".pred.nii.gz") and tmp.parent == tmp_path
        assert not (tmp_path / "pred.nii.gz").exists()
        tmp.write_bytes(b"x")
    assert (tmp_path / "pred.nii.gz").read_bytes() == b"x"
