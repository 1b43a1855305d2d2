"""The systemd unit: what docs/deploy.md installs is what the unit runs, and systemd accepts it.

``systemd-analyze verify`` checks the unit's syntax and that every command
it runs is an executable file; it does not look users up, so the user and
group are checked against the documented ``useradd`` instead. It reports
most problems (an unknown key, a bad value) on stderr with exit status 0,
so any output at all counts as a failure.
"""
from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, TIMEOUT

UNIT = ROOT / "contrib" / "init" / "realplexor.service"
DEPLOY = ROOT / "docs" / "deploy.md"
EXAMPLE_CONFIG = ROOT / "contrib" / "realplexor.toml"
# Where docs/deploy.md installs the command and the configuration.
VENV = "/opt/realplexor/.venv"
COMMAND = f"{VENV}/bin/realplexor"
CONFIG = "/etc/realplexor/realplexor.toml"

needs_systemd_analyze = pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                                           reason="needs systemd-analyze")


def unit_settings(text: str) -> dict[str, list[str]]:
    """``Key=value`` lines of a unit file, every value of each key in order."""
    settings: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def verify(unit: Path) -> str:
    """Everything ``systemd-analyze verify`` says about ``unit``, with its exit status."""
    result = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                            text=True, timeout=TIMEOUT)
    return f"{result.stdout}{result.stderr}" + (f"exit status {result.returncode}" if result.returncode else "")


def as_installed(tmp_path: Path, unit_text: str) -> Path:
    """A copy of the unit whose documented command is a real (stand-in) executable."""
    command = tmp_path / "realplexor"
    command.write_text("#!/bin/sh\n")
    command.chmod(0o755)
    copy = tmp_path / "realplexor.service"
    copy.write_text(unit_text.replace(COMMAND, str(command)))
    return copy


@pytest.fixture
def verify_works(tmp_path):
    """Skip where systemd-analyze finds fault even with a minimal correct unit."""
    control = tmp_path / "control" / "control.service"
    control.parent.mkdir()
    control.write_text("[Service]\nExecStart=/bin/sh -c true\n")
    said = verify(control)
    if said:
        pytest.skip(f"systemd-analyze verify here rejects even a minimal unit: {said}")


@needs_systemd_analyze
def test_systemd_accepts_the_unit_as_installed(tmp_path, verify_works):
    assert verify(as_installed(tmp_path, UNIT.read_text())) == ""


@needs_systemd_analyze
@pytest.mark.parametrize("change, complaint", [
    (("/opt/realplexor/.venv/bin/realplexor --config /etc/realplexor/realplexor.toml\n",
      "/usr/local/bin/realplexor --config /etc/realplexor/realplexor.toml\n"), "is not executable"),
    (("Restart=on-failure", "Restart=on-failure\nRestartEvery=1"), "Unknown key"),
    (("Type=simple", "Type=eventually"), "service type"),
])
def test_the_check_catches_a_broken_unit(tmp_path, verify_works, change, complaint):
    text = UNIT.read_text()
    assert change[0] in text
    assert complaint in verify(as_installed(tmp_path, text.replace(*change)))


def test_the_unit_runs_what_the_documented_install_creates():
    settings = unit_settings(UNIT.read_text())
    deploy = DEPLOY.read_text()
    for key in ("ExecStartPre", "ExecStart"):
        command = shlex.split(settings[key][0])
        assert command[0] == COMMAND
        assert command[1:3] == ["--config", CONFIG]
    assert f"python3 -m venv {VENV}\n" in deploy
    assert f"{VENV}/bin/pip install " in deploy
    assert f"{CONFIG}\n" in deploy
    assert settings["User"] == settings["Group"] == ["realplexor"]
    useradd = [line for line in deploy.splitlines() if line.startswith("useradd ")]
    assert len(useradd) == 1
    words = shlex.split(useradd[0])
    assert "--system" in words and "--user-group" in words and words[-1] == "realplexor"
    assert "cp /opt/realplexor/contrib/init/realplexor.service /etc/systemd/system/\n" in deploy


def test_the_units_check_passes_on_the_example_configuration():
    """ExecStartPre's command, run on the example file that the install copies into place."""
    command = shlex.split(unit_settings(UNIT.read_text())["ExecStartPre"][0])
    args = [str(EXAMPLE_CONFIG) if arg == CONFIG else arg for arg in command[1:]]
    result = subprocess.run([sys.executable, "-m", "realplexor", *args], capture_output=True,
                            text=True, timeout=TIMEOUT)
    assert result.returncode == 0, result.stderr
    assert "configuration OK" in result.stdout
