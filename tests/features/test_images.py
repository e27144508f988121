"""Bad and unusual image files each get the documented behaviour."""
import io

import numpy as np
import pytest
from PIL import Image

from how_met.features import images
from how_met.features.images import ImageError, load_image


def _photo(size=(240, 160)):
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def test_shrink_only(tmp_path):
    _photo((240, 160)).save(tmp_path / "a.jpg")
    arr, original = load_image(tmp_path / "a.jpg", 120)
    assert arr.shape == (80, 120, 3) and original == (240, 160)
    arr, _ = load_image(tmp_path / "a.jpg", 1000)  # never enlarged
    assert arr.shape == (160, 240, 3)


def test_exif_orientation(tmp_path):
    img = _photo((240, 160))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    img.save(tmp_path / "rot.jpg", exif=exif.tobytes())
    arr, original = load_image(tmp_path / "rot.jpg")
    assert arr.shape == (240, 160, 3) and original == (160, 240)


def test_truncated_jpeg(tmp_path):
    buf = io.BytesIO()
    _photo().save(buf, "JPEG")
    (tmp_path / "cut.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(ImageError, match=r"cut\.jpg: unreadable image"):
        load_image(tmp_path / "cut.jpg")


def test_zero_byte_and_text_files(tmp_path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(ImageError, match=r"empty\.jpg: empty file"):
        load_image(tmp_path / "empty.jpg")
    (tmp_path / "notes.jpg").write_text("this is not an image\n")
    with pytest.raises(ImageError, match=r"notes\.jpg: unreadable image"):
        load_image(tmp_path / "notes.jpg")
    with pytest.raises(ImageError, match="no such file"):
        load_image(tmp_path / "missing.jpg")


def test_cmyk_16bit_palette_alpha(tmp_path):
    _photo().convert("CMYK").save(tmp_path / "cmyk.jpg")
    arr, _ = load_image(tmp_path / "cmyk.jpg")
    assert arr.dtype == np.uint8 and arr.shape == (160, 240, 3)

    ramp = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 16).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "gray16.png")
    arr, _ = load_image(tmp_path / "gray16.png")
    assert arr.shape == (64, 64, 3) and arr.max() > 200 and arr.min() == 0  # full range kept

    rgba = np.zeros((32, 32, 4), np.uint8)
    rgba[..., 0] = 255
    rgba[:16, :, 3] = 255  # top half opaque red, bottom transparent
    Image.fromarray(rgba, "RGBA").convert("P").save(tmp_path / "pal.png", transparency=0)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    arr, _ = load_image(tmp_path / "rgba.png")
    assert tuple(arr[0, 0]) == (255, 0, 0) and tuple(arr[-1, -1]) == (255, 255, 255)
    arr, _ = load_image(tmp_path / "pal.png")
    assert arr.shape == (32, 32, 3) and arr.dtype == np.uint8


def test_huge_image_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(images, "MAX_PIXELS", 10_000)
    _photo((200, 100)).save(tmp_path / "big.png")
    with pytest.raises(ImageError, match=r"big\.png: 200x100 = 20,000 pixels exceeds the 10,000 pixel limit"):
        load_image(tmp_path / "big.png")


def test_list_images(tmp_path):
    (tmp_path / "sub").mkdir()
    _photo().save(tmp_path / "sub" / "b.png")
    _photo().save(tmp_path / "a.JPG")
    (tmp_path / "readme.txt").write_text("x")
    assert images.list_images(tmp_path) == ["a.JPG", "sub/b.png"]
