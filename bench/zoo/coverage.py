"""What monai.networks.nets exports, and for each name: the rows that cover it, or why none does.

Names are grouped by the object they point to (``DenseNet121``, ``Densenet121`` and
``densenet121`` are one class). A name that is neither covered nor skipped here is reported as
unclassified, so a new monai release cannot add a network to the module unnoticed.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable
from dataclasses import dataclass

from bench.zoo.network import Network

NO_BN_GROUPNORM = "no BatchNorm possible: GroupNorm only (norm_num_groups), no norm choice"
TRANSFORMER = "no BatchNorm possible: a transformer with LayerNorm only"
NOT_A_NETWORK = "not a network"

SKIPPED: dict[str, str] = {
    "AutoencoderKL": NO_BN_GROUPNORM,
    "ControlNet": NO_BN_GROUPNORM + "; also takes timesteps and a conditioning image",
    "DiffusionModelUNet": NO_BN_GROUPNORM + "; also takes timesteps",
    "SPADEAutoencoderKL": NO_BN_GROUPNORM + "; also takes a label map (two inputs)",
    "SPADEDiffusionModelUNet": NO_BN_GROUPNORM + "; also takes timesteps and a label map",
    "SPADENet": "two inputs (label map and image) and a latent drawn at random when none is given",
    "MedNeXt": "no BatchNorm possible: norm_type accepts 'group' or 'layer' only",
    "MedNeXtS": "no BatchNorm possible: a MedNeXt preset (group or layer norm only)",
    "MedNeXtB": "no BatchNorm possible: a MedNeXt preset (group or layer norm only)",
    "MedNeXtM": "no BatchNorm possible: a MedNeXt preset (group or layer norm only)",
    "MedNeXtL": "no BatchNorm possible: a MedNeXt preset (group or layer norm only)",
    "Quicknat": "no BatchNorm possible: its norm argument is stored but never used (the blocks "
    "hard-code InstanceNorm in monai 1.6.1); a build with norm='batch' holds 0 BatchNorm layers",
    "FullyConnectedNet": "no BatchNorm possible: its ADN layers take act and dropout only",
    "VarFullyConnectedNet": "no BatchNorm possible: its ADN layers take act and dropout only",
    "VQVAE": "no BatchNorm possible: no normalization layers (norm=None in its residual units)",
    "ViT": TRANSFORMER,
    "ViTAutoEnc": TRANSFORMER,
    "MaskedAutoEncoderViT": TRANSFORMER,
    "NaViT": TRANSFORMER,
    "DecoderOnlyTransformer": TRANSFORMER + " (token input)",
    "Transchex": TRANSFORMER + " (image and text inputs)",
    "MultiModal": TRANSFORMER + " (Transchex's multimodal encoder)",
    "BertAttention": NOT_A_NETWORK + ": a Transchex building block (LayerNorm only)",
    "BertMixedLayer": NOT_A_NETWORK + ": a Transchex building block (LayerNorm only)",
    "BertOutput": NOT_A_NETWORK + ": a Transchex building block (LayerNorm only)",
    "BertPreTrainedModel": NOT_A_NETWORK + ": a Transchex base class (LayerNorm only)",
    "Pooler": NOT_A_NETWORK + ": a Transchex building block",
    "PatchMerging": NOT_A_NETWORK + ": a Swin building block (LayerNorm)",
    "PatchMergingV2": NOT_A_NETWORK + ": a Swin building block (LayerNorm)",
    "HighResBlock": NOT_A_NETWORK + ": HighResNet's block (covered inside the HighResNet rows)",
    "ResNetBlock": NOT_A_NETWORK + ": ResNet's basic block (covered inside the resnet rows)",
    "ResNetBottleneck": NOT_A_NETWORK + ": ResNet's bottleneck (covered inside the resnet rows)",
    "TopologySearch": NOT_A_NETWORK + ": DiNTS's differentiable search space",
    "TopologyConstruction": NOT_A_NETWORK + ": the base class of DiNTS's search spaces",
    "BlockArgs": NOT_A_NETWORK + ": EfficientNet block configuration",
    "FlexUNetEncoderRegister": NOT_A_NETWORK + ": FlexibleUNet's backbone registry",
    "FLEXUNET_BACKBONE": NOT_A_NETWORK + ": FlexibleUNet's backbone registry instance",
    "drop_connect": NOT_A_NETWORK + ": a function used by EfficientNet",
    "get_efficientnet_image_size": NOT_A_NETWORK + ": a helper function",
    "get_medicalnet_pretrained_resnet_args": NOT_A_NETWORK + ": a helper function",
    "get_pretrained_resnet_medicalnet": "needs pretrained weights (downloads MedicalNet)",
    "ResNetFeatures": "a feature extractor (FlexibleUNet's encoder), not a network: returns a "
    "list of feature maps; its layers are the resnet rows' layers",
    "ResNetEncoder": "a feature extractor (FlexibleUNet's encoder), not a network: returns a "
    "list of feature maps; its layers are the resnet rows' layers",
    "EfficientNetBNFeatures": "a feature extractor, not a network: returns a list of feature "
    "maps; its layers are the EfficientNetBN rows' layers",
    "EfficientNetEncoder": "a feature extractor (FlexibleUNet's encoder), not a network: returns "
    "a list of feature maps; covered inside the FlexibleUNet rows",
    "MILModel": "needs torchvision (its backbones are torchvision ResNets) and pretrained "
    "weights by default",
    "TorchVisionFCModel": "needs torchvision",
    "NetAdapter": "a wrapper that replaces another network's head, not a network itself",
    "DAF3D": "needs torchvision (its backbone imports torchvision.models)",
    "VoxelMorph": "two inputs (moving, fixed) and a tuple output; its backbone VoxelMorphUNet is "
    "covered",
    "VISTA3D": "promptable segmentation: forward takes point and class prompts; its image encoder "
    "SegResNetDS2 is covered",
    "vista3d132": "VISTA3D preset (InstanceNorm encoder, prompts as inputs)",
}

# Generic classes whose presets are rows of their own.
COVERED_BY: dict[str, str] = {
    "ResNet": "the resnet10 ... resnet200 rows (ResNet with preset layers)",
    "SENet": "the SENet154, SEResNet* and SEResNeXt* rows (SENet presets)",
    "DenseNet": "the DenseNet121 ... DenseNet264 rows (DenseNet presets)",
    "EfficientNet": "the EfficientNetBN rows (EfficientNet with preset blocks)",
}


@dataclass(frozen=True)
class Entry:
    names: tuple[str, ...]  # every alias of one object in monai.networks.nets
    rows: tuple[str, ...]  # the catalogue rows covering it
    reason: str | None  # why not covered by a row of its own (None when covered)


def entries(catalogue: Iterable[Network]) -> list[Entry]:
    from monai.networks import nets

    groups: dict[int, list[str]] = {}
    for name in sorted(dir(nets)):
        value = getattr(nets, name)
        if name.startswith("_") or inspect.ismodule(value) or not _from_monai(value):
            continue
        groups.setdefault(id(value), []).append(name)
    rows = list(catalogue)
    result = []
    for names in groups.values():
        covering = tuple(r.name for r in rows if set(r.covers) & set(names))
        reason = next((SKIPPED[n] for n in names if n in SKIPPED), None)
        generic = next((COVERED_BY[n] for n in names if n in COVERED_BY), None)
        if covering:
            reason = None
        elif generic:
            reason = f"covered by {generic}"
        elif reason is None:
            reason = "unclassified: not in the zoo's catalogue nor its skip list"
        result.append(Entry(tuple(names), covering, reason))
    return result


def _from_monai(value: object) -> bool:
    module = getattr(value, "__module__", None) or type(value).__module__
    return module.startswith("monai.")
