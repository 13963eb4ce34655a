"""A TFDS dataset builder for any pairs folder, stored as array_record files (random access).

    builder = build_tfds("/data/pairs", "/data/tfds", image_size=256)
    source = builder.as_data_source("train")   # grain-ready random-access source
    # elsewhere, without the pairs folder:
    builder = tfds.builder_from_directory(built_dir)   # built_dir = builder.data_dir

Data lands in `<data_dir>/spatial_pairs/<config>/1.0.0/`. The config name carries a fingerprint of
`pairs.jsonl` and the image size, so a folder that grew (a rerun of a data job), another folder or
another size never reuses a stale build; an identical rebuild is a no-op.

tensorflow_datasets (the `tfds` extra: `pip install -e '.[tfds]'`) is imported lazily, on first use
of `PairsDatasetBuilder` or `build_tfds`, so importing spatial_jax.data never imports TensorFlow.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import re
from typing import Any

from spatial_jax.data import pairs as pairs_lib

DATASET_NAME = "spatial_pairs"
TEXT_FEATURES = ("id", "prompt", "perturbed_prompt", "relation_changed", "source_json")
IMAGE_FEATURES = ("chosen", "rejected")


def config_name(pairs_dir: str | os.PathLike, image_size: int | tuple[int, int] | None) -> str:
  """`<folder name>-<sha256 of pairs.jsonl, 12 hex>-<HxW | orig>`."""
  path = pairs_lib.pairs_file(pairs_dir)  # Clear FileNotFoundError for a missing folder/file.
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      digest.update(chunk)
  hw = pairs_lib.image_size_hw(image_size)
  size = f"{hw[0]}x{hw[1]}" if hw else "orig"
  base = re.sub(r"[^A-Za-z0-9_]+", "_", os.path.basename(os.path.abspath(pairs_dir))) or "pairs"
  return f"{base}-{digest.hexdigest()[:12]}-{size}"


def _import_tfds():
  try:
    import tensorflow_datasets as tfds
  except ImportError as e:
    raise ImportError(
      f"spatial_jax.data.tfds_builder needs tensorflow_datasets ({e}): pip install -e '.[tfds]'"
    ) from e
  return tfds


@functools.cache
def _classes() -> tuple[type, type]:
  """Defines the TFDS classes on first use (subclassing needs the tfds import)."""
  tfds = _import_tfds()

  @dataclasses.dataclass(eq=False)
  class PairsConfig(tfds.core.BuilderConfig):
    """BuilderConfig of a pairs folder; `image_size` (H, W) resizes at build time (None: keep)."""

    pairs_dir: str = ""
    image_size: tuple[int, int] | None = None

  class PairsDatasetBuilder(tfds.core.GeneratorBasedBuilder):
    """Builds a pairs folder into TFDS; splits come from the rows' `split` (default "train").

    Features: id, prompt, perturbed_prompt, relation_changed, source_json (the row's `source` as
    JSON, "null" if none) as text; chosen and rejected as PNG-encoded RGB images of a fixed size
    when configured. Examples keep file order within a split (no tfds shuffling), so index i of a
    split is the i-th row of that split in pairs.jsonl, as in the loader's `PairsSource`.
    """

    name = DATASET_NAME
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    # No download checksums to look up. Also, tfds 4.9.10 resolves code_path through
    # `importlib_resources`, a package it does not declare (ModuleNotFoundError on Python 3.11).
    code_path = None

    def __init__(
      self,
      *,
      pairs_dir: str | os.PathLike | None = None,
      image_size: int | tuple[int, int] | None = None,
      config: PairsConfig | None = None,
      **kwargs: Any,
    ):
      """Takes a `config`, or `pairs_dir` (+ `image_size`) to make one; kwargs go to tfds."""
      if config is None:
        if pairs_dir is None:
          raise ValueError("PairsDatasetBuilder needs pairs_dir= (or config=PairsConfig(...))")
        config = PairsConfig(
          name=config_name(pairs_dir, image_size),
          pairs_dir=os.path.abspath(pairs_dir),
          image_size=pairs_lib.image_size_hw(image_size),
          description=f"Pairs folder {os.path.abspath(pairs_dir)}",
        )
      super().__init__(config=config, **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
      hw = self.builder_config.image_size
      shape = (*hw, 3) if hw else (None, None, 3)
      image = functools.partial(tfds.features.Image, shape=shape, encoding_format="png")
      return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict(
          {
            **{k: tfds.features.Text() for k in TEXT_FEATURES},
            **{k: image() for k in IMAGE_FEATURES},
          }
        ),
        description="Spatial preference pairs (chosen wins against the original prompt).",
        # Keep pairs.jsonl order: deterministic, and the same indices as PairsSource.
        disable_shuffling=True,
      )

    def _split_generators(self, dl_manager):
      del dl_manager  # Everything is local.
      folder = self.builder_config.pairs_dir
      by_split: dict[str, list[pairs_lib.PairRecord]] = {}
      for record in pairs_lib.read_pairs(folder):
        by_split.setdefault(record.split_name, []).append(record)
      if not by_split:
        raise pairs_lib.PairsFormatError(f"{folder}/{pairs_lib.PAIRS_FILE} has no rows")
      bad = [s for s in by_split if not re.fullmatch(r"\w+", s)]
      if bad:
        raise pairs_lib.PairsFormatError(
          f"{folder}: split names must be letters/digits/underscores for TFDS, got {bad}"
        )
      return {split: self._generate_examples(rows) for split, rows in by_split.items()}

    def _generate_examples(self, rows):
      folder = self.builder_config.pairs_dir
      hw = self.builder_config.image_size
      for r in rows:
        example = {
          k: getattr(r, k) for k in ("id", "prompt", "perturbed_prompt", "relation_changed")
        }
        example["source_json"] = json.dumps(r.source, sort_keys=True)
        for k in IMAGE_FEATURES:
          # Re-encode as RGB PNG: user folders may hold RGBA/grey/JPEG files or other sizes.
          rgb = pairs_lib.load_rgb(os.path.join(folder, getattr(r, k)))
          example[k] = pairs_lib.encode_png(pairs_lib.resize_rgb(rgb, hw))
        yield r.id, example

  # Name the classes as module attributes (served by __getattr__ below), so pickle can find them:
  # grain's mp_prefetch pickles data sources, and a tfds source references its builder.
  for cls in (PairsConfig, PairsDatasetBuilder):
    cls.__module__, cls.__qualname__ = __name__, cls.__name__
  return PairsConfig, PairsDatasetBuilder


def __getattr__(name: str):
  # Module-level lazy attributes: `from ...tfds_builder import PairsDatasetBuilder` imports tfds
  # only then, never at `import spatial_jax.data.tfds_builder`.
  if name in ("PairsConfig", "PairsDatasetBuilder"):
    return _classes()[("PairsConfig", "PairsDatasetBuilder").index(name)]
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def build_tfds(
  pairs_dir: str | os.PathLike,
  data_dir: str | os.PathLike,
  *,
  image_size: int | tuple[int, int] | None = None,
):
  """Builds (or reuses an identical earlier build of) a pairs folder as array_record TFDS data.

  No network access: no GCS lookups, no statistics pass. Run it on one process; other processes
  can open the result with `tfds.builder_from_directory(builder.data_dir)`.

  Args:
    pairs_dir: the pairs folder.
    data_dir: TFDS data dir to write into.
    image_size: int side or (height, width) to resize both images to at build time; None keeps
      the stored sizes (then the loader resizes).

  Returns:
    The prepared `PairsDatasetBuilder`; `builder.as_data_source(split)` reads a split.
  """
  tfds = _import_tfds()

  _, builder_cls = _classes()
  builder = builder_cls(
    pairs_dir=pairs_dir, image_size=image_size, data_dir=data_dir, file_format="array_record"
  )
  builder.download_and_prepare(
    file_format="array_record",
    download_dir=os.path.join(os.fspath(data_dir), "downloads"),
    download_config=tfds.download.DownloadConfig(
      try_download_gcs=False, compute_stats=tfds.download.ComputeStatsMode.SKIP
    ),
  )
  return builder
