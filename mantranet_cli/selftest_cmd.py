"""``mantranet selftest``: the parity suite from the installed package, on this machine (``parity_tests.selftest``)."""

from __future__ import annotations

import argparse
import json
import re
from collections import Counter

from .errors import BAD_INPUT, CommandError

SHOWN_SKIPS = 5


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "selftest",
        help="run the parity test suite on this machine (needs the reference extra)",
        description="Run the project's property-based parity suite from the installed package, with this machine's "
        "PyTorch and TensorFlow: every layer and the whole model against the TensorFlow reference and a float64 "
        "evaluation, on generated weights and images. Default: the quick derandomized profile (the same examples "
        "on every run); --thorough: many more, different each run. --device also checks the model on a GPU "
        "layer by layer against the reference. Exit status: 0 passed, 1 failed, 2 could not run (for instance "
        "without the reference extra: pip install 'mantranet-torch[reference]').",
    )
    p.add_argument("--thorough", action="store_true", help="the exploratory profile: many more examples (slow)")
    p.add_argument("--device", metavar="DEV", help="also check the model on DEV (cuda, cuda:1, mps, cpu)")
    p.add_argument("-k", dest="keyword", metavar="EXPR", help="run only the tests pytest's -k EXPR selects")
    p.add_argument("--verbose", action="store_true", help="show pytest's own output")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from parity_tests.selftest import MissingExtra, selftest

    if args.device is not None:
        check_device(args.device)
    try:
        result = selftest(args.thorough, args.device, args.keyword, quiet=not args.verbose)
    except MissingExtra as e:
        raise CommandError(str(e), BAD_INPUT) from None
    if result.problem is not None:  # the suite did not run: "could not run", not "failed"
        raise CommandError(f"could not run: {result.problem}", BAD_INPUT)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
        return 0 if result.passed else 1
    counts = ", ".join(f"{n} {kind}" for kind, n in result.counts.items() if n or kind in ("passed", "failed"))
    print(f"selftest, profile {result.profile} ({', '.join(result.files)}): {counts} in {result.seconds:.0f} s")
    for test in result.failures:
        print(f"  FAILED {test}")
    reasons = Counter(skip.split(": ", 1)[-1] for skip in result.skipped)
    for reason, n in reasons.most_common(SHOWN_SKIPS):
        print(f"  skipped {n}: {reason}")
    if result.device is not None:
        d = result.device
        worst = max(d.worst.items(), key=lambda kv: kv[1]) if d.worst else ("-", 0.0)
        verdict = "every layer within tolerance" if d.passed else f"first over tolerance: {d.first_divergent}"
        print(
            f"device {d.device}: releases {', '.join(map(str, d.releases))} on {d.images} built-in images, "
            f"{verdict}; largest error of a layer alone {worst[1]:.2g} ({worst[0]})"
        )
    if result.exit_code not in (0, 1):
        print(f"pytest stopped with exit status {result.exit_code}; rerun with --verbose to see why")
    print("PASSED" if result.passed else "FAILED")
    return 0 if result.passed else 1


DEVICE_NAMES = re.compile(r"(cpu|mps|cuda(:\d+)?)")
ACCEPTED_DEVICES = "cpu, cuda, cuda:N (N: a GPU's index) and mps"


def check_device(device: str) -> None:
    """Refuse a --device that is not one of ``ACCEPTED_DEVICES``, or that this machine's PyTorch lacks."""
    import torch

    if not DEVICE_NAMES.fullmatch(device):
        raise CommandError(
            f"--device {device}: not a device this command checks; it accepts {ACCEPTED_DEVICES}", BAD_INPUT
        )
    target = torch.device(device)
    available = {
        "cuda": lambda: torch.cuda.is_available() and (target.index or 0) < torch.cuda.device_count(),
        "mps": lambda: getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available(),
        "cpu": lambda: True,
    }
    if not available[target.type]():
        raise CommandError(f"--device {device}: not available to this PyTorch build on this machine", BAD_INPUT)
