"""The dense-output half of the catalogue: segmentation, registration, reconstruction and generation
networks of monai.networks.nets, with BatchNorm chosen wherever they take a norm argument."""

from __future__ import annotations

from typing import Any

from torch import nn

from bench.zoo.network import LABELS, PAIR, SCAN, Network, monai_rows

SMALL_UNET: dict[str, Any] = {"channels": (16, 32, 64, 128), "strides": (2, 2, 2)}
BASIC_FEATURES = (16, 16, 32, 64, 128, 16)
SEGRESNET: dict[str, Any] = {"init_filters": 8, "norm": "batch"}


def _seg(d: int, **kwargs: Any) -> dict[str, Any]:
    return {"spatial_dims": d, "in_channels": SCAN[d][0], "out_channels": LABELS, **kwargs}


def networks() -> list[Network]:
    return [*segmenters(), *transformers(), *registration(), *generative()]


def segmenters() -> list[Network]:
    return [
        *monai_rows("UNet", "segmentation", lambda d: _seg(d, **SMALL_UNET, norm="batch")),
        *monai_rows(
            "UNet",
            "segmentation",
            lambda d: _seg(d, **SMALL_UNET, num_res_units=2, norm="batch"),
            name="UNet-res2",
        ),
        *monai_rows("AttentionUnet", "segmentation", lambda d: _seg(d, **SMALL_UNET)),
        *monai_rows(
            "BasicUNet",
            "segmentation",
            lambda d: _seg(d, features=BASIC_FEATURES, norm="batch"),
        ),
        *monai_rows(
            "BasicUNetPlusPlus",
            "segmentation",
            lambda d: _seg(d, features=BASIC_FEATURES, norm="batch"),
        ),
        *monai_rows(
            "DynUNet",
            "segmentation",
            lambda d: _seg(
                d,
                kernel_size=[3, 3, 3, 3],
                strides=[1, 2, 2, 2],
                upsample_kernel_size=[2, 2, 2],
                filters=[16, 32, 64, 128],
                norm_name="batch",
                res_block=True,
            ),
        ),
        *(
            row
            for name in ("SegResNet", "SegResNetDS", "SegResNetDS2")
            for row in monai_rows(name, "segmentation", lambda d: _seg(d, **SEGRESNET))
        ),
        *monai_rows(
            "SegResNetVAE",
            "segmentation",
            lambda d: _seg(d, input_image_size=SCAN[d][1:], init_filters=8, norm="batch"),
        ),
        *monai_rows("HighResNet", "segmentation", lambda d: _seg(d, norm_type="batch")),
        *monai_rows(
            "AHNet",
            "segmentation",
            lambda d: _seg(d, layers=(2, 2, 2, 2), psp_block_num=2, pretrained=False),
        ),
        *monai_rows(
            "FlexibleUNet",
            "segmentation",
            lambda d: _seg(
                d,
                backbone="efficientnet-b0",
                pretrained=False,
                decoder_channels=(64, 32, 16, 8, 8),
            ),
        ),
        *monai_rows("VNet", "segmentation", _seg),
        *monai_rows(
            "HoVerNet",
            "segmentation",
            lambda d: {"mode": "fast", "in_channels": 3, "np_out_channels": LABELS},
            dims=(2,),
            shape={2: (3, 256, 256)},  # fixed by the architecture in FAST mode
            stats_batch=2,  # ~4 s per sample on two cores
        ),
        *(
            Network(
                name=row.name,
                factory="bench.zoo.segmentation:dints",
                kwargs={
                    "spatial_dims": row.spatial_dims,
                    "in_channels": 1,
                    "num_classes": LABELS,
                    "channel_mul": 0.25,
                },
                input_shape=row.input_shape,
                task=row.task,
                spatial_dims=row.spatial_dims,
                covers=("DiNTS", "TopologyInstance"),
            )
            for row in monai_rows("DiNTS", "segmentation", lambda d: {})
        ),
    ]


def dints(spatial_dims: int, in_channels: int, num_classes: int, channel_mul: float) -> nn.Module:
    """DiNTS on a fixed (not searched) topology, with BatchNorm in the space and the stem."""
    from monai.networks.nets.dints import DiNTS, TopologyInstance

    space = TopologyInstance(
        channel_mul=channel_mul,
        num_blocks=4,
        num_depths=3,
        spatial_dims=spatial_dims,
        norm_name="batch",
    )
    return DiNTS(space, in_channels, num_classes, norm_name="batch", spatial_dims=spatial_dims)


def transformers() -> list[Network]:
    """Transformer encoders with convolutional decoders: the BNs sit in the decoder blocks."""
    swin: dict[str, Any] = {"feature_size": 12, "norm_name": "batch", "depths": (1, 1, 1, 1)}
    return [
        *monai_rows(
            "UNETR",
            "segmentation",
            lambda d: _seg(
                d,
                img_size=SCAN[d][1:],
                feature_size=8,
                hidden_size=96,
                mlp_dim=192,
                num_heads=4,
                norm_name="batch",
            ),
        ),
        *monai_rows("SwinUNETR", "segmentation", lambda d: _seg(d, **swin)),
        *monai_rows(
            "HyenaNDUNETR",
            "segmentation",
            lambda d: _seg(d, hyena_stages=(False, False, True, True), **swin),
        ),
    ]


def registration() -> list[Network]:
    """Moving and fixed image stacked on channels in, a displacement field out."""

    def reg(d: int, **kwargs: Any) -> dict[str, Any]:
        return {"spatial_dims": d, "in_channels": PAIR[d][0], **kwargs}

    return [
        *monai_rows(
            "RegUNet",
            "registration",
            lambda d: reg(d, num_channel_initial=8, depth=3, out_channels=d),
            shape=PAIR,
        ),
        *monai_rows(
            "LocalNet",
            "registration",
            lambda d: reg(d, num_channel_initial=8, extract_levels=(0, 1, 2, 3), out_channels=d),
            shape=PAIR,
        ),
        *monai_rows(
            "GlobalNet",
            "registration",
            lambda d: reg(d, image_size=list(PAIR[d][1:]), num_channel_initial=8, depth=3),
            shape=PAIR,
        ),
        *monai_rows(
            "VoxelMorphUNet",
            "registration",
            lambda d: reg(
                d,
                unet_out_channels=d,
                channels=(8, 16, 16, 16, 16, 16),
                final_conv_channels=(8, 8),
                norm="batch",
            ),
            shape=PAIR,
        ),
    ]


def generative() -> list[Network]:
    small = {"channels": (8, 16, 32), "strides": (2, 2, 2), "norm": "batch"}
    latent = 32
    return [
        *monai_rows(
            "AutoEncoder",
            "reconstruction",
            lambda d: {"spatial_dims": d, "in_channels": 1, "out_channels": 1, **small},
        ),
        *monai_rows(
            "VarAutoEncoder",
            "reconstruction",
            lambda d: {
                "spatial_dims": d,
                "in_shape": SCAN[d],
                "out_channels": 1,
                "latent_size": latent,
                **small,
            },
        ),
        *monai_rows(
            "Generator",
            "generation",
            lambda d: {
                "latent_shape": (latent,),
                "start_shape": (32, *([8] * d)),
                "channels": (16, 8, 1),
                "strides": (2, 2, 1),
                "norm": "batch",
            },
            shape={2: (latent,), 3: (latent,)},
        ),
        *monai_rows(
            "PatchDiscriminator",
            "classification",
            lambda d: {"spatial_dims": d, "channels": 8, "in_channels": 1, "norm": "batch"},
            shape=SCAN,
        ),
        *monai_rows(
            "MultiScalePatchDiscriminator",
            "classification",
            lambda d: {
                "num_d": 2,
                "num_layers_d": 2,
                "spatial_dims": d,
                "channels": 8,
                "in_channels": 1,
                "norm": "batch",
                "minimum_size_im": SCAN[d][-1],
            },
            shape=SCAN,
        ),
    ]
