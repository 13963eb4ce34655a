"""Adversarial perturbation: change one spatial relation (or a few), keep everything else.

`recolour_scene` is the one non-spatial perturbation: it gives one object a colour the prompt
does not name, so that a reward also learns that an image lacking a named object is wrong.

`perturb_scene` works on synthetic scenes (and keeps them satisfiable); `perturb_prompt` is the
offline, rule-based stand-in for the paper's GPT-5 perturbation of real English prompts. It would
rather reverse a relation word than risk a swap that moves more than one relation, so it swaps noun
phrases only when both are whole ("A cat is left of a dog.", not "a man with a hat ... left of").
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np

from spatial_jax.data import scenes

__all__ = [
  "RelationChange",
  "perturb_prompt",
  "perturb_scene",
  "perturb_scene_many",
  "recolour_scene",
]


@dataclasses.dataclass(frozen=True)
class RelationChange:
  """Which relation `perturb_scene` changed and how.

  Attributes:
    index: position of the changed relation in `scene.relations`.
    kind: "flip" (relation word reversed) or "swap" (subject and object exchanged).
    before: the relation in the original scene.
    after: the relation in the perturbed scene.
    type: `scenes.RELATION_TYPES` of the changed relation ("horizontal" / "vertical").
  """

  index: int
  kind: str
  before: scenes.Relation
  after: scenes.Relation
  type: str


def _changed(relation: scenes.Relation, kind: str) -> scenes.Relation:
  if kind == "flip":
    return scenes.Relation(relation.subject, scenes.OPPOSITE[relation.relation], relation.object)
  return scenes.Relation(relation.object, relation.relation, relation.subject)


def _reversible(scene: scenes.Scene, exclude: frozenset[int]) -> list[int]:
  """Indices of the relations that can be reversed alone with the scene staying satisfiable."""
  candidates = []
  for index, relation in enumerate(scene.relations):
    if index in exclude:
      continue
    relations = list(scene.relations)
    relations[index] = _changed(relation, "flip")
    if scenes.is_consistent(dataclasses.replace(scene, relations=tuple(relations))):
      candidates.append(index)
  return candidates


def perturb_scene(
  scene: scenes.Scene, rng: np.random.Generator, *, exclude: frozenset[int] = frozenset()
) -> tuple[scenes.Scene, RelationChange]:
  """Reverses one relation (by flip or swap) such that the scene stays satisfiable.

  Flip and swap reverse the same geometric constraint, so one consistency check covers both. A
  relation implied by others (a left of c given a left of b, b left of c) cannot be reversed alone;
  every scene has a reversible one (any edge of the transitive reduction of either axis order).
  `exclude`: indices not to change (those an earlier call changed).

  Raises:
    ValueError: if the scene has no relation, is itself contradictory, or has no reversible
      relation outside `exclude`.
  """
  if not scene.relations:
    raise ValueError("Cannot perturb a scene without relations.")
  if not scenes.is_consistent(scene):
    raise ValueError(f"Cannot perturb a contradictory scene: {scene}")
  candidates = _reversible(scene, exclude)
  if not candidates:
    raise ValueError(f"No relation outside {sorted(exclude)} can be reversed alone in {scene}")
  index = candidates[int(rng.integers(len(candidates)))]
  kind = ("flip", "swap")[int(rng.integers(2))]
  before = scene.relations[index]
  after = _changed(before, kind)
  relations = list(scene.relations)
  relations[index] = after
  perturbed = dataclasses.replace(scene, relations=tuple(relations))
  change = RelationChange(index, kind, before, after, scenes.RELATION_TYPES[before.relation])
  return perturbed, change


def perturb_scene_many(
  scene: scenes.Scene, rng: np.random.Generator, count: int
) -> tuple[scenes.Scene, list[RelationChange]]:
  """Reverses up to `count` distinct relations, one after another, each keeping the scene
  satisfiable (the paper's pairs with 2-3 perturbations). Fewer when no other relation can be
  reversed; always at least one. With `count=1` the draws are those of `perturb_scene`.
  """
  if count < 1:
    raise ValueError(f"count must be >= 1, got {count}")
  perturbed, change = perturb_scene(scene, rng)
  changes = [change]
  while len(changes) < count:
    exclude = frozenset(c.index for c in changes)
    if not _reversible(perturbed, exclude):
      break
    perturbed, change = perturb_scene(perturbed, rng, exclude=exclude)
    changes.append(change)
  return perturbed, changes


def recolour_scene(scene: scenes.Scene, rng: np.random.Generator) -> tuple[scenes.Scene, int, str]:
  """Gives one object (drawn uniformly) a palette colour no object of `scene` has.

  Relations and shapes stay, so the recoloured scene's prompt differs from the original's in one
  colour word, and its image lacks the object the original prompt names with the old colour.

  Returns:
    (recoloured scene, index of the recoloured object, its old colour).
  """
  index = int(rng.integers(len(scene.objects)))
  unused = [c for c in scenes.COLORS if c not in {o.color for o in scene.objects}]
  if not unused:
    raise ValueError(f"Every palette colour is taken; no object of {scene} can be recoloured.")
  old = scene.objects[index]
  objects = list(scene.objects)
  objects[index] = scenes.SceneObject(old.shape, unused[int(rng.integers(len(unused)))])
  return dataclasses.replace(scene, objects=tuple(objects)), index, old.color


# ---------------------------------------------------------------------------------------------------
# Free-form English prompts.
#
# Each spatial relation phrase has a reversal. Phrases whose reversal is a single word inside them
# (left/right, top/bottom, higher/lower, foreground/background) change only that word, so the rest of
# the phrase ("to the ... -hand side of") and its spacing survive untouched.

_WORD_FLIPS = {
  "left": "right",
  "right": "left",
  "top": "bottom",
  "bottom": "top",
  "higher": "lower",
  "lower": "higher",
  "foreground": "background",
  "background": "foreground",
}
_PHRASE_FLIPS = {
  "in front of": "behind",
  "in back of": "in front of",
  "behind": "in front of",
  "on top of": "beneath",
  "atop": "beneath",
  "beneath": "on top of",
  "underneath": "on top of",
  "above": "below",
  "below": "above",
  "over": "under",
  "under": "over",
}
_POSSESSIVE = r"(?:the|its|his|her|their)"
_SIDE = r"(?:[\s-]+hand)?(?:\s+side)?"
# (pattern, relational) in priority order; `relational` marks phrases that take an object ("... of
# the dog"), which is what allows swapping the two noun phrases. Group "word" is the flipped word.
_RELATION_PATTERNS = [
  (rf"(?:(?:on|to|at)\s+{_POSSESSIVE}\s+)?(?P<word>left|right){_SIDE}\s+of", True),
  (rf"(?:on|to|at)\s+{_POSSESSIVE}\s+(?P<word>left|right){_SIDE}", False),
  (r"(?:top|bottom|upper|lower)[\s-]+(?P<word>left|right)", False),  # "the upper left corner"
  (r"at\s+the\s+(?P<word>top|bottom)\s+of", True),
  (r"(?P<word>higher|lower)\s+than", True),
  (r"in\s+the\s+(?P<word>foreground|background)", False),
  (r"in\s+front\s+of|in\s+back\s+of|on\s+top\s+of", True),
  (r"behind|atop|beneath|underneath|above|below", True),
  # "over"/"under" also measure quantities ("over 20 people") and "all over" is not a relation.
  (r"(?<!all\s)(?:over|under)(?!\s*\d)", True),
]
_RELATION_RE = re.compile(
  "|".join(
    rf"(?P<p{k}>\b(?:{p.replace('?P<word>', f'?P<w{k}>')})\b)"
    for k, (p, _) in enumerate(_RELATION_PATTERNS)
  ),
  re.IGNORECASE,
)
_TOKEN_RE = re.compile(r"[A-Za-z0-9]+(?:['’-][A-Za-z0-9]+)*|[^\sA-Za-z0-9]")

_DETERMINERS = frozenset(
  "a an the one two three four five six seven eight nine ten some several many this these those "
  "its his her their my our your another".split()
)
_SINGULAR_DETERMINERS = frozenset("a an one this another".split())
_PLURAL_DETERMINERS = frozenset(
  "two three four five six seven eight nine ten some several many these those".split()
)
# Words that end a noun phrase: prepositions, conjunctions, auxiliaries, pronouns, relation words.
_STOP_WORDS = frozenset(
  "of in on at to with by from for near beside next behind above below over under beneath "
  "underneath atop inside outside into onto between among around across along against and or but "
  "while whereas is are was were be been has have had which that who whose it they left right top "
  "bottom front than".split()
)
# Verbs and adverbs between a subject and its relation phrase ("a cat is sitting just left of").
_VERB_FILLERS = frozenset(
  "is are was were be being sits sit stands stand lies lie rests rest hangs hang floats float "
  "placed positioned located situated set perched seen shown appears appear directly just slightly "
  "immediately far also can could".split()
)
_PLURAL_VERBS = frozenset("are were sit stand lie rest hang float appear".split())
# What may come right before the subject noun phrase of a swap, so that it is a whole phrase.
_SUBJECT_OPENERS = frozenset(
  "while whereas but is are shows showing depicts depicting features featuring has contains "
  "containing see sees".split()
)
# "a photo of <subject> ...": the subject is still a whole noun phrase.
_MEDIUM_NOUNS = frozenset(
  "photo photograph image picture painting drawing illustration rendering render scene view sketch "
  "shot".split()
)
# "on the left of the image" relates to the frame, not to another object: never swap those.
_FRAME_NOUNS = _MEDIUM_NOUNS | frozenset("frame canvas composition".split())
_CLAUSE_PUNCTUATION = frozenset(",.;:!?")


def _match_case(source: str, text: str) -> str:
  if len(source) > 1 and source.isupper():
    return text.upper()
  if source[:1].isupper():
    return text[:1].upper() + text[1:]
  return text


def _is_word(token: str) -> bool:
  return token[0].isalnum()


def _is_plural(words: list[str], verbs: list[str]) -> bool:
  determiner, head = words[0].lower(), words[-1].lower()
  if determiner in _PLURAL_DETERMINERS or any(v.lower() in _PLURAL_VERBS for v in verbs):
    return True
  if determiner in _SINGULAR_DETERMINERS:
    return False
  return head.endswith("s") and not head.endswith("ss")


def _tokens(text: str) -> list[re.Match]:
  return list(_TOKEN_RE.finditer(text))


def _object_phrase(tokens: list[re.Match], relation_starts: set[int]):
  """Noun phrase opening `tokens` (the text right after a relation phrase) if it is whole.

  Returns (start, end, words) in characters, or None. The phrase must end its clause: "left of a dog
  with a hat" or "left of a dog and above a cat" would carry other attributes or relations along.
  """
  if not tokens or tokens[0].group().lower() not in _DETERMINERS:
    return None
  k = 1
  while k < len(tokens) and k <= 6:
    word = tokens[k].group().lower()
    if not _is_word(word) or word in _STOP_WORDS or word in _DETERMINERS:
      break
    k += 1
  words = [t.group() for t in tokens[:k]]
  if len(words) < 2 or words[-1].lower() in _FRAME_NOUNS:
    return None
  if k < len(tokens):
    follower = tokens[k].group().lower()
    if follower not in _CLAUSE_PUNCTUATION and follower not in ("while", "whereas", "but"):
      return None
    # A relation right after (", and above the box") shares this clause's subject.
    rest = [t for t in tokens[k:] if t.group().lower() not in {",", "and", "but", "also", "is"}]
    if rest and rest[0].start() in relation_starts:
      return None
  return tokens[0].start(), tokens[k - 1].end(), words


def _subject_phrase(tokens: list[re.Match]):
  """Noun phrase closing `tokens` (the text before a relation phrase, minus verbs) if it is whole.

  Returns (start, end, words, skipped verbs) in characters, or None.
  """
  k = len(tokens) - 1
  verbs = []
  while k > 0:
    word = tokens[k].group().lower()
    previous = tokens[k - 1].group().lower()
    participle = word.endswith(("ing", "ed")) and previous not in _DETERMINERS
    if word not in _VERB_FILLERS and not participle:
      break
    verbs.append(word)
    k -= 1
  end = k
  while k >= 0 and end - k <= 6:
    word = tokens[k].group().lower()
    if word in _DETERMINERS or not _is_word(word) or word in _STOP_WORDS:
      break
    k -= 1
  if k < 0 or k == end or tokens[k].group().lower() not in _DETERMINERS:
    return None
  start = k
  if start > 0:
    opener = tokens[start - 1].group().lower()
    before_opener = tokens[start - 2].group().lower() if start > 1 else ""
    whole = (
      opener in _CLAUSE_PUNCTUATION
      or opener in _SUBJECT_OPENERS
      or (opener == "and" and before_opener == ",")  # ", and a cat ..."; "a cat and a dog" is not
      or (opener == "of" and before_opener in _MEDIUM_NOUNS)  # "a photo of a cat ..."
    )
    if not whole:
      return None
  words = [t.group() for t in tokens[start : end + 1]]
  if len(words) >= 3 and _looks_like_verb(words[-1]):
    # "a cyclist rides under ...": after a singular determiner, "-s" marks a verb; after "the" it
    # may be a plural noun ("the old cats") or a verb ("the cyclist rides"): ambiguous, give up.
    if words[0].lower() not in _SINGULAR_DETERMINERS:
      return None
    verbs.append(words.pop().lower())
    end -= 1
  return tokens[start].start(), tokens[end].end(), words, verbs


def _looks_like_verb(word: str) -> bool:
  word = word.lower()
  return word.endswith("s") and not word.endswith(("ss", "us", "is"))


def _swap(text: str, relation: re.Match, relations: list[re.Match]) -> str | None:
  """`text` with the noun phrases around `relation` exchanged, or None if they are not whole."""
  tokens = _tokens(text)
  subject = _subject_phrase([t for t in tokens if t.end() <= relation.start()])
  obj = _object_phrase(
    [t for t in tokens if t.start() >= relation.end()], {r.start() for r in relations}
  )
  if subject is None or obj is None:
    return None
  s_start, s_end, s_words, verbs = subject
  o_start, o_end, o_words = obj
  if _is_plural(s_words, verbs) != _is_plural(o_words, []):
    return None  # "two cats are left of a dog" -> "a dog are left of two cats"
  s_text, o_text = text[s_start:s_end], text[o_start:o_end]
  if s_text.lower() == o_text.lower():
    return None
  # Determiners are capitalised only at a sentence start, and that capital stays in place.
  new_subject = _match_case(s_text[0], o_text[0]) + o_text[1:]
  new_object = _match_case(o_text[0], s_text[0].lower()) + s_text[1:]
  return text[:s_start] + new_subject + text[s_end:o_start] + new_object + text[o_end:]


def _pattern_index(relation: re.Match) -> int:
  return next(k for k in range(len(_RELATION_PATTERNS)) if relation.group(f"p{k}") is not None)


def _flip(text: str, relation: re.Match) -> str:
  """`text` with the relation phrase `relation` reversed."""
  index = _pattern_index(relation)
  word_group = f"w{index}"
  if word_group in _RELATION_RE.groupindex and relation.group(word_group) is not None:
    start, end = relation.span(word_group)
    source = text[start:end]
    return text[:start] + _match_case(source, _WORD_FLIPS[source.lower()]) + text[end:]
  phrase = relation.group()
  reversal = _PHRASE_FLIPS[re.sub(r"\s+", " ", phrase.lower())]
  return text[: relation.start()] + _match_case(phrase, reversal) + text[relation.end() :]


def perturb_prompt(prompt: str, *, seed: int = 0) -> str | None:
  """Changes exactly one spatial relation of an English prompt; None if it has none.

  One relation phrase is chosen (deterministically from `seed`) and either reversed ("left of" ->
  "right of", "above" -> "below", "on top of" -> "beneath", "in front of" -> "behind", ...) or, when
  both noun phrases around it are whole ("A cat is left of a dog."), the two noun phrases are
  swapped. Non-directional relations ("next to", "near") do not count. Case, punctuation and all
  other text are preserved.
  """
  relations = list(_RELATION_RE.finditer(prompt))
  if not relations:
    return None
  rng = np.random.default_rng(seed)
  relation = relations[int(rng.integers(len(relations)))]
  relational = _RELATION_PATTERNS[_pattern_index(relation)][1]
  swapped = _swap(prompt, relation, relations) if relational else None
  if swapped is not None and rng.integers(2) == 1:
    return swapped
  return _flip(prompt, relation)
