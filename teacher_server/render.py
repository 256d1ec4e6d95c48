"""Rendering and tokenisation of input samples for a teacher: chat template, assistant-turn loss mask,
scored positions and truncation. Everything a backend needs arrives as a `TokenizedSample`.

Chat templates are Jinja, as in Hugging Face tokenizers. A template is named by `model` (the teacher
tokenizer's own `chat_template`), by the name of a shared template in `teacher_server/templates/`
(FuseChat renders every teacher with the pivot's template), or by a path to a `.jinja` file.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import jinja2
import jinja2.sandbox
import numpy as np

from datastore.chat import Message, Sample
from datastore.errors import UserError
from datastore.tokenizers import tokenizer_fingerprint  # noqa: F401  (defined with the datastore's meta)

TEMPLATE_DIR = Path(__file__).with_name("templates")
# Private-use code points: never produced by a template or tokenizer on their own.
_OPEN, _CLOSE = "\ue000", "\ue001"
_SENTINEL = re.compile(f"{_OPEN}(\\d+){_CLOSE}")


@dataclass
class TokenizedSample:
    """A sample ready for a backend: teacher tokens, loss mask, and the positions to score."""

    sample_id: str
    input_ids: np.ndarray  # int32 [T]
    loss_mask: np.ndarray  # bool [T]
    positions: np.ndarray  # int32 [N], ascending; position t predicts input_ids[t + 1]
    text: str
    assistant_spans: np.ndarray  # int32 [S, 2] character spans of assistant content in `text`
    truncated: bool

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])


def shared_templates() -> list[str]:
    return sorted(p.stem for p in TEMPLATE_DIR.glob("*.jinja"))


def resolve_template(spec: str, tokenizer) -> str:
    """The Jinja source for a template spec: `model`, a shared template's name, or a file path."""
    if spec == "model":
        source = getattr(tokenizer, "chat_template", None)
        if not source:
            raise UserError(
                f"chat_template 'model': the teacher's tokenizer has no chat template; use one of "
                f"{', '.join(shared_templates())} or a path to a .jinja file"
            )
        if isinstance(source, dict):  # several named templates: take the default one
            source = source.get("default") or next(iter(source.values()))
        return source
    shared = TEMPLATE_DIR / f"{spec}.jinja"
    if shared.is_file():
        return shared.read_text(encoding="utf-8")
    path = Path(spec)
    if path.suffix == ".jinja" and path.is_file():
        return path.read_text(encoding="utf-8")
    raise UserError(
        f"chat_template {spec!r}: not 'model', not a shared template ({', '.join(shared_templates())}) "
        f"and not an existing .jinja file"
    )


def _raise(message: str):
    raise jinja2.TemplateError(message)


@lru_cache(maxsize=32)
def _compile(source: str) -> jinja2.Template:
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise
    return env.from_string(source)


def render_chat(messages: tuple[Message, ...], template_source: str, tokenizer) -> tuple[str, list[tuple[int, int]]]:
    """Render a chat; return the text and the character spans of each assistant message's content.

    Assistant contents are first rendered as numbered sentinels, located, then substituted back, so
    the spans are exact whatever the template adds around them. A template that rewrites assistant
    content (strips it, say) is detected and reported rather than mis-masked.
    """
    template = _compile(template_source)
    variables = {
        "bos_token": tokenizer.bos_token or "",
        "eos_token": tokenizer.eos_token or "",
        "add_generation_prompt": False,
    }
    marked = [
        {"role": m.role, "content": f"{_OPEN}{i}{_CLOSE}" if m.role == "assistant" else m.content}
        for i, m in enumerate(messages)
    ]
    try:
        skeleton = template.render(messages=marked, **variables)
        expected = template.render(messages=[{"role": m.role, "content": m.content} for m in messages], **variables)
    except jinja2.TemplateError as e:
        raise UserError(f"chat template failed to render: {e}") from e
    pieces, spans, cursor, length = [], [], 0, 0
    for match in _SENTINEL.finditer(skeleton):
        before = skeleton[cursor : match.start()]
        content = messages[int(match.group(1))].content
        pieces += [before, content]
        length += len(before)
        spans.append((length, length + len(content)))
        length += len(content)
        cursor = match.end()
    pieces.append(skeleton[cursor:])
    text = "".join(pieces)
    if text != expected or len(spans) != sum(m.role == "assistant" for m in messages):
        raise UserError("chat template changes assistant content (e.g. strips it); the loss mask cannot be placed exactly")
    return text, spans


def _loss_spans(text: str, content_spans: list[tuple[int, int]], tokenizer) -> list[tuple[int, int]]:
    """Content spans extended over an end-of-turn special token that directly follows the content,
    so the student learns to stop (``</s>``, ``<|im_end|>``, ...)."""
    specials = sorted({t for t in (tokenizer.all_special_tokens or []) if t}, key=len, reverse=True)
    out = []
    for start, end in content_spans:
        for tok in specials:
            if text.startswith(tok, end):
                end += len(tok)
                break
        out.append((start, end))
    return out


def tokenize_sample(
    sample: Sample,
    tokenizer,
    template_source: str | None,
    max_length: int,
    all_positions: bool = False,
) -> TokenizedSample:
    """Render and tokenise one sample with its loss mask and scored positions, truncating to max_length."""
    if sample.is_chat:
        if template_source is None:
            raise UserError("a chat sample needs a chat template")
        text, content_spans = render_chat(sample.messages, template_source, tokenizer)
        loss_spans = _loss_spans(text, content_spans, tokenizer)
    else:
        # Plain text (FuseLLM continual training): BOS then the text; every token is a target.
        bos = tokenizer.bos_token or ""
        text = bos + sample.text
        content_spans = []
        loss_spans = [(len(bos), len(text))]
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = np.asarray(enc["input_ids"], dtype=np.int32)
    offsets = np.asarray(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2)
    mask = np.zeros(len(ids), dtype=bool)
    for start, end in loss_spans:
        # A token is a target when its characters overlap the span (covers a leading-space piece).
        mask |= (offsets[:, 0] < end) & (offsets[:, 1] > start) & (offsets[:, 1] > offsets[:, 0])
    truncated = len(ids) > max_length
    if truncated:
        ids, mask = ids[:max_length], mask[:max_length]
    if all_positions:
        positions = np.arange(max(len(ids) - 1, 0), dtype=np.int32)
    else:
        positions = np.flatnonzero(mask[1:]).astype(np.int32)
    return TokenizedSample(
        sample_id=sample.id,
        input_ids=ids,
        loss_mask=mask,
        positions=positions,
        text=text,
        assistant_spans=np.asarray(content_spans, dtype=np.int32).reshape(-1, 2),
        truncated=truncated,
    )
