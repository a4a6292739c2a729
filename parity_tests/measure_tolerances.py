"""Measure the worst errors behind ``tolerances.py``: ``python -m parity_tests.measure_tolerances``.

Runs the parity comparison (both modes, with the float64 oracle) over releases, weight seeds (official-layout
files, as in the suite), image kinds and sizes, and prints per layer and mode the worst error of PyTorch
against the reference and of each framework against float64, the smallest atol that would pass at the
policy's rtol without the oracle's arbitration, and how many cases fail under the policy. A few minutes
per release and seed with ``--threads 1`` on two cores.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mantranet_torch import LAYERS, RELEASES

from .official_files import WeightStore
from .runner import compare_layers
from .strategies import IMAGE_KINDS, Shape, make_image
from .tolerances import MODES

SHAPES = (Shape(2, 1, 1), Shape(1, 1, 70), Shape(1, 33, 47), Shape(3, 20, 21), Shape(1, 70, 64), Shape(1, 96, 96))


@dataclass
class Worst:
    """The largest value seen of one statistic, and the case it came from."""

    value: float = 0.0
    case: str = "-"

    def update(self, value: float, case: str) -> None:
        if value > self.value:
            self.value, self.case = value, case


@dataclass
class LayerStats:
    torch_vs_reference: Worst = field(default_factory=Worst)
    min_atol: Worst = field(default_factory=Worst)
    torch_vs_exact: Worst = field(default_factory=Worst)
    reference_vs_exact: Worst = field(default_factory=Worst)
    failures: int = 0


def measure(
    store: WeightStore, releases: list[int], seeds: list[int], shapes: tuple[Shape, ...]
) -> dict[tuple[str, str], LayerStats]:
    stats = {(mode, name): LayerStats() for mode in MODES for name in LAYERS}
    for release in releases:
        for seed in seeds:
            w = store.get(release, seed)
            for kind in IMAGE_KINDS:
                for shape in shapes:
                    case = f"Ptrain{release} seed {seed} {kind} {shape.batch}x{shape.height}x{shape.width}"
                    start = time.perf_counter()
                    report = compare_layers(w.reference, w.model, make_image(kind, shape, seed), oracle=w.oracle)
                    for layer in report.layers:
                        for mode, comparison in layer.comparisons.items():
                            attribution = (
                                layer.cumulative_attribution if mode == "cumulative" else layer.local_attribution
                            )
                            s = stats[(mode, layer.name)]
                            s.torch_vs_reference.update(comparison.max_abs, case)
                            s.min_atol.update(comparison.min_atol, case)
                            s.torch_vs_exact.update(attribution.torch_max_abs, case)
                            s.reference_vs_exact.update(attribution.reference_max_abs, case)
                            s.failures += not comparison.passed
                    print(f"{case}: {time.perf_counter() - start:.1f}s, first divergent {report.first_divergent_layer}")
                    for failure in report.failures():
                        print(f"    {failure}")
    return stats


def print_table(stats: dict[tuple[str, str], LayerStats]) -> None:
    print(
        f"{'mode':<10} {'layer':<16} {'torch-ref':>9} {'min atol':>9} {'torch-f64':>9} {'ref-f64':>9} fails  worst case"
    )
    for (mode, name), s in stats.items():
        print(
            f"{mode:<10} {name:<16} {s.torch_vs_reference.value:9.3g} {s.min_atol.value:9.3g} "
            f"{s.torch_vs_exact.value:9.3g} {s.reference_vs_exact.value:9.3g} {s.failures:5d}  "
            f"{s.min_atol.case}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--releases", type=int, nargs="+", default=sorted(RELEASES))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--max-side", type=int, default=96, help="skip shapes with a side over this")
    parser.add_argument("--threads", type=int, default=0, help="PyTorch threads (0: its default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = tuple(s for s in SHAPES if max(s.height, s.width) <= args.max_side)
    with tempfile.TemporaryDirectory() as folder:
        print_table(measure(WeightStore(Path(folder)), args.releases, args.seeds, shapes))


if __name__ == "__main__":
    main()
