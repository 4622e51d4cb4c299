"""Exports never destroy what was there (export/output.py): checked before any work, written to a
temporary sibling, renamed over the output when complete, with the umask's permissions.

A full disk is simulated by a writer that writes part of the file and then fails as the library
reports it (safetensors: an error saying "(os error 28)"; ONNX: ``OSError(ENOSPC)``).
"""
import errno
import os

import pytest
import torch

pytest.importorskip("safetensors")

from dino_fast.export.command import main as export_main  # noqa: E402
from dino_fast.export.hf_export import HF_FILES, export_hf  # noqa: E402
from dino_fast.export.output import OutputError, check_output  # noqa: E402
from dino_fast.export.safetensors_export import export_safetensors  # noqa: E402
from dino_fast.export.timm_export import TIMM_FILES, export_timm  # noqa: E402
from dino_fast.models import build_vit  # noqa: E402
from tests._cli import user_error  # noqa: E402

WRITERS = {"safetensors": export_safetensors, "hf": export_hf, "timm": export_timm}
OUTPUTS = {"safetensors": "w.safetensors", "hf": "hf", "timm": "timm"}


def tiny_vit(depth: int | None = 1):
    vit = build_vit("vit_tiny", 16).eval()
    vit.blocks = vit.blocks[:depth]
    return vit


@pytest.fixture
def checkpoint(tmp_path):
    """A vit_tiny/16 backbone saved as official released weights are."""
    path = tmp_path / "in" / "weights.pth"
    path.parent.mkdir()
    torch.save(tiny_vit(depth=None).state_dict(), path)
    return str(path)


def export(fmt, vit, output, **kwargs):
    """Call the library writer of ``fmt`` (hf and timm without their check: no libraries)."""
    if fmt in ("hf", "timm"):
        kwargs["check"] = False
    return WRITERS[fmt](vit, str(output), "vit_tiny", **kwargs)


def snapshot(path):
    """Every file below ``path`` (or ``path`` itself) with its bytes."""
    if os.path.isfile(path):
        return {"": open(path, "rb").read()}
    return {name: open(os.path.join(path, name), "rb").read() for name in os.listdir(path)}


def full_disk_after_half(monkeypatch):
    """Make safetensors' writer write half its file, then fail as it does on a full disk."""
    import safetensors.torch

    real = safetensors.torch.save_file

    def failing(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)
        with open(filename, "r+b") as f:
            f.truncate(os.path.getsize(filename) // 2)
        raise RuntimeError("Error while serializing: I/O error: No space left on device "
                           "(os error 28)")
    monkeypatch.setattr(safetensors.torch, "save_file", failing)


@pytest.mark.parametrize("fmt", WRITERS)
def test_a_full_disk_leaves_the_earlier_export_as_it_was(tmp_path, checkpoint, capsys,
                                                         monkeypatch, fmt):
    output = tmp_path / "out" / OUTPUTS[fmt]
    argv = ["--checkpoint", checkpoint, "--format", fmt, "--output", str(output), "--no_check"]
    export_main(argv)
    before = snapshot(output)
    full_disk_after_half(monkeypatch)
    line = user_error(capsys, export_main, argv)
    assert "No space left on device" in line and str(output) in line
    assert snapshot(output) == before
    assert os.listdir(output.parent) == [output.name]  # no temporary left behind


def test_a_full_disk_during_the_onnx_save_leaves_the_earlier_file(tmp_path, checkpoint, capsys,
                                                                  monkeypatch):
    pytest.importorskip("onnxscript")
    output = tmp_path / "m.onnx"
    output.write_bytes(b"the earlier export")

    def failing_save(program, path, *args, **kwargs):
        with open(path, "wb") as f:
            f.write(b"half a model")
        raise OSError(errno.ENOSPC, "No space left on device")  # what onnx raises, no path
    monkeypatch.setattr(torch.onnx.ONNXProgram, "save", failing_save)
    line = user_error(capsys, export_main, ["--checkpoint", checkpoint, "--output", str(output),
                                            "--no_check"])
    assert "No space left on device" in line and str(output) in line
    assert output.read_bytes() == b"the earlier export"
    assert sorted(os.listdir(tmp_path)) == ["in", "m.onnx"]


def test_a_failed_check_leaves_the_earlier_folder(tmp_path, monkeypatch):
    from dino_fast.export import hf_export

    vit = tiny_vit()
    export("hf", vit, tmp_path / "hf")
    before = snapshot(tmp_path / "hf")

    def failing_check(folder, vit):
        raise RuntimeError("the transformers ViTModel export disagrees with dino_fast")
    monkeypatch.setattr(hf_export, "check_hf", failing_check)
    with torch.no_grad():
        vit.norm.bias.fill_(1.0)
    with pytest.raises(RuntimeError, match="disagrees"):
        export_hf(vit, str(tmp_path / "hf"), "vit_tiny", check=True)
    assert snapshot(tmp_path / "hf") == before and os.listdir(tmp_path) == ["hf"]


def test_an_unwritable_folder_is_one_line_before_any_work(tmp_path, checkpoint, capsys,
                                                          monkeypatch):
    folder = tmp_path / "read-only"
    folder.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: False if str(path) == str(folder)
                        else real_access(path, mode))
    line = user_error(capsys, export_main, ["--checkpoint", checkpoint, "--format", "hf",
                                            "--output", str(folder / "hf")])
    assert "cannot write in the folder" in line and str(folder) in line


def test_a_denied_write_is_a_write_error_naming_the_output(tmp_path, monkeypatch):
    """A folder that refuses the temporary file when it is created (as a read-only folder does):
    a WriteError (one line in a command) naming the output, nothing written."""
    real_open = os.open

    def denying_open(path, flags, *args, **kwargs):
        if str(path).startswith(str(tmp_path / ".w.safetensors")):
            raise PermissionError(errno.EACCES, "Permission denied", path)
        return real_open(path, flags, *args, **kwargs)
    monkeypatch.setattr(os, "open", denying_open)
    with pytest.raises(OSError, match="Permission denied") as err:
        export_safetensors(tiny_vit(), str(tmp_path / "w.safetensors"), "vit_tiny")
    assert err.value.errno == errno.EACCES and err.value.filename == str(tmp_path / "w.safetensors")
    assert os.listdir(tmp_path) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="chmod does not stop root from writing")
def test_a_read_only_folder_is_one_line(tmp_path, checkpoint, capsys):
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        line = user_error(capsys, export_main, ["--checkpoint", checkpoint, "--format",
                                                "safetensors", "--output",
                                                str(folder / "w.safetensors")])
    finally:
        folder.chmod(0o755)
    assert str(folder) in line


def test_a_missing_parent_is_created_and_a_file_in_the_way_is_one_line(tmp_path, checkpoint,
                                                                       capsys):
    output = tmp_path / "new" / "folders" / "w.safetensors"
    export_main(["--checkpoint", checkpoint, "--format", "safetensors", "--output", str(output)])
    assert output.is_file()
    (tmp_path / "a_file").write_text("")
    line = user_error(capsys, export_main, ["--checkpoint", checkpoint, "--format", "hf",
                                            "--output", str(tmp_path / "a_file" / "hf")])
    assert f"{tmp_path / 'a_file'} is a file, not a folder" in line


def test_the_input_checkpoint_is_never_the_output(tmp_path, checkpoint, capsys):
    before = open(checkpoint, "rb").read()
    line = user_error(capsys, export_main, ["--checkpoint", checkpoint, "--format", "hf",
                                            "--output", os.path.dirname(checkpoint),
                                            "--overwrite"])
    assert "is or holds the input" in line and checkpoint in line
    weights = str(tmp_path / "w.safetensors")
    export_main(["--checkpoint", checkpoint, "--format", "safetensors", "--output", weights])
    line = user_error(capsys, export_main, ["--checkpoint", weights, "--format", "safetensors",
                                            "--output", weights])
    assert "is or holds the input" in line
    assert open(checkpoint, "rb").read() == before and os.path.isfile(weights)


@pytest.mark.parametrize("fmt", WRITERS)
def test_the_wrong_kind_is_refused_unless_overwrite(tmp_path, checkpoint, capsys, fmt):
    output = tmp_path / OUTPUTS[fmt]
    if fmt == "safetensors":
        output.mkdir()
        (output / "keep.txt").write_text("a folder where the file goes")
    else:
        output.write_text("a file where the folder goes")
    argv = ["--checkpoint", checkpoint, "--format", fmt, "--output", str(output), "--no_check"]
    line = user_error(capsys, export_main, argv)
    assert "--overwrite" in line and str(output) in line
    assert output.is_dir() == (fmt == "safetensors")  # untouched
    export_main([*argv, "--overwrite"])
    assert output.is_file() == (fmt == "safetensors")
    assert not [name for name in os.listdir(tmp_path) if name.startswith(".")]


@pytest.mark.parametrize("fmt,names", [("hf", HF_FILES), ("timm", TIMM_FILES)])
def test_a_folder_with_other_files_is_refused_and_an_earlier_export_replaced(tmp_path, fmt,
                                                                             names):
    vit = tiny_vit()
    output = tmp_path / fmt
    output.mkdir()  # an empty folder is fine
    export(fmt, vit, output)
    assert tuple(sorted(os.listdir(output))) == names
    with torch.no_grad():
        vit.norm.bias.fill_(1.0)
    before = snapshot(output)
    export(fmt, vit, output)  # replaces the earlier export
    assert snapshot(output)["model.safetensors"] != before["model.safetensors"]
    (output / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match="notes.txt"):
        export(fmt, vit, output)
    assert (output / "notes.txt").read_text() == "mine"
    export(fmt, vit, output, overwrite=True)
    assert tuple(sorted(os.listdir(output))) == names and os.listdir(tmp_path) == [fmt]


@pytest.mark.parametrize("argv,says", [
    (["--output", "w.safetensors"], "add --format safetensors"),
    (["--output", "model.pth"], "names a PyTorch checkpoint"),
    (["--format", "hf", "--output", "m.onnx"], "--format hf writes a folder"),
    (["--format", "timm", "--output", "w.safetensors"], "--format timm writes a folder"),
    (["--format", "safetensors", "--output", "w.pth"], "name the file *.safetensors")])
def test_the_suffix_and_the_format_agree(capsys, argv, says):
    with pytest.raises(SystemExit) as exit_info:
        export_main(argv)
    assert exit_info.value.code == 2 and says in capsys.readouterr().err


def test_an_onnx_file_without_its_suffix_says_what_it_is(tmp_path, checkpoint, capsys):
    pytest.importorskip("onnxscript")
    export_main(["--checkpoint", checkpoint, "--output", str(tmp_path / "model"), "--no_check"])
    assert f"wrote {tmp_path / 'model'} (vit_tiny/16, ONNX model" in capsys.readouterr().out


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_files_and_folders_get_the_umasks_permissions(tmp_path, umask):
    vit = tiny_vit()
    previous = os.umask(umask)
    try:
        export("safetensors", vit, tmp_path / "w.safetensors")
        export("hf", vit, tmp_path / "hf")
    finally:
        os.umask(previous)
    assert (tmp_path / "w.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask
    assert (tmp_path / "hf").stat().st_mode & 0o777 == 0o777 & ~umask
    for name in HF_FILES:  # the weights too (safetensors creates its files 0600)
        assert (tmp_path / "hf" / name).stat().st_mode & 0o777 == 0o666 & ~umask, name


def test_check_output_accepts_what_an_export_may_replace(tmp_path):
    check_output(str(tmp_path / "new.onnx"))
    (tmp_path / "old.onnx").write_bytes(b"an earlier export")
    check_output(str(tmp_path / "old.onnx"))
    (tmp_path / "hf").mkdir()
    check_output(str(tmp_path / "hf"), HF_FILES)
    with pytest.raises(OutputError, match="is a folder"):
        check_output(str(tmp_path / "hf"))
