"""Word-level tokenizer of the synthetic world, built from the scene grammar's vocabulary.

Stands in for the real Qwen2.5-VL / T5 / CLIP tokenizers: every word a prompt of `scenes` can contain
has its own id, so tiny models see whole words. Saved as a Hugging Face `tokenizer.json` (plus
`tokenizer_config.json`) and loaded as `transformers.PreTrainedTokenizerFast`, the same class the
real-world path uses. No special tokens are added automatically: callers place `<bos>`, `<image>`,
`<reward>` ... where their sequence format needs them.
"""

from __future__ import annotations

import os

import transformers
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

from spatial_jax.data import scenes

PAD, UNK, BOS, EOS, IMAGE, REWARD = "<pad>", "<unk>", "<bos>", "<eos>", "<image>", "<reward>"
SPECIAL_TOKENS = (PAD, UNK, BOS, EOS, IMAGE, REWARD)  # ids 0..5 in this order


def vocabulary() -> list[str]:
  """Special tokens, then every word / punctuation mark of the grammar (sorted; stable ids)."""
  return [*SPECIAL_TOKENS, *scenes.grammar_words()]


def build_tokenizer() -> Tokenizer:
  """A WordLevel tokenizer: lowercase, split on whitespace and punctuation, unknown -> `<unk>`."""
  vocab = {token: index for index, token in enumerate(vocabulary())}
  tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
  tokenizer.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
  tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
    [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
  )
  # Joins words with spaces and drops the space before punctuation ("square ." -> "square."): the
  # WordPiece decoder's cleanup does that for . , ! ? (no "##" pieces exist), Replace for : and ;.
  tokenizer.decoder = decoders.Sequence(
    [
      decoders.WordPiece(prefix="##", cleanup=True),
      decoders.Replace(" :", ":"),
      decoders.Replace(" ;", ";"),
    ]
  )
  tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
  return tokenizer


def _fast_tokenizer(
  tokenizer: Tokenizer, model_max_length: int | None = None
) -> transformers.PreTrainedTokenizerFast:
  extra = {} if model_max_length is None else {"model_max_length": int(model_max_length)}
  return transformers.PreTrainedTokenizerFast(
    tokenizer_object=tokenizer,
    **extra,
    pad_token=PAD,
    unk_token=UNK,
    bos_token=BOS,
    eos_token=EOS,
    additional_special_tokens=[IMAGE, REWARD],
    clean_up_tokenization_spaces=False,  # the decoder already does it
  )


def save_tokenizer(directory: str | os.PathLike, *, model_max_length: int | None = None) -> str:
  """Writes tokenizer.json + tokenizer_config.json (+ special tokens map) into `directory`.

  `model_max_length` (tokenizer_config.json's entry) records the padded length a model was
  trained at, e.g. the synthetic T5's, whose states change with the amount of padding.

  Returns:
    The path of tokenizer.json.
  """
  os.makedirs(directory, exist_ok=True)
  _fast_tokenizer(build_tokenizer(), model_max_length).save_pretrained(os.fspath(directory))
  return os.path.join(os.fspath(directory), "tokenizer.json")


def load_tokenizer(directory: str | os.PathLike) -> transformers.PreTrainedTokenizerFast:
  """Loads a tokenizer saved by `save_tokenizer`, with its special tokens set."""
  path = os.path.join(os.fspath(directory), "tokenizer.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"No tokenizer.json in {directory!r}; write one with save_tokenizer().")
  return transformers.PreTrainedTokenizerFast.from_pretrained(os.fspath(directory))
