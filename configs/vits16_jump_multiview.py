"""The patch-size comparison: DINOCell's recipe at patch 16 (14x14 tokens on a 224 crop).

Same recipe, group and tags scheme as configs/vits8_jump_multiview.py (only
`model.patch_size` and its tag differ), so the two runs line up in W&B. Run:

    python -m dinocell_jax.train --config configs/vits16_jump_multiview.py \\
        --config.data.source=loaddata:/data/jump/load_data_with_illum.csv

Presets as in vits8_jump_multiview.py (`:gpus=8`, `:strategy=average`, `:lr=1e-4`).
"""

import os

from dinocell_jax import cli
from dinocell_jax import config as config_lib

_base = cli.load_config_module(os.path.join(os.path.dirname(os.path.abspath(__file__)), "vits8_jump_multiview.py"))


def get_config(arg=None):
    return _base.build(**config_lib.parse_preset(arg, {**_base.PRESETS, "patch": 16}))
