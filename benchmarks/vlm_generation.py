"""Cost of ``explain_generation`` on a vision-language model against one ``explain`` per token.

A LLaVA-shaped model with random weights (CLIP vision tower on 224-pixel images in 14-pixel
patches, 256 image tokens, two-layer projector, a SmolLM2-sized Llama cut to 8 layers) explains a
16-token continuation of a prompt with one image. ``explain_generation`` runs one forward pass of
prompt, image and continuation and batched backward passes that return, for every generated token,
the relevance of the prompt's tokens and of the image's pixels; the loop runs ``explain`` once per
generated token on the growing sequence, with the image each time. Written to
``benchmarks/results/vlm_generation.md`` (time ratios in one run; lower is better).

    python benchmarks/vlm_generation.py [--new-tokens 16] [--repeats 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import datetime
from pathlib import Path

import torch
import transformers as tf
from _provenance import code_version
from generation import timed  # this folder is on the path when the script runs

import lxt_plus

ROOT = Path(__file__).resolve().parents[1]
IMAGE_TOKEN = 49_000


def build() -> torch.nn.Module:
    text = {
        "model_type": "llama",
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 8,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "vocab_size": 49_152,
        "max_position_embeddings": 2048,
        "tie_word_embeddings": True,
    }
    vision = {
        "model_type": "clip_vision_model",
        "hidden_size": 384,
        "intermediate_size": 1536,
        "num_hidden_layers": 6,
        "num_attention_heads": 6,
        "image_size": 224,
        "patch_size": 14,
    }
    cfg = tf.LlavaConfig(text_config=text, vision_config=vision, image_token_id=IMAGE_TOKEN)
    torch.manual_seed(0)
    return tf.LlavaForConditionalGeneration(cfg).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rules", default="attnlrp")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "vlm_generation.md"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = build()
    n_image = (224 // 14) ** 2
    gen = torch.Generator().manual_seed(1)
    ids = torch.cat(
        [
            torch.randint(100, 40_000, (8,), generator=gen),
            torch.full((n_image,), IMAGE_TOKEN),
            torch.randint(100, 40_000, (16,), generator=gen),
        ]
    )
    pixels = torch.randn(1, 3, 224, 224, generator=gen)
    cont = torch.randint(100, 40_000, (args.new_tokens,), generator=gen)
    prompt = {"input_ids": ids[None], "pixel_values": pixels}

    def matrix() -> object:
        return lxt_plus.explain_generation(model, None, prompt, continuation=cont, rules=args.rules)

    def loop() -> object:
        full = torch.cat([ids, cont])
        for t in range(args.new_tokens):
            lxt_plus.explain(
                model,
                {"input_ids": full[None, : ids.numel() + t], "pixel_values": pixels},
                target=int(cont[t]),
                rules=args.rules,
            )
        return None

    def forward() -> object:
        with torch.no_grad():
            return model(input_ids=torch.cat([ids, cont[:-1]])[None], pixel_values=pixels, logits_to_keep=1)

    t_forward = timed(forward, args.repeats)
    t_matrix = timed(matrix, args.repeats)
    t_loop = timed(loop, max(1, args.repeats - 1))
    version = code_version()
    rows = [
        "# Vision-language generation matrix against the per-token loop",
        "",
        f"Written by `python benchmarks/vlm_generation.py` on {datetime.date.today().isoformat()} "
        f"(lxt_plus {version}, torch {torch.__version__}, {torch.get_num_threads()} threads, CPU, float32, "
        f"preset {args.rules}). A LLaVA-shaped model with random weights: CLIP tower (6 layers, 384 wide) on "
        f"a 224-pixel image, {n_image} image tokens, Llama of SmolLM2's width cut to 8 layers; "
        f"{ids.numel()} prompt tokens with the image, {args.new_tokens} generated tokens explained. "
        "Median of the repeats.",
        "",
        "| what | seconds | ÷ no-grad forward | ÷ per-token loop |",
        "|---|---:|---:|---:|",
        f"| no-grad forward (prompt + continuation) | {t_forward:.2f} | 1.00 | |",
        f"| `explain_generation` (tokens and pixels, every row) | {t_matrix:.2f} | {t_matrix / t_forward:.2f} "
        f"| **{t_matrix / t_loop:.2f}** |",
        f"| `explain` once per generated token | {t_loop:.2f} | {t_loop / t_forward:.2f} | 1.00 |",
        "",
    ]
    Path(args.out).write_text("\n".join(rows))
    print("\n".join(rows))


if __name__ == "__main__":
    main()
