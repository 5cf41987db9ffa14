"""Conversation templates: how a dialogue becomes the prompt text the language model sees.

The templates of the published InternVL-Chat, rendered byte for byte as its ``Conversation.get_prompt``:

* ``internvl_zh`` (InternVL-Chat-V1-1, LLaMA-2 tokenizer)::

      {system} <human>: {q1} <bot>: {a1}</s><human>: {q2} <bot>:

  (empty system message: the prompt starts with one space). Generation stops at ``</s>``.
* ``Hermes-2`` (V1-2 / V1-2-Plus, Nous-Hermes-2-Yi-34B) and ``internlm2-chat`` (V1-5, InternLM2): ChatML with no
  newline between turns, the system prompt first::

      <|im_start|>system\\n{system}<|im_end|><|im_start|>user\\n{q}<|im_end|><|im_start|>assistant\\n{a}<|im_end|>

  The two differ only in training: the published ``internlm2-chat`` preprocessing strips every message and its
  tokenizer adds ``<s>``. ``phi3-chat`` is the same layout with ``<|system|>\\n``, ``<|user|>\\n``,
  ``<|assistant|>\\n`` and ``<|end|>``; ``internvl2_5`` closes every turn with ``<|im_end|>\\n``.
* ``plain``: no system prompt and no role markers, each turn followed by ``\\n`` (captions for projector training).

As published, a message that is empty (or None, the turn to be generated) contributes its role marker only,
without the closing separator, also inside a history. Generation stops at the separator token
(``sep.strip()``), which ``chat()`` passes as the only ``eos_token_id``.

``Conversation.render()`` is the single place that lays out a dialogue: it returns the text and, for SFT, the
character spans of the supervised text (each answer with its closing separator; ``internvl_zh`` includes the space
in front of the answer, as the published V1-1 preprocessing does). ``chat.data`` turns those spans into label
positions; ``chat()`` uses ``prompt()``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

# The system prompt of the published Hermes-2 / internlm2-chat / phi3-chat templates, verbatim: the models were
# trained with it, and benchmark numbers depend on it.
INTERNVL_SYSTEM_MESSAGE = ('你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, '
                           '是一个有用无害的人工智能助手。')
HERMES2_SYSTEM_MESSAGE = INTERNVL_SYSTEM_MESSAGE
INTERNVL2_5_SYSTEM_MESSAGE = ('你是书生·万象，英文名是InternVL，'  # the published text, split only for line length
                              '是由上海人工智能实验室、清华大学及多家合作单位联合开发的'
                              '多模态大语言模型。')

STYLES = ('chatml', 'internvl_zh')


@dataclass(frozen=True)
class ConversationTemplate:
    """The text layout of one chat format.

    Args:
        name: the name config.json's ``template`` field uses.
        system_template: the system prompt, with ``{system_message}`` where the message goes.
        system_message: the default system message.
        roles: the text that opens a user turn and an assistant turn.
        sep: the text that closes every turn ('chatml') or every answer ('internvl_zh').
        style: 'chatml' (published ``SeparatorStyle.MPT``) or 'internvl_zh'.
        question_sep: 'internvl_zh' only: the text that closes a question.
        strip_messages: SFT strips every message first (the published ``preprocess_internlm``).
        per_message_tokens: SFT tokenizes each message on its own and concatenates the ids (the published
            ``preprocess_internvl2_5``); otherwise the whole rendered conversation is tokenized once.
        turns_as_given: SFT (published record rules) takes a record's turns as they come, a leading ``system`` turn
            as the system message (the published ``preprocess_internvl2_5``); otherwise, as the other published
            ``preprocess*`` functions, a leading answer is dropped, turns must alternate and a ``system`` turn
            makes the record bad.
        special_tokens: tokens the tokenizer must hold as single special tokens for this template.
    """

    name: str
    system_template: str
    system_message: str
    roles: tuple[str, str]
    sep: str
    style: str = 'chatml'
    question_sep: str = ''
    strip_messages: bool = False
    per_message_tokens: bool = False
    turns_as_given: bool = False
    special_tokens: tuple[str, ...] = ()

    def __post_init__(self):
        if self.style not in STYLES:
            raise ValueError(f'template {self.name}: style must be one of {STYLES}, got {self.style!r}')

    @property
    def stop_str(self) -> str:
        """The text at which a generated answer ends: the separator token (``sep.strip()``, as published), or the
        separator itself when it is only whitespace ('plain': a newline)."""
        return self.sep.strip() or self.sep

    def conversation(self, system_message: str | None = None) -> 'Conversation':
        return Conversation(self, self.system_message if system_message is None else system_message)


_CHATML_TOKENS = ('<|im_start|>', '<|im_end|>')
TEMPLATES: dict[str, ConversationTemplate] = {t.name: t for t in (
    ConversationTemplate('internvl_zh', system_template='', system_message='', roles=('<human>', '<bot>'),
                         sep='</s>', style='internvl_zh', question_sep=' '),
    ConversationTemplate('Hermes-2', system_template='<|im_start|>system\n{system_message}',
                         system_message=INTERNVL_SYSTEM_MESSAGE,
                         roles=('<|im_start|>user\n', '<|im_start|>assistant\n'), sep='<|im_end|>',
                         special_tokens=_CHATML_TOKENS),
    ConversationTemplate('internlm2-chat', system_template='<|im_start|>system\n{system_message}',
                         system_message=INTERNVL_SYSTEM_MESSAGE,
                         roles=('<|im_start|>user\n', '<|im_start|>assistant\n'), sep='<|im_end|>',
                         strip_messages=True, special_tokens=_CHATML_TOKENS),
    ConversationTemplate('phi3-chat', system_template='<|system|>\n{system_message}',
                         system_message=INTERNVL_SYSTEM_MESSAGE, roles=('<|user|>\n', '<|assistant|>\n'),
                         sep='<|end|>', special_tokens=('<|system|>', '<|user|>', '<|assistant|>', '<|end|>')),
    ConversationTemplate('internvl2_5', system_template='<|im_start|>system\n{system_message}',
                         system_message=INTERNVL2_5_SYSTEM_MESSAGE,
                         roles=('<|im_start|>user\n', '<|im_start|>assistant\n'), sep='<|im_end|>\n',
                         per_message_tokens=True, turns_as_given=True, special_tokens=_CHATML_TOKENS),
    ConversationTemplate('plain', system_template='', system_message='', roles=('', ''), sep='\n'),
)}


def get_template(name: str) -> ConversationTemplate:
    try:
        return TEMPLATES[name]
    except KeyError:
        raise KeyError(f'unknown conversation template {name!r}; known templates: {", ".join(TEMPLATES)}') from None


USER, ASSISTANT = 0, 1


@dataclass
class Block:
    """A piece of rendered text that is tokenized on its own, with the character spans of supervised text."""

    text: str
    targets: list[tuple[int, int]] = field(default_factory=list)


@dataclass
class Conversation:
    """A dialogue in one template: a list of ``(role index, text)``; text None is the turn to be generated."""

    template: ConversationTemplate
    system_message: str
    messages: list[tuple[int, str | None]] = field(default_factory=list)

    def append(self, role: int, text: str | None) -> 'Conversation':
        if role not in (USER, ASSISTANT):
            raise ValueError(f'role must be 0 (user) or 1 (assistant), got {role!r}')
        self.messages.append((role, text))
        return self

    def blocks(self) -> list[Block]:
        """The rendered dialogue as blocks (one, unless the template tokenizes each message on its own)."""
        t = self.template
        if t.style == 'internvl_zh':
            return [self._internvl_zh()]
        blocks = [Block(t.system_template.format(system_message=self.system_message) + t.sep)] \
            if t.system_template else []
        for role, text in self.messages:
            block = Block(t.roles[role])
            if text:
                block.text += text
                if role == ASSISTANT:
                    # the answer and its closing separator (per-message templates: chat.data._encode_per_message
                    # ends the labels as the published preprocess_internvl2_5 does, before the message's last token)
                    block.targets.append((len(t.roles[role]), len(block.text) + len(t.sep)))
                block.text += t.sep
            blocks.append(block)
        return blocks if t.per_message_tokens else [_join(blocks)]

    def _internvl_zh(self) -> Block:
        t = self.template
        block = Block(self.system_message + t.question_sep)
        for role, text in self.messages:
            if not text:
                block.text += t.roles[role] + ':'
                continue
            block.text += t.roles[role] + ':'
            start = len(block.text)  # the published V1-1 labels begin with the space before the answer
            block.text += ' ' + text + (t.question_sep if role == USER else t.sep)
            if role == ASSISTANT:
                block.targets.append((start, len(block.text)))
        return block

    def prompt(self) -> str:
        return ''.join(b.text for b in self.blocks())

    def clean_answer(self, generated: str) -> str:
        """A decoded generation cut at the template's stop text and stripped (as the published ``chat()``)."""
        stop = self.template.stop_str
        if stop:
            generated = generated.split(stop, 1)[0]
        return generated.strip()


def _join(blocks: list[Block]) -> Block:
    out = Block('')
    for b in blocks:
        out.targets += [(s + len(out.text), e + len(out.text)) for s, e in b.targets]
        out.text += b.text
    return out
