"""Parity of our Infinity against the official code: same random state dict, same forced bits, logits per scale.

Needs the official model code in .official/Infinity (tools/fetch_official.sh) and a CUDA GPU. The official
code imports timm and flash_attn, which the GPU machine lacks: small shims stand in for them here (DropPath is
identity at inference; flash-attn calls become SDPA, keeping the official bf16 cast of the cross-attention).

Both models run in fp32 without autocast. Bits are not sampled: the official sampler is replaced by one that
records the CFG-combined logits and returns a fixed random bit tensor, and our loop is fed the same bits — so
each scale's inputs are identical and the per-scale logit difference measures the model alone.

    PYTHONPATH=. python bench/parity_infinity.py --out bench/results/parity_infinity.json
"""
from __future__ import annotations

import argparse
import os
import sys
import types

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.common import write_result  # noqa: E402
from sparvar.config import InfinityConfig, get_config  # noqa: E402
from sparvar.generate import TorchRunner, resample  # noqa: E402
from sparvar.vae import latent_to_tokens, tokens_to_latent  # noqa: E402
from sparvar.model import build_model  # noqa: E402
from sparvar.checkpoint import to_official_name  # noqa: E402
from sparvar.schedule import get_schedule  # noqa: E402


def install_shims():
    """Stand-ins for the official code's third-party imports that the GPU machine does not have."""
    timm = types.ModuleType("timm")
    timm_models = types.ModuleType("timm.models")
    timm_layers = types.ModuleType("timm.models.layers")
    timm_loss = types.ModuleType("timm.loss")

    class DropPath(torch.nn.Module):
        def __init__(self, p=0.0):
            super().__init__()

        def forward(self, x):
            return x

    timm_models.register_model = lambda fn: fn
    timm_layers.DropPath = DropPath
    timm_layers.drop_path = lambda x, *a, **k: x
    timm_loss.SoftTargetCrossEntropy = torch.nn.CrossEntropyLoss
    timm.models, timm_models.layers, timm.loss = timm_models, timm_layers, timm_loss
    sys.modules.update({"timm": timm, "timm.models": timm_models, "timm.models.layers": timm_layers, "timm.loss": timm_loss})

    flash = types.ModuleType("flash_attn")

    def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, **kw):  # BLHc
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=softmax_scale)
        return out.transpose(1, 2)

    def flash_attn_varlen_kvpacked_func(q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0, softmax_scale=None, **kw):
        outs = []
        for i in range(len(cu_seqlens_q) - 1):
            qi = q[cu_seqlens_q[i]:cu_seqlens_q[i + 1]].transpose(0, 1)  # H L c
            kvi = kv[cu_seqlens_k[i]:cu_seqlens_k[i + 1]]
            ki, vi = kvi[:, 0].transpose(0, 1), kvi[:, 1].transpose(0, 1)
            outs.append(F.scaled_dot_product_attention(qi, ki, vi, scale=softmax_scale).transpose(0, 1))
        return torch.cat(outs)

    flash.flash_attn_func = flash_attn_func
    flash.flash_attn_varlen_kvpacked_func = flash_attn_varlen_kvpacked_func
    sys.modules["flash_attn"] = flash
    if "pytz" not in sys.modules:
        try:
            import pytz  # noqa: F401
        except ImportError:
            sys.modules["pytz"] = types.ModuleType("pytz")
    torch.compile = lambda fn=None, **kw: fn if fn is not None else (lambda f: f)  # run the fused AdaLN norm uncompiled


class VAEStub:
    """The pieces of the official tokenizer that the official sampling loop touches."""

    def __init__(self, codebook_dim: int):
        self.embed_dim = codebook_dim
        self.vocab_size = 2 ** codebook_dim
        lfq = types.SimpleNamespace(mask=2 ** torch.arange(codebook_dim - 1, -1, -1),
                                    indices_to_codes=lambda idx, label_type: self.codes(idx))
        self.quantizer = types.SimpleNamespace(lfq=lfq, z_interplote_up="trilinear")

    def codes(self, idx_Bld):  # (B, 1, h, w, d) bits -> (B, d, 1, h, w), +-1/sqrt(d)
        from sparvar.vae import bits_to_codes

        return bits_to_codes(idx_Bld.float(), self.embed_dim).permute(0, 4, 1, 2, 3)


BF16_CAST = "q=q_compact.to(dtype=torch.bfloat16), kv=kv_compact.to(dtype=torch.bfloat16)"


def import_official(keep_bf16_cross_attention: bool):
    """The official Infinity class. With keep_bf16_cross_attention=False, the one line of basic.py that casts
    cross-attention q/kv to bf16 (flash-attn has no fp32 path) is edited out in memory: a controlled experiment
    that shows whether any difference is left besides that rounding."""
    import importlib.util

    root = os.path.join(ROOT, ".official", "Infinity")
    if root not in sys.path:
        sys.path.insert(0, root)
    install_shims()
    for name in [m for m in sys.modules if m == "infinity" or m.startswith("infinity.")]:
        del sys.modules[name]
    if not keep_bf16_cross_attention:
        path = os.path.join(root, "infinity", "models", "basic.py")
        source = open(path).read()
        assert source.count(BF16_CAST) == 1, "official basic.py changed: update the parity harness"
        import infinity.models  # noqa: F401  (package first)

        spec = importlib.util.spec_from_loader("infinity.models.basic", loader=None, origin=path)
        module = importlib.util.module_from_spec(spec)
        module.__file__ = path
        exec(compile(source.replace(BF16_CAST, "q=q_compact, kv=kv_compact"), path, "exec"), module.__dict__)
        sys.modules["infinity.models.basic"] = module
        del sys.modules["infinity.models.infinity"]  # the package init imported it against the unedited basic.py
    import infinity.models.infinity as official_module

    return official_module


def official_model(cfg: InfinityConfig, device, official_module):
    OfficialInfinity = official_module.Infinity

    kwargs = dict(depth=cfg.depth, embed_dim=cfg.width, num_heads=cfg.heads, mlp_ratio=cfg.mlp_dim / cfg.width,
                  block_chunks=cfg.depth // cfg.blocks_per_chunk)
    with torch.no_grad():  # built on the CPU: its init draws cfg_uncond from a CPU generator
        model = OfficialInfinity(
            vae_local=VAEStub(cfg.vae.codebook_dim), text_channels=cfg.text_dim, text_maxlen=cfg.text_maxlen,
            shared_aln=True, raw_scale_schedule=None, checkpointing="full-block", customized_flash_attn=False,
            fused_norm=True, pad_to_multiplier=128, use_flex_attn=False, add_lvl_embeding_only_first_block=1,
            use_bit_label=1, rope2d_each_sa_layer=1, rope2d_normalized_by_hw=2, pn="1M",
            apply_spatial_patchify=int(cfg.vae.spatial_patchify), inference_mode=True, train_h_div_w_list=[1.0], **kwargs)
    return model.to(device).eval().requires_grad_(False)


@torch.no_grad()
def run_parity(name: str, depth: int | None, resolution: int, device, seed: int = 0) -> dict:
    """Both variants of the official code (as is; bf16 cross-attention cast removed) against ours."""
    results = {}
    for keep in (True, False):
        results[keep] = _run_parity(name, depth, resolution, device, seed, keep)
    out = results[True]
    out["max_abs_logit_diff_official_without_bf16_cross_attention_cast"] = results[False]["max_abs_logit_diff"]
    out["per_scale_official_without_bf16_cross_attention_cast"] = results[False]["per_scale"]
    return out


def _run_parity(name, depth, resolution, device, seed, keep_bf16_cross_attention) -> dict:
    import dataclasses

    cfg = get_config(name)
    if depth is not None:
        cfg = dataclasses.replace(cfg, name=f"{name}-depth{depth}", depth=depth)
    schedule = get_schedule(resolution)
    ours = build_model(cfg, device=device, dtype=torch.float32, seed=seed)
    official_module = import_official(keep_bf16_cross_attention)
    theirs = official_model(cfg, device, official_module)
    sd = {to_official_name(k, cfg): v for k, v in ours.state_dict().items()}
    missing, unexpected = theirs.load_state_dict(sd, strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    theirs.rng = torch.Generator(device=device)

    # one prompt of 37 tokens; the same features enter both models
    B, L = 1, 37
    g = torch.Generator(device="cpu").manual_seed(seed)
    feats = (torch.randn(B, L, cfg.text_dim, generator=g) * 0.2).to(device)
    lengths = torch.tensor([L], device=device)
    d = cfg.bits
    forced = [torch.randint(0, 2, (B, n, d), generator=g).to(device) for n in schedule.lengths]

    # official loop, with the sampler replaced: record logits, return the forced bits
    recorded = []

    def fake_sampler(logits_BlV, rng=None, top_k=0, top_p=0.0, num_samples=1):
        recorded.append(logits_BlV.float().clone())
        si = len(recorded) - 1
        return forced[si].reshape(B, -1, 1).long()

    official_module.sample_with_top_k_top_p_also_inplace_modifying_logits_ = fake_sampler
    cu = torch.tensor([0, L], dtype=torch.int32, device=device)
    cfg_scale = 4.0
    theirs.autoregressive_infer_cfg(
        vae=theirs_vae(theirs), scale_schedule=[(1, h, w) for h, w in schedule.grids],
        label_B_or_BLT=(feats[0], [L], cu, L), B=B, g_seed=seed, cfg_list=[cfg_scale] * schedule.num_scales,
        tau_list=[1.0] * schedule.num_scales, top_k=0, top_p=0.0, returns_vemb=1, cfg_insertion_layer=[0],
        vae_type=1, ret_img=False, inference_mode=True)

    # our loop fed the same bits
    from sparvar.vae import bits_to_codes

    def ours_vs_official():
        runner = TorchRunner(ours, schedule)
        runner.begin(feats, lengths, guided=True)
        patch = 2 if cfg.vae.spatial_patchify else 1
        final = (schedule.final_grid[0] * patch, schedule.final_grid[1] * patch)
        codes, summed, per_scale = None, None, []
        for k, (h, w) in enumerate(schedule.grids):
            logits = runner.step(k, codes)
            logits = cfg_scale * logits[:B] + (1 - cfg_scale) * logits[B:]
            ref = recorded[k].reshape(B, h * w, 2 * d)
            diff = (logits - ref).abs()
            per_scale.append({"scale": k, "grid": [h, w], "max_abs": diff.max().item(), "mean_abs": diff.mean().item(),
                              "ref_abs_max": ref.abs().max().item()})
            latent = tokens_to_latent(bits_to_codes(forced[k].float(), cfg.vae.codebook_dim), h, w, cfg.vae.spatial_patchify)
            up = resample(latent, final)
            summed = up if summed is None else summed + up
            if k + 1 < schedule.num_scales:
                nh, nw = schedule.grids[k + 1]
                codes = latent_to_tokens(resample(summed, (nh * patch, nw * patch)), cfg.vae.spatial_patchify)
        return per_scale

    per_scale = ours_vs_official()
    del theirs, ours
    torch.cuda.empty_cache()
    return {"model": cfg.name, "depth": cfg.depth, "width": cfg.width, "heads": cfg.heads, "resolution": resolution,
            "dtype": "fp32", "cfg": cfg_scale, "max_abs_logit_diff": max(s["max_abs"] for s in per_scale),
            "per_scale": per_scale}


def theirs_vae(model):
    return VAEStub(model.d_vae // (4 if model.apply_spatial_patchify else 1))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/results/parity_infinity.json")
    ap.add_argument("--resolution", type=int, default=1024)
    args = ap.parse_args()
    device = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    runs = [run_parity("infinity-2b", None, args.resolution, device),
            run_parity("infinity-8b", 10, args.resolution, device)]  # 2 chunks of 5: the official loop needs >1 chunk
    for r in runs:
        print(f"{r['model']}: max |logit diff| over all scales = {r['max_abs_logit_diff']:.3e} (official as is); "
              f"{r['max_abs_logit_diff_official_without_bf16_cross_attention_cast']:.3e} (its bf16 cross-attention cast removed)")
        for s in r["per_scale"]:
            print(f"   scale {s['scale']:2d} {s['grid']}: max {s['max_abs']:.3e} mean {s['mean_abs']:.3e} (|ref| max {s['ref_abs_max']:.2f})")
    write_result(args.out, {
        "benchmark": "parity of sparvar's Infinity vs the official FoundationVision/Infinity code",
        "official_commit": open(os.path.join(ROOT, ".official", "Infinity", "COMMIT")).read().strip(),
        "method": "same random state dict in both; bits forced identical at every scale; CFG-combined logits compared; "
                  "fp32, no autocast, TF32 off; official flash-attn replaced by SDPA; the official code is run as is (its "
                  "cross-attention casts q/kv to bf16) and with that one cast edited out in memory",
        "runs": runs,
    })


if __name__ == "__main__":
    main()
