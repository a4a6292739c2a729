"""``selftest``: the device check (here on the CPU, the one device CI has) and the hint without the extra."""

from __future__ import annotations

from pathlib import Path

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


def test_an_unknown_device_name_lists_what_the_command_accepts(capsys) -> None:
    assert main(["selftest", "--device", "tpu"]) == 2  # torch knows "tpu"-like types; this command does not
    err = capsys.readouterr().err
    assert err == (
        "mantranet selftest: error: --device tpu: not a device this command checks; it accepts cpu, cuda, "
        "cuda:N (N: a GPU's index) and mps\n"
    )


def test_a_k_expression_that_cannot_run_exits_2_with_the_reason_and_writes_nothing_here(tmp_path) -> None:
    """Exit 2 ("could not run", as the help says), not 1 ("failed"); Hypothesis's files go to the user cache,
    never to .hypothesis/ in the folder the command runs from. In a subprocess (pytest cannot run inside pytest),
    one for both commands (TensorFlow is imported once)."""
    import json
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), "MANTRANET_HOME": str(tmp_path / "home")}
    script = (
        "import contextlib, io, json, sys\n"
        "from mantranet_cli.main import main\n"
        "out = []\n"
        "for expression in sys.argv[1:]:\n"
        "    err = io.StringIO()\n"
        "    with contextlib.redirect_stderr(err):\n"
        "        code = main(['selftest', '-k', expression])\n"
        "    out.append((code, err.getvalue()))\n"
        "print(json.dumps(out))\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", script, "(((", "no_test_is_named_so"],
        cwd=tmp_path, env=env, text=True, capture_output=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    (bad_code, bad_err), (none_code, none_err) = json.loads(run.stdout.splitlines()[-1])
    assert (bad_code, none_code) == (2, 2), (bad_err, none_err)
    assert bad_err.startswith("mantranet selftest: error: could not run: -k '(((' is not an expression pytest reads (")
    assert none_err == (
        "mantranet selftest: error: could not run: -k 'no_test_is_named_so' selects none of the suite's tests\n"
    )
    assert "FAILED" not in run.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["home"]  # no .hypothesis/ where the command ran
    assert (tmp_path / "home" / "hypothesis").is_dir()  # Hypothesis's constants cache, in the user cache
