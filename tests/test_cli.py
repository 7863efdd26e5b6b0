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


def test_simulate_same_seed_gives_byte_identical_files(tmp_path, capsys):
    # The acceptance command, run twice.
    for out in ("a", "b"):
        assert main(["simulate", "--days", "3", "--seed", "1", "--out", str(tmp_path / out),
                     "--quiet"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["behavior_events"] > 10_000 and summary["items"] > 0
    for name in ("items.jsonl", "behaviors.jsonl"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    main(["simulate", "--days", "3", "--seed", "2", "--out", str(tmp_path / "c"), "--quiet"])
    assert (tmp_path / "c" / "behaviors.jsonl").read_bytes() != (
        tmp_path / "a" / "behaviors.jsonl").read_bytes()


@pytest.mark.slow
def test_demo_quick_reports_what_it_did(tmp_path, capsys):
    assert main(["demo", "--quick", "--json", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    figures = json.loads(out.strip().splitlines()[-1])
    assert figures["items_encoded"] == 64 and figures["embedding_dim"] == 1664
    assert figures["behavior_events"] > 1_000 and figures["item_events"] >= figures["items"]
    assert figures["encoder_version"].startswith("enc-")
    # Malformed records are mixed in; each one is a dead letter with a reason, none lost.
    dead = (tmp_path / "dead_letters.jsonl").read_text().splitlines()
    assert figures["dead_letters"] == len(dead) > 0
    assert all(json.loads(line)["reason"] for line in dead)
    assert 0.1 < figures["fresh_impression_share"] < 0.5
    assert "not implemented yet" in out  # it does not pretend to do more than it does
