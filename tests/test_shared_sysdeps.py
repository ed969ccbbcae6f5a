"""The set-up names the exact command when it cannot install a system library itself."""

from shared import sysdeps


def test_missing_library_prints_exact_command_when_not_root(monkeypatch, capsys):
    monkeypatch.setattr(sysdeps.ctypes.util, "find_library", lambda name: None)
    monkeypatch.setattr(sysdeps.os, "geteuid", lambda: 1000)
    assert sysdeps.ensure(install=True) == 1
    err = capsys.readouterr().err
    assert "sudo apt-get install -y --no-install-recommends libusb-1.0-0" in err
    assert sysdeps.main(["--check"]) == 0  # non-strict: reports but does not fail the set-up
    assert sysdeps.main(["--check", "--strict"]) == 1


def test_present_library_needs_nothing(monkeypatch):
    monkeypatch.setattr(sysdeps.ctypes.util, "find_library", lambda name: f"lib{name}.so")
    assert sysdeps.missing_libraries() == [] and sysdeps.ensure() == 0
