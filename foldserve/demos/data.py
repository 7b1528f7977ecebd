"""Datasets that ship with scikit-learn (no downloads), split once into train and held-out parts.

Features stay raw float32 (digit pixels 0-16, tumour measurements on their own scales): clients send
raw values, and the network's input BatchNorm does the normalizing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt
from sklearn.datasets import load_breast_cancer, load_digits
from sklearn.model_selection import train_test_split

from foldserve.tensors import Features

DatasetName = Literal["digits", "breast_cancer"]
Targets = npt.NDArray[np.int64]

HELD_OUT_FRACTION = 0.25
# NOTE: the split has its own fixed seed, apart from the training seed, so runs with different
# training seeds are scored on the same held-out samples.
SPLIT_SEED = 0


@dataclass(frozen=True)
class Dataset:
    name: DatasetName
    source: str  # the scikit-learn loader, for the manifest
    x_train: Features  # (N_train, *sample_shape)
    y_train: Targets  # (N_train,)
    x_test: Features  # (N_test, *sample_shape)
    y_test: Targets  # (N_test,)
    labels: tuple[str, ...]  # class index -> label

    @property
    def split(self) -> str:
        return (
            f"stratified, {len(self.y_train)} train / {len(self.y_test)} held out "
            f"({HELD_OUT_FRACTION:.0%}), split seed {SPLIT_SEED}"
        )


def load_dataset(name: DatasetName, sample_shape: tuple[int, ...]) -> Dataset:
    """Load ``name`` with every sample reshaped to ``sample_shape`` (e.g. (64,) or (1, 8, 8))."""
    if name == "digits":
        bunch = load_digits()
        labels = tuple(str(int(t)) for t in bunch.target_names)
        source = "sklearn.datasets.load_digits"
    elif name == "breast_cancer":
        bunch = load_breast_cancer()
        labels = tuple(str(t) for t in bunch.target_names)
        source = "sklearn.datasets.load_breast_cancer"
    else:
        raise ValueError(f"unknown dataset {name!r}: use 'digits' or 'breast_cancer'")
    x = np.asarray(bunch.data, dtype=np.float32)
    y = np.asarray(bunch.target, dtype=np.int64)
    if int(np.prod(sample_shape)) != x.shape[1]:
        raise ValueError(f"{name} has {x.shape[1]} features per sample, not {sample_shape}")
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=HELD_OUT_FRACTION, stratify=y, random_state=SPLIT_SEED
    )
    return Dataset(
        name=name,
        source=source,
        x_train=np.ascontiguousarray(x_train.reshape(-1, *sample_shape)),
        y_train=np.ascontiguousarray(y_train),
        x_test=np.ascontiguousarray(x_test.reshape(-1, *sample_shape)),
        y_test=np.ascontiguousarray(y_test),
        labels=labels,
    )
