"""The data seam: the built-in digits, image folders, `datasets` folders; decoded once; broken files named."""

import numpy as np
import pytest
import torch
from PIL import Image

from training import data


def test_digits_are_scaled_upsampled_and_split_without_overlap():
    from sklearn.datasets import load_digits

    train_idx, test_idx = data.digits_split_indices("train"), data.digits_split_indices("test")
    assert len(set(train_idx) & set(test_idx)) == 0 and len(train_idx) + len(test_idx) == 1797
    x8, y8 = data.load_digits_tensors(8, "train")
    raw = load_digits()
    # At 8x8 the tensor is the raw image: ink 16 -> +1, background 0 -> -1.
    torch.testing.assert_close(x8[:, 0], torch.from_numpy(raw.images[train_idx] / 8.0 - 1).float())
    assert torch.equal(y8, torch.from_numpy(raw.target[train_idx]))
    x16, _ = data.load_digits_tensors(16, "test")
    assert x16.shape == (len(test_idx), 1, 16, 16) and x16.min() >= -1 and x16.max() <= 1
    # Upsampling keeps the image: area-averaging back to 8x8 correlates with the original almost perfectly.
    back = torch.nn.functional.interpolate(x16, size=(8, 8), mode="area")
    x8_test, _ = data.load_digits_tensors(8, "test")
    assert torch.corrcoef(torch.stack([back.flatten(), x8_test.flatten()]))[0, 1] > 0.95
    with pytest.raises(ValueError, match="split='val'"):
        data.digits_split_indices("val")


def test_build_dataset_defaults_to_digits_with_labels():
    ds = data.build_dataset(resolution=16)
    item = ds[0]
    assert item["images"].shape == (1, 16, 16) and 0 <= int(item["labels"]) <= 9
    assert len(ds) == len(data.digits_split_indices("train"))
    with pytest.raises(ValueError, match="channels=3"):
        data.build_dataset(resolution=16, channels=3)


def _write_images(folder, n=4, size=(12, 10)):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.RandomState(0)
    for i in range(n):
        Image.fromarray(rng.randint(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(folder / f"img_{i}.png")


def _count_decodes(monkeypatch):
    from training.data import decode, image_sets

    calls = []
    original = decode.decode_array

    def counting(*args, **kwargs):
        calls.append(args[1])
        return original(*args, **kwargs)

    monkeypatch.setattr(decode, "decode_array", counting)
    monkeypatch.setattr(image_sets, "decode_array", counting)
    return calls


def test_small_image_folder_is_decoded_once_into_uint8_and_resized(tmp_path, monkeypatch):
    _write_images(tmp_path / "imgs" / "sub")
    calls = _count_decodes(monkeypatch)
    ds = data.build_dataset(
        train_data_dir=str(tmp_path / "imgs"), resolution=8, channels=3, center_crop=True, random_flip=True
    )
    assert ds.path == "memory" and "held in RAM" in ds.reason
    assert len(calls) == 4 and ds.images.dtype == torch.uint8 and ds.images.shape == (4, 3, 8, 8)
    for epoch in range(3):  # epochs only index the cached tensor
        ds.set_epoch(epoch)
        _ = [ds[i] for i in range(len(ds))]
    assert len(calls) == 4
    # Flips are a pure function of (seed, epoch, index): the same epoch gives the same items.
    ds.set_epoch(1)
    first = torch.stack([ds[i]["images"] for i in range(4)])
    ds.set_epoch(1)
    assert torch.equal(first, torch.stack([ds[i]["images"] for i in range(4)]))
    stored = data.to_model_range(ds.images)
    flipped_or_not = [torch.equal(f, stored[i]) or torch.equal(f, stored[i].flip(-1)) for i, f in enumerate(first)]
    assert all(flipped_or_not)


def test_random_crop_keeps_the_long_side_until_the_epoch(tmp_path):
    _write_images(tmp_path / "imgs", n=2, size=(16, 8))
    ds = data.build_dataset(train_data_dir=str(tmp_path / "imgs"), resolution=8, channels=1)
    assert [tuple(t.shape) for t in ds.images] == [(1, 8, 16), (1, 8, 16)]
    assert ds[0]["images"].shape == (1, 8, 8)


def test_broken_image_is_named_or_skipped_with_a_count(tmp_path):
    _write_images(tmp_path / "imgs", n=3)
    (tmp_path / "imgs" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    with pytest.raises(data.BrokenImageError, match="broken.png"):
        data.build_dataset(train_data_dir=str(tmp_path / "imgs"), resolution=8, channels=3)
    ds = data.build_dataset(train_data_dir=str(tmp_path / "imgs"), resolution=8, channels=3, skip_broken_images=True)
    assert len(ds) == 3 and ds.num_skipped == 1


def test_empty_or_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="is not a directory"):
        data.build_dataset(train_data_dir=str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="contains no image files"):
        data.build_dataset(train_data_dir=str(tmp_path / "empty"))


def test_save_to_disk_folder_loads_offline_with_labels(tmp_path):
    import datasets

    rng = np.random.RandomState(0)
    images = [Image.fromarray(rng.randint(0, 255, (8, 8), dtype=np.uint8)) for _ in range(5)]
    ds = datasets.Dataset.from_dict(
        {"image": images, "label": [0, 1, 2, 3, 4]},
        features=datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")}),
    )
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "saved"))
    expected = torch.from_numpy(np.asarray(images[2], dtype=np.float32) / 255 * 2 - 1)
    for data_loading in ("memory", "workers", "cache"):
        built = data.build_dataset(
            dataset_name=str(tmp_path / "saved"),
            resolution=8,
            channels=1,
            data_loading=data_loading,
            data_cache_dir=str(tmp_path / "cache"),
        )
        assert built.path == data_loading and len(built) == 5 and built.labels.tolist() == [0, 1, 2, 3, 4]
        assert torch.equal(built[2]["images"][0], expected) and int(built[2]["labels"]) == 2


def test_epoch_sampler_is_a_function_of_seed_and_epoch():
    s = data.EpochSampler(10, seed=3)
    s.set_epoch(2)
    a = list(s)
    s.set_epoch(5)
    b = list(s)
    s.set_epoch(2)
    assert list(s) == a and a != b and sorted(a) == list(range(10))
