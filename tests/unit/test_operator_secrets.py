"""`./danbao`'s secrets file: made on first use, before anything is installed, never with an
empty value (an empty token left every service refusing to start, and stayed so)."""
import os
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
NAMES = ("DANBAO_API_TOKEN", "DANBAO_JWT_SECRET", "DANBAO_PII_KEY")


def _fresh_clone(tmp_path: Path) -> Path:
    """The operator script alone, as on a fresh clone: no .venv, no .data."""
    root = tmp_path / "clone"
    root.mkdir()
    shutil.copy(ROOT / "danbao", root / "danbao")
    return root


def _status(root: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DANBAO_")}
    # `status` exits 1 when something is down, which is everything here
    subprocess.run(["bash", str(root / "danbao"), "status"], env=env, capture_output=True, timeout=60)


def _secrets(root: Path) -> dict[str, str]:
    lines = (root / ".data" / "secrets.env").read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if line)


def test_status_on_a_fresh_clone_writes_every_secret_non_empty(tmp_path):
    root = _fresh_clone(tmp_path)
    _status(root)
    values = _secrets(root)
    assert set(values) == set(NAMES)
    assert all(len(values[name]) >= 40 for name in NAMES), {k: len(v) for k, v in values.items()}
    assert len(set(values.values())) == 3
    assert (root / ".data" / "secrets.env").stat().st_mode & 0o077 == 0


def test_an_empty_value_is_generated_and_the_others_are_kept(tmp_path):
    root = _fresh_clone(tmp_path)
    (root / ".data").mkdir()
    (root / ".data" / "secrets.env").write_text("DANBAO_API_TOKEN=\nDANBAO_PII_KEY=kept-key\n")
    _status(root)
    values = _secrets(root)
    assert values["DANBAO_PII_KEY"] == "kept-key"
    assert len(values["DANBAO_API_TOKEN"]) >= 40 and len(values["DANBAO_JWT_SECRET"]) >= 60
    assert sorted(values) == sorted(NAMES)
