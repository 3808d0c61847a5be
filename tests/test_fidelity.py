"""Fidelity benchmark (bench/fidelity.py) and the infinity-cifar SparVAR policy, on CPU with the shipped weights."""
import os

import numpy as np
import pytest
import torch

from bench import fidelity
from sparvar.schedule import get_schedule
from sparvar.sparse import default_policy


def test_cifar_policy_is_the_paper_policy_scaled_to_11_scales():
    s = get_schedule(64, model="infinity-cifar")
    p = default_policy("infinity-cifar", s)
    assert p.decision_scale == 8 and list(p.sparse_scales) == [8, 9, 10] and p.num_layers == 6
    assert [p.kind(1, sc) for sc in (7, 8, 9, 10)] == ["dense", "cs4a_decide", "cs4a", "cs4a"]
    assert [p.kind(2, sc) for sc in (7, 8, 9, 10)] == ["dense", "csla", "csla", "csla"]
    last = p.csla_layout(s, 10)
    assert last.token_density <= 0.10 and last.density < 0.30  # genuinely sparse at the last scale
    assert p.topk(s) == 192 and [p.cs4a_geometry(s, sc).key_count for sc in (9, 10)] == [352, 608]
    assert [p.cs4a_geometry(s, sc).num_groups for sc in (9, 10)] == [12, 22]  # the paper's group counts


def test_psnr_ssim_and_summary():
    ramp = np.linspace(0, 200, 16)
    a = np.stack([ramp[:, None] + 0 * ramp[None, :], ramp[None, :] + 0 * ramp[:, None], (ramp[:, None] + ramp) / 2], -1)
    a = a.round().astype(np.uint8)  # a smooth image: noise then lowers SSIM clearly
    assert fidelity.psnr_db(a, a) == float("inf") and fidelity.ssim(a, a) == pytest.approx(1.0)
    assert fidelity.psnr_db(a, a + 1) == pytest.approx(20 * np.log10(255.0))  # MSE of one level
    noisy = np.clip(a.astype(int) + np.random.default_rng(1).integers(-40, 40, a.shape), 0, 255).astype(np.uint8)
    assert fidelity.ssim(a, noisy) < 0.9
    summary = fidelity.summarize_pairs([float("inf"), 30.0], [1.0, 0.5], [0.0, 1e-3])
    assert summary["psnr_db_mean"] == pytest.approx((fidelity.PSNR_CAP_DB + 30) / 2) and summary["identical_images"] == 1
    assert summary["psnr_db_pooled"] == pytest.approx(10 * np.log10(1 / 5e-4), abs=1e-3) and summary["ssim_mean"] == 0.75


def test_raw_roundtrip_and_grid(tmp_path):
    rng = np.random.default_rng(0)
    images = {k: rng.integers(0, 255, (3, 8, 8, 3), dtype=np.uint8) for k in ("dense", "sparvar", "skip2")}
    raw = {"images": images, "bit_mismatch": {"sparvar": [0.0, 0.1], "skip2": [0.0]},
           "attention_errors": {"sparvar": {(2, 8): [0.1, 0.2]}}, "seconds_per_image": {k: 1.0 for k in images}}
    path = fidelity.save_raw(raw, {"prompts": ["cat"]}, str(tmp_path / "raw.npz"))
    back, meta = fidelity.load_raw(path)
    assert meta == {"prompts": ["cat"]} and back["attention_errors"] == raw["attention_errors"]
    assert all(np.array_equal(back["images"][k], v) for k, v in images.items())
    grid = fidelity.save_grid(images, ("dense", "sparvar", "skip2"), 2, str(tmp_path / "g.png"), zoom=1)
    from PIL import Image

    pixels = np.asarray(Image.open(grid))
    assert pixels.shape == (3 * 10 + 2, 2 * 10 + 2, 3)
    assert np.array_equal(pixels[12:20, 12:20], images["sparvar"][1])  # row 1 = sparvar, column 1 = pair 1


def test_scores_pair_every_variant_with_dense_pair_by_pair(tmp_path):
    """A variant listed twice appended its images twice and zip() then scored seed 1's dense images against seed 0's
    sparse ones; now a repeat is refused and a variant with another image count than dense is an error. A re-scoring
    writes its grid beside its --out (not over the committed one) and states targets only for what it measured."""
    with pytest.raises(ValueError, match="each variant once"):
        fidelity.generate_variants(None, None, None, ["cat"], [0], ["dense", "sparvar", "sparvar"])
    rng = np.random.default_rng(0)
    images = {"dense": rng.integers(0, 255, (2, 8, 8, 3), dtype=np.uint8),
              "skip2": rng.integers(0, 255, (4, 8, 8, 3), dtype=np.uint8)}
    raw = {"images": images, "bit_mismatch": {"skip2": [0.0]}, "attention_errors": {},
           "seconds_per_image": {k: 1.0 for k in images}}
    with pytest.raises(ValueError, match="skip2 has 4 images and dense 2"):
        fidelity.score(raw, depth=6)
    images["skip2"] = images["skip2"][:2]
    path = fidelity.save_raw(raw, {"prompts": ["cat", "dog"], "seeds": [0]}, str(tmp_path / "raw.npz"))
    out = str(tmp_path / "rescored.json")
    assert fidelity.main(["--from-raw", path, "--out", out]) == 0
    import json

    result = json.loads(open(out).read())
    assert os.path.isfile(str(tmp_path / "rescored.png")) and result["targets_met"] == {}
    assert "fp32" in result["metric_notes"] and "LPIPS(VGG) not measured" in result["metric_notes"]


@pytest.fixture
def one_thread():
    """One intra-op thread: a generation is a long chain of small ops, and two threads on a shared 2-core
    machine spend most of their time waiting for each other (measured 10x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_sparvar_stays_close_to_dense_and_skipping_does_not(one_thread):
    """The paper's ordering on our trained model: SparVAR's image is far closer to dense than skip-last-2's."""
    for path in (fidelity.WEIGHTS, fidelity.TOKENIZER):
        if not os.path.isfile(path):
            pytest.fail(f"shipped weights missing: {path} (trained by sparvar/train, see weights/MODEL_CARD.md)")
    cfg, model, decoder = fidelity.load("cpu")
    results, raw = fidelity.run_fidelity(model, decoder, cfg, ["airplane", "automobile"], [0], ["dense", "sparvar", "skip2"])
    sparvar, skip2 = results["sparvar"], results["skip2"]
    assert sparvar["identical_images"] == 0  # sparse attention really changed the computation
    assert sparvar["psnr_db_mean"] >= fidelity.TARGETS["psnr_db"]
    assert sparvar["psnr_db_mean"] >= skip2["psnr_db_mean"] + 1.5
    assert sparvar["ssim_mean"] > skip2["ssim_mean"]
    # dense scales sample identical bits; the sparse ones diverge only a little
    assert sparvar["bit_mismatch_per_scale"][:8] == [0.0] * 8 and 0 < sparvar["bit_mismatch_per_scale"][-1] < 0.4
    errors = sparvar["attention_rel_error"]["per_layer_scale"]
    assert errors["layer0_scale8"] == 0.0  # CS4A's decision scale attends densely
    assert all(0.0 < errors[f"layer{layer}_scale{sc}"] < 0.5 for layer in range(2, 6) for sc in (8, 9, 10))
    assert all(0.0 < errors[f"layer{layer}_scale{sc}"] < 0.5 for layer in range(2) for sc in (9, 10))


def test_engines_are_scored_only_as_the_variant_they_were_built_for(engines):
    """`bench.fidelity --engines`: each directory's build must be its variant's (a dense engine given as 'sparvar'
    had been scored as SparVAR, silently 100 dB); query-tile variants take engines built with those tiles."""
    from bench.fidelity import generate_engines

    with pytest.raises(ValueError, match="built for .*'attention': 'dense'.*variant 'sparvar' needs .*'attention': 'sparvar'"):
        generate_engines({"dense": engines["dense"], "sparvar": engines["dense"]}, ["cat"], [0])
    with pytest.raises(ValueError, match="variant 'sparvar_tiles_8x8' needs .*'csla_query_tile': \\(8, 8\\)"):
        generate_engines({"dense": engines["dense"], "sparvar_tiles_8x8": engines["sparvar"]}, ["cat"], [0])
    with pytest.raises(ValueError, match="engines need 'dense' and may add"):
        generate_engines({"dense": engines["dense"], "csla_only": engines["sparvar"]}, ["cat"], [0])


@pytest.mark.parametrize("field, value", [("seed", 1), ("dtype", "fp16"), ("fp8", True), ("weights", "/elsewhere.pt")])
def test_scored_engines_differ_from_the_dense_one_in_attention_alone(engines, tmp_path, field, value):
    """Another seed, precision, FP8 setting or checkpoint in the SparVAR engine would be scored as SparVAR's error."""
    import json
    import shutil

    from bench.fidelity import generate_engines
    from sparvar.engine import MANIFEST

    other = shutil.copytree(engines["sparvar"], tmp_path / "sparvar")
    manifest = json.loads((other / MANIFEST).read_text())
    manifest["spec"][field] = value
    (other / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=f"differs from the dense engine .* in {field} \\({value!r} vs"):
        generate_engines({"dense": engines["dense"], "sparvar": str(other)}, ["cat"], [0])
