"""Datasets from files, broken inputs, transforms per split, splits and folds, samplers, collate."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import small_config
from torchkiln.config.build import build_data, build_loaders
from torchkiln.config.load import resolve
from torchkiln.data.collate import PadSequences, build_collate
from torchkiln.data.images import CsvImages, ImageFolder
from torchkiln.data.loaders import BalancedBatchSampler, FastLoader
from torchkiln.data.splits import kfold_indices, split_indices
from torchkiln.data.tensorfile import TensorFile
from torchkiln.errors import ConfigError, DataError


# ------------------------------------------------------------------------------------------
# generated files
# ------------------------------------------------------------------------------------------
def _image(seed: int, size: int = 16, mode: str = "RGB"):
    from PIL import Image

    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
    arr[:, : size // 2] = 0  # left half dark: a horizontal flip is visible
    return Image.fromarray(arr).convert(mode)


def make_folder(root: Path, counts: dict[str, int], jpeg_every: int = 5) -> Path:
    """root/<class>/<i>.png (every `jpeg_every`-th a .jpg), 16x16 RGB."""
    k = 0
    for cls, n in counts.items():
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            ext = "jpg" if jpeg_every and i % jpeg_every == 0 else "png"
            _image(k).save(root / cls / f"{i}.{ext}")
            k += 1
    return root


def make_csv(root: Path, rows: list[dict], name: str = "labels.csv") -> Path:
    path = root / name
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


def cfg_for(tmp_path: Path, **data) -> object:
    raw = small_config(tmp_path, data={"dataset": {"type": "Digits"}, "val_split": 0.2, "test_split": 0.1,
                                       "batch_size": 64, **data})
    return resolve(raw, "test")


# ------------------------------------------------------------------------------------------
# datasets
# ------------------------------------------------------------------------------------------
def test_image_folder_lists_lazily_and_decodes_png_and_jpeg(tmp_path):
    root = make_folder(tmp_path / "imgs", {"cat": 12, "dog": 8})
    (tmp_path / "imgs" / "cat" / "notes.txt").write_text("not an image")
    ds = ImageFolder(str(root))
    assert ds.classes == ["cat", "dog"] and ds.num_classes == 2 and len(ds) == 20
    assert np.bincount(ds.targets).tolist() == [12, 8]
    img, target = ds[0]
    assert img.dtype == torch.uint8 and tuple(img.shape) == (3, 16, 16) and target == 0
    jpg = next(i for i, it in enumerate(ds.items) if it.path.suffix == ".jpg")
    assert tuple(ds[jpg][0].shape) == (3, 16, 16)
    gray = ImageFolder(str(root), mode="L")
    assert tuple(gray[0][0].shape) == (1, 16, 16)


def test_broken_image_files_name_the_file(tmp_path):
    root = make_folder(tmp_path / "imgs", {"a": 5, "b": 5})
    good = (root / "a" / "1.png").read_bytes()
    (root / "a" / "truncated.png").write_bytes(good[: len(good) // 2])
    ds = ImageFolder(str(root))  # listing is cheap: a truncated file is found when decoded
    idx = next(i for i, it in enumerate(ds.items) if it.path.name == "truncated.png")
    with pytest.raises(DataError, match=r"truncated\.png.*cannot decode") as err:
        ds[idx]
    assert "\n" not in str(err.value)

    (root / "b" / "garbage.png").write_bytes(b"this is not a png at all" * 10)
    ds = ImageFolder(str(root))
    idx = next(i for i, it in enumerate(ds.items) if it.path.name == "garbage.png")
    with pytest.raises(DataError, match=r"garbage\.png: not a readable image"):
        ds[idx]

    (root / "b" / "empty.png").write_bytes(b"")
    with pytest.raises(DataError, match=r"empty\.png: image file is empty.*on_error: skip"):
        ImageFolder(str(root))  # found early: at build time


def test_torchvision_decodes_the_same_pixels_as_pillow_and_finds_the_same_breakage(tmp_path):
    """JPEG, PNG and WebP go through torchvision.io (faster); every kind of file gives the pixels
    Pillow's RGB conversion gives, and a truncated file of either decoder is one broken input."""
    from PIL import Image
    from torchvision.transforms.v2.functional import pil_to_tensor

    from torchkiln.data.images import CODEC_DECODED, decode_image

    rgb = np.random.default_rng(0).integers(0, 255, (20, 24, 3), dtype=np.uint8)
    kinds = {"rgb.jpg": Image.fromarray(rgb), "gray.jpg": Image.fromarray(rgb[..., 0]),
             "cmyk.jpg": Image.fromarray(rgb).convert("CMYK"), "rgb.png": Image.fromarray(rgb),
             "rgba.png": Image.fromarray(np.dstack([rgb, rgb[..., :1]])), "palette.png": Image.fromarray(rgb).convert("P"),
             "gray-alpha.png": Image.fromarray(rgb).convert("LA"), "16bit.png": Image.fromarray(rgb[..., 0].astype(np.uint16) * 257),
             "rgb.webp": Image.fromarray(rgb), "rgb.bmp": Image.fromarray(rgb)}
    for name, image in kinds.items():
        image.save(tmp_path / name)
        got = decode_image(tmp_path / name)
        with Image.open(tmp_path / name) as im:
            want = pil_to_tensor(im.convert("RGB"))
        assert got.dtype == torch.uint8 and torch.equal(got, want), name
    assert {".jpg", ".png", ".webp"} <= set(CODEC_DECODED) and ".bmp" not in CODEC_DECODED
    for name in ("rgb.jpg", "rgb.png", "rgb.bmp"):
        whole = (tmp_path / name).read_bytes()
        (tmp_path / f"cut-{name}").write_bytes(whole[: len(whole) // 2])
        with pytest.raises(DataError, match=rf"cut-{name}: cannot decode image") as err:
            decode_image(tmp_path / f"cut-{name}")
        assert "\n" not in str(err.value)


def test_skip_policy_counts_drops_and_still_fails_above_max(tmp_path):
    """Nothing is decoded up front: an empty file is dropped at build time, a truncated one is
    skipped when it is read (its place taken by the next sample that reads), and listed."""
    from torchkiln.data.skipping import SkipBroken

    root = make_folder(tmp_path / "imgs", {"a": 20, "b": 20})
    good = (root / "a" / "1.png").read_bytes()
    (root / "a" / "truncated.png").write_bytes(good[:60])
    (root / "b" / "empty.png").write_bytes(b"")
    ds = ImageFolder(str(root), on_error="skip", max_skipped=0.1)
    assert len(ds) == 41 and [Path(p).name for p, _ in ds.skipped] == ["empty.png"]
    bad = next(i for i, it in enumerate(ds.items) if it.path.name == "truncated.png")
    reader = SkipBroken(ds, ds.skip_log)
    assert torch.equal(reader[bad][0], ds[(bad + 1) % len(ds)][0])  # the next one, every time
    assert sorted(Path(p).name for p, _ in ds.skip_log.found) == ["empty.png", "truncated.png"]
    for i in range(len(ds)):  # every sample reads
        reader[i]
    listed = tmp_path / "skipped_files.txt"  # the run's list: other processes' finds count too
    listed.write_text(f"{root / 'b' / '3.png'}\tfound by a worker\n")
    strict = ImageFolder(str(root), on_error="skip", max_skipped=0.05)
    strict.skip_log.attach(listed)
    with pytest.raises(DataError, match=r"3 of 42 inputs are broken .*max_skipped=0.05"):
        SkipBroken(strict, strict.skip_log)[bad]
    assert "truncated.png" in listed.read_text()
    with pytest.raises(DataError, match=r"1 of 42 inputs are broken .*max_skipped=0.01"):
        ImageFolder(str(root), on_error="skip", max_skipped=0.01)


def test_skip_decodes_nothing_before_the_first_step_and_each_file_once_an_epoch(tmp_path, monkeypatch):
    """What makes on_error: skip cost what the broken files cost: building the data and loaders
    as kiln train does decodes no image; the first batch decodes its own images and the broken
    one among them (once); an epoch decodes each file about once."""
    import torchkiln.data.images as images

    root = make_folder(tmp_path / "imgs", {"a": 30, "b": 30})
    good = (root / "a" / "1.png").read_bytes()
    for i in range(3):
        (root / "b" / f"truncated{i}.png").write_bytes(good[:60])
    decoded: list[str] = []
    real = images.decode_image

    def counting(path, *args, **kwargs):
        decoded.append(Path(path).name)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(images, "decode_image", counting)
    cfg = cfg_for(tmp_path, dataset={"type": "ImageFolder", "args": {"root": str(root)}}, val_split=0.25,
                  test_split=0.0, batch_size=8, on_error="skip", max_skipped=0.1)
    loaders = build_loaders(cfg, build_data(cfg))
    assert decoded == []
    first = next(iter(loaders["train"]))
    assert len(first[0]) == 8 and 8 <= len(decoded) <= 8 + 3
    decoded.clear()
    n = sum(len(x) for x, _ in loaders["train"])
    assert n == len(loaders["train"].dataset)
    assert len(decoded) <= n + 2 * 3  # a broken file read, and the sample read in its place


def test_decompression_guard(tmp_path, monkeypatch):
    """max_pixels and Pillow's bomb limit hold for both decoders, checked from the header alone."""
    from PIL import Image

    from torchkiln.data.images import decode_image

    root = make_folder(tmp_path / "imgs", {"a": 2, "b": 2}, jpeg_every=2)  # a .jpg and a .png a class
    ds = ImageFolder(str(root), max_pixels=100)
    names = sorted(it.path.suffix for it in ds.items)
    assert names == [".jpg", ".jpg", ".png", ".png"]
    for i in range(len(ds)):
        with pytest.raises(DataError, match=r"16x16, above max_pixels=100"):
            ds[i]
    assert Image.MAX_IMAGE_PIXELS is not None  # Pillow's own limit is never switched off
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "x.bmp")  # Pillow's decoder
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 256 pixels: above twice the limit
    for name in ("a/0.jpg", "a/1.png"):
        with pytest.raises(DataError, match=r"decompression-bomb limit"):
            decode_image(root / name)
    with pytest.raises(DataError, match=r"decompression-bomb limit"):
        decode_image(tmp_path / "x.bmp")


def test_both_decoders_turn_a_photo_upright_by_its_exif_orientation(tmp_path, monkeypatch):
    """TorchCodec applies a JPEG's EXIF orientation; the Pillow path does too, so a rotated phone
    photo gives the same pixels from either (here forced through Pillow with CODEC_DECODED empty)."""
    from PIL import Image, ImageOps

    from torchkiln.data import images

    rgb = np.random.default_rng(2).integers(0, 255, (37, 53, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees: shown 37 wide, 53 high
    Image.fromarray(rgb).save(tmp_path / "photo.jpg", exif=exif.tobytes())
    codec = images.decode_image(tmp_path / "photo.jpg")
    monkeypatch.setattr(images, "CODEC_DECODED", ())
    pillow = images.decode_image(tmp_path / "photo.jpg")
    with Image.open(tmp_path / "photo.jpg") as im:
        upright = torch.from_numpy(np.array(ImageOps.exif_transpose(im).convert("RGB"))).permute(2, 0, 1)
    assert codec.shape == pillow.shape == (3, 53, 37)
    assert torch.equal(codec, upright) and torch.equal(pillow, upright)


def test_image_sizes_read_from_png_and_jpeg_headers_match_pillow(tmp_path):
    """The header parse the TorchCodec path checks sizes with: every JPEG kind Pillow writes
    (baseline, progressive, gray, CMYK, with an EXIF block, restart markers) and PNGs; None for
    what it does not read (WebP, another format, a cut header: Pillow's path takes those)."""
    from PIL import Image

    from torchkiln.data.images import header_size

    rgb = np.random.default_rng(1).integers(0, 255, (37, 53, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x010F] = "torchkiln"  # Make
    kinds = {"base.jpg": (Image.fromarray(rgb), {}), "prog.jpg": (Image.fromarray(rgb), {"progressive": True}),
             "gray.jpg": (Image.fromarray(rgb[..., 0]), {}), "cmyk.jpg": (Image.fromarray(rgb).convert("CMYK"), {}),
             "exif.jpg": (Image.fromarray(rgb), {"exif": exif.tobytes()}),
             "restart.jpg": (Image.fromarray(rgb), {"restart_marker_blocks": 1}),
             "rgb.png": (Image.fromarray(rgb), {}), "palette.png": (Image.fromarray(rgb).convert("P"), {})}
    for name, (image, options) in kinds.items():
        image.save(tmp_path / name, **options)
        data = (tmp_path / name).read_bytes()
        assert header_size(data) == (53, 37), name
        assert header_size(data[:10]) is None, name  # cut inside the header
    Image.fromarray(rgb).save(tmp_path / "x.webp")
    assert header_size((tmp_path / "x.webp").read_bytes()) is None
    assert header_size(b"GIF89a" + bytes(20)) is None
    assert header_size(b"\xff\xd8\xff\xda" + bytes(20)) is None  # a scan before any frame header


def test_csv_single_label_missing_file_and_unknown_label(tmp_path):
    make_folder(tmp_path / "imgs", {"x": 10}, jpeg_every=0)
    rows = [{"image": f"x/{i}.png", "label": "cat" if i % 2 else "dog"} for i in range(10)]
    ds = CsvImages(str(make_csv(tmp_path / "imgs", rows)))
    assert ds.classes == ["cat", "dog"] and len(ds) == 10
    assert ds[1][1].dtype == torch.int64 and int(ds[1][1]) == 0

    bad = rows + [{"image": "x/missing.png", "label": "cat"}]
    with pytest.raises(DataError, match=r"missing\.png \(bad\.csv line 12\): image file not found"):
        CsvImages(str(make_csv(tmp_path / "imgs", bad, "bad.csv")))
    unknown = rows + [{"image": "x/3.png", "label": "horse"}]
    with pytest.raises(DataError, match=r"3\.png \(u\.csv line 12\): label 'horse' is not in the class list"):
        CsvImages(str(make_csv(tmp_path / "imgs", unknown, "u.csv")), classes=["cat", "dog"])
    with pytest.raises(DataError, match=r"no column 'labl'; did you mean 'label'"):
        CsvImages(str(make_csv(tmp_path / "imgs", rows)), label_col="labl")


def test_csv_multilabel_regression_and_heads(tmp_path):
    root = make_folder(tmp_path / "imgs", {"x": 6}, jpeg_every=0)
    rows = [{"image": f"x/{i}.png", "tags": ["a b", "b", "", "c a", "a", "b c"][i], "y": str(i / 2),
             "color": "red" if i % 2 else "blue", "shape": "sq" if i < 3 else "ci", "a": i % 2, "b": 1}
            for i in range(6)]
    path = make_csv(root, rows)
    ml = CsvImages(str(path), label_col="tags", target="multilabel")
    assert ml.classes == ["a", "b", "c"] and ml.num_classes == 3
    assert ml[0][1].tolist() == [1.0, 1.0, 0.0] and ml[2][1].tolist() == [0.0, 0.0, 0.0]
    cols = CsvImages(str(path), label_col=["a", "b"], target="multilabel")
    assert cols[1][1].tolist() == [1.0, 1.0]
    reg = CsvImages(str(path), label_col="y", target="regression")
    assert reg[3][1].dtype == torch.float32 and float(reg[3][1]) == 1.5
    heads = CsvImages(str(path), label_col=["color", "shape"], target="heads")
    assert heads.classes == {"color": ["blue", "red"], "shape": ["ci", "sq"]}
    assert {k: int(v) for k, v in heads[1][1].items()} == {"color": 1, "shape": 1}
    unlabelled = CsvImages(str(path), label_col=None)
    assert len(unlabelled[0]) == 1


def test_tensor_file_npz_and_pt(tmp_path):
    x = np.random.default_rng(0).normal(size=(30, 5)).astype(np.float64)
    y = np.arange(30) % 3
    np.savez(tmp_path / "d.npz", x=x, y=y)
    ds = TensorFile(str(tmp_path / "d.npz"))
    assert ds.inputs.dtype == torch.float32 and ds.num_classes == 3 and len(ds) == 30
    torch.save({"feats": torch.ones(4, 2), "target": torch.tensor([0.5, 1.0, 1.5, 2.0])}, tmp_path / "r.pt")
    reg = TensorFile(str(tmp_path / "r.pt"), x_key="feats", y_key="target")
    assert reg.num_classes is None and float(reg[2][1]) == 1.5
    with pytest.raises(DataError, match=r"no array 'x' \(found: feats, target\)"):
        TensorFile(str(tmp_path / "r.pt"))
    (tmp_path / "bad.pt").write_bytes(b"\x00" * 50)
    with pytest.raises(DataError, match=r"bad\.pt: cannot read tensor file"):
        TensorFile(str(tmp_path / "bad.pt"))


def test_user_dataset_by_import_path(tmp_path, monkeypatch):
    (tmp_path / "mydata.py").write_text(
        "import torch\n"
        "class Squares(torch.utils.data.Dataset):\n"
        "    def __init__(self, n=20):\n"
        "        self.n = n\n"
        "        self.targets = [i % 2 for i in range(n)]\n"
        "    def __len__(self):\n"
        "        return self.n\n"
        "    def __getitem__(self, i):\n"
        "        return torch.full((3,), float(i * i)), self.targets[i]\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("mydata", None)
    cfg = cfg_for(tmp_path, dataset={"type": "mydata:Squares", "args": {"n": 20}}, val_split=0.25, test_split=0.0)
    data = build_data(cfg)
    assert len(data.train) == 15 and len(data.val) == 5
    loaders = build_loaders(cfg, data)
    assert not isinstance(loaders["train"], FastLoader)
    x, y = next(iter(loaders["train"]))
    assert x.shape[1] == 3 and torch.equal(x[:, 0], x[:, 1])


# ------------------------------------------------------------------------------------------
# transforms
# ------------------------------------------------------------------------------------------
def test_train_and_eval_transforms_differ_as_configured(tmp_path):
    root = make_folder(tmp_path / "imgs", {"a": 10, "b": 10}, jpeg_every=0)
    cfg = cfg_for(tmp_path, dataset={"type": "ImageFolder", "args": {"root": str(root)}}, val_split=0.5,
                  test_split=0.0, transforms={
                      "train": [{"type": "RandomHorizontalFlip", "args": {"p": 1.0}},
                                {"type": "ToDtype", "args": {"dtype": "float32", "scale": True}},
                                {"type": "Normalize", "args": {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}}],
                      "eval": [{"type": "Resize", "args": {"size": 8, "interpolation": "nearest"}}],
                  })
    data = build_data(cfg)
    raw = data.train.dataset  # the Subset under the transform
    tx, _ = data.train[0]
    expected = (raw[0][0].flip(-1).float() / 255 - 0.5) / 0.5
    assert tx.dtype == torch.float32 and type(tx) is torch.Tensor
    assert torch.allclose(tx, expected, atol=1e-6)
    vx, _ = data.val[0]
    raw_val = data.val.dataset[0][0]
    assert tuple(vx.shape) == (3, 8, 8) and vx.dtype == torch.float32  # no flip, no normalize, resized
    assert torch.allclose(vx, raw_val[:, ::2, ::2].float() / 255)


def test_bad_transform_config_fails_before_data_is_read(tmp_path):
    from torchkiln.config.build import check_components

    cfg = cfg_for(tmp_path, transforms={"train": [{"type": "RandomHorizntalFlip"}]})
    with pytest.raises(ConfigError, match=r"data.transforms.train.0.type: unknown transform.*RandomHorizontalFlip"):
        check_components(cfg)
    cfg = cfg_for(tmp_path, transforms={"eval": [{"type": "Resize", "args": {"sise": 3}}]})
    with pytest.raises(ConfigError, match=r"data.transforms.eval.0.args.sise: unknown argument.*'size'"):
        check_components(cfg)


# ------------------------------------------------------------------------------------------
# splits and folds
# ------------------------------------------------------------------------------------------
def test_stratified_split_keeps_class_proportions():
    labels = np.array([0] * 300 + [1] * 100 + [2] * 50)
    train, val, test = split_indices(len(labels), [0.2, 0.1], seed=3, labels=labels)
    for part, size in ((val, 90), (test, 45)):
        assert len(part) == size
        assert np.allclose(np.bincount(labels[part], minlength=3) / size, [2 / 3, 2 / 9, 1 / 9], atol=0.02)
    assert len(np.intersect1d(train, val)) == 0 and len(np.unique(np.concatenate([train, val, test]))) == 450
    again = split_indices(len(labels), [0.2, 0.1], seed=3, labels=labels)
    assert all(np.array_equal(a, b) for a, b in zip(again, (train, val, test)))


def test_kfold_folds_are_disjoint_cover_the_data_and_are_stratified():
    labels = np.array([0] * 60 + [1] * 20)
    vals = []
    for fold in range(4):
        train, val = kfold_indices(len(labels), 4, fold, seed=1, labels=labels)
        assert len(np.intersect1d(train, val)) == 0 and len(train) + len(val) == 80
        assert np.bincount(labels[val]).tolist() == [15, 5]
        vals.append(val)
    assert np.array_equal(np.sort(np.concatenate(vals)), np.arange(80))
    for i in range(4):
        for j in range(i + 1, 4):
            assert len(np.intersect1d(vals[i], vals[j])) == 0
    with pytest.raises(DataError, match="class 1 has 2 samples, fewer than 4 folds"):
        kfold_indices(10, 4, 0, seed=1, labels=np.array([0] * 8 + [1] * 2))


def test_kfold_config_holds_out_test_and_rotates_val(tmp_path):
    seen = []
    for fold in range(3):
        data = build_data(cfg_for(tmp_path, folds=3, fold=fold, test_split=0.1))
        test_idx = data.test.indices
        seen.append(set(data.val.indices))
        assert not set(data.val.indices) & set(data.train.indices)
        assert not set(test_idx) & (set(data.val.indices) | set(data.train.indices))
        assert len(data.train) + len(data.val) + len(test_idx) == 1797
    assert not (seen[0] & seen[1]) and not (seen[1] & seen[2])
    with pytest.raises(ConfigError, match="fold must be in 0..2"):
        cfg_for(tmp_path, folds=3, fold=3)


# ------------------------------------------------------------------------------------------
# samplers and collate
# ------------------------------------------------------------------------------------------
def test_balanced_sampler_is_balanced_deterministic_and_resumable():
    labels = np.array([0] * 900 + [1] * 100)
    s = BalancedBatchSampler(labels, batch_size=50, seed=7)
    s.set_epoch(2)
    epoch2 = list(s)
    drawn = np.concatenate([labels[b] for b in epoch2])
    assert len(drawn) == 1000 and 0.4 < drawn.mean() < 0.6  # about half from the 10% class
    s2 = BalancedBatchSampler(labels, batch_size=50, seed=7)
    s2.set_epoch(2)
    assert list(s2) == epoch2
    s2.set_epoch(2)
    s2.skip(5)
    assert list(s2) == epoch2[5:]
    s2.set_epoch(3)
    assert list(s2) != epoch2


def test_balanced_sampler_from_config_and_its_error(tmp_path):
    cfg = cfg_for(tmp_path, sampler="balanced", batch_size=32)
    loaders = build_loaders(cfg, build_data(cfg))
    assert isinstance(loaders["train"].batch_sampler, BalancedBatchSampler)
    torch.save({"x": torch.ones(20, 2), "y": torch.linspace(0, 1, 20)}, tmp_path / "r.pt")
    cfg = cfg_for(tmp_path, dataset={"type": "TensorFile", "args": {"path": str(tmp_path / "r.pt")}},
                  sampler="balanced", stratify=False)
    with pytest.raises(ConfigError, match="sampler: balanced needs single-label class targets"):
        build_loaders(cfg, build_data(cfg))


def test_pad_sequences_collate():
    batch = [(torch.ones(3, 2), torch.tensor(1)), (torch.ones(5, 2) * 2, torch.tensor(0))]
    x, y, lengths = PadSequences(padding_value=-1)(batch)
    assert x.shape == (2, 5, 2) and x[0, 3:].eq(-1).all() and x[1].eq(2).all()
    assert y.tolist() == [1, 0] and lengths.tolist() == [3, 5]
    seq2seq = [(torch.arange(2), torch.arange(2)), (torch.arange(4), torch.arange(4))]
    _, t, _ = build_collate(resolve(small_config(Path("."), data={"collate": "pad_sequences"}), "t").data.collate)(seq2seq)
    assert t[0].tolist() == [0, 1, -100, -100]


def test_images_of_different_sizes_give_a_clear_collate_error(tmp_path):
    root = make_folder(tmp_path / "imgs", {"a": 4, "b": 4}, jpeg_every=0)
    _image(99, size=20).save(root / "a" / "big.png")
    cfg = cfg_for(tmp_path, dataset={"type": "ImageFolder", "args": {"root": str(root)}}, val_split=0.0,
                  test_split=0.0, batch_size=9, stratify=False)
    loaders = build_loaders(cfg, build_data(cfg))
    with pytest.raises(DataError, match="samples in a batch differ in size.*Resize"):
        next(iter(loaders["train"]))


class RandomlyAugmented(torch.utils.data.Dataset):
    """Each sample drawn through all three RNGs, as augmentation pipelines do."""

    def __len__(self) -> int:
        return 40

    def __getitem__(self, i):
        import random

        noise = torch.rand(2) + float(np.random.rand()) + random.random()
        return torch.tensor([float(i)]), noise


def _epoch(loader, epoch: int, skip: int = 0) -> list[torch.Tensor]:
    from torchkiln.data.loaders import set_loader_epoch

    set_loader_epoch(loader, epoch, skip=skip)
    return [torch.cat([x, noise], dim=1) for x, noise in loader]


@pytest.mark.parametrize("persistent", [False, True])
def test_worker_augmentation_depends_on_the_batch_alone(persistent):
    """With workers, a batch's random draws are a function of (seed, epoch, rank, batch): the same
    for 1 or 2 workers and after a mid-epoch resume skips batches (what makes such a resume exact)."""
    from torchkiln.data.loaders import make_loader

    def loader(workers: int):
        return make_loader(RandomlyAugmented(), 8, train=True, seed=3, num_workers=workers,
                           persistent_workers=persistent)

    one, two = loader(1), loader(2)
    first = _epoch(one, 0)
    assert len(first) == 5
    assert all(torch.equal(a, b) for a, b in zip(first, _epoch(two, 0)))
    resumed = _epoch(loader(2), 0, skip=3)  # a fresh loader, as after a restart
    assert all(torch.equal(a, b) for a, b in zip(first[3:], resumed)) and len(resumed) == 2
    second = _epoch(two, 1)  # another epoch: another order and other draws
    assert not torch.equal(torch.cat(first)[:, 1:], torch.cat(second)[:, 1:])
    assert sorted(torch.cat(second)[:, 0].tolist()) == list(range(40))
