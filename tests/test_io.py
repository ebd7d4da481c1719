"""Outputs appear only when complete: an interrupted or failed run leaves nothing behind."""
import pytest

from slimlm import io, models
from slimlm.cli import main
from slimlm.errors import SlimlmError


def test_atomic_dir_moves_into_place_only_on_success(tmp_path):
    target = tmp_path / "out"
    with io.atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("x")
        assert not target.exists()
    assert (target / "a.txt").read_text() == "x"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


@pytest.mark.parametrize("exc", [KeyboardInterrupt, RuntimeError, SystemExit])
def test_atomic_dir_cleans_up_on_interruption(tmp_path, exc):
    target = tmp_path / "out"
    with pytest.raises(exc):
        with io.atomic_dir(target) as tmp:
            (tmp / "half.bin").write_bytes(b"\0" * 10)
            raise exc()
    assert list(tmp_path.iterdir()) == []


def test_existing_output_needs_overwrite(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("old")
    with pytest.raises(SlimlmError, match="--overwrite"):
        io.check_output_dir(tmp_path / "out", overwrite=False)
    with io.atomic_dir(tmp_path / "out", overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["new.txt"]


def test_interrupted_cli_run_leaves_no_output(tmp_path, model_dir, monkeypatch, capsys):
    def interrupted(model, tok, folder):
        (folder / "model.safetensors").write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(models, "save_model", interrupted)
    out = tmp_path / "q"
    code = main(["quantize", "--model", str(model_dir), "--method", "rtn", "--bits", "4", "--group-size", "32",
                 "--output", str(out)])
    assert code == 130 and "interrupted" in capsys.readouterr().err
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".q.")]


def test_cli_refuses_existing_output_before_work(tmp_path, model_dir, capsys):
    out = tmp_path / "q"
    out.mkdir()
    code = main(["quantize", "--model", str(model_dir), "--method", "rtn", "--output", str(out)])
    assert code == 2 and "--overwrite" in capsys.readouterr().err
