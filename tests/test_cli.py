"""The ``ppm`` command line: fast help, config errors, and the simulate/demo commands."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from ppm.cli import main

HEAVY = ("torch", "transformers", "feast", "faust", "pandas", "pyarrow")


def test_help_imports_nothing_heavy():
    code = (
        "import sys\n"
        "from ppm.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        f"print([m for m in {HEAVY!r} if m in sys.modules])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "usage: ppm" in out.stdout
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_bad_config_is_a_usage_error(monkeypatch, capsys):
    monkeypatch.setenv("PPM__ENCODERS__IMAGE_SIZE", "huge")
    with pytest.raises(SystemExit) as exc:
        main(["config"])
    assert exc.value.code == 2
    assert "image_size" in capsys.readouterr().err


def test_config_prints_the_effective_values(monkeypatch, capsys):
    monkeypatch.setenv("PPM__SIMULATOR__SEED", "42")
    assert main(["config"]) == 0
    assert json.loads(capsys.readouterr().out)["simulator"]["seed"] == 42
