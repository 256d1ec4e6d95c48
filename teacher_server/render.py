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
import jinja2.ext
import jinja2.nodes
import jinja2.sandbox
import numpy as np

from datastore.chat import Message, Sample, unicode_problem
from datastore.errors import UserError
from datastore.tokenizers import tokenizer_fingerprint  # noqa: F401  (defined with the datastore's meta)

TEMPLATE_DIR = Path(__file__).with_name("templates")
# Markers are private-use code points chosen per render among those absent from the chat and the template,
# so user text that contains private-use characters can never be mistaken for a marker.
_MARKER_POOL = range(0xF0000, 0xF0100)  # Supplementary Private Use Area-A
_MARKER_CHARS = tuple(chr(c) for c in _MARKER_POOL)
# Tokens of slack kept after the cut of an over-long text (see `_encode`); a cut changes at most the
# tokenisation of the last pre-token(s) before it.
_CUT_MARGIN = 16


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
    """The Jinja source for a template spec: `model`, a shared template's name, or a file path.
    Raises `UserError` for an unknown spec or a template that does not compile."""
    source = _template_source(spec, tokenizer)
    _compile(source)
    return source


def _template_source(spec: str, tokenizer) -> str:
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


class _GenerationMarks(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}`: the tags transformers' chat templates use to mark the
    tokens an assistant generates (`apply_chat_template(..., return_assistant_tokens_mask=True)`).

    The block renders its body wrapped in the markers passed as the render variables `_lf_gen_open` /
    `_lf_gen_close` (empty strings: the body alone), so `render_chat` can locate exactly what it covers.
    """

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        args = [jinja2.nodes.Name("_lf_gen_open", "load"), jinja2.nodes.Name("_lf_gen_close", "load")]
        return jinja2.nodes.CallBlock(self.call_method("_wrap", args), [], [], body).set_lineno(lineno)

    @staticmethod
    def _wrap(open_mark: str, close_mark: str, caller) -> str:
        return f"{open_mark}{caller()}{close_mark}"


@lru_cache(maxsize=32)
def _compile(source: str) -> jinja2.Template:
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationMarks, "jinja2.ext.loopcontrols"]
    )
    env.globals["raise_exception"] = _raise
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise UserError(f"chat template does not compile (line {e.lineno}: {e.message})") from None


def _free_markers(n: int, *texts: str) -> list[str]:
    """The first `n` private-use characters of the pool that occur in none of `texts`."""
    free: list[str] = []
    for c in _MARKER_CHARS:  # a substring search per text and candidate: texts rarely hold any
        if not any(c in t for t in texts):
            free.append(c)
            if len(free) == n:
                return free
    # 256 candidates: only a text built to exhaust them gets here
    raise UserError("the sample uses every private-use marker character the renderer needs")


@dataclass
class RenderedChat:
    """A rendered chat: `text`, the character spans `[start, end)` of each assistant message's content,
    and, when the template marks them with `{% generation %}`, the spans of the generated parts."""

    text: str
    content_spans: list[tuple[int, int]]
    generation_spans: list[tuple[int, int]] | None  # None: the template has no generation marks


def render_chat(messages: tuple[Message, ...], template_source: str, tokenizer) -> tuple[str, list[tuple[int, int]]]:
    """Render a chat; return the text and the character spans of each assistant message's content.

    Raises `UserError` when the template refuses the chat (`raise_exception`, e.g. "roles must
    alternate") or rewrites assistant content. See `render_chat_marked` for the generation marks.
    """
    rendered = render_chat_marked(messages, template_source, tokenizer)
    return rendered.text, rendered.content_spans


def render_chat_marked(messages: tuple[Message, ...], template_source: str, tokenizer) -> RenderedChat:
    """Render a chat and locate each assistant content and each `{% generation %}` block exactly.

    Assistant contents are first rendered as numbered markers (private-use characters absent from the
    chat), located, then substituted back, so the spans are exact whatever the template adds around
    them. A template that rewrites assistant content (strips it, say) is reported (`UserError`) rather
    than mis-masked.
    """
    template = _compile(template_source)
    a_open, a_close, g_open, g_close = _free_markers(4, template_source, *(m.content for m in messages))
    variables = {
        "bos_token": tokenizer.bos_token or "",
        "eos_token": tokenizer.eos_token or "",
        "add_generation_prompt": False,
    }
    marked = [
        {"role": m.role, "content": f"{a_open}{i}{a_close}" if m.role == "assistant" else m.content}
        for i, m in enumerate(messages)
    ]
    try:
        skeleton = template.render(messages=marked, _lf_gen_open=g_open, _lf_gen_close=g_close, **variables)
        expected = template.render(messages=[{"role": m.role, "content": m.content} for m in messages],
                                   _lf_gen_open="", _lf_gen_close="", **variables)
    except jinja2.TemplateError as e:
        raise UserError(f"chat template refuses this chat: {e}") from None
    token = re.compile(f"{re.escape(a_open)}(\\d+){re.escape(a_close)}|{re.escape(g_open)}|{re.escape(g_close)}")
    pieces: list[str] = []
    content_spans: list[tuple[int, int]] = []
    gen_spans: list[tuple[int, int]] = []
    cursor = length = 0
    gen_start: int | None = None
    for match in token.finditer(skeleton):
        before = skeleton[cursor : match.start()]
        pieces.append(before)
        length += len(before)
        cursor = match.end()
        if match.group(1) is not None:
            index = int(match.group(1))
            if index >= len(messages) or messages[index].role != "assistant":
                raise UserError("chat template changes assistant content; the loss mask cannot be placed exactly")
            content = messages[index].content
            pieces.append(content)
            content_spans.append((length, length + len(content)))
            length += len(content)
        elif match.group(0) == g_open:
            if gen_start is not None:
                raise UserError("chat template nests {% generation %} blocks")
            gen_start = length
        else:
            if gen_start is not None and length > gen_start:
                gen_spans.append((gen_start, length))
            gen_start = None
    pieces.append(skeleton[cursor:])
    text = "".join(pieces)
    if text != expected or len(content_spans) != sum(m.role == "assistant" for m in messages):
        raise UserError("chat template changes assistant content (e.g. strips it); the loss mask cannot be placed exactly")
    uses_marks = "generation" in template_source and g_open in skeleton
    return RenderedChat(text=text, content_spans=content_spans, generation_spans=gen_spans if uses_marks else None)


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
    """Render and tokenise one sample with its loss mask and scored positions, truncating to max_length.

    The loss mask covers the template's `{% generation %}` blocks when it has them, else every
    assistant content and the end-of-turn special token right after it. Raises `UserError` when the
    template refuses the chat or rewrites assistant content, and when the tokenizer rejects the text.
    """
    text, content_spans, loss_spans = _render(sample, tokenizer, template_source)
    ids, offsets = _encode(text, tokenizer, max_length)
    return _tokenized(sample.id, text, content_spans, loss_spans, ids, offsets, max_length, all_positions)


def tokenize_samples(
    samples: list[Sample],
    tokenizer,
    template_source: str | None,
    max_length: int,
    all_positions: bool = False,
    batch_size: int = 256,
) -> list[TokenizedSample | UserError]:
    """`tokenize_sample` of each sample, in order, with the error it raises in place of a refused
    sample. Texts are tokenised `batch_size` at a time in one tokenizer call (the fast tokenizers' batch
    path: same ids and offsets as one call per text, less overhead per sample); a batch the tokenizer
    rejects, and any text long enough to be cut before tokenising (`_encode`), go one text at a time."""
    out: list[TokenizedSample | UserError | None] = [None] * len(samples)
    rendered: list[tuple[int, str, list, list]] = []  # (index, text, content spans, loss spans)
    for i, sample in enumerate(samples):
        try:
            rendered.append((i, *_render(sample, tokenizer, template_source)))
        except UserError as e:
            out[i] = e
    short_limit = (max_length + _CUT_MARGIN) * 8  # what `_encode` tokenises whole, uncut
    encoded: dict[int, tuple[np.ndarray, np.ndarray] | UserError] = {}
    batchable = [r for r in rendered if len(r[1]) <= short_limit]
    for start in range(0, len(batchable), batch_size):
        part = batchable[start : start + batch_size]
        try:
            encoded.update(zip([r[0] for r in part], _tokenize_batch([r[1] for r in part], tokenizer), strict=True))
        except UserError:  # a text the tokenizer rejects: find which, one text at a time
            for r in part:
                try:
                    encoded[r[0]] = _tokenize(r[1], tokenizer)
                except UserError as e:
                    encoded[r[0]] = e
    for i, text, content_spans, loss_spans in rendered:
        if i not in encoded:  # long: cut before tokenising
            try:
                encoded[i] = _encode(text, tokenizer, max_length)
            except UserError as e:
                encoded[i] = e
        enc = encoded[i]
        out[i] = enc if isinstance(enc, UserError) else _tokenized(
            samples[i].id, text, content_spans, loss_spans, *enc, max_length, all_positions)
    return out


def _render(sample: Sample, tokenizer, template_source: str | None) -> tuple[str, list, list]:
    """(text, assistant content spans, loss spans) of a sample: the chat rendered with the template, or
    BOS + the plain text."""
    if sample.is_chat:
        if template_source is None:
            raise UserError("a chat sample needs a chat template")
        rendered = render_chat_marked(sample.messages, template_source, tokenizer)
        text, content_spans = rendered.text, rendered.content_spans
        if rendered.generation_spans is not None:
            loss_spans = rendered.generation_spans
        else:
            loss_spans = _loss_spans(text, content_spans, tokenizer)
        return text, content_spans, loss_spans
    # Plain text (FuseLLM continual training): BOS then the text; every token is a target.
    bos = tokenizer.bos_token or ""
    text = bos + sample.text
    return text, [], [(len(bos), len(text))]


def _tokenized(sample_id: str, text: str, content_spans: list, loss_spans: list, ids: np.ndarray,
               offsets: np.ndarray, max_length: int, all_positions: bool) -> TokenizedSample:
    """The `TokenizedSample` of a rendered text's tokens (`_encode`): loss mask, truncation, positions."""
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
        sample_id=sample_id,
        input_ids=ids,
        loss_mask=mask,
        positions=positions,
        text=text,
        assistant_spans=np.asarray(content_spans, dtype=np.int32).reshape(-1, 2),
        truncated=truncated,
    )


@lru_cache(maxsize=16)
def max_token_chars(tokenizer) -> int:
    """The longest token of the vocabulary, in characters of its string form: an upper bound on the
    characters of text one token covers (a byte-level BPE token's string has one character per byte,
    a SentencePiece byte token like ``<0x0A>`` stands for one character). At least 1."""
    return max([1, *(len(t) for t in tokenizer.get_vocab())])


def _tokenize(text: str, tokenizer) -> tuple[np.ndarray, np.ndarray]:
    if (problem := unicode_problem(text, "the rendered text")) is not None:
        raise UserError(problem)
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    except (TypeError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"the tokenizer rejects the rendered text ({first})") from None
    ids = np.asarray(enc["input_ids"], dtype=np.int32)
    return ids, np.asarray(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2)


def _tokenize_batch(texts: list[str], tokenizer) -> list[tuple[np.ndarray, np.ndarray]]:
    """`_tokenize` of several texts in one tokenizer call (UserError when it rejects any of them)."""
    if any(unicode_problem(t, "a rendered text") for t in texts):
        raise UserError("a rendered text is not valid Unicode")
    try:
        enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    except (TypeError, ValueError) as e:
        raise UserError(f"the tokenizer rejects a rendered text ({e})") from None
    return [
        (np.asarray(ids, dtype=np.int32), np.asarray(offsets, dtype=np.int64).reshape(-1, 2))
        for ids, offsets in zip(enc["input_ids"], enc["offset_mapping"], strict=True)
    ]


def _encode(text: str, tokenizer, max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """Token ids (int32 [T]) and character offsets (int64 [T, 2]) of `text`, cut to at most
    `max_length + 1` tokens' worth of text before tokenising when the text is longer.

    A text that would be truncated anyway is cut to a prefix of `(max_length + margin) * c` characters
    first, trying a typical `c` = 8 characters per token, then the vocabulary's longest token
    (`max_token_chars`), which a prefix of that length must fill. The cut is kept only if the prefix
    still gives `max_length + margin` tokens; the tokens before the margin are then those of the whole
    text (a cut only changes how the last pre-token(s) split). Otherwise the whole text is tokenised, so
    a sample that fits is tokenised exactly as before.
    """
    need = max_length + _CUT_MARGIN
    if len(text) <= need * 8:  # the common case: no cut, and no vocabulary scan
        return _tokenize(text, tokenizer)
    for chars_per_token in (8, max_token_chars(tokenizer)):
        cut = need * chars_per_token
        if len(text) <= cut:
            break
        ids, offsets = _tokenize(text[:cut], tokenizer)
        if len(ids) >= need:
            return ids[: max_length + 1], offsets[: max_length + 1]
    return _tokenize(text, tokenizer)


def checked_sample(
    sample: Sample, tokenizer, template_source: str | None, max_length: int, all_positions: bool = False
) -> tuple[TokenizedSample | None, str | None]:
    """(the tokenised sample, None), or (None, why it cannot be extracted: one line).

    A sample with no position to score (cut at `max_length` before its first assistant token, or a
    one-token text) cannot be extracted: it would store no target. Runs everything extraction runs before the model: rendering with the template (which may refuse
    the chat, e.g. Mistral-v0.1's "roles must alternate") and tokenising (`tokenize_sample`). Used to
    validate a dataset for a teacher before any sample is scored.
    """
    return checked_samples([sample], tokenizer, template_source, max_length, all_positions)[0]


def checked_samples(
    samples: list[Sample], tokenizer, template_source: str | None, max_length: int, all_positions: bool = False
) -> list[tuple[TokenizedSample | None, str | None]]:
    """`checked_sample` of each sample, in order, tokenised in batches (`tokenize_samples`)."""
    out: list[tuple[TokenizedSample | None, str | None]] = [(None, None)] * len(samples)
    valid: list[int] = []
    for i, sample in enumerate(samples):
        problem = unicode_problem(sample.id, "'id'")
        if problem is None:
            valid.append(i)
        else:
            out[i] = None, problem
    done = tokenize_samples([samples[i] for i in valid], tokenizer, template_source, max_length, all_positions)
    for i, ts in zip(valid, done, strict=True):
        if isinstance(ts, UserError):
            out[i] = None, str(ts)
        elif not len(ts.positions):  # nothing to distil: a sample must give at least one target
            out[i] = None, (f"no position to score: cut at max_length={max_length} tokens before its first "
                            "assistant token" if ts.truncated else "no position to score (fewer than 2 tokens "
                            "or no assistant token)")
        else:
            out[i] = ts, None
    return out


def sample_problem(sample: Sample, tokenizer, template_source: str | None, max_length: int) -> str | None:
    """Why `sample` cannot be extracted with this tokenizer and template (one line), or None
    (`checked_sample`)."""
    return checked_sample(sample, tokenizer, template_source, max_length)[1]
