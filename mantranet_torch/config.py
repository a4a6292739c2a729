"""Architecture settings of ManTraNet and the five official releases."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

FIXED_FIRST_LAYER_FILTERS = 12  # 9 SRM + 3 Bayar filters in b1c1; the rest are regular kernels
# Bounds far beyond the releases (32 filters, 4 windows up to 63): a config read from a file cannot make the
# model or its detector's buffers (which grow with the windows) take all memory
MAX_FIRST_BLOCK_FILTERS = 4096
MAX_WINDOWS, MAX_WINDOW_SIZE = 16, 4095
LSTM, GRU = "lstm", "gru"
RECURRENT_KINDS = (LSTM, GRU)  # the detector's recurrent layer: the official ConvLSTM, or a ConvGRU variant


@dataclass(frozen=True)
class ManTraNetConfig:
    """What the weights alone do not say: the official releases differ in these three settings.

    first_block_filters: output channels of b1c1 (32 for Ptrain0/1, 16 for Ptrain2/3/4).
    transform_activation: "tanh" for Ptrain0, None (linear) otherwise.
    window_sizes: the local-mean windows of the anomaly detector, smallest first.
    recurrent: the detector's recurrent layer, "lstm" (the official ConvLSTM, every release) or "gru" (a
    ConvGRU variant to train, which no official file holds).
    """

    first_block_filters: int = 16
    transform_activation: str | None = None
    window_sizes: tuple[int, ...] = (7, 15, 31)
    recurrent: str = LSTM

    def __post_init__(self) -> None:
        if not FIXED_FIRST_LAYER_FILTERS < self.first_block_filters <= MAX_FIRST_BLOCK_FILTERS:
            raise ValueError(
                f"first_block_filters must exceed {FIXED_FIRST_LAYER_FILTERS} and be at most "
                f"{MAX_FIRST_BLOCK_FILTERS}, got {self.first_block_filters}"
            )
        if self.transform_activation not in (None, "tanh"):
            raise ValueError(f"transform_activation must be None or 'tanh', got {self.transform_activation!r}")
        sizes = tuple(int(k) for k in self.window_sizes)
        if not 0 < len(sizes) <= MAX_WINDOWS or any(k < 1 or k % 2 == 0 or k > MAX_WINDOW_SIZE for k in sizes):
            raise ValueError(
                f"window_sizes must be 1 to {MAX_WINDOWS} odd positive integers up to {MAX_WINDOW_SIZE}, "
                f"got {self.window_sizes!r}"
            )
        object.__setattr__(self, "window_sizes", sizes)
        if self.recurrent not in RECURRENT_KINDS:
            raise ValueError(
                f"recurrent must be one of {', '.join(map(repr, RECURRENT_KINDS))}, got {self.recurrent!r}"
            )

    @property
    def time_steps(self) -> int:
        """Recurrent steps: one per window, plus the global mean."""
        return len(self.window_sizes) + 1

    def describe(self) -> str:
        """The settings in words, as every tool here prints them (the recurrent layer only when not the official)."""
        text = (
            f"{self.first_block_filters} first-block filters, transform {self.transform_activation or 'linear'}, "
            f"windows {', '.join(map(str, self.window_sizes))}"
        )
        return text if self.recurrent == LSTM else f"{text}, ConvGRU detector"

    def to_dict(self) -> dict[str, Any]:
        """As JSON. ``recurrent`` only when it is not "lstm": files written before the variant existed carry no
        such key and mean the ConvLSTM, and an LSTM model's file stays byte for byte what it was."""
        d = asdict(self)
        d["window_sizes"] = list(self.window_sizes)
        if self.recurrent == LSTM:
            del d["recurrent"]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ManTraNetConfig:
        unknown = set(d) - {"first_block_filters", "transform_activation", "window_sizes", "recurrent"}
        if unknown:
            raise ValueError(f"unknown config keys: {sorted(unknown)}")
        return cls(
            first_block_filters=int(d["first_block_filters"]),
            transform_activation=d["transform_activation"],
            window_sizes=tuple(d["window_sizes"]),
            recurrent=d.get("recurrent", LSTM),
        )


RELEASES: dict[int, ManTraNetConfig] = {
    0: ManTraNetConfig(32, "tanh", (7, 15, 31, 63)),
    1: ManTraNetConfig(32, None, (7, 15, 31, 63)),
    2: ManTraNetConfig(16, None, (7, 15, 31, 63)),
    3: ManTraNetConfig(16, None, (7, 15, 31, 63)),
    4: ManTraNetConfig(16, None, (7, 15, 31)),
}


def release_config(index: int) -> ManTraNetConfig:
    """Config of the official release ``ManTraNet_Ptrain{index}.h5``.

    Args:
        index: the official release, 0-4.

    Returns:
        Its ``ManTraNetConfig`` (from ``RELEASES``).

    Raises:
        ValueError: no official release ``index``.
    """
    try:
        return RELEASES[index]
    except KeyError:
        raise ValueError(f"no official release {index}; releases are {sorted(RELEASES)}") from None
