"""Chat prompts: a model's ``chat_template`` rendered as ``transformers``' ``apply_chat_template`` renders it.

The template comes from ``chat_template.jinja`` or ``tokenizer_config.json``'s ``chat_template`` in a model or run
directory (``ardiff convert`` copies ``tokenizer_config.json`` into the run). Rendering uses jinja2's sandbox with
the settings ``transformers`` uses (``trim_blocks``, ``lstrip_blocks``, loop controls, a ``tojson`` that keeps
non-ASCII, ``raise_exception``, ``strftime_now``), and the template sees ``messages``, ``add_generation_prompt``,
``tools``/``documents`` (None) and the special tokens (``bos_token``, ``eos_token``, ...) as strings.

:func:`end_token` finds the token the template closes an assistant turn with (``<|im_end|>``, ``<|eot_id|>``...):
``ardiff sample --chat`` stops there.
"""

from __future__ import annotations

import datetime
import json
import os
from typing import Any, List, Mapping, Optional, Sequence, Tuple

_SPECIALS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def _token_str(value) -> Optional[str]:
  if isinstance(value, Mapping):  # AddedToken as saved: {"content": "<|im_end|>", ...}
    value = value.get("content")
  return value if isinstance(value, str) else None


def load_chat_template(model_dir: str) -> Tuple[str, dict]:
  """``(template, special token strings)`` of a model or run directory; a ValueError naming the files looked at
  when there is no template."""
  config_path = os.path.join(model_dir, "tokenizer_config.json")
  config = {}
  if os.path.isfile(config_path):
    with open(config_path) as f:
      config = json.load(f)
  specials = {k: _token_str(config.get(k)) for k in _SPECIALS if _token_str(config.get(k)) is not None}
  jinja_path = os.path.join(model_dir, "chat_template.jinja")
  if os.path.isfile(jinja_path):
    with open(jinja_path) as f:
      return f.read(), specials
  template = config.get("chat_template")
  if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
    named = {t.get("name"): t.get("template") for t in template if isinstance(t, Mapping)}
    template = named.get("default")
  if not isinstance(template, str) or not template:
    raise ValueError(f"{model_dir} has no chat template (looked for chat_template.jinja and chat_template in "
                     "tokenizer_config.json); --chat needs one. Use --prompt with plain text instead.")
  return template, specials


def _environment():
  import jinja2
  import jinja2.ext
  import jinja2.sandbox

  def raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)

  def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

  env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                     extensions=[jinja2.ext.loopcontrols])
  env.filters["tojson"] = tojson
  env.globals["raise_exception"] = raise_exception
  env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
  return env


def render_chat(template: str, messages: Sequence[Mapping[str, Any]], *, specials: Optional[Mapping] = None,
                add_generation_prompt: bool = True, **kwargs) -> str:
  """The prompt text for ``messages`` (``[{"role": ..., "content": ...}]``), as ``apply_chat_template(...,
  tokenize=False)`` renders it. ``kwargs`` reach the template too (e.g. ``enable_thinking``)."""
  for m in messages:
    if not isinstance(m, Mapping) or "role" not in m:
      raise ValueError(f"chat messages must be dicts with a 'role' (and 'content'), got {m!r}.")
  context = {**dict(specials or {}), **kwargs}
  return _environment().from_string(template).render(messages=[dict(m) for m in messages], tools=None,
                                                      documents=None, add_generation_prompt=add_generation_prompt,
                                                      **context)


def end_token(template: str, specials: Optional[Mapping] = None) -> Optional[str]:
  """The text the template writes right after an assistant message (``<|im_end|>``, ``<|eot_id|>``, ...), cut at
  the first newline or space; None when it writes nothing there."""
  marker = "ARDIFF_END_PROBE"
  text = render_chat(template, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": marker}],
                     specials=specials, add_generation_prompt=False)
  after = text[text.rfind(marker) + len(marker):] if marker in text else ""
  token = after.split("\n", 1)[0].split(" ", 1)[0]
  return token or None


def chat_prompt(model_dir: str, messages, **kwargs) -> Tuple[str, Optional[str]]:
  """``(prompt text, end token)`` for a question (a string: one user turn) or a list of messages."""
  if isinstance(messages, str):
    messages = [{"role": "user", "content": messages}]
  template, specials = load_chat_template(model_dir)
  return render_chat(template, messages, specials=specials, **kwargs), (end_token(template, specials)
                                                                        or specials.get("eos_token"))


def token_id(tok, text: str) -> int:
  """The id of a special token's text under ardiff tokenizer ``tok``; a ValueError if it is not one token."""
  ids: List[int] = list(tok.encode(text))
  if len(ids) != 1:
    raise ValueError(f"the chat template's end token {text!r} encodes to {ids}, not one token; the tokenizer "
                     "does not know it as a special token.")
  return ids[0]
