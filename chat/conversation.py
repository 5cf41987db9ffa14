"""Conversation templates: how a dialogue becomes the prompt text the language model sees.

Two templates:

* ``Hermes-2`` -- the ChatML-style template of InternVL-Chat-V1-2 (LLM: Nous-Hermes-2-Yi-34B). Every turn is
  ``<|im_start|>{role}\\n{text}<|im_end|>`` with no newline between turns, the system prompt first::

      <|im_start|>system\\n{system}<|im_end|><|im_start|>user\\n{q}<|im_end|><|im_start|>assistant\\n{a}<|im_end|>

  Generation stops at ``<|im_end|>``. No BOS token is added (the published V1-2 preprocessing does not).
* ``plain`` -- no system prompt and no role markers, each turn followed by ``\\n`` (LLaVA's 'plain' style, used to
  train the projector on captions: ``<image>\\n`` + caption). Generation stops at the newline.

``Conversation.segments()`` is the single place that lays out a dialogue; the SFT dataset uses its
``(text, is_target)`` pieces for label masking and ``chat()`` uses ``prompt()`` for generation, so training and
inference cannot drift apart.
"""
from __future__ import annotations

from dataclasses import dataclass, field

# The system prompt of the published Hermes-2 template (InternVL-Chat-V1-2), kept verbatim: the model was trained
# with it, and benchmark numbers depend on it.
HERMES2_SYSTEM_MESSAGE = ('你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, '
                          '是一个有用无害的人工智能助手。')


@dataclass(frozen=True)
class ConversationTemplate:
    """The text layout of one chat format.

    Args:
        name: the name config.json's ``template`` field uses.
        system_template: the system prompt, with ``{system_message}`` where the message goes ('' for none).
        system_message: the default system message.
        roles: the text that opens a user turn and an assistant turn.
        sep: the text that closes every turn (and the system prompt).
        stop_str: the text at which a generated answer ends (the closing ``sep``), or None when the answer runs
            until the tokenizer's end-of-sequence token.
        special_tokens: tokens the tokenizer must hold as single special tokens for this template.
    """

    name: str
    system_template: str
    system_message: str
    roles: tuple[str, str]
    sep: str
    stop_str: str | None
    special_tokens: tuple[str, ...] = ()

    def conversation(self, system_message: str | None = None) -> 'Conversation':
        return Conversation(self, self.system_message if system_message is None else system_message)


TEMPLATES: dict[str, ConversationTemplate] = {
    'Hermes-2': ConversationTemplate(
        name='Hermes-2',
        system_template='<|im_start|>system\n{system_message}',
        system_message=HERMES2_SYSTEM_MESSAGE,
        roles=('<|im_start|>user\n', '<|im_start|>assistant\n'),
        sep='<|im_end|>',
        stop_str='<|im_end|>',
        special_tokens=('<|im_start|>', '<|im_end|>'),
    ),
    'plain': ConversationTemplate(
        name='plain',
        system_template='',
        system_message='',
        roles=('', ''),
        sep='\n',
        stop_str='\n',
    ),
}


def get_template(name: str) -> ConversationTemplate:
    try:
        return TEMPLATES[name]
    except KeyError:
        raise KeyError(f'unknown conversation template {name!r}; known templates: {", ".join(TEMPLATES)}') from None


USER, ASSISTANT = 0, 1


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

    def segments(self) -> list[tuple[str, bool]]:
        """The prompt as ``(text, is_target)`` pieces; targets are assistant answers with their closing ``sep``.

        The assistant role marker is not a target (the model is given it), the closing ``sep`` is (the model
        must learn to end its answer).
        """
        t = self.template
        pieces: list[tuple[str, bool]] = []
        if t.system_template:
            pieces.append((t.system_template.format(system_message=self.system_message) + t.sep, False))
        for role, text in self.messages:
            if role == USER:
                if text is None:
                    raise ValueError('a user turn needs text')
                pieces.append((t.roles[USER] + text + t.sep, False))
            else:
                if t.roles[ASSISTANT]:
                    pieces.append((t.roles[ASSISTANT], False))
                if text is not None:
                    pieces.append((text + t.sep, True))
        return pieces

    def prompt(self) -> str:
        return ''.join(text for text, _ in self.segments())

    def clean_answer(self, generated: str) -> str:
        """A decoded generation cut at the template's stop text and stripped."""
        stop = self.template.stop_str
        if stop:
            generated = generated.split(stop, 1)[0]
        return generated.strip()
