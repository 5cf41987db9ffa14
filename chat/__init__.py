"""InternVL-Chat on the project's InternViT: model, checkpoints, preprocessing, templates and SFT.

    from chat import load_chat_model, load_tokenizer, load_image
    model = load_chat_model('InternVL-Chat-V1-2', dtype='bfloat16').cuda()
    tokenizer = load_tokenizer('InternVL-Chat-V1-2', model)
    answer = model.chat(tokenizer, load_image('photo.jpg').cuda().bfloat16(), 'Describe the image.')

Training: ``tools/chat_sft.py`` (``chat.sft``). The vision model is ``backbones.InternViT``; nothing here copies it.
"""
from .checkpoint import (
    ChatCheckpointError,
    build_from_parts,
    build_language_model,
    load_chat_model,
    load_tokenizer,
    read_chat_config,
    read_projector,
    save_chat_model,
)
from .conversation import TEMPLATES, Conversation, ConversationTemplate, get_template
from .model import (
    IMAGE_PLACEHOLDER,
    IMG_CONTEXT_TOKEN,
    IMG_END_TOKEN,
    IMG_START_TOKEN,
    ChatSettings,
    InternVLChatModel,
    build_projector,
    pixel_shuffle,
)
from .preprocess import IMAGENET_MEAN, IMAGENET_STD, choose_grid, dynamic_tiles, load_image
from .tokenization import prepare_tokenizer

__all__ = ['InternVLChatModel', 'ChatSettings', 'pixel_shuffle', 'build_projector', 'load_chat_model',
           'save_chat_model', 'build_from_parts', 'build_language_model', 'load_tokenizer', 'read_chat_config',
           'ChatCheckpointError', 'read_projector', 'prepare_tokenizer', 'load_image', 'dynamic_tiles', 'choose_grid',
           'IMAGENET_MEAN', 'IMAGENET_STD', 'TEMPLATES', 'get_template', 'Conversation', 'ConversationTemplate',
           'IMG_START_TOKEN', 'IMG_END_TOKEN', 'IMG_CONTEXT_TOKEN', 'IMAGE_PLACEHOLDER']
