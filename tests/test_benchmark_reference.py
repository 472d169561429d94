"""The reference step's script: its xFormers stand-ins against plain attention, and a toy run on CPU."""

import json
import os
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "scripts"))

import benchmark_reference as ref  # noqa: E402

_STOOD_IN = ("dinov2", "xformers", "fvcore")


@pytest.fixture
def stand_ins():
    """dinov2 imported afresh over the stand-ins, and the process's own modules put back after:
    other tests import dinov2 without xFormers, and dinov2 reads its availability at import."""
    def ours(name):
        return name.split(".")[0] in _STOOD_IN

    saved = {k: v for k, v in sys.modules.items() if ours(k)}
    for k in saved:
        del sys.modules[k]
    ref.install_stand_ins()
    yield
    for k in [k for k in sys.modules if ours(k)]:
        del sys.modules[k]
    sys.modules.update(saved)


def _attention(q, k, v):
    """Plain softmax attention, [B, N, heads, head_dim] in and out."""
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    weights = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
    return (weights @ v).transpose(1, 2)


def test_block_diagonal_attention_attends_within_each_sequence():
    torch.manual_seed(0)
    groups = [(3, 7), (2, 5), (1, 4)]  # (sequences, length): as the student's global + local crops
    parts = [torch.randn(b, n, 2, 8) for b, n in groups]
    mask, _ = ref._BlockDiagonalMask.from_tensor_list([p.flatten(2) for p in parts])
    assert mask.runs == [[3, 7], [2, 5], [1, 4]]
    q, k, v = (torch.cat([p.reshape(1, -1, 2, 8) * s for p in parts], dim=1) for s in (1.0, 0.5, 2.0))
    out = ref._memory_efficient_attention(q, k, v, attn_bias=mask)
    expected = torch.cat([_attention(p, p * 0.5, p * 2.0).reshape(1, -1, 2, 8) for p in parts], dim=1)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    split = mask.split(out.flatten(2))
    assert [tuple(t.shape) for t in split] == [(3, 7, 16), (2, 5, 16), (1, 4, 16)]


def test_index_stand_ins_match_their_definitions():
    torch.manual_seed(0)
    x, source, scale = torch.randn(5, 3, 4), torch.randn(2, 3, 4), torch.randn(4)
    index = torch.tensor([4, 1])
    expected = x.clone()
    for i, row in enumerate(index):
        expected[row] += 0.5 * scale * source[i]
    torch.testing.assert_close(ref._scaled_index_add(x, index, source, scaling=scale, alpha=0.5), expected)
    a, b = torch.randn(4, 6), torch.randn(3, 2)
    cat = ref._index_select_cat([a, b], [torch.tensor([2, 0]), torch.tensor([1])])
    torch.testing.assert_close(cat, torch.cat([a[2], a[0], b[1]]))


def test_nested_blocks_give_each_crop_set_its_own_forward(stand_ins):
    # The student's list path (global and local crops as one block-diagonal sequence) must
    # equal running each crop set alone.
    from dinov2.models.vision_transformer import vit_small

    torch.manual_seed(0)
    model = vit_small(patch_size=8, img_size=32, init_values=1e-5, block_chunks=0).eval()
    g, l = torch.randn(3, 3, 32, 32), torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        nested = model.forward_features([g, l], [None, None])
        alone = [model.forward_features(g), model.forward_features(l)]
    for a, b in zip(nested, alone):
        torch.testing.assert_close(a["x_norm_clstoken"], b["x_norm_clstoken"], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(a["x_norm_patchtokens"], b["x_norm_patchtokens"], rtol=1e-4, atol=1e-5)


def test_reference_step_runs_at_toy_size_on_cpu():
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "scripts", "benchmark_reference.py"), "--device", "cpu", "--batch", "2",
         "--patch", "16", "--global_size", "32", "--local_size", "16", "--prototypes", "64",
         "--steps", "2", "--window", "1", "--warmup", "1"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in ("images_per_s", "step_s", "peak_mem_gib", "compile_s", "device", "batch", "torch", "variant"):
        assert key in result, key
    assert result["batch"] == 2 and result["images_per_s"] > 0 and result["variant"] == "eager"
    assert torch.isfinite(torch.tensor(result["loss"]))
