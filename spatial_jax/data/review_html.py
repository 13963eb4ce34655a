"""`review.html`: a static gallery of generated pairs for a human pass (no server, no scripts).

Kept and dropped pairs are shown side by side (the image of the original prompt, then the image of
the perturbed prompt), with both prompts (the changed words marked), the changed relation, the
split and the judge's scores; prompts skipped before generation are listed with their reason.
Images are linked by their paths relative to the pairs folder, so the page is opened from there.
"""

from __future__ import annotations

import difflib
import html
import json
import os
from collections.abc import Sequence
from typing import Any

from spatial_jax import fileio
from spatial_jax.data import pairs

_STYLE = """
body { font-family: sans-serif; margin: 1.5em; color: #222; }
h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 1.5em; }
.pair { display: inline-block; vertical-align: top; width: 540px; margin: 0 1em 1.2em 0;
        padding: .6em; border: 1px solid #ddd; border-radius: 6px; }
.pair.dropped { background: #fff6f6; }
.images { display: flex; gap: 8px; }
figure { margin: 0; text-align: center; font-size: 85%; }
img { width: 256px; height: 256px; object-fit: contain; image-rendering: pixelated;
      background: #eee; }
.meta { font-size: 85%; color: #555; margin: .3em 0; }
.prompt { margin: .25em 0; font-size: 90%; }
mark { background: #ffe08a; }
table { border-collapse: collapse; font-size: 90%; }
td, th { border: 1px solid #ddd; padding: .25em .5em; text-align: left; vertical-align: top; }
pre { background: #f6f6f6; padding: .6em; font-size: 85%; }
"""


def mark_differences(text: str, other: str) -> str:
  """HTML of `text` with the words that `other` lacks (or has changed) in <mark>."""
  a, b = text.split(), other.split()
  out = []
  for op, i1, i2, _, _ in difflib.SequenceMatcher(a=a, b=b, autojunk=False).get_opcodes():
    words = html.escape(" ".join(a[i1:i2]))
    if words:
      out.append(words if op == "equal" else f"<mark>{words}</mark>")
  return " ".join(out)


def _scores(source: Any) -> str:
  judge = source.get("judge") if isinstance(source, dict) else None
  if not judge:
    return ""
  c, r = judge["chosen"], judge["rejected"]
  return (
    f"judge {html.escape(str(judge['name']))}: original {c:.4g}, perturbed {r:.4g}, "
    f"difference {c - r:+.4g} (keep if &gt; {judge['margin']:g})"
  )


def _card(record: pairs.PairRecord, prefix: str, dropped: bool) -> str:
  source = record.source if isinstance(record.source, dict) else {}
  reason = source.get("drop_reason", "")
  esc = html.escape
  src = lambda path: esc(os.path.join(prefix, path) if prefix else path, quote=True)  # noqa: E731
  meta = f"<b>{esc(record.id)}</b> · split {esc(record.split_name)}"
  meta += f" · {esc(str(source.get('change_type', '')))}"
  if reason:
    meta += f" · <b>dropped: {esc(reason)}</b>"
  role = ("", "") if dropped else (" (chosen)", " (rejected)")
  original = mark_differences(record.prompt, record.perturbed_prompt)
  perturbed = mark_differences(record.perturbed_prompt, record.prompt)
  return f"""
<div class="pair{" dropped" if dropped else ""}" id="{esc(record.id, quote=True)}">
  <div class="meta">{meta}</div>
  <div class="images">
    <figure><img src="{src(record.chosen)}" loading="lazy" alt="original">
      <figcaption>original prompt{role[0]}</figcaption></figure>
    <figure><img src="{src(record.rejected)}" loading="lazy" alt="perturbed">
      <figcaption>perturbed prompt{role[1]}</figcaption></figure>
  </div>
  <div class="prompt"><b>original:</b> {original}</div>
  <div class="prompt"><b>perturbed:</b> {perturbed}</div>
  <div class="meta">changed: {esc(record.relation_changed)}</div>
  <div class="meta">{_scores(source)}</div>
</div>"""


def _section(title: str, cards: list[str], total: int) -> str:
  more = f" (the first {len(cards)} shown)" if len(cards) < total else ""
  body = "".join(cards) if cards else "<p>None.</p>"
  return f"<h2>{html.escape(title)}: {total}{more}</h2>\n{body}\n"


def render_review(
  *,
  kept: Sequence[pairs.PairRecord],
  dropped: Sequence[pairs.PairRecord],
  dropped_dir: str,
  skipped: Sequence[dict[str, Any]],
  stats: dict[str, Any],
  max_pairs: int,
  title: str = "Generated spatial preference pairs",
) -> str:
  """The page's HTML; each section shows at most `max_pairs` items (0: all)."""
  limit = lambda items: list(items)[: max_pairs or None]  # noqa: E731
  kept_cards = [_card(r, "", dropped=False) for r in limit(kept)]
  dropped_cards = [_card(r, dropped_dir, dropped=True) for r in limit(dropped)]
  rows = "".join(
    f"<tr><td>{html.escape(str(r['id']))}</td><td>{html.escape(str(r['prompt']))}</td>"
    f"<td>{html.escape(str(r.get('reason')))}</td><td>{html.escape(str(r.get('detail') or ''))}"
    "</td></tr>"
    for r in limit(skipped)
  )
  table = (
    f"<table><tr><th>id</th><th>prompt</th><th>reason</th><th>detail</th></tr>{rows}</table>"
    if rows
    else "<p>None.</p>"
  )
  more = f" (the first {max_pairs} shown)" if max_pairs and len(skipped) > max_pairs else ""
  return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>{_STYLE}</style></head><body>
<h1>{html.escape(title)}</h1>
<p>Each pair: the image generated for the original prompt (left) and for the perturbed prompt
(right); the judge scores both against the ORIGINAL prompt. Changed words are marked.</p>
<pre>{html.escape(json.dumps(stats, indent=2, sort_keys=True))}</pre>
{_section("Kept pairs", kept_cards, len(kept))}
{_section("Dropped by the judge", dropped_cards, len(dropped))}
<h2>Skipped before generation: {len(skipped)}{more}</h2>
{table}
</body></html>
"""


def write_review(path: str, **kwargs: Any) -> str:
  """Writes `render_review(**kwargs)` to `path` atomically; returns the path."""
  fileio.write_atomic(path, render_review(**kwargs).encode("utf-8"))
  return path
