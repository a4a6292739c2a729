"""torch.hub entry points: ``torch.hub.load(REPO_OR_DIR, "mantranet", release=4, pretrained=True)``.

REPO_OR_DIR is this repository's GitHub name (source="github") or a local checkout (source="local").
"""

dependencies = ["torch", "h5py", "numpy", "PIL", "safetensors", "platformdirs", "psutil", "tqdm"]


def mantranet(release: int = 4, pretrained: bool = True, **options):
    """ManTraNet, shaped as the official release ``release`` (0-4), in eval mode.

    pretrained=True: the trained release, downloaded, verified, converted and cached per user on first use
    (``options`` go to ``converter.pretrained``: map_location, folder, url, timeout_s).
    pretrained=False: the same architecture with untrained (random) weights; nothing is downloaded.
    """
    if pretrained:
        from converter import pretrained as load_release

        return load_release(release, **options)
    from mantranet_torch import ManTraNet

    return ManTraNet.from_release(release).eval()
