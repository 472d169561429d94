"""TFDS builders that prepare Cell Painting fields as ArrayRecord shards.

- `jump_cellpainting`: fields of JUMP LoadData tables (a file, a glob, or a
  `load_data_csv/<batch>/` tree), given as `loaddata=` or placed in the manual dir.
- `synthetic_cells`: the synthetic generator, for tests and demos without data.

Each example is a finished field (`sources.finish_field`: downscale, intensity
bounds, crop/pad to data.field_size) with its bounds, label and metadata, split
into `train` and `holdout` by the same rule as the raw sources. Preparation and
reading need tensorflow-datasets and array-record only; TensorFlow is never
imported. Read back with `data.source=tfds:<name>` and `data.tfds_data_dir`.

    python -m dinocell_jax.data.tfds_builders jump_cellpainting --data_dir /data/tfds \\
        --loaddata /data/jump/workspace/load_data_csv/2020_11_04_CPJUMP1 --set data.field_size=512
"""

from __future__ import annotations

import argparse
import ast
import concurrent.futures
import logging
import sys

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from dinocell_jax import config as config_lib
from dinocell_jax.data.sources import META, DataError, ReadError

log = logging.getLogger(__name__)


def _features() -> tfds.features.FeaturesDict:
    # tfds.features.Image takes at most 4 channels; a Tensor keeps all planes at 16 bits.
    # Raw bytes rather than zlib: 16-bit camera noise barely compresses, and decoding is free.
    feats = {
        "field": tfds.features.Tensor(shape=(None, None, None), dtype=np.uint16, encoding="bytes"),
        "norm_low": tfds.features.Tensor(shape=(None,), dtype=np.float32),
        "norm_high": tfds.features.Tensor(shape=(None,), dtype=np.float32),
        "label": tfds.features.Scalar(dtype=np.int32),
    }
    feats.update({k: tfds.features.Text() for k in META})
    return tfds.features.FeaturesDict(feats)


class _FieldBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Shared preparation: read a split's fields in threads, skip (count, log) unreadable ones."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Finished uint16 fields [C, S, S] with intensity bounds, labels and metadata."}
    _SOURCE = ""

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        # tfds' own lookup needs the `importlib_resources` backport for builders that
        # live in an installed package; the answer is this file either way.
        return epath.Path(__file__)

    def __init__(self, *, run_config=None, **kwargs):
        kwargs.setdefault("file_format", "array_record")
        self._run_config = run_config
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(builder=self, description=self.__doc__, features=_features(),
                                     homepage="https://github.com/broadinstitute/cellpainting-gallery")

    def _config_for(self, source: str):
        config = (self._run_config or config_lib.base_config()).copy_and_resolve_references()
        config.unlock()
        config.data.source = source
        return config

    def _splits(self, source: str) -> dict:
        from dinocell_jax.data import pipeline

        config = self._config_for(source)
        splits = {"train": self._generate_examples(pipeline.make_source(config, "train"), config)}
        if config.data.holdout > 0:
            try:
                splits["holdout"] = self._generate_examples(pipeline.make_source(config, "holdout"), config)
            except DataError as e:
                log.warning("%s: no holdout split (%s)", self.name, e)
        return splits

    def _generate_examples(self, source, config):
        d = config.data

        def read(i):
            try:
                return i, source[i], None
            except ReadError as e:
                return i, None, str(e)

        skipped = 0
        with concurrent.futures.ThreadPoolExecutor(max(1, int(d.read_threads))) as pool:
            for i, record, error in pool.map(read, range(len(source))):
                if error is not None:
                    skipped += 1
                    log.warning("%s: skipped field %d: %s", self.name, i, error)
                    continue
                key = "/".join(record[k] for k in META)
                yield key, {k: record[k] for k in ("field", "norm_low", "norm_high", "label", *META)}
        if len(source) and skipped > d.max_failure_fraction * len(source):
            raise DataError(f"{self.name}: {skipped} of {len(source)} fields could not be read, more than "
                            f"data.max_failure_fraction={d.max_failure_fraction} (each is logged above)")


class JumpCellpainting(_FieldBuilder):
    """JUMP Cell Painting fields (5 stains, 16-bit) from LoadData tables."""

    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Put JUMP LoadData tables (load_data.csv / load_data_with_illum.csv|parquet, or the "
        "workspace/load_data_csv/<batch>/ tree) in the manual dir, or pass loaddata=<path or s3:// URL>. "
        "Image paths in the tables may be local or s3://; see data.path_remap for a local copy."
    )

    def __init__(self, *, loaddata: str = "", **kwargs):
        self._loaddata = loaddata
        super().__init__(**kwargs)

    def _split_generators(self, dl_manager):
        spec = self._loaddata or (str(dl_manager.manual_dir) if dl_manager.manual_dir else "")
        if not spec:
            raise DataError(f"jump_cellpainting: no LoadData table; {self.MANUAL_DOWNLOAD_INSTRUCTIONS}")
        return self._splits(f"loaddata:{spec}")


class SyntheticCells(_FieldBuilder):
    """Synthetic Cell Painting fields (data.num_fields, data.field_size, data.n_phenotypes)."""

    def _split_generators(self, dl_manager):
        return self._splits("synthetic")


BUILDERS = {"jump_cellpainting": JumpCellpainting, "synthetic_cells": SyntheticCells}


def prepare(name: str, data_dir: str, run_config=None, *, loaddata: str = "", manual_dir: str = ""):
    """Prepares dataset `name` under `data_dir` (offline) and returns its builder."""
    if name not in BUILDERS:
        raise DataError(f"unknown TFDS dataset {name!r}; one of {sorted(BUILDERS)}")
    kwargs = {"loaddata": loaddata} if name == "jump_cellpainting" else {}
    builder = BUILDERS[name](data_dir=data_dir, run_config=run_config, **kwargs)
    download_config = tfds.download.DownloadConfig(manual_dir=manual_dir or None)
    builder.download_and_prepare(download_config=download_config)
    return builder


def _parse_override(config, item: str) -> None:
    key, _, text = item.partition("=")
    if not key.startswith("data.") or not text:
        raise SystemExit(f"--set {item!r}: expected data.<key>=<value>")
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = text
    leaf = key.split(".", 1)[1]
    if leaf not in config.data:
        raise SystemExit(f"--set {item!r}: config.data has no key {leaf!r}")
    try:
        config.data[leaf] = value
    except TypeError as e:
        raise SystemExit(f"--set {item!r}: {e}") from e


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", choices=sorted(BUILDERS))
    parser.add_argument("--data_dir", required=True)
    parser.add_argument("--loaddata", default="", help="LoadData table(s), glob or load_data_csv folder")
    parser.add_argument("--manual_dir", default="")
    parser.add_argument("--set", action="append", default=[], metavar="data.KEY=VALUE")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    config = config_lib.base_config()
    for item in args.set:
        _parse_override(config, item)
    builder = prepare(args.name, args.data_dir, config, loaddata=args.loaddata, manual_dir=args.manual_dir)
    for split, info in builder.info.splits.items():
        print(f"{args.name} {split}: {info.num_examples} fields -> {builder.data_dir}")
    return 0


if __name__ == "__main__":
    # Here, not in main(): main() also runs inside tests and notebooks that own the handlers.
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    sys.exit(main())
