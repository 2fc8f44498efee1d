"""A chat record as token ids with a label on every assistant turn.

Which characters of the rendered dialogue belong to which message comes from the
tokenizer's own chat template, rendered on each prefix of the dialogue (the approach
that works for any template, as TRL's ``assistant_only_loss`` fallback and
torchtune's message masking do it): message ``i`` spans the text that rendering
``messages[:i+1]`` adds to rendering ``messages[:i]``, and an assistant turn's
trained part is what follows the generation prompt, i.e. its content and its
end-of-turn marker. A template that renders an earlier prefix differently once later
turns exist (some strip reasoning from past turns) cannot be split this way and is
refused.

Message content that holds special-token text (``<|im_end|>`` inside an answer) is
located exactly and tokenized with ``split_special_tokens=True``, so it stays plain
text; only the template's own markers become control tokens. Content without such
text tokenizes the same either way, so it takes the cheaper path of the plain
rendering, split only where a label starts or ends: a single-turn record gets exactly
the ids of the former prompt/response split (tests/test_chat.py checks it).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

IGNORE_INDEX = -100
TRUNCATION_POLICIES = ("drop", "keep-start")


@dataclass(frozen=True)
class Encoded:
    """One record's tokens: ``example`` is ``{"input_ids", "labels"}`` (lists of ints of
    one length) or None when dropped; ``status`` is 'kept', 'truncated' or 'dropped';
    ``length`` is the token count before any cut; ``reason`` says why it was dropped."""

    example: dict | None
    status: str
    length: int
    reason: str = ""


def trains(message: dict) -> bool:
    """Whether an assistant message is trained: ``"train": false`` or ``"weight": 0``
    opt it out (as in axolotl's and OpenAI's chat formats)."""
    return (message.get("role") == "assistant" and message.get("train", True) is not False
            and message.get("weight", 1) != 0)


def _render(tokenizer, messages: list[dict], *, generation_prompt: bool = False) -> str:
    if not messages:
        return ""
    try:  # a template may reject a role or an order it does not know (jinja raises)
        return tokenizer.apply_chat_template(messages, tokenize=False,
                                             add_generation_prompt=generation_prompt)
    except Exception as err:  # noqa: BLE001 - jinja, ValueError, TypeError: one message
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ValueError(f"the chat template cannot render it: {first}") from None


_SENTINEL = re.compile("\ue000([0-9]+)\ue001")  # private-use characters; only our stand-ins are rendered with it


def render_pieces(messages: list[dict], tokenizer) -> list[tuple[str, bool, bool]]:
    """The rendered dialogue as ``(text, is_content, trained)`` pieces, in order.

    ``is_content`` marks a message's own content, to be tokenized as plain text; the
    other pieces are the template's markup. When some content holds special-token
    text, the template is rendered with each content replaced by a sentinel, which
    locates the contents exactly (a search for the content could hit markup, e.g.
    content that is ``<|im_end|>``), checked against the real rendering. Raises
    ValueError when the template does not render each prefix of the dialogue as a
    prefix of the whole, or changes content that holds special-token text.
    """
    special = special_tokens(tokenizer)
    if not any(isinstance(m.get("content"), str) and any(t in m["content"] for t in special)
               for m in messages):
        # no content could become a control token: the real rendering, split only where
        # a label starts or ends, tokenizes as the whole text would (and costs the
        # template renders of the plain prompt/response split)
        full, cuts = _layout(messages, tokenizer)
        return _merged([(full[a:b], False, t) for (a, t), (b, _) in zip(cuts, cuts[1:])])
    stand_ins = [{**m, "content": f"\ue000{i}\ue001"} if isinstance(m.get("content"), str) else m
                 for i, m in enumerate(messages)]
    full, cuts = _layout(stand_ins, tokenizer)
    pieces = []
    for (begin, trained), (end, _) in zip(cuts, cuts[1:]):
        at = begin
        for match in _SENTINEL.finditer(full, begin, end):
            if match.start() > at:
                pieces.append((full[at:match.start()], False, trained))
            pieces.append((messages[int(match.group(1))]["content"], True, trained))
            at = match.end()
        if end > at:
            pieces.append((full[at:end], False, trained))
    if "".join(text for text, _, _ in pieces) != _render(tokenizer, messages):
        raise ValueError(
            "chat template problem: it does not render message content as given (e.g. it "
            "trims it), so content that looks like a special token cannot be kept as plain "
            "text: use a template that renders content verbatim, or remove that text")
    return _merged(pieces)


def _merged(pieces: list[tuple[str, bool, bool]]) -> list[tuple[str, bool, bool]]:
    """Adjacent markup pieces of the same training flag joined, empty ones dropped:
    markup splits only where the label changes, as a whole-text tokenization would."""
    out: list[tuple[str, bool, bool]] = []
    for text, is_content, trained in pieces:
        if not text:
            continue
        if out and not is_content and not out[-1][1] and out[-1][2] == trained:
            out[-1] = (out[-1][0] + text, False, trained)
        else:
            out.append((text, is_content, trained))
    return out


def _layout(messages: list[dict], tokenizer) -> tuple[str, list[tuple[int, bool]]]:
    """The rendered dialogue and the character offsets where its pieces start, each
    with whether that piece is trained; the last offset is the text's end. Only the
    prefixes that bound an assistant turn are rendered: the other boundaries do not
    change a label."""
    full = _render(tokenizer, messages)
    cuts: list[tuple[int, bool]] = [(0, False)]
    previous = 0
    for i, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        prompt = _render(tokenizer, messages[:i], generation_prompt=True)
        upto = full if i == len(messages) - 1 else _render(tokenizer, messages[:i + 1])
        _check_prefix(prompt, upto, full, i, previous)
        cuts += [(len(prompt), trains(message)), (len(upto), False)]
        previous = len(upto)
    cuts.append((len(full), False))
    return full, cuts


def _check_prefix(prompt: str, upto: str, full: str, index: int, previous: int) -> None:
    if not (full.startswith(upto) and upto.startswith(prompt) and len(prompt) >= previous):
        raise ValueError(
            f"chat template problem: rendering the dialogue up to message {index} is not a "
            "prefix of rendering all of it, so the turns cannot be located: use a template "
            "that renders earlier turns the same whatever follows (or instruction records)")


def special_tokens(tokenizer) -> set[str]:
    """Every token text the tokenizer would turn into a control id (its special tokens
    and the added tokens marked special, e.g. SmolLM2's ``<file_sep>``)."""
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    return set(tokenizer.all_special_tokens) | {t.content for t in added.values() if t.special}


def _ids(tokenizer, texts: list[str], *, plain: bool) -> list[list[int]]:
    if not texts:
        return []
    return tokenizer(texts, add_special_tokens=False, split_special_tokens=plain)["input_ids"]


def encode_chat(messages: list[dict], tokenizer, max_length: int, *,
                truncation: str = "drop") -> Encoded:
    """``messages`` as ids with labels on every trained assistant turn (content and
    end-of-turn marker), -100 elsewhere.

    ``truncation``: 'drop' skips an example longer than ``max_length`` tokens;
    'keep-start' keeps its first ``max_length`` tokens (status 'truncated'). Either way
    an example with no labelled token left is dropped. Raises ValueError for a
    template that cannot render the dialogue or its prefixes consistently.
    """
    if truncation not in TRUNCATION_POLICIES:
        raise ValueError(f"truncation '{truncation}' is not one of {TRUNCATION_POLICIES}")
    pieces = render_pieces(messages, tokenizer)
    # one batched call per kind: the per-call overhead of a fast tokenizer is most of
    # its cost on pieces this short
    encoded = {plain: iter(_ids(tokenizer, [t for t, c, _ in pieces if c == plain], plain=plain))
               for plain in (False, True)}
    input_ids: list[int] = []
    labels: list[int] = []
    for _, is_content, trained in pieces:
        ids = next(encoded[is_content])
        input_ids += ids
        labels += ids if trained else [IGNORE_INDEX] * len(ids)
    length = len(input_ids)
    status = "kept"
    if length > max_length:
        if truncation == "drop":
            return Encoded(None, "dropped", length,
                           f"{length} tokens > max-length {max_length}")
        input_ids, labels, status = input_ids[:max_length], labels[:max_length], "truncated"
    if all(label == IGNORE_INDEX for label in labels):
        return Encoded(None, "dropped", length,
                       f"no trained token within max-length {max_length}")
    return Encoded({"input_ids": input_ids, "labels": labels}, status, length)
