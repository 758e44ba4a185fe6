"""The two upscaler architectures `sd-export upscaler` reads, and how a state dict names them.

- RRDBNet (ESRGAN, Real-ESRGAN x4plus/x2plus, BSRGAN, most community "4x-..." models): BasicSR's definition,
  loaded from its own key layout (`conv_first`, `body.N.rdbM.convK`), BSRGAN/RealSR's (`RRDB_trunk`,
  `trunk_conv`, `upconvN`, `HRconv`) and the original ESRGAN repository's (`model.0`, `model.1.sub.N.RDBM...`),
  with 1-3 nearest-neighbour x2 stages and Real-ESRGAN's pixel-unshuffle input for x2 and x1 models.
- SRVGGNetCompact (Real-ESRGAN's realesr-general / animevideo models): `body.0` conv, PReLU and conv pairs,
  a last conv into pixel shuffle, plus the nearest-upsampled input.

These mirror spandrel's ESRGAN and Compact architectures (tests compare the outputs where spandrel can be
imported). They are written here rather than imported because spandrel imports torchvision at import time, and
torchvision's wheels must match the installed torch build; a mismatched torchvision fails on import and takes
transformers' image utilities, and so the SD exporter, down with it. Other layouts (ESRGAN+, SwinIR, HAT, ...)
are refused with the reason.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ExportError

StateDict = dict[str, torch.Tensor]


class ResidualDenseBlock(nn.Module):
    """Five densely connected 3x3 convolutions; the result is scaled by 0.2 and added to the input."""

    def __init__(self, features: int, growth: int) -> None:
        super().__init__()
        for k in range(1, 6):
            out = features if k == 5 else growth
            setattr(self, f"conv{k}", nn.Conv2d(features + (k - 1) * growth, out, 3, 1, 1))
        self.lrelu = nn.LeakyReLU(0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = [x]
        for k in range(1, 5):
            outs.append(self.lrelu(getattr(self, f"conv{k}")(torch.cat(outs, 1))))
        return self.conv5(torch.cat(outs, 1)) * 0.2 + x


class RRDB(nn.Module):
    """Three residual dense blocks in a residual (scaled by 0.2)."""

    def __init__(self, features: int, growth: int) -> None:
        super().__init__()
        self.rdb1 = ResidualDenseBlock(features, growth)
        self.rdb2 = ResidualDenseBlock(features, growth)
        self.rdb3 = ResidualDenseBlock(features, growth)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rdb3(self.rdb2(self.rdb1(x))) * 0.2 + x


@dataclass(frozen=True)
class RRDBConfig:
    channels: int = 3
    features: int = 64
    blocks: int = 23
    growth: int = 32
    upsamples: int = 2  # nearest-neighbour x2 stages
    unshuffle: int = 1  # Real-ESRGAN x2: 2, x1: 4 (pixel-unshuffled input)

    @property
    def scale(self) -> int:
        return 2**self.upsamples // self.unshuffle


class RRDBNet(nn.Module):
    """ESRGAN's generator in BasicSR's layout: input [0, 1] RGB (N, C, H, W) -> (N, C, H*scale, W*scale).
    With `unshuffle`, H and W must be multiples of it (the runtime pads the image to that)."""

    def __init__(self, config: RRDBConfig) -> None:
        super().__init__()
        self.config = config
        c, f = config.channels, config.features
        self.conv_first = nn.Conv2d(c * config.unshuffle**2, f, 3, 1, 1)
        self.body = nn.Sequential(*[RRDB(f, config.growth) for _ in range(config.blocks)])
        self.conv_body = nn.Conv2d(f, f, 3, 1, 1)
        for n in range(1, config.upsamples + 1):
            setattr(self, f"conv_up{n}", nn.Conv2d(f, f, 3, 1, 1))
        self.conv_hr = nn.Conv2d(f, f, 3, 1, 1)
        self.conv_last = nn.Conv2d(f, c, 3, 1, 1)
        self.lrelu = nn.LeakyReLU(0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.config.unshuffle > 1:
            x = F.pixel_unshuffle(x, self.config.unshuffle)
        feat = self.conv_first(x)
        feat = feat + self.conv_body(self.body(feat))
        for n in range(1, self.config.upsamples + 1):
            feat = self.lrelu(getattr(self, f"conv_up{n}")(F.interpolate(feat, scale_factor=2.0, mode="nearest")))
        return self.conv_last(self.lrelu(self.conv_hr(feat)))


@dataclass(frozen=True)
class CompactConfig:
    channels: int = 3
    features: int = 64
    convs: int = 16
    scale: int = 4


class SRVGGNetCompact(nn.Module):
    """Real-ESRGAN's compact network: convolutions with PReLU at low resolution, pixel shuffle at the end, and
    the nearest-upsampled input added, so the network learns the residual."""

    def __init__(self, config: CompactConfig) -> None:
        super().__init__()
        self.config = config
        c, f = config.channels, config.features
        layers: list[nn.Module] = [nn.Conv2d(c, f, 3, 1, 1), nn.PReLU(f)]
        for _ in range(config.convs):
            layers += [nn.Conv2d(f, f, 3, 1, 1), nn.PReLU(f)]
        layers.append(nn.Conv2d(f, c * config.scale**2, 3, 1, 1))
        self.body = nn.Sequential(*layers)
        self.upsampler = nn.PixelShuffle(config.scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = F.interpolate(x, scale_factor=float(self.config.scale), mode="nearest")
        return self.upsampler(self.body(x)) + base


@dataclass(frozen=True)
class Architecture:
    """What a state dict turned out to be: the network with its weights loaded, and how to describe it."""

    name: str  # "RRDBNet" or "SRVGGNetCompact"
    module: nn.Module
    scale: int
    channels: int
    input_multiple: int  # H and W of the graph's input must be multiples of this
    hyperparameters: dict[str, int]


def from_state_dict(state: StateDict, source: str) -> Architecture:
    """Recognise `state` (unwrapped from `params_ema`/`params` by the caller) and load it; ExportError naming
    `source` when it is neither architecture or its shapes do not fit one."""
    if "conv_first.weight" in state or "model.0.weight" in state:
        state = _to_basicsr_layout(state, source)
        config = _rrdb_config(state, source)
        module: nn.Module = RRDBNet(config)
        name, scale, multiple = "RRDBNet", config.scale, config.unshuffle
    elif "body.0.weight" in state and "body.1.weight" in state:
        config = _compact_config(state, source)
        module, name, scale, multiple = SRVGGNetCompact(config), "SRVGGNetCompact", config.scale, 1
    else:
        keys = ", ".join(sorted(state)[:4])
        raise ExportError(
            f"{source}: not an ESRGAN (RRDBNet) or Real-ESRGAN compact (SRVGGNetCompact) state dict (keys: {keys}, ...)"
        )
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        raise ExportError(f"{source}: weights do not fit {name}: {' '.join(first[:2])[:300]}") from None
    return Architecture(name, module.eval(), scale, config.channels, multiple, asdict(config))


# Old ESRGAN repository and BSRGAN/RealSR key names -> BasicSR's.
_RENAMES = (
    (r"^model\.1\.sub\.(\d+)\.RDB(\d)\.conv(\d)\.0\.", r"body.\1.rdb\2.conv\3."),
    (r"^RRDB_trunk\.(\d+)\.RDB(\d)\.conv(\d)\.", r"body.\1.rdb\2.conv\3."),
    (r"^trunk_conv\.", "conv_body."),
    (r"^upconv(\d)\.", r"conv_up\1."),
    (r"^HRconv\.", "conv_hr."),
)


def _to_basicsr_layout(state: StateDict, source: str) -> StateDict:
    """The same weights under BasicSR's names: `model.1.sub.<N>` (the last entry of the trunk) is conv_body, the
    sequential's upsampling convolutions sit at 3, 6, 9, then HR conv and last conv two and four after them."""
    if any(".conv1x1." in key for key in state):
        raise ExportError(f"{source}: ESRGAN+ (conv1x1 in its dense blocks) is not supported")
    renamed: StateDict = {}
    for key, value in state.items():
        for pattern, replacement in _RENAMES:
            key = re.sub(pattern, replacement, key)
        renamed[key] = value
    if "model.0.weight" not in renamed:
        return renamed
    trunk = [int(m.group(1)) for k in renamed if (m := re.match(r"model\.1\.sub\.(\d+)\.weight$", k))]
    positions = sorted({int(m.group(1)) for k in renamed if (m := re.match(r"model\.(\d+)\.weight$", k))})
    if not trunk or len(positions) < 3 or positions[0] != 0:
        raise ExportError(f"{source}: an old-style ESRGAN state dict without its trunk or output convolutions")
    ups, hr, last = positions[1:-2], positions[-2], positions[-1]
    names = {0: "conv_first", hr: "conv_hr", last: "conv_last", **{p: f"conv_up{n}" for n, p in enumerate(ups, 1)}}
    names_of = {f"model.1.sub.{max(trunk)}.": "conv_body."} | {f"model.{p}.": f"{n}." for p, n in names.items()}
    out: StateDict = {}
    for key, value in renamed.items():
        prefix = next((p for p in names_of if key.startswith(p)), None)
        out[names_of[prefix] + key[len(prefix) :] if prefix else key] = value
    return out


def _rrdb_config(state: StateDict, source: str) -> RRDBConfig:
    first, last = _weight(state, "conv_first", source), _weight(state, "conv_last", source)
    channels, features = last.shape[0], first.shape[0]
    blocks = 1 + max((int(m.group(1)) for k in state if (m := re.match(r"body\.(\d+)\.", k))), default=-1)
    upsamples = sum(1 for k in state if re.match(r"conv_up\d\.weight$", k))
    ratio = first.shape[1] // max(channels, 1)
    unshuffle = {1: 1, 4: 2, 16: 4}.get(ratio) if first.shape[1] == ratio * channels else None
    if unshuffle is None or blocks < 1 or not 1 <= upsamples <= 3 or channels not in (1, 3, 4):
        raise ExportError(
            f"{source}: an RRDBNet this exporter does not know ({first.shape[1]} input and {channels} output "
            f"channels, {blocks} blocks, {upsamples} upsampling stages)"
        )
    growth = _weight(state, "body.0.rdb1.conv1", source).shape[0]
    config = RRDBConfig(channels, features, blocks, growth, upsamples, unshuffle)
    if config.scale < 1 or 2**upsamples % unshuffle:
        raise ExportError(f"{source}: unshuffle by {unshuffle} with {upsamples} upsampling stages has no scale")
    return config


def _compact_config(state: StateDict, source: str) -> CompactConfig:
    indices = sorted({int(m.group(1)) for k in state if (m := re.match(r"body\.(\d+)\.weight$", k))})
    first, last = _weight(state, "body.0", source), _weight(state, f"body.{indices[-1]}", source)
    channels, features = first.shape[1], first.shape[0]
    scale = math.isqrt(last.shape[0] // max(channels, 1))
    convs = (indices[-1] - 2) // 2
    if scale < 1 or scale**2 * channels != last.shape[0] or indices != list(range(indices[-1] + 1)) or convs < 0:
        raise ExportError(f"{source}: an SRVGGNetCompact this exporter does not know (with PReLU activations only)")
    return CompactConfig(channels, features, convs, scale)


def _weight(state: StateDict, name: str, source: str) -> torch.Tensor:
    weight = state.get(f"{name}.weight")
    if not isinstance(weight, torch.Tensor) or weight.ndim != 4:
        raise ExportError(f"{source}: {name}.weight is missing or not a convolution weight")
    return weight
