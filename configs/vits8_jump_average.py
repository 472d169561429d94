"""Baseline of the channel-strategy comparison: DINOCell's recipe with every crop from the channel mean.

Same recipe, group and tags scheme as configs/vits8_jump_multiview.py (only
`data.strategy` and its tag differ), so the two runs line up in W&B. Run:

    python -m dinocell_jax.train --config configs/vits8_jump_average.py \\
        --config.data.source=loaddata:/data/jump/load_data_with_illum.csv

Presets as in vits8_jump_multiview.py (`:gpus=8`, `:patch=16`, `:lr=1e-4`).
"""

import os

from dinocell_jax import cli
from dinocell_jax import config as config_lib

_base = cli.load_config_module(os.path.join(os.path.dirname(os.path.abspath(__file__)), "vits8_jump_multiview.py"))


def get_config(arg=None):
    return _base.build(**config_lib.parse_preset(arg, {**_base.PRESETS, "strategy": "average"}))
