"""Policy networks for image observations, shaped as Stable-Baselines3 features extractors.

Every backbone is split in two so that attribution (Grad-CAM++) and defenses can reach the
last spatial feature map without forward hooks:

    spatial(x) -> (B, D, h, w)   the last spatial map (conv channels, or the ViT token grid)
    head(fmap) -> (B, features_dim)

``ImageFeatures`` puts an input *gate* in front of the backbone. It is ``nn.Identity`` unless a
defense (SGAM) installs a masking layer there; all inputs reaching the extractor are floats in
[0, 1] (SB3 divides uint8 images by 255 before calling it), which is also the attacker's scale.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal

import gymnasium as gym
import torch
import torch.nn.functional as F
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor
from torch import Tensor, nn

from fgmf_marl.policy import Ablations

BackboneName = Literal["cnn", "vit"]


#: (kernel, stride, padding) of the three convolutions of each CNN layout
CNN_LAYOUTS: dict[str, tuple[tuple[int, int, int], ...]] = {
    "small": ((3, 2, 1), (3, 2, 1), (3, 1, 1)),
    "nature": ((8, 4, 0), (4, 2, 0), (3, 1, 0)),
}
CnnLayout = Literal["small", "nature"]


def cnn_min_image_size(layout: CnnLayout) -> int:
    """The smallest square image side the layout's convolutions map to at least a 1 x 1 feature map."""
    size = 1
    for kernel, stride, padding in reversed(CNN_LAYOUTS[layout]):
        size = max(1, (size - 1) * stride + kernel - 2 * padding)
    return size


def space_to_depth_weight(weight: Tensor, stride: int) -> Tensor:
    """(O, C, k, k) kernel of a stride-``stride`` convolution as the (O, C * stride^2, k / stride, k / stride) kernel
    of the stride-1 convolution of ``F.pixel_unshuffle(x, stride)`` (its channel order: c * stride^2 + i * stride + j)."""
    o, c, kh, kw = weight.shape
    return (weight.view(o, c, kh // stride, stride, kw // stride, stride).permute(0, 1, 3, 5, 2, 4)
            .reshape(o, c * stride * stride, kh // stride, kw // stride))


class _InputGradBySpaceToDepth(torch.autograd.Function):
    """Identity on ``y`` = conv2d(x.detach(), weight, bias, stride) whose gradient for ``x`` is that convolution's.

    The input gradient is a stride-1 transposed convolution with the space-to-depth kernel, then
    ``pixel_shuffle`` (zeros for the rows and columns a floor-sized output never reads). It is built from
    differentiable operations, so second derivatives (SCOR-PIO's parameter gradient through an input gradient,
    Hessian-vector products) flow through it; the weight and bias gradients flow through ``y``'s own node.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, y: Tensor, weight: Tensor, stride: int) -> Tensor:
        ctx.save_for_backward(weight)
        ctx.stride, ctx.size = stride, x.shape[-2:]
        return y.view_as(y)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor, None, None]:
        (weight,) = ctx.saved_tensors
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = F.pixel_shuffle(F.conv_transpose2d(grad, space_to_depth_weight(weight, ctx.stride)), ctx.stride)
            height, width = ctx.size
            grad_x = F.pad(grad_x, (0, width - grad_x.shape[-1], 0, height - grad_x.shape[-2]))
        return grad_x, grad, None, None


class SpaceToDepthGradConv2d(nn.Conv2d):
    """``nn.Conv2d`` (stride s > 1, kernel a multiple of s, no padding) whose input gradient takes a faster route.

    The forward pass is ``nn.Conv2d``'s, bit for bit. Only where the input requires a gradient (attacks, input
    attributions, SCOR-PIO, SA-PPO's inner PGD) is the input gradient computed as the gradient of the equal
    stride-1 convolution of the space-to-depth image (equal up to float summation order, tested against
    PyTorch's own to first and second order). Why: oneDNN's CPU kernel for the input gradient of an 8 x 8 /
    stride 4 convolution over a 3-channel image costs several forward passes, and it is most of every
    gradient step on pistonball's NatureCNN (measurements: docs/experiments/throughput.md).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int) -> None:
        if stride < 2 or kernel_size % stride:
            raise ValueError(f"SpaceToDepthGradConv2d needs stride >= 2 dividing the kernel; got kernel {kernel_size}, "
                             f"stride {stride}")
        super().__init__(in_channels, out_channels, kernel_size, stride=stride)

    def forward(self, x: Tensor) -> Tensor:
        if not (torch.is_grad_enabled() and x.requires_grad):
            return super().forward(x)
        y = F.conv2d(x.detach(), self.weight, self.bias, self.stride)
        return _InputGradBySpaceToDepth.apply(x, y, self.weight, self.stride[0])


def _image_conv(c_in: int, c_out: int, kernel: int, stride: int, padding: int) -> nn.Conv2d:
    """The first (image-reading) convolution: :class:`SpaceToDepthGradConv2d` where its shape allows, else plain."""
    if padding == 0 and stride > 1 and kernel % stride == 0:
        return SpaceToDepthGradConv2d(c_in, c_out, kernel, stride)
    return nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=padding)


class CnnBackbone(nn.Module):
    """Three convolutions and a linear head over the flattened map.

    ``layout="small"`` (default): three 3x3 convolutions, two with stride 2, for the native env's
    48 x 48 views; ``"nature"``: the DQN network of Mnih et al. (2015) (8x8/4, 4x4/2, 3x3/1, no
    padding), SB3's ``NatureCNN`` and so the network of the PettingZoo/SB3 tutorial recipe at 84 x 84.

    The head flattens instead of pooling because positions matter in the coverage task: which
    landmark is nearest depends on where things are, and pooling would throw that away.

    The convolutions run on a channels-last copy of the input, a layout oneDNN's CPU kernels prefer:
    the same function (outputs equal up to float summation order, tested), faster forward + backward.
    The weights keep the default layout, which SB3's orthogonal init needs; flatten still reads the
    map in (C, H, W) order (measurements: docs/experiments/throughput.md, "Throughput and speed"). The nature
    layout's first convolution is a :class:`SpaceToDepthGradConv2d` (the same function and parameters).
    """

    def __init__(self, in_channels: int, height: int, width: int, channels: tuple[int, int, int] = (16, 32, 32),
                 features_dim: int = 128, layout: CnnLayout = "small") -> None:
        super().__init__()
        if layout not in CNN_LAYOUTS:
            raise ValueError(f"unknown CNN layout {layout!r}; known: {', '.join(CNN_LAYOUTS)}")
        layers: list[nn.Module] = []
        for c_in, c_out, (kernel, stride, padding) in zip((in_channels, *channels[:2]), channels, CNN_LAYOUTS[layout]):
            reads_image = not layers
            conv = (_image_conv(c_in, c_out, kernel, stride, padding) if reads_image
                    else nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=padding))
            layers += [conv, nn.ReLU()]
        self.convs = nn.Sequential(*layers)
        with torch.no_grad():
            fmap_numel = self.convs(torch.zeros(1, in_channels, height, width)).numel()
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(fmap_numel, features_dim), nn.ReLU())
        self.features_dim = features_dim
        self._columns: tuple[Tensor, tuple, Tensor] | None = None

    def spatial(self, x: Tensor) -> Tensor:
        return self.convs(x.contiguous(memory_format=torch.channels_last))

    def head(self, fmap: Tensor) -> Tensor:
        return self.fc(fmap)

    def linear_columns(self) -> Tensor:
        """The head's linear weight transposed, contiguous (in_features, features_dim), cached until the weight
        changes in place (training, a state-dict load), moves, or is replaced: ``embedding_bag`` reads its rows."""
        weight = self.fc[1].weight
        key = (weight._version, weight.data_ptr(), weight.device, weight.dtype)   # .to() swaps .data in place
        if self._columns is None or self._columns[0] is not weight or self._columns[1] != key:
            self._columns = (weight, key, weight.detach().t().contiguous())
        return self._columns[2]

    def features_of_ablations(self, ablations: Ablations, clean: Tensor) -> Tensor:
        """``head(spatial(ablations.images()))`` (n, features_dim), recomputing only what each ablation can change.

        ``clean`` (B, D, h, w) is ``spatial(ablations.obs)``. Layer by layer, an ablation can change only the
        positions its box reaches: a window (one size per group of ablations) that each convolution
        recomputes alone, from an input crop that is the clean activation of the layer below (a zero margin
        standing for the padding) with the window recomputed there written in; the first convolution reads a
        crop of the ablated image (one gather of ``obs``, ``baseline`` and ``region`` packed together). The
        head's linear layer adds only the last window's change to the clean pre-activation (a sparse product,
        as ``embedding_bag`` with weights). Ablations are grouped by the side of their last window (rounded up
        to even, so that a batch has two or three groups); a group whose last window's receptive field costs
        more than ``LOCAL_COST_LIMIT`` of a full pass takes the full pass. Equal to the full pass up to float
        summation order (tested). Why: an ablation-based explanation (PGCA's P) removes one small entity per
        copy; a full pass recomputes a map that mostly cannot change, and even the last window's whole
        receptive field is a third of a 48 x 48 image for a 2 x 2 px entity, whose first layers change at a
        few positions only.
        """
        sample, box = ablations.sample, ablations.box.long()
        device = box.device
        _, linear, activation = self.fc
        pre = linear(clean.flatten(1))[sample]                                     # (n, F) clean pre-activations
        if sample.numel() == 0:
            return activation(pre)
        convs = [m for m in self.convs if isinstance(m, nn.Conv2d)]
        sizes = [tuple(ablations.obs.shape[-2:])]
        for conv in convs:
            sizes.append(tuple(conv_output_size(n_in, conv.kernel_size[d], conv.stride[d], conv.padding[d])
                               for d, n_in in enumerate(sizes[-1])))
        macs = [conv.in_channels * conv.out_channels * conv.kernel_size[0] * conv.kernel_size[1] for conv in convs]
        full_cost = sum(m * h * w for m, (h, w) in zip(macs, sizes[1:]))
        geometry = [tuple(torch.tensor(v, device=device) for v in (conv.kernel_size, conv.stride, conv.padding, size))
                    for conv, size in zip(convs, sizes[1:])]                       # per layer: kernel, stride, padding, size
        lo, hi = box[:, 0::2], box[:, 1::2]                                        # (n, 2): (y, x)
        reachable = []                                                             # per layer: [lo, hi) it can change
        for k, st, p, size in geometry:
            lo = (-((k - 1 - p - lo) // st)).clamp_min(0)
            hi = torch.minimum((hi - 1 + p) // st + 1, size)
            reachable.append((lo, hi))
        reach = (hi - lo).amax(1)                                                  # 0: no convolution reads the region
        side = reach + reach % 2
        depth, height, width = clean.shape[1:]
        clean_rows = clean.permute(0, 2, 3, 1).reshape(-1, depth)
        inputs: list[Tensor] | None = None
        for value in torch.unique(side[reach > 0]).tolist():
            members = (side == value).nonzero()[:, 0]
            if receptive_cost(convs, [min(value, height), min(value, width)]) > LOCAL_COST_LIMIT * full_cost:
                pre[members] = linear(self.spatial(ablations.images(members)).flatten(1))
                continue
            if inputs is None:
                inputs = self.crop_sources(ablations, convs)
            x = start = window = None
            for i, (conv, size, (_, stride, padding, size_t)) in enumerate(zip(convs, sizes[1:], geometry)):
                lo_i, hi_i = reachable[i][0][members], reachable[i][1][members]
                side_i = value if i == len(convs) - 1 else int((hi_i - lo_i).amax())
                extent = [min(side_i, size[0]), min(side_i, size[1])]
                start = torch.minimum(lo_i, size_t - torch.tensor(extent, device=device))
                corner = start * stride - padding
                crop_extent = [(e - 1) * conv.stride[d] + conv.kernel_size[d] for d, e in enumerate(extent)]
                margin = max(conv.padding)                                          # the crop source's zero margin
                if i == 0:
                    x = ablated_crop(inputs[0], ablations, members, corner + margin, crop_extent)
                else:   # the clean input around the window, with the window the layer below recomputed written in
                    x = write_window(crop_rows(inputs[i], sample[members], corner + margin, crop_extent),
                                     window - corner, x).permute(0, 3, 1, 2)
                x = torch.relu(F.conv2d(x, conv.weight, conv.bias, conv.stride))
                window = start
            rows, cols = window_indices(start, list(x.shape[-2:]))
            position = (rows[:, :, None] * width + cols[:, None, :])                 # (m, kh, kw) on the last map
            flat = (sample[members][:, None, None] * (height * width) + position).flatten()
            change = x.permute(0, 2, 3, 1).reshape(-1, depth) - clean_rows.index_select(0, flat)   # (m kh kw, D)
            column = position[..., None] + torch.arange(depth, device=device) * (height * width)  # flatten's order
            pre[members] += F.embedding_bag(column.reshape(members.numel(), -1), self.linear_columns(),
                                            per_sample_weights=change.reshape(members.numel(), -1), mode="sum")
        return activation(pre)

    def crop_sources(self, ablations: Ablations, convs: list[nn.Conv2d]) -> list[Tensor]:
        """What each convolution's crops are cut from, channels last with a zero margin of its padding: the packed
        image (``pack_for_crops``) for the first, the clean activation of the layer below for the others."""
        sources = [pack_for_crops(ablations, max(convs[0].padding))]
        x = ablations.obs.contiguous(memory_format=torch.channels_last)
        for conv, above in zip(convs[:-1], convs[1:]):
            x = torch.relu(F.conv2d(x, conv.weight, conv.bias, conv.stride, conv.padding))   # as ``spatial`` computes it
            sources.append(F.pad(x, (max(above.padding),) * 4).permute(0, 2, 3, 1).contiguous())
        return sources


#: a group of ablations takes the full pass when its last window's receptive field costs more than this share of it
LOCAL_COST_LIMIT = 0.6


def conv_output_size(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


def receptive_cost(convs: list[nn.Conv2d], window: list[int]) -> int:
    """Multiply-adds of computing a ``window`` of the last map from its whole receptive field (each layer's output
    over the crop the layer above reads): the local recompute's cost bound, compared with a full pass's."""
    extents, cost = window, 0
    for conv in reversed(convs):
        cost += conv.in_channels * conv.out_channels * conv.kernel_size[0] * conv.kernel_size[1] * extents[0] * extents[1]
        extents = [(e - 1) * conv.stride[d] + conv.kernel_size[d] for d, e in enumerate(extents)]
    return cost


def window_indices(start: Tensor, extent: list[int]) -> tuple[Tensor, Tensor]:
    """Rows (n, h) and columns (n, w) of windows of ``extent`` starting at ``start`` (n, 2)."""
    return (start[:, :1] + torch.arange(extent[0], device=start.device),
            start[:, 1:] + torch.arange(extent[1], device=start.device))


def crop_rows(source: Tensor, sample: Tensor, start: Tensor, extent: list[int]) -> Tensor:
    """Windows (m, h, w, C) of ``source`` (B, H, W, C) at images ``sample`` (m,) and corners ``start`` (m, 2)."""
    _, height, width, channels = source.shape
    rows, cols = window_indices(start, extent)
    index = (sample[:, None, None] * height + rows[:, :, None]) * width + cols[:, None, :]
    return source.reshape(-1, channels).index_select(0, index.flatten()).reshape(*index.shape, channels)


def write_window(crop: Tensor, offset: Tensor, values: Tensor) -> Tensor:
    """``crop`` (m, h, w, C) with ``values`` (m, C, vh, vw) written in at ``offset`` (m, 2), in place; what falls
    outside the crop is dropped."""
    m, height, width, channels = crop.shape
    rows, cols = window_indices(offset, list(values.shape[-2:]))
    inside = ((rows >= 0) & (rows < height))[:, :, None] & ((cols >= 0) & (cols < width))[:, None, :]
    target = (torch.arange(m, device=crop.device)[:, None, None] * height + rows[:, :, None]) * width + cols[:, None, :]
    crop.reshape(-1, channels).index_copy_(0, target[inside], values.permute(0, 2, 3, 1)[inside])
    return crop


def pack_for_crops(ablations: Ablations, margin: int) -> Tensor:
    """(B, H + 2m, W + 2m, 2C + 1): each pixel's obs, baseline and region label + 1, channels last, with a
    zero margin of ``margin`` pixels (label 0 there: never replaced), so that one gather crops all three.
    Labels ride in the image's float dtype, exact below 2 ** 24 (a batch has ~10 segments per image)."""
    obs = ablations.obs
    if ablations.region.numel() and int(ablations.region.max()) >= 2 ** 24 - 1:
        raise ValueError(f"ablation region labels must be < 2**24 - 1 to be packed exactly, got {int(ablations.region.max())}")
    b, c, h, w = obs.shape
    packed = obs.new_zeros(b, h + 2 * margin, w + 2 * margin, 2 * c + 1)
    inside = packed[:, margin:margin + h, margin:margin + w]
    inside[..., :c] = obs.permute(0, 2, 3, 1)
    inside[..., c:2 * c] = ablations.baseline.permute(0, 2, 3, 1)
    inside[..., 2 * c] = ablations.region + 1
    return packed


def ablated_crop(packed: Tensor, ablations: Ablations, members: Tensor, start: Tensor, extent: list[int]) -> Tensor:
    """Windows (m, C, h, w) of the ablated copies ``members`` starting at ``start`` (m, 2) in ``packed``'s
    (margin-shifted) coordinates; channels-last in memory, as the convolutions prefer."""
    crop = crop_rows(packed, ablations.sample[members], start, extent)          # (m, h, w, 2C+1)
    c = (crop.shape[-1] - 1) // 2
    replaced = crop[..., -1:] == (ablations.label[members] + 1).to(crop.dtype)[:, None, None, None]
    return torch.where(replaced, crop[..., c:2 * c], crop[..., :c]).permute(0, 3, 1, 2)


class _Block(nn.Module):
    """Pre-norm transformer block (attention + MLP), as in ViT."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 2.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, tokens: Tensor) -> Tensor:
        y = self.norm1(tokens)
        tokens = tokens + self.attn(y, y, y, need_weights=False)[0]
        return tokens + self.mlp(self.norm2(tokens))


VitStem = Literal["patch", "conv"]


class VitBackbone(nn.Module):
    """A small Vision Transformer: a stem that makes tokens, learned positions, a few blocks.

    ``stem="patch"`` is ViT's patchify stem, one ``patch_size`` x ``patch_size`` stride-``patch_size``
    convolution. ``stem="conv"`` is the convolutional stem of "Early Convolutions Help Transformers
    See Better" (Xiao et al., 2021): three 3 x 3 stride-2 convolutions (16, 32, ``dim`` channels, ReLU
    between), one token per 8 x 8 px. Why both: with the patchify stem PPO never learned the coverage
    task (the value function stayed at zero explained variance; docs/experiments/vit.md, "ViT
    throughput"); a convolutional stem is the standard remedy for ViTs' optimisation instability.

    ``spatial`` returns the token grid after the last block as (B, D, h, w), the ViT analogue of a conv
    feature map (this is what Grad-CAM++ uses for ViTs). There is no class token; the head flattens the
    normalised tokens so positional information reaches the policy: tanh(W flatten(LN(tokens)) / sqrt(T) + b).
    """

    def __init__(self, in_channels: int, height: int, width: int, patch_size: int = 6, dim: int = 64,
                 depth: int = 2, heads: int = 4, features_dim: int = 128, stem: VitStem = "conv") -> None:
        super().__init__()
        if stem == "patch":
            if height % patch_size or width % patch_size:
                raise ValueError(f"ViT patch_size={patch_size} must divide the image size {height}x{width}")
            self.embed: nn.Module = nn.Conv2d(in_channels, dim, patch_size, stride=patch_size)
        elif stem == "conv":
            self.embed = nn.Sequential(
                nn.Conv2d(in_channels, 16, 3, stride=2, padding=1), nn.ReLU(),
                nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
                nn.Conv2d(32, dim, 3, stride=2, padding=1),
            )
        else:
            raise ValueError(f"unknown ViT stem {stem!r}; known: patch, conv")
        with torch.no_grad():
            self.grid = tuple(self.embed(torch.zeros(1, in_channels, height, width)).shape[2:])
        n_tokens = self.grid[0] * self.grid[1]
        self.pos = nn.Parameter(torch.zeros(1, n_tokens, dim))
        nn.init.trunc_normal_(self.pos, std=0.02)
        self.blocks = nn.Sequential(*[_Block(dim, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        # tanh, ViT's pre-logits activation, not the CNN's ReLU: with ReLU all 128 features of one seed
        # died in PPO's first updates and never came back (docs/experiments/vit.md, "ViT throughput")
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(dim * n_tokens, features_dim), nn.Tanh())
        #: 1/sqrt(tokens): the flattened normalised tokens have norm ~sqrt(T * dim); without the scale the
        #: features grew to norm ~90 within 100k PPO steps, saturating every tanh of SB3's MLP heads
        self.token_scale = n_tokens ** -0.5
        self.features_dim = features_dim

    def spatial(self, x: Tensor) -> Tensor:
        tokens = self.embed(x).flatten(2).transpose(1, 2) + self.pos  # (B, T, D)
        tokens = self.blocks(tokens)
        b, t, d = tokens.shape
        return tokens.transpose(1, 2).reshape(b, d, *self.grid)

    def head(self, fmap: Tensor) -> Tensor:
        tokens = self.norm(fmap.flatten(2).transpose(1, 2))
        return self.fc(tokens * self.token_scale)


class ImageFeatures(BaseFeaturesExtractor):
    """SB3 features extractor: ``gate`` (identity or a defense's masking layer) then a backbone.

    Pass it through ``policy_kwargs=dict(features_extractor_class=ImageFeatures,
    features_extractor_kwargs=dict(backbone="cnn", ...))``.
    """

    #: dtype of ``forward`` (PPO's rollouts and loss); float32 unless the trainer sets it with ``compute_dtype``
    compute_dtype: torch.dtype = torch.float32

    def __init__(self, observation_space: gym.spaces.Box, backbone: BackboneName = "cnn",
                 features_dim: int = 128, **backbone_kwargs: object) -> None:
        shape = observation_space.shape
        if shape is None or len(shape) != 3:
            raise ValueError(f"ImageFeatures needs channel-first image observations (C, H, W), got shape {shape}")
        channels, height, width = shape
        if backbone == "cnn":
            net: nn.Module = CnnBackbone(channels, height, width, features_dim=features_dim, **backbone_kwargs)
        elif backbone == "vit":
            net = VitBackbone(channels, height, width, features_dim=features_dim, **backbone_kwargs)
        else:
            raise ValueError(f"unknown backbone {backbone!r}; known: cnn, vit")
        super().__init__(observation_space, features_dim)
        self.gate: nn.Module = nn.Identity()
        self.backbone = net

    def spatial(self, x: Tensor) -> Tensor:
        """Last spatial feature map of the gated input; x is a float image batch in [0, 1]."""
        return self.backbone.spatial(self.gate(x))

    def head(self, fmap: Tensor) -> Tensor:
        return self.backbone.head(fmap)

    def forward(self, x: Tensor) -> Tensor:
        if self.compute_dtype == torch.float32:
            return self.head(self.spatial(x))
        with torch.autocast(x.device.type, dtype=self.compute_dtype):
            features = self.head(self.spatial(x))
        return features.float()


def image_extractors(policy: nn.Module) -> list[ImageFeatures]:
    """Every ``ImageFeatures`` inside ``policy`` (the actor's and critic's, once each when shared)."""
    return [m for m in policy.modules() if isinstance(m, ImageFeatures)]


@contextmanager
def compute_dtype(policy: nn.Module, dtype: torch.dtype) -> Iterator[None]:
    """Run the ``forward`` of every ``ImageFeatures`` in ``policy`` under autocast to ``dtype`` inside the block.

    Only ``forward`` (what SB3 calls for rollouts and the PPO loss) changes; ``spatial``/``head``, which
    ``PolicyView`` and with it every attack, attribution and regulariser use, stay float32: finite
    differences, double backprop and attack gradients need the precision. Weights stay float32 either way
    (autocast keeps float32 master weights), so a checkpoint is the same kind of object.
    """
    extractors = image_extractors(policy)
    previous = [m.compute_dtype for m in extractors]
    for m in extractors:
        m.compute_dtype = dtype
    try:
        yield
    finally:
        for m, old in zip(extractors, previous):
            m.compute_dtype = old
