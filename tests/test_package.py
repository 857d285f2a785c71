import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import mochi
from mochi.cli import main
from mochi.files import atomic_path, atomic_write_text

ROOT = Path(__file__).resolve().parents[1]


def test_import_is_light():
    code = "import sys, mochi; print('torch' in sys.modules)"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert out.stdout.strip() == "False"


def test_help_does_not_import_torch():
    """Parsing imported mochi.offload (and so torch, ~2 s) for every command line, `--help` included."""
    code = (
        "import sys\nfrom mochi.cli import main\n"
        "for argv in (['--help'], ['generate', '--help'], ['serve', '--help']):\n"
        "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
        "print('torch' in sys.modules, file=sys.stderr)"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert out.stderr.strip() == "False"


def test_version_and_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"mochi {mochi.__version__}"


def test_unknown_public_name():
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        mochi.nope  # noqa: B018


def test_atomic_path_renames_on_success(tmp_path):
    target = tmp_path / "a.mp4"
    with atomic_path(target) as tmp:
        assert tmp.suffix == ".mp4" and tmp.parent == tmp_path
        tmp.write_bytes(b"x")
        assert not target.exists()
    assert target.read_bytes() == b"x"
    assert list(tmp_path.iterdir()) == [target]
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask


def test_atomic_path_leaves_nothing_on_error(tmp_path):
    target = tmp_path / "a.txt"
    atomic_write_text(target, "old")
    with pytest.raises(KeyboardInterrupt), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise KeyboardInterrupt
    assert target.read_text() == "old"
    assert list(tmp_path.iterdir()) == [target]


def test_atomic_path_missing_folder(tmp_path):
    with pytest.raises(ValueError, match="does not exist"), atomic_path(tmp_path / "no" / "a.txt"):
        pass


def test_atomic_path_onto_a_folder_is_refused_before_the_writer_runs(tmp_path):
    """os.replace onto a folder failed after the work, with "Is a directory" and no rule."""
    (tmp_path / "a.txt").mkdir()
    want = f"cannot write {str(tmp_path / 'a.txt')!r}: a folder has that name; move it away or give another"
    with pytest.raises(ValueError, match=re.escape(want)), atomic_path(tmp_path / "a.txt"):
        raise AssertionError("the writer ran")
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"] and (tmp_path / "a.txt").is_dir()


def test_readme_test_command_is_what_ci_runs():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    blocks = re.findall(r"```(?:bash|sh)\n(.*?)```", readme, re.S)
    test_cmd = [b.strip() for b in blocks if "pytest" in b]
    assert test_cmd, "README has no test command"
    assert test_cmd[0] in ci


def test_dir_lists_the_lazily_loaded_public_api():
    """The public names are loaded on first use (PEP 562); dir(mochi), and with it tab completion, listed
    none of them."""
    import mochi

    assert set(mochi.__all__) <= set(dir(mochi))
    assert dir(mochi) == sorted(dir(mochi)) and "__version__" in dir(mochi)
