"""Networks and configs: official layout and sizes, stage-2 identity at init,
volumetric parameters, checkpointing, conditioning encodings, config files."""
from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch

from gem3d.config import Config, MaskConfig, VAEConfig, from_dict, load_config, save_config, to_dict
from gem3d.models import (build_slice_model, build_unet, build_vae, decode_latents, encode_masks,
                          encode_slices, volume_condition, volumetric_parameters)
from gem3d.models.mask_encoding import onehot_fractions, vae_mask_image
from gem3d.models.unet import AttentionBlock, timestep_embedding


def count(model):
    return sum(p.numel() for p in model.parameters())


def randomise(model, seed=0, std=0.1):
    """Random weights everywhere, also in the zero-initialised layers, so outputs are not trivial
    (norm scales around 1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale_of_norm = p.ndim == 1 and name.endswith("weight")
            p.copy_(torch.randn(p.shape, generator=g) * std + (1.0 if scale_of_norm else 0.0))
    return model


def tiny_unet(volumetric=False, **overrides):
    cfg = load_config("tiny")
    cfg.unet = dataclasses.replace(cfg.unet, **overrides)
    return cfg, build_unet(cfg, volumetric=volumetric)


# --- the official architecture -------------------------------------------------------------

def official_unet_shapes(in_ch, out_ch, mc, mult, nrb, attn, head_ch=32, context_dim=None, pseudo3d=False):
    """State-dict key -> shape of the official UNetModel (openaimodel.py, or openaimodel_pseudo3D.py
    with pseudo3d=True), walked from its constructor as read in HKU-MedAI/GEM-3D; independent of gem3d."""
    s, ted = {}, 4 * mc

    def lin(k, i, o, bias=True):
        s[k + ".weight"] = (o, i)
        if bias:
            s[k + ".bias"] = (o,)

    def conv(k, i, o, ks, dims=2):
        s[k + ".weight"], s[k + ".bias"] = (o, i) + (ks,) * dims, (o,)

    def norm(k, c):
        s[k + ".weight"], s[k + ".bias"] = (c,), (c,)

    def tem(k, c):  # PseudoConv3d: Conv1d(c, c, 3) as .temporal_conv
        if pseudo3d:
            conv(k + ".temporal_conv", c, c, 3, dims=1)

    def res(k, i, o):
        norm(k + ".in_layers.0", i), conv(k + ".in_layers.2", i, o, 3), tem(k + ".in_layers_tem", o)
        lin(k + ".emb_layers.1", ted, o)
        norm(k + ".out_layers.0", o), conv(k + ".out_layers.3", o, o, 3), tem(k + ".out_layers_tem", o)
        if i != o:
            conv(k + ".skip_connection", i, o, 1)

    def att(k, c):
        norm(k + ".norm", c)
        if context_dim is None:  # AttentionBlock
            conv(k + ".qkv", c, 3 * c, 1, dims=1), conv(k + ".proj_out", c, c, 1, dims=1)
            if pseudo3d:
                conv(k + ".qkv_tem", c, 3 * c, 1, dims=1), conv(k + ".proj_out_tem", c, c, 1, dims=1)
            return
        conv(k + ".proj_in", c, c, 1), conv(k + ".proj_out", c, c, 1)  # SpatialTransformer, depth 1
        b = k + ".transformer_blocks.0"
        for a, cd in (("attn1", c), ("attn2", context_dim)):
            lin(f"{b}.{a}.to_q", c, c, False), lin(f"{b}.{a}.to_k", cd, c, False)
            lin(f"{b}.{a}.to_v", cd, c, False), lin(f"{b}.{a}.to_out.0", c, c)
        lin(b + ".ff.net.0.proj", c, 8 * c), lin(b + ".ff.net.2", 4 * c, c)
        for j in (1, 2, 3):
            norm(f"{b}.norm{j}", c)

    lin("time_embed.0", mc, ted), lin("time_embed.2", ted, ted)
    conv("input_blocks.0.0", in_ch, mc, 3), tem("input_blocks.0.1", mc)
    chans, ch, ds, i = [mc], mc, 1, 1
    for level, m in enumerate(mult):
        for _ in range(nrb):
            res(f"input_blocks.{i}.0", ch, m * mc)
            ch = m * mc
            if ds in attn:
                att(f"input_blocks.{i}.1", ch)
            chans.append(ch)
            i += 1
        if level != len(mult) - 1:
            conv(f"input_blocks.{i}.0.op", ch, ch, 3), tem(f"input_blocks.{i}.0.op_tem", ch)
            chans.append(ch)
            ds, i = ds * 2, i + 1
    res("middle_block.0", ch, ch), att("middle_block.1", ch), res("middle_block.2", ch, ch)
    i = 0
    for level, m in reversed(list(enumerate(mult))):
        for r in range(nrb + 1):
            res(f"output_blocks.{i}.0", ch + chans.pop(), m * mc)
            ch, j = m * mc, 1
            if ds in attn:
                att(f"output_blocks.{i}.1", ch)
                j = 2
            if level and r == nrb:
                conv(f"output_blocks.{i}.{j}.conv", ch, ch, 3), tem(f"output_blocks.{i}.{j}.conv_tem", ch)
                ds //= 2
            i += 1
    norm("out.0", ch), conv("out.2", mc, out_ch, 3), tem("out_tem", out_ch)
    return s


def shapes(model, prefix=""):
    return {k[len(prefix):]: tuple(v.shape) for k, v in model.state_dict().items() if k.startswith(prefix)}


def test_paper_unet_is_the_official_architecture_key_for_key():
    # brain_stage1.yaml / brain_stage2.yaml: in 12, out 4, 224 ch, mult [1,2,3,4], 2 res blocks,
    # attention_resolutions [8,4,2], 32 channels per head, AttentionBlock (use_spatial_transformer: false)
    cfg = load_config("paper")
    assert (cfg.unet.model_channels, cfg.unet.channel_mult, cfg.unet.attention_resolutions) == \
        (224, (1, 2, 3, 4), (8, 4, 2))
    with torch.device("meta"):
        stage1 = build_unet(cfg)
        stage2 = build_unet(cfg, volumetric=True)
    official = dict(in_ch=12, out_ch=4, mc=224, mult=(1, 2, 3, 4), nrb=2, attn=(8, 4, 2))
    assert shapes(stage1) == official_unet_shapes(**official)
    assert shapes(stage2) == official_unet_shapes(**official, pseudo3d=True)
    # sum of the official shapes above: 274,076,324 (stage 1), 367,878,616 (stage 2, +93,802,292 '*_tem')
    assert count(stage1) == 274_076_324 == sum(math.prod(v) for v in official_unet_shapes(**official).values())
    assert count(stage2) == 367_878_616
    assert sum(p.numel() for p in volumetric_parameters(stage2)) == 367_878_616 - 274_076_324


def test_paper_slice_model_is_the_official_architecture_key_for_key():
    # brain_slice.yaml: in 4, 224 ch, mult [1,2,4,4], attention [4,2,1], SpatialTransformer with
    # context_dim 128 (PositionalEmbedder: parameter-free): 414,106,788 parameters
    with torch.device("meta"):
        model = build_slice_model(load_config("paper"))
    official = official_unet_shapes(4, 4, 224, (1, 2, 4, 4), 2, (4, 2, 1), context_dim=128)
    assert shapes(model, "unet.") == official and len(shapes(model)) == len(official)
    assert count(model) == 414_106_788


def test_kl_f8_is_the_stable_diffusion_vae():
    with torch.device("meta"):
        vae = build_vae(load_config("paper"))
    # LDM kl-f8 = SD v1 VAE: 83,653,863 parameters; RGB, /8, 4 latent channels, scale 0.18215
    assert count(vae) == 83_653_863
    assert (vae.config.in_channels, vae.config.out_channels, vae.config.latent_channels) == (3, 3, 4)
    assert load_config("paper").vae.factor == 8 and vae.config.scaling_factor == 0.18215


def test_tiny_sizes_and_input_channels():
    cfg = load_config("tiny")
    unet = build_unet(cfg)
    assert 100_000 < count(unet) < 1_000_000 and count(unet) == 705_668
    assert unet.in_channels == 4 + 5 + 4  # latent + one-hot of (-1, 0, 1, 2, 3) + informed latent
    paper = load_config("paper")
    baseline = from_dict({"preset": "paper", "informed_slice": False})
    with torch.device("meta"):
        assert build_unet(paper).in_channels == 12
        assert build_unet(baseline).in_channels == 8  # mask-only "Make-A-Volume" baseline


# --- forward conventions ----------------------------------------------------------------------

@pytest.mark.parametrize("n", [1, 3, 8])
@pytest.mark.parametrize("volumetric", [False, True])
def test_forward_shapes(n, volumetric):
    cfg, unet = tiny_unet(volumetric)
    x, mask, informed = torch.randn(2, n, 4, 8, 6), torch.randn(2, n, 5, 8, 6), torch.randn(2, 4, 8, 6)
    cond = volume_condition(mask, informed)
    assert cond.shape == (2, n, 9, 8, 6) and torch.equal(cond[:, -1, 5:], informed)
    assert unet(x, torch.tensor([3, 999]), cond).shape == (2, n, 4, 8, 6)
    assert unet(x, torch.full((2, n), 7), cond).shape == (2, n, 4, 8, 6)
    with pytest.raises(ValueError, match="channels"):
        unet(x, torch.tensor([3, 999]), mask)
    with pytest.raises(ValueError, match="timesteps"):
        unet(x, torch.tensor([3, 4, 5]), cond)


def test_one_timestep_per_window_is_broadcast_over_its_slices():
    _, unet = tiny_unet()
    randomise(unet)
    x, cond = torch.randn(2, 3, 4, 4, 4), torch.randn(2, 3, 9, 4, 4)
    t = torch.tensor([5, 800])
    assert torch.equal(unet(x, t, cond), unet(x, t[:, None].expand(2, 3), cond))
    assert not torch.allclose(unet(x, t, cond), unet(x, t.flip(0), cond))


def test_timestep_embedding_is_cos_then_sin():
    e = timestep_embedding(torch.tensor([0.0, 1.0]), 8)
    assert torch.equal(e[0], torch.tensor([1.0] * 4 + [0.0] * 4))
    assert torch.allclose(e[1, :4], torch.cos(torch.tensor([1.0, 0.1, 0.01, 0.001])))


def test_attention_block_matches_the_official_legacy_formula():
    block = randomise(AttentionBlock(64, 32, use_checkpoint=False), std=0.2)  # 2 heads
    x = torch.randn(3, 64, 4, 4)
    # official QKVAttentionLegacy: split heads first, then q|k|v; scale 1/sqrt(sqrt(ch)) on q and k
    s = x.reshape(3, 64, 16)
    q, k, v = block.qkv(block.norm(s)).reshape(3 * 2, 3 * 32, 16).split(32, dim=1)
    scale = 1 / math.sqrt(math.sqrt(32))
    w = torch.softmax(torch.einsum("bct,bcs->bts", q * scale, k * scale), dim=-1)
    a = torch.einsum("bts,bcs->bct", w, v).reshape(3, 64, 16)
    expected = (s + block.proj_out(a)).reshape(3, 64, 4, 4)
    assert torch.allclose(block(x, 1), expected, atol=1e-5)


# --- stage 2: volumetric layers ---------------------------------------------------------------

@pytest.mark.parametrize("n", [2, 5, 16])
def test_stage2_at_init_reproduces_stage1(n):
    _, stage1 = tiny_unet()
    randomise(stage1)
    stage2 = copy.deepcopy(stage1)
    stage2.add_volumetric_layers()
    x, cond, t = torch.randn(1, n, 4, 6, 4), torch.randn(1, n, 9, 6, 4), torch.tensor([321])
    with torch.no_grad():
        y1, y2 = stage1(x, t, cond), stage2(x, t, cond)
        assert y1.std() > 0.1  # a real output, not the zero of zero-initialised layers
        assert (y1 - y2).abs().max() < 1e-5
        for name in ("output_blocks.3.0.out_layers_tem.temporal_conv.weight", "middle_block.1.proj_out_tem.weight"):
            dict(stage2.named_parameters())[name].add_(0.1)  # the inserted layers are in the path
            assert (stage2(x, t, cond) - y1).abs().max() > 1e-3


def test_volumetric_layers_mix_slices_and_stage1_does_not():
    _, stage1 = tiny_unet()
    randomise(stage1)
    stage2 = copy.deepcopy(stage1)
    stage2.add_volumetric_layers()
    randomise(stage2, seed=1)
    x, cond, t = torch.randn(1, 4, 4, 4, 4), torch.randn(1, 4, 9, 4, 4), torch.tensor([100])
    x2 = x.clone()
    x2[:, 0] += 1.0  # change slice 0 only
    with torch.no_grad():
        assert torch.equal(stage1(x, t, cond)[:, 1:], stage1(x2, t, cond)[:, 1:])
        assert not torch.allclose(stage2(x, t, cond)[:, 1:], stage2(x2, t, cond)[:, 1:])


def test_volumetric_parameters_are_exactly_the_inserted_ones():
    _, unet = tiny_unet()
    before = {n: p for n, p in unet.named_parameters()}
    unet.add_volumetric_layers()
    after = dict(unet.named_parameters())
    inserted = {id(p) for n, p in after.items() if n not in before}
    vol = {id(p) for p in volumetric_parameters(unet)}
    assert vol == inserted and len(vol) == len(after) - len(before) > 0
    assert vol.isdisjoint(id(p) for p in before.values())
    assert all(p is after[n] for n, p in before.items())  # base parameters untouched
    with pytest.raises(RuntimeError):
        unet.add_volumetric_layers()


def test_gradients_reach_only_volumetric_layers_when_base_is_frozen():
    _, unet = tiny_unet(volumetric=True)
    randomise(unet)
    vol = {id(p) for p in volumetric_parameters(unet)}
    for p in unet.parameters():
        p.requires_grad_(id(p) in vol)
    unet(torch.randn(1, 4, 4, 4, 4), torch.tensor([10]), torch.randn(1, 4, 9, 4, 4)).square().mean().backward()
    base = [p for p in unet.parameters() if id(p) not in vol]
    assert base and all(p.grad is None for p in base)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in volumetric_parameters(unet))


def test_use_checkpoint_gives_identical_outputs_and_gradients():
    _, plain = tiny_unet(volumetric=True, dropout=0.1)
    randomise(plain)
    ckpt = copy.deepcopy(plain)
    for m in ckpt.modules():
        if hasattr(m, "use_checkpoint"):
            m.use_checkpoint = True
    calls = []
    ckpt.input_blocks[1][0].in_layers.register_forward_hook(lambda *a: calls.append(1))
    x, cond, t = torch.randn(2, 3, 4, 4, 4), torch.randn(2, 3, 9, 4, 4), torch.tensor([1, 600])
    outs = []
    for model in (plain, ckpt):
        torch.manual_seed(0)
        y = model(x, t, cond)
        y.square().mean().backward()
        outs.append((y.detach(), [p.grad for p in model.parameters()]))
    assert len(calls) == 2  # recomputed in backward: checkpointing is really on
    assert torch.equal(outs[0][0], outs[1][0])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(outs[0][1], outs[1][1]))


# --- slice model ------------------------------------------------------------------------------

@pytest.mark.parametrize("position", ["crossattn", "time"])
def test_slice_model_is_conditioned_on_position(position):
    cfg = from_dict({"preset": "tiny", "slice_model": {"position": position, "mask_conditioned": True}})
    model = randomise(build_slice_model(cfg))
    assert model.unet.in_channels == 4 + 5
    x, cond, t = torch.randn(2, 4, 16, 16), torch.randn(2, 5, 16, 16), torch.tensor([5, 5])
    with torch.no_grad():
        a = model(x, t, torch.tensor([0.2, 0.2]), cond)
        b = model(x, t, torch.tensor([0.2, 0.8]), cond)
    assert a.shape == (2, 4, 16, 16)
    assert torch.allclose(a[0], b[0], atol=1e-6) and not torch.allclose(a[1], b[1], atol=1e-3)


# --- VAE and mask encoding --------------------------------------------------------------------

def rgb_tiny_vae():
    cfg = load_config("tiny")
    cfg.vae = dataclasses.replace(cfg.vae, in_channels=3, out_channels=3, scale=0.5)
    return cfg, build_vae(cfg).eval()


def test_encode_decode_chunks_and_grey_rgb_conversion():
    cfg, vae = rgb_tiny_vae()
    x = torch.rand(5, 1, 64, 64) * 2 - 1
    with torch.no_grad():
        z = encode_slices(vae, x, 0.5, chunk_size=2)
        assert z.shape == (5, 4, 16, 16)
        assert torch.allclose(z, encode_slices(vae, x.repeat(1, 3, 1, 1), 0.5, chunk_size=100), atol=1e-6)
        assert torch.allclose(z, 0.5 * vae.encode(x.repeat(1, 3, 1, 1)).latent_dist.mean, atol=1e-6)
        y = decode_latents(vae, z, 0.5, chunk_size=3)
        assert y.shape == (5, 1, 64, 64)
        assert torch.allclose(y, vae.decode(z / 0.5).sample.mean(1, keepdim=True), atol=1e-5)
    with pytest.raises(ValueError):
        encode_slices(vae, torch.zeros(2, 2, 64, 64), 0.5)


def test_vae_mask_encoding_uses_the_official_scaling():
    labels = torch.tensor([[-1, 0, 1, 2, 3]])[:, None].expand(1, 5, 5).transpose(1, 2).contiguous()
    image = vae_mask_image(labels, max_label=3)
    assert torch.allclose(image[0, 0, :, 0], torch.tensor([-5 / 3, -1, -1 / 3, 1 / 3, 1]))
    cfg, vae = rgb_tiny_vae()
    cfg.mask = MaskConfig(encoding="vae")
    mask = torch.randint(-1, 4, (3, 64, 64))
    with torch.no_grad():
        z = encode_masks(mask, cfg, vae)
        assert torch.allclose(z, encode_slices(vae, mask[:, None].float() / 3 * 2 - 1, 0.5), atol=1e-6)
    assert z.shape == (3, 4, 16, 16)


def test_onehot_mask_encoding_gives_area_fractions():
    cfg = load_config("tiny")  # values (-1, 0, 1, 2, 3), VAE factor 4
    mask = torch.zeros(1, 4, 8, dtype=torch.long)
    mask[0, :, :4] = torch.tensor([[-1, -1, 0, 0], [1, 1, 1, 1], [3, 3, 3, 3], [3, 3, 3, 3]])
    mask[0, :, 4:] = 2
    z = encode_masks(mask, cfg)
    assert z.shape == (1, 5, 1, 2)
    frac = (z + 1) / 2
    assert torch.allclose(frac[0, :, 0, 0], torch.tensor([2, 2, 4, 0, 8]) / 16)
    assert torch.allclose(frac[0, :, 0, 1], torch.tensor([0, 0, 0, 1.0, 0]))
    assert torch.allclose(frac.sum(1), torch.ones(1, 1, 2))
    with pytest.raises(ValueError, match=r"\[7\]"):
        encode_masks(torch.full((1, 4, 4), 7), cfg)
    with pytest.raises(ValueError, match="divisible"):
        onehot_fractions(torch.zeros(1, 6, 6, dtype=torch.long), (0,), 4)


# --- configuration ----------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["tiny", "small", "paper"])
@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_config_round_trips(tmp_path, name, suffix):
    cfg = load_config(name)
    assert from_dict(to_dict(cfg)) == cfg
    save_config(cfg, tmp_path / f"c{suffix}")
    assert load_config(tmp_path / f"c{suffix}") == cfg
    assert load_config(str(tmp_path / f"c{suffix}")).data.labels == {1: "necrosis", 2: "edema", 3: "enhancing"}


def test_config_file_overrides_a_preset_and_rejects_unknown_keys(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("preset: paper\ninformed_slice: false\ntrain:\n  lr: 5e-6\n"
                    "data:\n  labels: {1: liver, 2: kidney}\n")
    cfg = load_config(path)
    assert cfg.unet.model_channels == 224 and not cfg.informed_slice
    assert cfg.train.lr == 5e-6 and cfg.window_length == 16 and cfg.data.labels == {1: "liver", 2: "kidney"}
    path.write_text("unet:\n  chanel_mult: [1, 2]\n")
    with pytest.raises(ValueError, match=r"unet\.chanel_mult"):
        load_config(path)
    with pytest.raises(ValueError, match="model_channels"):
        from_dict({"unet": {"model_channels": "wide"}})
    with pytest.raises(ValueError, match="mask.encoding"):
        from_dict({"mask": {"encoding": "rle"}})
    with pytest.raises(ValueError, match="preset"):
        load_config("huge")
    assert isinstance(Config(), Config) and VAEConfig().factor == 4


def test_setting_a_config_attribute_that_is_not_a_field_is_an_error():
    cfg = Config()
    cfg.train.stage1_steps = 5
    with pytest.raises(AttributeError, match="TrainConfig has no field 'stage1_step'.*stage1_steps"):
        cfg.train.stage1_step = 5
    with pytest.raises(AttributeError, match="Config has no field 'window'"):
        cfg.window = 8
    assert cfg.train.stage1_steps == 5 and not hasattr(cfg.train, "stage1_step")
