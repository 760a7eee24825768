"""The VGG configurations of Simonyan & Zisserman (2014) as data, in torchvision's state_dict layout.

``features.N`` (conv, optional BN, ReLU; 2x2 max pool), ``avgpool`` (adaptive 7x7) and ``classifier.{0,3,6}``,
so torchvision VGG weights load strictly. Configurations: A (vgg11), A-LRN (vgg11_lrn), B (vgg13),
C (vgg16_c, with 1x1 convs), D (vgg16) and E (vgg19).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from .registry import register_model

__all__ = [
    "VGG", "VGG_CONFIGS", "VGG_VARIANTS", "make_vgg_features", "vgg11", "vgg11_bn", "vgg11_lrn", "vgg13",
    "vgg13_bn", "vgg16_c", "vgg16", "vgg16_bn", "vgg19", "vgg19_bn",
]

# int: 3x3 conv with that many outputs; (c, 1): 1x1 conv; "M": 2x2 max pool stride 2; "LRN": local response norm
Layer = int | tuple[int, int] | str

VGG_CONFIGS: dict[str, list[Layer]] = {
    "A": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "A-LRN": [64, "LRN", "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "B": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "C": [64, 64, "M", 128, 128, "M", 256, 256, (256, 1), "M", 512, 512, (512, 1), "M", 512, 512, (512, 1), "M"],
    "D": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    "E": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"],
}


def make_vgg_features(cfg: Sequence[Layer], batch_norm: bool, in_chans: int = 3) -> nn.Sequential:
    """The ``features`` stack of a configuration; convs keep their bias so the BN-free layout matches torchvision."""
    layers: list[nn.Module] = []
    in_ch = in_chans
    for item in cfg:
        if item == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        elif item == "LRN":
            # AlexNet's LRN, which the VGG paper refers to
            layers.append(nn.LocalResponseNorm(size=5, alpha=1e-4, beta=0.75, k=2.0))
        else:
            out_ch, k = (item, 3) if isinstance(item, int) else item
            layers.append(nn.Conv2d(in_ch, out_ch, kernel_size=k, padding=k // 2))
            if batch_norm:
                layers.append(nn.BatchNorm2d(out_ch))
            layers.append(nn.ReLU(inplace=True))
            in_ch = out_ch
    return nn.Sequential(*layers)


class VGG(nn.Module):
    """VGG classifier: ``features``, adaptive 7x7 ``avgpool``, ``classifier`` FC 4096-4096-classes with dropout.

    Args:
        cfg: a list from :data:`VGG_CONFIGS`.
        batch_norm: BatchNorm after every conv (the ``_bn`` variants).
        num_classes, dropout, in_chans: as named.
    """

    def __init__(
        self, cfg: Sequence[Layer], batch_norm: bool = False, num_classes: int = 1000, dropout: float = 0.5,
        in_chans: int = 3,
    ) -> None:
        super().__init__()
        self.features = make_vgg_features(cfg, batch_norm, in_chans)
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        self.classifier = nn.Sequential(
            nn.Linear(512 * 7 * 7, 4096), nn.ReLU(True), nn.Dropout(dropout),
            nn.Linear(4096, 4096), nn.ReLU(True), nn.Dropout(dropout),
            nn.Linear(4096, num_classes),
        )
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(x.flatten(1))


# model name (without _bn) -> its configuration in VGG_CONFIGS
VGG_VARIANTS = {
    "vgg11": "A", "vgg11_lrn": "A-LRN", "vgg13": "B", "vgg16_c": "C", "vgg16": "D", "vgg19": "E",
}


def _vgg(cfg_name: str, batch_norm: bool, num_classes: int, deploy: bool, **kwargs) -> VGG:
    # the deploy form of a _bn model is the plain model with BN folded into conv biases
    return VGG(VGG_CONFIGS[cfg_name], batch_norm=batch_norm and not deploy, num_classes=num_classes, **kwargs)


@register_model
def vgg11(*, num_classes: int = 1000, deploy: bool = False, **kwargs) -> VGG:
    """VGG configuration A (8 conv layers + 3 fully connected: 11 weight layers)."""
    return _vgg("A", False, num_classes, deploy, **kwargs)


@register_model
def vgg11_bn(*, num_classes: int = 1000, deploy: bool = False, **kwargs) -> VGG:
    """VGG configuration A with BatchNorm after every conv (``deploy=True``: folded, the plain vgg11 layout)."""
    return _vgg("A", True, num_classes, deploy, **kwargs)


@register_model
def vgg11_lrn(*, num_classes: int = 1000, deploy: bool = False, **kwargs) -> VGG:
    """VGG configuration A-LRN: A with local response normalisation after the first conv."""
    return _vgg("A-LRN", False, num_classes, deploy, **kwargs)


@register_model
def vgg13(*, num_classes: int = 1000, deploy: bool = False, **kwargs) -> VGG:
    """VGG configuration B (10 conv layers)."""
    return _vgg("B", False, num_classes, deploy, **kwargs)


@register_model
def vgg13_bn(*, num_classes: int = 1000, deploy: bool = False, **kwargs) -> VGG:
    """VGG configuration B with BatchNorm (``deploy=True``: folded, the plain vgg13 layout)."""
    return _vgg("B", True, num_classes, deploy, **kwargs)


@register_model
def vgg16_c(*, num_classes: int = 1000, deploy: bool = False, **kwargs) -> VGG:
    """VGG configuration C: 16 layers, three of them 1x1 convs."""
    return _vgg("C", False, num_classes, deploy, **kwargs)


@register_model
def vgg16(*, num_classes: int = 1000, deploy: bool = False, **kwargs) -> VGG:
    """VGG configuration D (13 conv layers), torchvision's vgg16."""
    return _vgg("D", False, num_classes, deploy, **kwargs)


@register_model
def vgg16_bn(*, num_classes: int = 1000, deploy: bool = False, **kwargs) -> VGG:
    """VGG configuration D with BatchNorm (``deploy=True``: folded, the plain vgg16 layout)."""
    return _vgg("D", True, num_classes, deploy, **kwargs)


@register_model
def vgg19(*, num_classes: int = 1000, deploy: bool = False, **kwargs) -> VGG:
    """VGG configuration E (16 conv layers), torchvision's vgg19."""
    return _vgg("E", False, num_classes, deploy, **kwargs)


@register_model
def vgg19_bn(*, num_classes: int = 1000, deploy: bool = False, **kwargs) -> VGG:
    """VGG configuration E with BatchNorm (``deploy=True``: folded, the plain vgg19 layout)."""
    return _vgg("E", True, num_classes, deploy, **kwargs)
