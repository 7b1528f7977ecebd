from __future__ import annotations

import numpy as np
import pytest

from foldserve.demos.data import Dataset, load_dataset


def test_digits_are_raw_float32_pixels_with_a_held_out_split(digits_flat: Dataset) -> None:
    assert digits_flat.x_train.dtype == np.float32
    assert digits_flat.y_train.dtype == np.int64
    assert digits_flat.x_train.shape == (1347, 64)
    assert digits_flat.x_test.shape == (450, 64)
    # Raw pixel values 0-16: the model, not the loader, normalizes.
    assert digits_flat.x_train.min() == 0.0
    assert digits_flat.x_train.max() == 16.0
    assert digits_flat.labels == tuple(str(d) for d in range(10))


def test_the_cnn_view_is_the_same_samples_as_images(
    digits_flat: Dataset, digits_images: Dataset
) -> None:
    assert digits_images.x_train.shape == (1347, 1, 8, 8)
    np.testing.assert_array_equal(digits_images.x_train.reshape(-1, 64), digits_flat.x_train)
    np.testing.assert_array_equal(digits_images.y_test, digits_flat.y_test)


def test_split_is_stratified_and_deterministic(digits_flat: Dataset) -> None:
    again = load_dataset("digits", (64,))
    np.testing.assert_array_equal(again.x_test, digits_flat.x_test)
    train_share = np.bincount(digits_flat.y_train) / len(digits_flat.y_train)
    test_share = np.bincount(digits_flat.y_test) / len(digits_flat.y_test)
    assert np.abs(train_share - test_share).max() < 0.01


def test_breast_cancer_features_keep_their_very_different_scales() -> None:
    data = load_dataset("breast_cancer", (30,))
    assert data.x_train.shape[1] == 30
    assert len(data.x_train) + len(data.x_test) == 569
    scales = data.x_train.std(axis=0)
    assert scales.max() / scales.min() > 1e4
    assert data.labels == ("malignant", "benign")


def test_a_shape_that_does_not_fit_is_refused() -> None:
    with pytest.raises(ValueError, match="64 features per sample"):
        load_dataset("digits", (1, 7, 7))
