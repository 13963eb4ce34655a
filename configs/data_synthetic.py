r"""Synthetic spatial preference pairs: the embedded default data set.

Renders (prompt, chosen, rejected) pairs of the procedural spatial world: the
chosen image satisfies every relation of the prompt, the rejected one was made
for a prompt with exactly one relation changed. Writes a pairs folder
(`pairs.jsonl` + `images/`), `gallery.png` and `stats.json` into the workdir;
rerunning into the same folder continues where it stopped.

  python -m spatial_jax.main --config configs/data_synthetic.py --workdir workdirs/pairs
  python -m spatial_jax.main --config configs/data_synthetic.py:smoke --workdir /tmp/d
  python -m spatial_jax.main --config configs/data_synthetic.py:size=128 --workdir /tmp/d128
"""

from spatial_jax import configs_lib


def get_config(arg=None):
  arg = configs_lib.parse_arg(arg, smoke=False, size=64)
  config = configs_lib.base_config("data_synthetic")

  config.num_train = 20_000
  config.num_test = 2_000
  config.image_size = arg.size
  config.min_objects = 2
  config.max_objects = 4
  # Long prompts (3-4 relations) matter: the paper stresses them.
  config.max_relations = 4
  # Layouts drawn per image, keeping the one that separates related objects most (1: any).
  config.layout_candidates = 1
  # The fraction of pairs whose rejected image recolours one object instead of changing a
  # relation (the prompt then names an object the image lacks); 0: relation pairs only.
  config.recolour_fraction = 0.0
  # Relations a rejected image reverses: 1..max_changes, drawn per pair (as many as the scene
  # allows); 1: every pair changes exactly one, the paper's training pairs.
  config.max_changes = 1
  # "perturbed": the rejected image is the scene with relations reversed (adversarial pairs);
  # "other_scene": an image of another scene, the negatives of a generic image-text model.
  config.rejected = "perturbed"
  # Pairs shown in gallery.png (chosen above rejected).
  config.gallery_pairs = 16
  # Check every written pair with the oracle (chosen must score 1, rejected < 1).
  config.verify_with_oracle = True
  config.log_every_secs = 10.0

  if arg.smoke:
    config.num_train = 96
    config.num_test = 32
    config.gallery_pairs = 8
  return config
