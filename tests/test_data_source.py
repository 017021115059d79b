"""The folder scan (global index, classes, layouts) and robust decoding to RGB."""

import numpy as np
import pytest
from PIL import Image

from dcluster.core.config import DataConfig
from dcluster.data import BadImageError, DataSourceError, FolderSource, decode_rgb, open_source
from images import (photo, write_cmyk_jpeg, write_grayscale_jpeg, write_photo, write_png,
                    write_text_as_jpg, write_truncated_jpeg, write_zero_byte)


def test_class_tree_gets_sorted_global_indices_and_classes(tmp_path):
    # Written out of order, with mixed-case extensions, a nested folder and files to ignore.
    for number, rel in enumerate(["b/2.jpg", "a/z.PNG", "c/deep/x.jpeg", "a/m.JPG", "b/1.bmp",
                                  "c/0.webp"]):
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        photo(number).save(path, format={"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG",
                                         "bmp": "BMP", "webp": "WEBP"}[path.suffix[1:].lower()])
    write_photo(tmp_path / "a" / ".hidden.jpg", 9)
    write_photo(tmp_path / ".trash" / "t.jpg", 9)
    (tmp_path / "a" / "notes.txt").write_text("not an image")
    (tmp_path / "README.md").write_text("top-level non-image files are ignored")

    source = FolderSource(tmp_path)

    assert source.relpaths == ["a/m.JPG", "a/z.PNG", "b/1.bmp", "b/2.jpg", "c/0.webp",
                               "c/deep/x.jpeg"]
    assert source.class_names == ["a", "b", "c"]
    assert source.targets.dtype == np.int64
    assert source.targets.tolist() == [0, 0, 1, 1, 2, 2]
    assert len(source) == 6
    assert source.describe(3) == str(tmp_path / "b" / "2.jpg")
    assert source.read_bytes(3) == (tmp_path / "b" / "2.jpg").read_bytes()


def test_flat_folder_has_no_classes(tmp_path):
    for name in ["c.jpg", "a.jpg", "b.png"]:
        write_photo(tmp_path / name, 0)
    source = open_source(DataConfig(path=str(tmp_path)))
    assert source.relpaths == ["a.jpg", "b.png", "c.jpg"]
    assert source.class_names is None and source.targets is None


def test_rescan_gives_the_same_indices_and_a_changed_folder_another_fingerprint(tmp_path):
    for n in range(4):
        write_photo(tmp_path / "k" / f"{n}.jpg", n)
    first, again = FolderSource(tmp_path), FolderSource(tmp_path)
    assert first.relpaths == again.relpaths and first.fingerprint() == again.fingerprint()
    write_photo(tmp_path / "k" / "new.jpg", 5)
    assert FolderSource(tmp_path).fingerprint() != first.fingerprint()


def test_mixed_layout_is_refused_with_root_and_example(tmp_path):
    write_photo(tmp_path / "loose.jpg", 0)
    write_photo(tmp_path / "cls" / "x.jpg", 1)
    with pytest.raises(DataSourceError) as err:
        FolderSource(tmp_path)
    assert str(tmp_path) in str(err.value)
    assert "loose.jpg" in str(err.value) and "cls" in str(err.value)


@pytest.mark.parametrize("content", ["nothing", "non_images", "empty_class_folders"])
def test_folder_without_images_is_refused(tmp_path, content):
    if content == "non_images":
        (tmp_path / "a.txt").write_text("x")
    elif content == "empty_class_folders":
        (tmp_path / "cat").mkdir()
    with pytest.raises(DataSourceError, match="holds no images"):
        FolderSource(tmp_path)


def test_missing_folder_is_refused(tmp_path):
    with pytest.raises(DataSourceError, match="does not exist"):
        FolderSource(tmp_path / "nope")


@pytest.mark.parametrize("writer", [
    write_grayscale_jpeg, write_cmyk_jpeg,
    lambda p: write_png(p, "P"), lambda p: write_png(p, "RGBA"), lambda p: write_png(p, "LA"),
], ids=["grey-jpeg", "cmyk-jpeg", "palette-png", "rgba-png", "grey-alpha-png"])
def test_every_colour_mode_decodes_to_rgb(tmp_path, writer):
    path = writer(tmp_path / "img")
    image = decode_rgb(path.read_bytes(), 0, str(path))
    assert image.mode == "RGB"
    assert image.size == photo(0).size
    # The picture survives the conversion (up to JPEG losses and palette dithering).
    decoded = np.asarray(image.convert("L"), dtype=float).ravel()
    original = np.asarray(photo(0).convert("L"), dtype=float).ravel()
    assert np.corrcoef(decoded, original)[0, 1] > 0.9


def test_sixteen_bit_png_keeps_its_range(tmp_path):
    ramp = (np.arange(256, dtype=np.uint16) * 257).reshape(16, 16)
    path = tmp_path / "deep.png"
    Image.fromarray(ramp).save(path)
    pixels = np.asarray(decode_rgb(path.read_bytes(), 0, str(path)))
    assert pixels.shape == (16, 16, 3)
    assert pixels[..., 0].ravel().tolist() == list(range(256))


@pytest.mark.parametrize("writer, reason", [
    (write_zero_byte, "empty"),
    (write_truncated_jpeg, "truncated"),
    (write_text_as_jpg, "cannot identify"),
], ids=["zero-byte", "truncated", "text"])
def test_broken_bytes_raise_bad_image_error_naming_the_file(tmp_path, writer, reason):
    path = writer(tmp_path / "broken.jpg")
    with pytest.raises(BadImageError) as err:
        decode_rgb(path.read_bytes(), 42, str(path))
    assert (err.value.index, err.value.path) == (42, str(path))
    assert reason in err.value.reason.lower()
    assert str(path) in str(err.value)
