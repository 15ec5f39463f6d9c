"""The masked loss of LoRA training: masks from a masks/ folder or an alpha channel, cropped as their
images are, turned into latent-grid weights that line up with the codec's latent layout; with them the
trainer's loss is the per-element weighted error (all-ones masks change nothing, complementary halves
add up to the unmasked loss); missing or bad masks are one-line errors before anything changes."""

import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from rflow.cli import main
from rflow.errors import UserError
from rflow.models.codec import PixelUnshuffleCodec
from rflow.train.data import latent_weight, load_image, load_mask, read_dataset
from rflow.train.lora import LoRAConfig, LoRATrainer
from test_lora_train import CFG, shapes_folder, tiny_pipe

pytestmark = pytest.mark.usefixtures("one_thread")


def write_masks(folder, fill):
    """A masks/ folder beside the images: ``fill(width, height, i)`` -> uint8 array per image."""
    (folder / "masks").mkdir(exist_ok=True)
    for i, p in enumerate(sorted(folder.glob("*.png"))):
        w, h = Image.open(p).size
        Image.fromarray(fill(w, h, i)).save(folder / "masks" / p.name)
    return folder


def test_masks_come_from_a_masks_folder_or_the_alpha_channel(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    Image.new("RGB", (8, 8), "red").save(d / "a.png")
    Image.new("RGBA", (8, 8), (0, 0, 255, 128)).save(d / "b.png")
    Image.new("RGB", (8, 8), "green").save(d / "c.png")
    (d / "masks").mkdir()
    Image.new("L", (8, 8), 255).save(d / "masks" / "a.jpg")
    items = {it.path.name: it for it in read_dataset(d)}
    assert items["a.png"].mask == d / "masks" / "a.jpg" and items["b.png"].mask == d / "b.png"
    assert items["c.png"].mask is None
    assert torch.allclose(load_mask(items["b.png"], (8, 8)), torch.full((1, 1, 8, 8), 128 / 255))
    with pytest.raises(UserError, match="c.png: no loss mask"):
        load_mask(items["c.png"], (8, 8))
    Image.new("L", (4, 4), 255).save(d / "masks" / "a.jpg")
    with pytest.raises(UserError, match="the loss mask is 4x4, its image a.png 8x8"):
        load_mask(items["a.png"], (8, 8))
    (d / "masks" / "a.jpg").write_bytes(b"not an image")
    with pytest.raises(UserError, match="cannot be read"):
        load_mask(items["a.png"], (8, 8))


def test_a_mask_is_cropped_and_scaled_as_its_image(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    a = np.zeros((20, 40, 3), np.uint8)
    a[:, :10] = 255  # a white band on the left quarter
    Image.fromarray(a).save(d / "x.png")
    (d / "masks").mkdir()
    Image.fromarray(a[..., 0]).save(d / "masks" / "x.png")
    it = read_dataset(d)[0]
    img, mask = load_image(it.path, (16, 16)), load_mask(it, (16, 16))  # a centre crop of a wide image
    assert mask.shape == (1, 1, 16, 16)
    torch.testing.assert_close(mask[0, 0], (img[0, 0] + 1) / 2, atol=1e-6, rtol=0)


def test_latent_weights_follow_the_codecs_latent_layout():
    g = torch.Generator().manual_seed(0)
    mask = (torch.rand(2, 1, 16, 16, generator=g) > 0.7).float()
    codec = PixelUnshuffleCodec(4)
    w = latent_weight(codec, mask, 0.1)
    assert w.shape == codec.encode(torch.zeros(2, 3, 16, 16)).shape
    # each latent element's weight is its own pixel's: the codec's own encoding of the weight image
    raw = codec.encode((0.1 + 0.9 * mask).expand(-1, 3, -1, -1))
    torch.testing.assert_close(w, raw / raw.mean(dim=(1, 2, 3), keepdim=True))
    assert torch.allclose(w.mean(dim=(1, 2, 3)), torch.ones(2))
    vae = type("VAE", (), {"downscale_factor": 8})()  # a VAE latent: one weight per cell, every channel
    v = latent_weight(vae, mask, 0.0)
    assert v.shape == (2, 1, 2, 2) and torch.allclose(v.mean(dim=(1, 2, 3)), torch.ones(2))
    cells = mask.unfold(2, 8, 8).unfold(3, 8, 8).mean((-1, -2))
    torch.testing.assert_close(v, cells / cells.mean(dim=(1, 2, 3), keepdim=True))
    assert torch.equal(latent_weight(codec, mask, 1.0), torch.ones_like(w))


@pytest.fixture()
def data(tmp_path):
    return shapes_folder(tmp_path / "data", n=2)


def trainer(data, out, **kw):
    return LoRATrainer(tiny_pipe(), LoRAConfig(**dict(CFG, batch=1, steps=1, **kw)), read_dataset(data), out)


def test_masked_loss_is_the_per_element_weighted_error(data, tmp_path):
    plain = trainer(data, tmp_path / "p")
    losses = [plain.loss_at(k).item() for k in range(2)]
    write_masks(data, lambda w, h, i: np.full((h, w), 255, np.uint8))
    ones = trainer(data, tmp_path / "o", masked_loss=True)
    assert [ones.loss_at(k).item() for k in range(2)] == losses  # all-ones masks change nothing
    left = lambda w, h, i: np.tile((np.arange(w) < w // 2).astype(np.uint8) * 255, (h, 1))  # noqa: E731
    write_masks(data, left)
    a = [trainer(data, tmp_path / "a", masked_loss=True, mask_floor=0.0).loss_at(k).item() for k in range(2)]
    write_masks(data, lambda w, h, i: 255 - left(w, h, i))
    b = [trainer(data, tmp_path / "b", masked_loss=True, mask_floor=0.0).loss_at(k).item() for k in range(2)]
    for x, y, z in zip(a, b, losses):  # each half weighted 2, the other 0: the halves' mean is the whole
        assert x != pytest.approx(z, rel=1e-3) and (x + y) / 2 == pytest.approx(z, rel=1e-5)


def test_masked_training_runs_and_missing_masks_are_one_line_errors(data, tmp_path, capsys):
    from rflow.loading import save_pipeline

    model = tmp_path / "model"
    save_pipeline(tiny_pipe(), model, dtype=torch.float32)
    capsys.readouterr()
    args = ["train", "--model", str(model), "--data", str(data), "--steps", "2", "--rank", "2", "--resolution", "32",
            "--masked-loss", "--mask-floor", "0.2"]
    missing_model = [tmp_path / "no-model" if a == str(model) else a for a in args]  # decided before any loading
    assert main([*map(str, missing_model), "-o", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("rflow: error: --masked-loss: 2 image(s) have no loss mask"), err
    assert not (tmp_path / "none" / "lora.safetensors").exists()
    write_masks(data, lambda w, h, i: np.tile((np.arange(w) < w // 2).astype(np.uint8) * 255, (h, 1)))
    assert main([*args, "-o", str(tmp_path / "run")]) == 0, capsys.readouterr().err
    assert (tmp_path / "run" / "lora.safetensors").is_file()
    for bad in ("1.5", "-0.1"):
        assert main([*args[:-1], bad, "-o", str(tmp_path / f"bad{bad}")]) == 2
        assert "--mask-floor" in capsys.readouterr().err
    shutil.rmtree(data / "masks")
    assert main(["train", "--full", "--masked-loss", "-o", str(tmp_path / "full")]) == 2
    assert "--masked-loss: LoRA options, not for --full" in capsys.readouterr().err
