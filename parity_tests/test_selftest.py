"""``selftest``: the device check (here on the CPU, the one device CI has) and the hint without the extra."""

from __future__ import annotations

import pytest

from mantranet_cli.main import main
from parity_tests import selftest as selftest_module
from parity_tests.selftest import INSTALL_HINT, MissingExtra, device_check, selftest

SIZE = 24  # small images keep the two full comparisons cheap; every layer still runs (windows may exceed them)


def test_the_device_check_compares_every_layer_with_the_reference() -> None:
    check = device_check("cpu", releases=(4,), size=SIZE)
    # the same comparison as the suite's, through a Side that moves tensors to the device and back
    assert check.passed and check.first_divergent is None and check.images == 6 and check.releases == [4]
    layers = list(check.worst)
    assert layers[0] == "b1c1" and layers[-1] == "pred" and len(layers) == 21
    # each layer's own error (local mode) is float32 rounding; divStd's values reach ~1e3 on near-flat channels
    assert 0 < max(v for k, v in check.worst.items() if k != "divStd") < 1e-3


def test_the_device_check_names_a_layer_that_is_off(monkeypatch) -> None:
    stages = selftest_module.DeviceSide.stages

    def off_at_b3c1(self, x):
        for name, out in stages(self, x):
            yield name, out + 1e-2 if name == "b3c1" else out  # what a wrong kernel on the device would give

    monkeypatch.setattr(selftest_module.DeviceSide, "stages", off_at_b3c1)
    check = device_check("cpu", releases=(4,), size=SIZE)
    assert (
        not check.passed
        and check.first_divergent.startswith("release 4, image ")
        and "b3c1 (cumulative)" in (check.first_divergent)
    )


def test_without_the_reference_extra_one_line_says_what_to_install(monkeypatch, capsys) -> None:
    monkeypatch.setattr(selftest_module, "missing_extra", lambda: ["tensorflow", "tf_keras"])
    with pytest.raises(MissingExtra, match="selftest needs tensorflow, tf_keras"):
        selftest()
    assert main(["selftest"]) == 2
    err = capsys.readouterr().err
    assert err == f"mantranet selftest: error: selftest needs tensorflow, tf_keras: {INSTALL_HINT}\n"


def test_an_unavailable_device_is_refused_before_any_test(capsys) -> None:
    assert main(["selftest", "--device", "nonsense"]) == 2
    assert "--device nonsense" in capsys.readouterr().err
