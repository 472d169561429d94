"""Export: the teacher backbone of a checkpoint, loaded into the dinov2 package's torch ViT,
gives our features (fp32, 1e-5); the .pth variant holds the same tensors."""

import os

import jax
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors import safe_open
from safetensors.torch import load_file

from dinocell_jax import export
from dinocell_jax.models.vit import VisionTransformer, vit_config_from
from tiny import random_checkpoint, tiny_config

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _config():
    # Learned positions and no registers: what the PyPI dinov2 ViT implements.
    return tiny_config(**{"model.pos_embed": "learned", "model.pos_embed_size": 16, "model.n_storage_tokens": 0})


def _workdir(tmp_path, config, step=12):
    workdir = tmp_path / "run"
    return workdir, random_checkpoint(config, workdir, step)


def _ours(config, params, images_nhwc):
    cfg = vit_config_from(config.model, 1)
    graphdef = nnx.split(nnx.eval_shape(lambda: VisionTransformer(cfg, rngs=nnx.Rngs(0))), nnx.Param)[0]
    return jax.jit(lambda p, x: nnx.merge(graphdef, p)(x))(params, images_nhwc)


def test_exported_teacher_in_dinov2_vit_gives_our_features(tmp_path):
    from dinov2.models.vision_transformer import DinoVisionTransformer

    config = _config()
    workdir, state = _workdir(tmp_path, config)
    out = str(tmp_path / "backbone.safetensors")
    assert export.main(["--workdir", str(workdir), "--out", out]) == 0

    model = DinoVisionTransformer(img_size=16, patch_size=4, in_chans=1, embed_dim=32, depth=2, num_heads=2,
                                  init_values=1e-5, block_chunks=0).eval()
    model.load_state_dict(load_file(out), strict=True)
    with safe_open(out, "np") as f:
        header = f.metadata()
    assert header["step"] == "12" and header["which"] == "teacher" and header["patch_size"] == "4"
    assert header["input_norm"] == "fixed"

    x = np.random.default_rng(1).normal(size=(3, 16, 16, 1)).astype(np.float32)
    with torch.no_grad():
        theirs = model.forward_features(torch.from_numpy(x.transpose(0, 3, 1, 2)))
    ours = _ours(config, state.teacher["backbone"], x)
    np.testing.assert_allclose(theirs["x_norm_clstoken"].numpy(), np.asarray(ours["x_norm_clstoken"]), atol=1e-5)
    np.testing.assert_allclose(theirs["x_norm_patchtokens"].numpy(), np.asarray(ours["x_norm_patchtokens"]),
                               atol=1e-5)
    # The student differs: the export really took the teacher.
    student = _ours(config, state.student["backbone"], x)
    assert np.abs(np.asarray(student["x_norm_clstoken"]) - theirs["x_norm_clstoken"].numpy()).max() > 1e-2


def test_torch_format_and_step_directory(tmp_path):
    config = _config()
    workdir, state = _workdir(tmp_path, config)
    os.remove(workdir / "config.json")  # e.g. a downloaded artifact: the config comes from the checkpoint
    out = str(tmp_path / "student.pth")
    step_dir = str(workdir / "checkpoints" / "12")
    assert export.main(["--workdir", step_dir, "--out", out, "--format", "torch", "--which", "student"]) == 0
    sd = torch.load(out, weights_only=True)
    kernel = state.student["backbone"]["blocks"][1]["mlp"]["fc1"]["kernel"]
    np.testing.assert_array_equal(sd["blocks.1.mlp.fc1.weight"].numpy(), np.asarray(kernel).T)
    assert sd["patch_embed.proj.weight"].shape == (32, 1, 4, 4)


def test_errors_name_the_problem(tmp_path, capsys):
    assert export.main(["--workdir", str(tmp_path), "--out", str(tmp_path / "x.safetensors"),
                        "--config", "configs/demo.py"]) == 2
    assert "no finished checkpoint" in capsys.readouterr().err
    config = _config()
    workdir, _ = _workdir(tmp_path, config)
    assert export.main(["--workdir", str(workdir), "--out", "x.bin", "--format", "onnx"]) == 2
    assert "--format 'onnx'" in capsys.readouterr().err
