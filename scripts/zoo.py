"""Published network architectures as ONNX files with calibrated BatchNormalization statistics, for
``scripts/verify_criterion.py --zoo``.

Each network is built by timm or torchvision with its own initialization (no weights are downloaded:
nothing can be), given BN scales and shifts of a trained network's spread (scale exp(N(0, 0.4)),
shift N(0, 0.2)), then calibrated: its BN running statistics are the cumulative mean and variance of
the activations that reach each BN in training mode, over CALIBRATION_BATCHES batches of smooth
random images (upsampled noise at three scales, normalized as ImageNet's are). So each BN normalizes
what reaches it, as in a trained network, and a folding error shows at its true size. It is then
exported by torch's TorchScript exporter with the BNs kept (``TrainingMode.PRESERVE``: the default
EVAL mode would fuse them into the convolutions before bnfold sees them).

Needs torch, torchvision and timm, which are not among the suite's requirements, e.g. in a venv of
its own beside bnfold::

    pip install torch torchvision timm onnx -e '.[cpu]'
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

ZOO: dict[str, tuple[str, str]] = {
    # name: (library, constructor)
    "resnet50": ("timm", "resnet50"),
    "resnext50_32x4d": ("timm", "resnext50_32x4d"),
    "seresnet50": ("timm", "seresnet50"),
    "densenet121": ("timm", "densenet121"),
    "dla34": ("timm", "dla34"),
    "dpn68": ("timm", "dpn68"),
    "cspdarknet53": ("timm", "cspdarknet53"),
    "hrnet_w18_small": ("timm", "hrnet_w18_small"),
    "regnety_016": ("timm", "regnety_016"),
    "repvgg_a2": ("timm", "repvgg_a2"),
    "mobilenetv2_100": ("timm", "mobilenetv2_100"),
    "mobilenetv3_large_100": ("timm", "mobilenetv3_large_100"),
    "efficientnet_b0": ("timm", "efficientnet_b0"),
    "tf_efficientnet_b0": ("timm", "tf_efficientnet_b0"),
    "mnasnet_100": ("timm", "mnasnet_100"),
    "ghostnet_100": ("timm", "ghostnet_100"),
    "inception_v3": ("torchvision", "inception_v3"),
    "vgg11_bn": ("torchvision", "vgg11_bn"),
    "shufflenet_v2_x1_0": ("torchvision", "shufflenet_v2_x1_0"),
}

CALIBRATION_BATCHES = 4
BATCH = 16
SIZES = {"vgg11_bn": 224}  # its classifier pools to 7x7, which torch exports only from a multiple of 7


def _construct(library: str, name: str) -> Any:
    if library == "timm":
        import timm

        return timm.create_model(name, pretrained=False)
    import torchvision

    make: Callable[..., Any] = getattr(torchvision.models, name)
    if name == "inception_v3":
        return make(weights=None, aux_logits=False, init_weights=True)
    return make(weights=None)


def _images(torch: Any, gen: Any, size: int, batch: int = BATCH) -> Any:
    """A batch of smooth random images: noise at 1/32, 1/8 and 1/2 of the size, upsampled and summed,
    then normalized with ImageNet's mean and std, as a preprocessed photo is."""
    f = torch.nn.functional
    picture = torch.zeros(batch, 3, size, size)
    for scale, weight in ((32, 1.0), (8, 0.5), (2, 0.25)):
        low = torch.rand(batch, 3, max(size // scale, 1), max(size // scale, 1), generator=gen)
        picture += weight * f.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)
    picture = (picture / 1.75).clamp(0, 1)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    return (picture - mean) / std


def calibrated(name: str, size: int, seed: int = 0) -> Any:
    """The network ``name`` of :data:`ZOO` in eval mode, with calibrated BN statistics."""
    import torch

    torch.manual_seed(seed)
    model = _construct(*ZOO[name])
    gen = torch.Generator().manual_seed(seed)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    with torch.no_grad():
        for bn in bns:
            bn.weight.copy_(torch.exp(0.4 * torch.randn(bn.num_features, generator=gen)))
            bn.bias.copy_(0.2 * torch.randn(bn.num_features, generator=gen))
            bn.reset_running_stats()
            bn.momentum = None  # a cumulative average over the calibration batches
        model.train()
        for _ in range(CALIBRATION_BATCHES):
            model(_images(torch, gen, size))
    return model.eval()


def export(name: str, path: Path, size: int, seed: int = 0) -> Path:
    """Write the calibrated network ``name`` to ``path`` (batch 1, size x size unless SIZES says
    otherwise, opset 17)."""
    import torch

    size = SIZES.get(name, size)
    model = calibrated(name, size, seed)
    x = torch.zeros(1, 3, size, size)
    torch.onnx.export(
        model,
        (x,),
        str(path),
        dynamo=False,
        opset_version=17,
        training=torch.onnx.TrainingMode.PRESERVE,
        input_names=["input"],
        output_names=["logits"],
    )
    return path


def images(path: Path, size: int, samples: int = 3, seed: int = 1) -> Path:
    """An .npz of ``samples`` images like the calibration's (another seed), for ``--inputs``: one
    sample per leading index, each of batch 1."""
    import numpy as np
    import torch

    gen = torch.Generator().manual_seed(seed)
    np.savez(path, input=_images(torch, gen, size, samples).numpy()[:, None])
    return path
