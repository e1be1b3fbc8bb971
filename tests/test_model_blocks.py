"""Unit tests of the model zoo's blocks, attention factory, backbones and config loader."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from wsi_pipeline.config import ConfigError
from wsi_pipeline.models import create_model, list_models, register_model
from wsi_pipeline.models.attention import (
    ATTENTION_LAYERS,
    ECA,
    LECA,
    EcaLeca,
    GdAM,
    create_attn,
    eca_kernel_size,
)
from wsi_pipeline.models.blocks import ConvNormAct, TransformerLayer, create_act
from wsi_pipeline.models.gru_net import CDRB, MultiResBlock
from wsi_pipeline.models.inception_v4 import InceptionV4Encoder
from wsi_pipeline.models.mobilevit import MobileViTBlock, MobileViTEncoder
from wsi_pipeline.train.config import load_train_config


def rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", sorted(ATTENTION_LAYERS))
def test_attention_keeps_shape_and_trains(name: str) -> None:
    torch.manual_seed(0)
    attn = create_attn(name, 32)
    x = rand(2, 32, 6, 6).requires_grad_()
    out = attn(x)
    assert out.shape == x.shape
    out.sum().backward()
    assert x.grad is not None and x.grad.any()


def test_attention_factory_errors_and_identity() -> None:
    assert isinstance(create_attn(None, 8), nn.Identity)
    with pytest.raises(ValueError, match="valid: .*'eca'"):
        create_attn("nope", 8)
    with pytest.raises(ValueError, match="valid"):
        create_act("swish2")
    with pytest.raises(ValueError, match="eca_mode"):
        EcaLeca(8, eca_mode="bad")  # type: ignore[arg-type]


def test_eca_adaptive_kernel_sizes() -> None:
    assert [eca_kernel_size(c) for c in (64, 192, 384, 1024, 1536)] == [3, 5, 5, 5, 5]
    assert ECA(1536).conv.kernel_size == (5,)


def test_depthwise_eca_is_a_per_channel_gate() -> None:
    eca = ECA(4, mode="depthwise")
    x = rand(2, 4, 5, 5)
    centre = eca.conv.weight[:, 0, 1]
    expected = x * torch.sigmoid(centre * x.mean((2, 3)))[..., None, None]
    torch.testing.assert_close(eca(x), expected)


def test_leca_gate_varies_by_quadrant() -> None:
    torch.manual_seed(0)
    leca = LECA(32)
    nn.init.ones_(leca.fc1.weight)  # keep the hidden ReLU active for positive inputs
    x = rand(1, 32, 8, 8).abs()
    x[..., :4, :4] += 3.0
    gate = leca(x) / x
    assert not torch.allclose(gate[..., 0, 0], gate[..., 7, 7])


def test_conv_norm_act_same_padding() -> None:
    block = ConvNormAct(3, 5, (1, 7))
    assert block(rand(1, 3, 9, 11)).shape == (1, 5, 9, 11)
    assert block.conv.bias is None


def test_transformer_layer_shape() -> None:
    assert TransformerLayer(16, 4, 32)(rand(2, 10, 16)).shape == (2, 10, 16)


@pytest.mark.parametrize(
    ("encoder", "channels"),
    [
        (InceptionV4Encoder, (64, 192, 384, 1024, 1536)),
        (MobileViTEncoder, (32, 64, 96, 128, 160)),
    ],
)
def test_encoder_taps_at_strides_2_to_32(encoder: type[nn.Module], channels: tuple[int]) -> None:
    with torch.device("meta"):
        feats = encoder(in_channels=4)(torch.empty(1, 4, 96, 64))
    assert [f.shape[1] for f in feats] == list(channels)
    assert [tuple(f.shape[-2:]) for f in feats] == [(96 // s, 64 // s) for s in (2, 4, 8, 16, 32)]


def test_inception_uses_timm_key_names() -> None:
    with torch.device("meta"):
        keys = InceptionV4Encoder().state_dict().keys()
    assert {"features.0.conv.weight", "features.21.branch2_3b.bn.running_var"} <= keys


def test_mobilevit_block_handles_odd_sizes() -> None:
    block = MobileViTBlock(8, 16, 32, depth=1).eval()
    assert block(rand(1, 8, 5, 7)).shape == (1, 8, 5, 7)


def test_multires_widths_match_the_paper() -> None:
    widths = [MultiResBlock(3, u).out_channels for u in (32, 64, 128, 256, 512)]
    assert widths == [51, 105, 212, 426, 853]


def test_cdrb_gate_is_per_sample_unless_batch_mean() -> None:
    torch.manual_seed(0)
    x = rand(3, 6, 8, 8)
    per_sample = CDRB(6, 4).eval()
    torch.testing.assert_close(per_sample(x)[:1], per_sample(x[:1]))
    torch.manual_seed(0)
    batch_mean = CDRB(6, 4, gate_batch_mean=True).eval()
    assert not torch.allclose(batch_mean(x)[:1], batch_mean(x[:1]))


def test_gdam_samples_in_training_and_uses_the_mean_at_eval() -> None:
    torch.manual_seed(0)
    gdam = GdAM(8, hidden_channels=4)
    x = rand(1, 8, 2, 2)
    maps = gdam.eval()(x)
    assert [m.shape[-1] for m in maps] == [4, 8, 16, 32]
    assert all(torch.equal(a, b) for a, b in zip(maps, gdam(x), strict=True))
    gdam.train()
    assert not torch.equal(gdam(x)[0], gdam(x)[0])


def test_gdam_prior_options(tmp_path: Path) -> None:
    assert "prior" in dict(GdAM(8, prior="learnable").named_parameters())
    path = tmp_path / "phrases.pt"
    torch.save(rand(16, 24), path)
    with torch.device("meta"):
        model = create_model("gru_net", base_channels=8, text_embeddings=path)
    assert model.gdam.prior.shape == (1, 1, 32, 32)
    assert (model.gdam.prior >= 0).all()


def test_encoder_weights_and_freezing(tmp_path: Path) -> None:
    torch.manual_seed(0)
    path = tmp_path / "encoder.pt"
    torch.save(MobileViTEncoder().state_dict(), path)
    model = create_model("lanet", encoder_weights=path, freeze_encoder=True)
    loaded = torch.load(path, weights_only=True)
    assert torch.equal(model.encoder.stem.conv.weight, loaded["stem.conv.weight"])
    assert not any(p.requires_grad for p in model.encoder.parameters())
    assert all(p.requires_grad for p in model.decoder.parameters())


def test_model_config_rejects_bad_values(tmp_path: Path) -> None:
    recipes = Path(__file__).resolve().parents[1] / "configs" / "train"
    raw = yaml.safe_load((recipes / "lanet.yaml").read_text())
    raw["model"]["kwargs"] = {"width": 2}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match="valid: .*agg_channels"):
        load_train_config(path)
    del raw["model"]["kwargs"]["width"]
    raw["data"]["input_size"] = 250
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match="multiple of 32"):
        load_train_config(path)


def test_register_model_rejects_duplicates_and_missing_divisor() -> None:
    with pytest.raises(ValueError, match="already registered"):
        register_model("unet")(nn.Identity)
    with pytest.raises(TypeError, match="size_divisor"):
        register_model("no_divisor_net")(nn.Identity)
    assert "no_divisor_net" not in list_models()
