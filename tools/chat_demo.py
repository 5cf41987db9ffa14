"""Chat with an InternVL-Chat checkpoint about an image, or run the CPU quick start of the whole chat stack.

    # one question (or, without --question, one question per input line, keeping the conversation)
    python tools/chat_demo.py --model CHAT_DIR --image photo.jpg --question "Describe the image." \\
        [--dynamic --max-tiles 6] [--dtype bfloat16] [--device cuda] [--max-new-tokens 256]

    # CPU quick start, nothing downloaded: tiny random parts -> backbone export -> SFT -> chat
    python tools/chat_demo.py --tiny-quickstart work_dirs/chat_tiny [--steps 80]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split('\n\n', 1)[1])
    parser.add_argument('--model', help='InternVL-Chat checkpoint directory (with its tokenizer)')
    parser.add_argument('--image', help='image file (leave out for a text-only chat)')
    parser.add_argument('--question', help='the question; without it, questions are read from standard input')
    parser.add_argument('--dynamic', action='store_true', help='dynamic-resolution tiles (default: the model config)')
    parser.add_argument('--max-tiles', type=int, default=None, help='maximum tiles with --dynamic')
    parser.add_argument('--dtype', default=None, help='bfloat16, float16 or float32 (default: as stored)')
    parser.add_argument('--device', default=None, help='default: cuda where available, else cpu')
    parser.add_argument('--max-new-tokens', type=int, default=256)
    parser.add_argument('--tiny-quickstart', metavar='WORK_DIR', help='run the CPU quick start in WORK_DIR')
    parser.add_argument('--steps', type=int, default=80, help='SFT steps of the quick start')
    args = parser.parse_args(argv)
    if not args.tiny_quickstart and not args.model:
        parser.error('give --model CHAT_DIR (or --tiny-quickstart WORK_DIR)')
    args.device = args.device or ('cuda' if _cuda() else 'cpu')  # after --help: torch is imported here
    return args


def _cuda() -> bool:
    import torch
    return torch.cuda.is_available()


def chat_loop(args: argparse.Namespace) -> None:
    from chat import load_chat_model, load_image, load_tokenizer
    model = load_chat_model(args.model, dtype=args.dtype).to(args.device)
    tokenizer = load_tokenizer(args.model, model)
    pixel_values = None
    if args.image:
        s = model.settings
        dynamic = args.dynamic or s.dynamic_image_size
        pixel_values = load_image(args.image, model.image_size, dynamic, s.min_dynamic_patch,
                                  args.max_tiles or s.max_dynamic_patch, s.use_thumbnail)
        pixel_values = pixel_values.to(args.device, next(model.vision_model.parameters()).dtype)
        print(f'{args.image}: {pixel_values.shape[0]} tile(s) of {model.image_size}px', flush=True)
    generation = dict(max_new_tokens=args.max_new_tokens, do_sample=False)
    questions = [args.question] if args.question else (line.strip() for line in sys.stdin)
    history = None
    for question in questions:
        if not question:
            continue
        start = time.time()
        answer, history = model.chat(tokenizer, pixel_values, question, generation, history=history,
                                     return_history=True)
        print(f'Q: {question}\nA: {answer}\n({time.time() - start:.1f}s)', flush=True)


def tiny_quickstart(work_dir: str, steps: int) -> dict:
    """Tiny random backbone and LLM, the backbone written as an HF directory (what tools/export_to_chat.py
    writes), a synthetic coloured-squares SFT set, a short SFT from parts, then chat() on each image."""
    from backbones.writing import write_hf
    from chat import load_chat_model, load_image, load_tokenizer
    from chat.sft import main as sft_main
    from chat.tiny import COLOURS, build_tiny_parts, write_colour_dataset, write_tiny_llm

    work = Path(work_dir)
    if work.exists():
        raise FileExistsError(f'{work} already exists; choose a new work dir')
    backbone, _, _ = build_tiny_parts(seed=0)
    write_hf(backbone.state_dict(), backbone.arch, work / 'backbone', dtype='float32')
    write_tiny_llm(work / 'llm', seed=0)
    data = write_colour_dataset(work / 'data', copies=4)
    metrics = sft_main(['--vision_path', str(work / 'backbone'), '--llm_path', str(work / 'llm'),
                        '--data', str(data), '--output_dir', str(work / 'sft'), '--conv_style', 'plain',
                        '--max_steps', str(steps), '--per_device_train_batch_size', '8', '--learning_rate', '3e-3',
                        '--warmup_steps', '0', '--logging_steps', '10', '--save_strategy', 'no',
                        '--report_to', 'none', '--use_cpu', 'True', '--disable_tqdm', 'True', '--seed', '0'])
    model = load_chat_model(work / 'sft')
    tokenizer = load_tokenizer(work / 'sft', model)
    correct = 0
    for colour in COLOURS:
        pixels = load_image(work / 'data' / 'images' / f'{colour}.png', model.image_size)
        answer = model.chat(tokenizer, pixels, 'what colour is the square?', dict(max_new_tokens=12))
        correct += answer == f'the square is {colour}.'
        print(f'{colour:>6} square -> {answer!r}', flush=True)
    print(f'loss {metrics["first_logged_loss"]:.3f} -> {metrics["last_logged_loss"]:.3f} in {steps} steps; '
          f'{correct}/{len(COLOURS)} colours answered exactly; model in {work / "sft"}', flush=True)
    return dict(metrics, correct=correct)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.tiny_quickstart:
        tiny_quickstart(args.tiny_quickstart, args.steps)
    else:
        chat_loop(args)
    return 0


if __name__ == '__main__':
    sys.exit(main())
