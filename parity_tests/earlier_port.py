"""Checkpoints laid out as the earlier PyTorch port lays them (its keys, as in SPEC.md), from our state dicts: test
fixtures of the shipped suite (test_parity_cmd.py) and of tests/."""

from __future__ import annotations

from pathlib import Path

import torch

from mantranet_torch.layers import srm_kernels

# The earlier port's module layout, as its code builds it: a ModuleList of 3x3 convolutions with a ReLU
# between each pair (so the convolutions sit at even indices) standing for b1c2 .. transform.
PORT_CONVS = ("b1c2", "b2c1", "b2c2", "b3c1", "b3c2", "b3c3", "b4c1", "b4c2", "b4c3", "b5c1", "b5c2", "transform")


def port_parts(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The earlier port's (IMTFE, AnomalyDetector) state dicts holding ``state``'s weights, laid out as it lays them."""
    featex = {
        "init_conv.weight": state["featex.b1c1.regular_kernel"],
        "BayarConv2D.weight": state["featex.b1c1.bayar_kernel"],
        "SRMConv2D.weight": srm_kernels(),
    }
    for i, name in enumerate(PORT_CONVS):
        featex[f"middle_and_last_block.{2 * i}.weight"] = state[f"featex.{name}.weight"]
        featex[f"middle_and_last_block.{2 * i}.bias"] = state[f"featex.{name}.bias"]
    detector = {
        "adaptation.weight": state["detector.outlier_trans.weight"],
        "sigma_F": state["detector.glb_std.min_std"].reshape(1, 64, 1, 1),
        "conv_lstm.cell_list.0.conv.weight": torch.cat(
            [state["detector.clstm.kernel"], state["detector.clstm.recurrent_kernel"]], dim=1
        ),
        "conv_lstm.cell_list.0.conv.bias": state["detector.clstm.bias"],
        "end.0.weight": state["detector.pred.weight"],
        "end.0.bias": state["detector.pred.bias"],
    }
    return featex, detector


def write_port_files(tmp_path: Path, state: dict[str, torch.Tensor]) -> dict[str, Path]:
    """The port's three checkpoint files (both parts; each part alone) holding ``state``'s weights."""
    featex, detector = port_parts(state)
    paths = {name: tmp_path / name for name in ("MantraNetv4.pt", "IMTFEv4.pt", "AnomalyDetectorv4.pt")}
    both = {f"IMTFE.{k}": v for k, v in featex.items()} | {f"AnomalyDetector.{k}": v for k, v in detector.items()}
    torch.save(both, paths["MantraNetv4.pt"])
    torch.save(featex, paths["IMTFEv4.pt"])
    torch.save(detector, paths["AnomalyDetectorv4.pt"])
    return paths
