"""Scene grammar of the synthetic spatial world: objects, relations, prompts.

A scene is 2-4 coloured shapes plus 1-4 directional relations between them. Relations are sampled
from a hidden random order of the objects along each axis, so every sampled scene is satisfiable.
`scene_to_prompt` describes a scene in varied English (short one-relation prompts and long
multi-sentence ones) and `parse_prompt` reads any such prompt back into the scene.

Colours within a scene are distinct so that the oracle can identify objects by colour alone.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

import numpy as np

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "star", "cross")

# Saturated colours, pairwise >= 80 apart in RGB, so that the oracle separates them under the
# renderer's colour jitter and no low-saturation background pixel comes close to any of them.
COLORS: dict[str, tuple[int, int, int]] = {
  "red": (220, 30, 30),
  "orange": (255, 140, 0),
  "yellow": (245, 220, 20),
  "green": (30, 180, 40),
  "cyan": (20, 200, 220),
  "blue": (30, 60, 230),
  "purple": (160, 40, 210),
}

RELATIONS = ("left of", "right of", "above", "below")
RELATION_TYPES: dict[str, str] = {
  "left of": "horizontal",
  "right of": "horizontal",
  "above": "vertical",
  "below": "vertical",
}
OPPOSITE: dict[str, str] = {
  "left of": "right of",
  "right of": "left of",
  "above": "below",
  "below": "above",
}

# English phrasings of each canonical relation. No phrase is ambiguous between relations.
RELATION_PHRASES: dict[str, tuple[str, ...]] = {
  "left of": ("to the left of", "on the left of", "left of", "on the left side of"),
  "right of": ("to the right of", "on the right of", "right of", "on the right side of"),
  "above": ("above", "over", "higher than", "on top of"),
  "below": ("below", "under", "beneath", "lower than"),
}

# Prompt templates. {S} subject, {R} relation phrase, {O} reference object.
_SHORT_TEMPLATES = (
  "{S} {R} {O}",
  "a photo of {S} {R} {O}",
  "an image of {S} {R} {O}",
  "a picture of {S} {R} {O}",
  "{S} is {R} {O}.",
  "there is {S} {R} {O}.",
  "{S} sits {R} {O}.",
  "{R} {O} is {S}.",
)
_CLAUSE_TEMPLATES = (
  "{S} is {R} {O}",
  "{S} sits {R} {O}",
  "{S} is placed {R} {O}",
  "{S} appears {R} {O}",
  "{S} can be seen {R} {O}",
  "{S} is located {R} {O}",
  "{S} lies {R} {O}",
  "{R} {O} is {S}",
  "{R} {O} sits {S}",
)
# Only for a subject not mentioned yet ("there is the red circle" reads badly).
_NEW_SUBJECT_TEMPLATES = ("there is {S} {R} {O}", "we see {S} {R} {O}")
# A subject with two relations in one clause.
_SHARED_SUBJECT_TEMPLATES = (
  "{S} is {R} {O} and {R2} {O2}",
  "{S} sits {R} {O} and {R2} {O2}",
)
_INTRO_TEMPLATES = (
  "there are {n} objects: {list}.",
  "a scene with {list}.",
  "this image shows {list}.",
  "{n} shapes are visible: {list}.",
  "an image containing {list}.",
  "we see {list}.",
)
_CONNECTIVES = ("also, ", "in addition, ", "meanwhile, ")
_CLAUSE_JOINERS = (", and ", ", while ")
_NUMBER_WORDS = {2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven"}
# Punctuation the parser accepts as sentence ends besides the emitted ".".
_EXTRA_PUNCTUATION = ("!", "?", ";")

# Tokens as the tokenizer's whitespace + punctuation pre-tokenizer sees them (lowercased).
_TOKEN_RE = re.compile(r"[a-z]+|[^\sa-z]")


@dataclasses.dataclass(frozen=True)
class SceneObject:
  """A coloured shape."""

  shape: str
  color: str

  def __post_init__(self):
    if self.shape not in SHAPES:
      raise ValueError(f"Unknown shape {self.shape!r}; known shapes: {SHAPES}.")
    if self.color not in COLORS:
      raise ValueError(f"Unknown colour {self.color!r}; known colours: {tuple(COLORS)}.")

  @property
  def name(self) -> str:
    """How prompts name the object, e.g. "red circle"."""
    return f"{self.color} {self.shape}"


@dataclasses.dataclass(frozen=True)
class Relation:
  """`objects[subject]` is `relation` `objects[object]`, e.g. (0, "left of", 1)."""

  subject: int
  relation: str
  object: int

  def __post_init__(self):
    if self.relation not in RELATIONS:
      raise ValueError(f"Unknown relation {self.relation!r}; known relations: {RELATIONS}.")
    if self.subject == self.object:
      raise ValueError(f"Relation {self} relates object {self.subject} to itself.")


@dataclasses.dataclass(frozen=True)
class Scene:
  """Objects (with distinct colours) and relations between them (indices into `objects`)."""

  objects: tuple[SceneObject, ...]
  relations: tuple[Relation, ...]

  def __post_init__(self):
    colors = [o.color for o in self.objects]
    if len(set(colors)) != len(colors):
      raise ValueError(
        f"Objects of a scene need distinct colours (the oracle finds them by colour): {colors}."
      )
    for r in self.relations:
      for i in (r.subject, r.object):
        if not 0 <= i < len(self.objects):
          raise ValueError(f"Relation {r} refers to object {i}; scene has {len(self.objects)}.")

  def canonical(self) -> Scene:
    """The same scene with objects ordered by first mention (subject, then object)."""
    order = []
    for r in self.relations:
      for i in (r.subject, r.object):
        if i not in order:
          order.append(i)
    order += [i for i in range(len(self.objects)) if i not in order]
    new_index = {old: new for new, old in enumerate(order)}
    return Scene(
      objects=tuple(self.objects[i] for i in order),
      relations=tuple(
        Relation(new_index[r.subject], r.relation, new_index[r.object]) for r in self.relations
      ),
    )


def axis_edges(scene: Scene, axis: str) -> list[tuple[int, int]]:
  """Edges (a, b) meaning a's coordinate must be smaller than b's (x: a left of b; y: a above b).

  Image y grows downwards, so "a above b" is y_a < y_b.
  """
  edges = []
  for r in scene.relations:
    if axis == "x" and r.relation == "left of" or axis == "y" and r.relation == "above":
      edges.append((r.subject, r.object))
    elif axis == "x" and r.relation == "right of" or axis == "y" and r.relation == "below":
      edges.append((r.object, r.subject))
  return edges


def _is_acyclic(num_nodes: int, edges: Sequence[tuple[int, int]]) -> bool:
  indegree = [0] * num_nodes
  for _, b in edges:
    indegree[b] += 1
  ready = [i for i in range(num_nodes) if indegree[i] == 0]
  seen = 0
  while ready:
    node = ready.pop()
    seen += 1
    for a, b in edges:
      if a == node:
        indegree[b] -= 1
        if indegree[b] == 0:
          ready.append(b)
  return seen == num_nodes


def is_consistent(scene: Scene) -> bool:
  """Whether some layout satisfies all relations (no cycle of strict orders on either axis)."""
  n = len(scene.objects)
  return _is_acyclic(n, axis_edges(scene, "x")) and _is_acyclic(n, axis_edges(scene, "y"))


def sample_scene(
  rng: np.random.Generator, *, min_objects: int = 2, max_objects: int = 4, max_relations: int = 4
) -> Scene:
  """Samples a satisfiable scene; every object takes part in at least one relation.

  The number of objects is uniform in [min_objects, max_objects]; the number of relations is uniform
  between what covers every object and `max_relations` (at most one relation per object pair and
  axis), except that two objects mostly get one relation: a mix of short one-relation prompts and
  long ones. Objects are in canonical order (first mention).
  """
  if not 2 <= min_objects <= max_objects <= len(COLORS):
    raise ValueError(
      f"Need 2 <= min_objects <= max_objects <= {len(COLORS)} (one colour per object), "
      f"got min_objects={min_objects}, max_objects={max_objects}."
    )
  if max_relations < 1:
    raise ValueError(f"max_relations must be >= 1, got {max_relations}.")
  # Every object needs a relation, and one relation covers at most two objects.
  max_objects = min(max_objects, 2 * max_relations)
  if min_objects > max_objects:
    raise ValueError(
      f"min_objects={min_objects} objects cannot all be in {max_relations} relations."
    )
  n = int(rng.integers(min_objects, max_objects + 1))
  colors = rng.choice(list(COLORS), size=n, replace=False)
  shapes = rng.choice(SHAPES, size=n, replace=True)
  objects = tuple(SceneObject(str(s), str(c)) for s, c in zip(shapes, colors, strict=True))

  # (pair, axis) slots; a hidden order per axis decides each relation's direction.
  slots = [(a, b, axis) for a in range(n) for b in range(a + 1, n) for axis in "xy"]
  low = max(1, (n + 1) // 2)
  high = min(max_relations, len(slots))
  if n == 2:
    high = min(high, 1 + int(rng.random() < 0.25))  # mostly a single relation: short prompts
  num_relations = int(rng.integers(low, high + 1))
  rank = {"x": rng.permutation(n), "y": rng.permutation(n)}
  while True:
    chosen = [slots[i] for i in rng.choice(len(slots), size=num_relations, replace=False)]
    if len({i for a, b, _ in chosen for i in (a, b)}) == n:
      break
  relations = []
  for a, b, axis in chosen:
    first, second = (a, b) if rank[axis][a] < rank[axis][b] else (b, a)
    before, after = ("left of", "right of") if axis == "x" else ("above", "below")
    if rng.random() < 0.5:
      relations.append(Relation(first, before, second))
    else:
      relations.append(Relation(second, after, first))
  return Scene(objects, tuple(relations)).canonical()


def _noun_phrase(obj: SceneObject, mentioned: bool) -> str:
  if mentioned:
    return f"the {obj.name}"
  return f"{'an' if obj.color[0] in 'aeiou' else 'a'} {obj.name}"


def _fill(
  template: str,
  fillers: dict[str, tuple[str, int | None]],
  objects: Sequence[SceneObject],
  mentioned: set[int],
) -> str:
  """Fills {S}/{O}/{R}... in textual order, so the first mention of an object gets "a"/"an"."""

  def substitute(match: re.Match) -> str:
    text, obj = fillers[match.group(1)]
    if obj is None:
      return text
    phrase = _noun_phrase(objects[obj], obj in mentioned)
    mentioned.add(obj)
    return phrase

  return re.sub(r"\{(\w+)\}", substitute, template)


def _pick(rng: np.random.Generator, options: Sequence[str]) -> str:
  return options[int(rng.integers(len(options)))]


def _capitalize(sentence: str) -> str:
  return sentence[:1].upper() + sentence[1:]


def _relation_fillers(
  rng: np.random.Generator, relations: Sequence[Relation]
) -> dict[str, tuple[str, int | None]]:
  fillers = {"S": ("", relations[0].subject)}
  for k, r in enumerate(relations):
    suffix = "" if k == 0 else str(k + 1)
    fillers["R" + suffix] = (_pick(rng, RELATION_PHRASES[r.relation]), None)
    fillers["O" + suffix] = ("", r.object)
  return fillers


def _clauses(rng: np.random.Generator, scene: Scene, mentioned: set[int]) -> list[str]:
  clauses = []
  relations = list(scene.relations)
  k = 0
  while k < len(relations):
    group = relations[k : k + 1]
    nxt = relations[k + 1] if k + 1 < len(relations) else None
    if nxt is not None and nxt.subject == group[0].subject and rng.random() < 0.4:
      group.append(nxt)
    if len(group) == 2:
      template = _pick(rng, _SHARED_SUBJECT_TEMPLATES)
    elif group[0].subject not in mentioned and rng.random() < 0.25:
      template = _pick(rng, _NEW_SUBJECT_TEMPLATES)
    else:
      template = _pick(rng, _CLAUSE_TEMPLATES)
    clauses.append(_fill(template, _relation_fillers(rng, group), scene.objects, mentioned))
    k += len(group)
  return clauses


def scene_to_prompt(scene: Scene, rng: np.random.Generator) -> str:
  """Describes `scene` in English: one short phrase for one relation, else several sentences."""
  if not scene.relations:
    raise ValueError("A scene needs at least one relation to be described.")
  mentioned: set[int] = set()
  if len(scene.relations) == 1 and len(scene.objects) == 2:
    template = _pick(rng, _SHORT_TEMPLATES)
    text = _fill(template, _relation_fillers(rng, scene.relations), scene.objects, mentioned)
    return _capitalize(text) if text.endswith(".") else text

  sentences = []
  related = {i for r in scene.relations for i in (r.subject, r.object)}
  # An object outside every relation exists in the prompt only through the listing.
  if rng.random() < 0.5 or len(related) < len(scene.objects):
    names = [_noun_phrase(o, False) for o in scene.objects]
    listing = ", ".join(names[:-1]) + " and " + names[-1]
    intro = _pick(rng, _INTRO_TEMPLATES)
    sentences.append(intro.format(n=_NUMBER_WORDS[len(names)], list=listing))
    mentioned.update(range(len(scene.objects)))
  clauses = _clauses(rng, scene, mentioned)
  k = 0
  while k < len(clauses):
    first = k == 0  # "Also, ..." needs a relation sentence before it
    if k + 1 < len(clauses) and rng.random() < 0.3:
      sentence = clauses[k] + _pick(rng, _CLAUSE_JOINERS) + clauses[k + 1]
      k += 2
    else:
      sentence = clauses[k]
      k += 1
    if not first and rng.random() < 0.3:
      sentence = _pick(rng, _CONNECTIVES) + sentence
    sentences.append(sentence + ".")
  return " ".join(_capitalize(s) for s in sentences)


def grammar_words() -> list[str]:
  """Every token (lowercase word or punctuation mark) a prompt of this grammar can contain."""
  texts = [
    *_SHORT_TEMPLATES,
    *_CLAUSE_TEMPLATES,
    *_NEW_SUBJECT_TEMPLATES,
    *_SHARED_SUBJECT_TEMPLATES,
    *_INTRO_TEMPLATES,
    *_CONNECTIVES,
    *_CLAUSE_JOINERS,
    *_EXTRA_PUNCTUATION,
    *_NUMBER_WORDS.values(),
    *(p for phrases in RELATION_PHRASES.values() for p in phrases),
    *SHAPES,
    *COLORS,
    "a an the and",
  ]
  words = set()
  for text in texts:
    words.update(_TOKEN_RE.findall(re.sub(r"\{\w+\}", " ", text).lower()))
  return sorted(words)


# ---------------------------------------------------------------------------------------------------
# Parsing.

_PHRASE_TOKENS = sorted(
  ((tuple(p.split()), rel) for rel, phrases in RELATION_PHRASES.items() for p in phrases),
  key=lambda item: -len(item[0]),  # longest first: "to the left of" before "left of"
)
_SENTENCE_ENDS = {".", *_EXTRA_PUNCTUATION}


def _split_clauses(tokens: list[str]) -> list[list[str]]:
  """Splits at sentence ends and at the clause joiners ", and" / ", while"."""
  clauses, current = [], []
  for k, token in enumerate(tokens):
    joiner = token == "," and k + 1 < len(tokens) and tokens[k + 1] in ("and", "while")
    if token in _SENTENCE_ENDS or joiner:
      clauses.append(current)
      current = []
    else:
      current.append(token)
  clauses.append(current)
  return [c for c in clauses if c]


def _clause_items(clause: list[str], prompt: str) -> list[tuple[str, str | SceneObject]]:
  """The clause as a sequence of ("obj", SceneObject) and ("rel", relation) items."""
  items = []
  k = 0
  while k < len(clause):
    token = clause[k]
    if token in COLORS:
      if k + 1 >= len(clause) or clause[k + 1] not in SHAPES:
        raise ValueError(f"Colour {token!r} is not followed by a shape in prompt {prompt!r}.")
      items.append(("obj", SceneObject(clause[k + 1], token)))
      k += 2
      continue
    if token in SHAPES:
      raise ValueError(f"Shape {token!r} has no colour in prompt {prompt!r}.")
    for phrase, relation in _PHRASE_TOKENS:
      if tuple(clause[k : k + len(phrase)]) == phrase:
        items.append(("rel", relation))
        k += len(phrase)
        break
    else:
      k += 1  # filler word ("is", "the", "sits", ...)
  return items


def _clause_relations(items, clause_text: str, prompt: str):
  """(subject, relation, object) triples of one clause."""
  kinds = "".join("o" if kind == "obj" else "r" for kind, _ in items)
  values = [v for _, v in items]
  if re.fullmatch(r"o(ro)+", kinds):  # "S is R O [and R2 O2]"
    return [(values[0], values[k], values[k + 1]) for k in range(1, len(values), 2)]
  if kinds == "roo":  # "R O is S"
    return [(values[2], values[0], values[1])]
  raise ValueError(
    f"Cannot read clause {clause_text!r} of prompt {prompt!r}: expected '<object> <relation> "
    f"<object>' (e.g. 'the red circle is left of the blue square') or '<relation> <object> is "
    f"<object>'."
  )


def parse_prompt(prompt: str) -> Scene:
  """Reads a prompt of this grammar back into a scene (objects ordered by first mention).

  Raises:
    ValueError: naming the word, clause or object at fault, when the prompt is not of the grammar.
  """
  tokens = _TOKEN_RE.findall(prompt.lower())
  known = set(grammar_words())
  unknown = sorted({t for t in tokens if t not in known})
  if unknown:
    raise ValueError(f"Prompt {prompt!r} has words outside the scene grammar: {unknown}.")
  triples, listed = [], []
  for clause in _split_clauses(tokens):
    items = _clause_items(clause, prompt)
    if not items:
      continue  # a connective or filler only
    if all(kind == "obj" for kind, _ in items):
      listed += [v for _, v in items]  # an object listing ("a scene with a red circle and ...")
      continue
    triples += _clause_relations(items, " ".join(clause), prompt)
  if not triples:
    raise ValueError(f"Prompt {prompt!r} states no spatial relation.")
  objects: list[SceneObject] = []
  for obj in [x for s, _, o in triples for x in (s, o)] + listed:
    if obj not in objects:
      objects.append(obj)
  index = {obj: k for k, obj in enumerate(objects)}
  try:
    relations = tuple(Relation(index[s], r, index[o]) for s, r, o in triples)
    return Scene(tuple(objects), relations)
  except ValueError as e:
    raise ValueError(f"Prompt {prompt!r} does not describe a valid scene: {e}") from e
