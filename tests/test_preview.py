"""Cheap previews of latent models (the linear latent-to-RGB map) and the class lookup."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_vae

from mrdit import build_model, get_preset
from mrdit.classes import ClassIndex, ClassLookupError
from mrdit.pipeline import LatentDecoder, Pipeline
from mrdit.preview import LinearPreview, fit_linear_preview


class LinearVae(torch.nn.Module):
    """A stand-in autoencoder whose decode is a known per-pixel linear map (upsampled 2x), and whose
    encoder pools: the fit must recover that map."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        super().__init__()
        self.w, self.b = torch.nn.Parameter(weight), torch.nn.Parameter(bias)
        self.config = SimpleNamespace(block_out_channels=(8, 16))

    def encode(self, images):
        pooled = F.avg_pool2d(images, 2)  # (B, 3, h, w)
        z = torch.cat([pooled, pooled[:, :1] * pooled[:, 1:2]], dim=1)  # (B, 4, h, w), not collinear
        return SimpleNamespace(latent_dist=SimpleNamespace(mean=z))

    def decode(self, z):
        rgb = torch.einsum("oc,bchw->bohw", self.w, z) + self.b.view(1, 3, 1, 1)  # (B, 3, h, w)
        return SimpleNamespace(sample=F.interpolate(rgb, scale_factor=2, mode="nearest"))


@torch.no_grad()
def test_linear_fit_recovers_a_linear_decoder_and_round_trips(tmp_path):
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(3, 4, generator=g) * 0.1, torch.randn(3, generator=g) * 0.1  # decodes stay in [-1, 1]
    lin = fit_linear_preview(LinearVae(w, b), scale_factor=0.5, n=3, size=32)
    assert torch.allclose(lin.weight, w * 2, atol=1e-4) and torch.allclose(lin.bias, b, atol=1e-4)  # z = 0.5 x
    assert lin.fit_rmse < 1e-4
    z = torch.randn(2, 4, 8, 8, generator=g)
    assert lin(z).shape == (2, 3, 8, 8) and lin(z).abs().max() <= 1
    lin.save(tmp_path / "preview.safetensors")
    assert torch.equal(LinearPreview.load(tmp_path / "preview.safetensors")(z), lin(z))


def test_latent_pipeline_streams_linear_previews_and_decodes_finals_with_the_vae():
    torch.manual_seed(0)
    cfg = get_preset("tiny").replace(channels=4, image_size=16, num_classes=3, null_label=2)
    vae = tiny_vae().eval()
    decoder = LatentDecoder(vae, 0.5)
    pipe = Pipeline(build_model(cfg), decoder, previewer=fit_linear_preview(vae, 0.5, n=2, size=32))
    calls = []
    vae_decode = vae.decode
    vae.decode = lambda z: calls.append(z.shape) or vae_decode(z)
    result = pipe.generate(0, [1, 2], steps=3, keep_trajectory=True)
    assert len(calls) == 1  # the final images only, not 3 steps x (x_t + 3 branches)
    assert result.images[0].size == (32, 32) and result.trajectory[0].kind == "linear approximation"
    assert result.trajectory[-1].branches[0].shape == (2, 3, 4, 4)
    full = pipe.full_preview(result.trajectory[-1])
    assert len(calls) == 5 and full.branches[-1].shape == (2, 3, 32, 32)


def test_pixel_models_preview_their_pixels():
    pipe = Pipeline(build_model(get_preset("tiny")))
    pv = pipe.generate(0, 0, steps=2, keep_trajectory=True).trajectory[0]
    assert pv.kind == "pixels" and pv.latents is None and pipe.full_preview(pv) is pv


def test_class_lookup_exact_before_case_insensitive_ids_and_synonyms():
    idx = ClassIndex(["tench", "Cardigan", "cardigan", "golden retriever"], {1: ["Cardigan Welsh corgi"]})
    assert idx.lookup("Cardigan") == 1 and idx.lookup("cardigan") == 2  # the corgi vs the sweater
    assert idx.lookup("3") == 3 and idx.lookup(3) == 3 and idx.lookup(" 0 ") == 0
    assert idx.lookup("Golden_Retriever") == 3 and idx.lookup("golden  retriever") == 3
    assert idx.lookup("cardigan welsh corgi") == 1 and idx.lookup("cardigan (2)") == 2
    assert idx.choices()[2] == ("cardigan (2)", "cardigan")
    with pytest.raises(ClassLookupError, match="several classes: Cardigan \\(1\\), cardigan \\(2\\)"):
        idx.lookup("CARDIGAN")
    with pytest.raises(ClassLookupError, match="out of range"):
        idx.lookup("4")
    with pytest.raises(ClassLookupError, match="unknown class"):
        idx.lookup("cardigan (3)")  # a label whose id does not match its name is not a label
    with pytest.raises(ValueError, match="outside"):
        ClassIndex(["a"], {5: ["b"]})
